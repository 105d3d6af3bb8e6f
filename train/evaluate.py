#!/usr/bin/env python
"""Score an SD-style pipeline folder on an image-caption validation set with an evaluation network (issue 7).

    python train/evaluate.py --model models/emoji-teacher --data data/emoji            # the teacher: 25 steps, CFG 4
    python train/evaluate.py --model outputs/one-step/final --data data/emoji \\
        --eval_tower models/emoji-teacher/eval_tower --steps 1 --guidance 0             # a one-step student

The evaluation network is the CLIPModel the teacher script trains next to its text encoder (its image
tower saw the same data; MODEL/eval_tower by default). With it, on the --data val split:

- retrieval: top-1 / top-5 image->caption accuracy over all val captions (a duplicate caption counts as
  a hit), for the real val images, the VAE's reconstructions and the model's samples for the same captions;
- FD: the Frechet distance between Gaussians fitted to the network's projected image embeddings of a set
  and of the real val images (FID's formula, Heusel et al. 2017, in this network's feature space); the
  floor is FD(real train images, real val images) with the same count;
- the VAE's reconstruction error on val (PSNR, mean absolute error in 8-bit levels).

Samples come from plain diffusers (`StableDiffusionPipeline.from_pretrained(MODEL)`, its own scheduler),
one seeded generator per image (--seed + index), so the batch size does not change them.
Writes OUT/metrics.json and OUT/samples.png (real val images above the model's samples, captions below);
OUT defaults to MODEL/eval.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an SD pipeline folder (model_index.json, unet/, vae/, ...)")
    parser.add_argument("--data", required=True, help="an imagefolder with train/ and val/ (train/emoji_data.py's output)")
    parser.add_argument("--eval_tower", help="CLIPModel folder of the evaluation network (default MODEL/eval_tower)")
    parser.add_argument("--out", help="where metrics.json and samples.png go (default MODEL/eval)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale; <= 1 turns it off (default 4)")
    parser.add_argument("--num_images", type=int, default=0, help="first N val images only; 0 = all (default)")
    parser.add_argument("--batch_size", type=int, default=64, help="captions per sampling batch (default 64)")
    parser.add_argument("--grid", type=int, default=16, help="captions in samples.png, spread over val (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption_column", default="text", help="caption key in metadata.jsonl (default 'text')")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    return parser


# --- the metrics (reused by the later stages' evaluations) ---------------------------------------


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of Gaussians fitted to two feature
    sets (N, D). The trace of the matrix square root is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S_a^1/2 S_b S_a^1/2: exact in float64, no scipy needed."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return max(0.0, float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross))  # >= 0 up to rounding


def _embeddings(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object, 4 a tensor


@torch.no_grad()
def image_embeddings(tower, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Projected image embeddings (N, projection_dim) of images in [-1, 1], as the tower was trained on them.
    Images of another side than the tower's (a 128 px model scored by the 64 px v1 tower) are resized to it
    first (bilinear, antialiased)."""
    side = tower.config.vision_config.image_size

    def fit(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.float()
        if batch.shape[-2:] != (side, side):
            batch = torch.nn.functional.interpolate(batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return batch

    return torch.cat([_embeddings(tower.get_image_features(pixel_values=fit(images[i : i + batch_size])))
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def text_embeddings(tower, tokenizer, captions: list[str], batch_size: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(captions[i : i + batch_size], padding="longest", max_length=77, truncation=True, return_tensors="pt").input_ids
        out.append(_embeddings(tower.get_text_features(input_ids=ids)))
    return torch.cat(out)


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], k: int = 1) -> float:
    """Top-k image->caption retrieval: image i hits when one of its k most similar captions (cosine) is
    caption i's text (so an identical caption elsewhere also counts). Chance is about k / N."""
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices.tolist()
    return sum(any(captions[j] == captions[i] for j in row) for i, row in enumerate(top)) / len(captions)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """An AutoencoderKL's decode(posterior mean) of images in [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(images[i : i + batch_size]).latent_dist.mean).sample for i in range(0, len(images), batch_size)])


# --- data, sampling, grid ------------------------------------------------------------------------


def load_split(folder: Path, caption_column: str, resolution: int, limit: int = 0, pick_seed: int | None = None
               ) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Images in [-1, 1] (N, 3, R, R), captions, and the metadata rows of an imagefolder split: the first
    `limit` usable entries (0 = all), or with `pick_seed` that many drawn at random; only those images are
    loaded (read_sources decodes each image once to skip bad ones)."""
    from train import common

    source = common.read_sources(None, str(folder), caption_column, None, 0)  # skips (and reports) unusable records
    rows = source.records
    keep = list(range(len(rows)))
    if pick_seed is not None:
        keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(pick_seed)).tolist()
    keep = keep[:limit] if limit else keep
    images = torch.stack([common.load_image(source.images[i], resolution) for i in keep])
    return images, [source.prompts[i] for i in keep], [rows[i] for i in keep]


@torch.no_grad()
def sample(pipe, captions: list[str], *, steps: int, guidance: float, seed: int, batch_size: int,
           control: torch.Tensor | None = None, control_scale: float = 1.0) -> torch.Tensor:
    """The pipeline's images (N, 3, H, W) in [-1, 1]; image i uses generator seed + i. With `control`
    ((N, 3, H, W) in [0, 1]; a ControlNet pipeline), image i is drawn from control i at `control_scale`."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(captions), batch_size), desc="sampling", unit="batch"):
        chunk = captions[i : i + batch_size]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        controlnet = {} if control is None else {"image": control[i : i + batch_size], "controlnet_conditioning_scale": control_scale}
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt", **controlnet).images
        out.append(images * 2 - 1)
    return torch.cat(out)


def label(row: dict, caption: str) -> str:
    """A short caption for the grid: the emoji name, skin tone and style when the metadata has them
    (accents dropped: the grid's small bitmap font is ASCII)."""
    import unicodedata

    from train.emoji_data import skin_tone_words

    text = caption
    if row.get("name"):
        tone = skin_tone_words(row.get("skin_tone"))
        text = row["name"].lower() + (f", {tone}" if tone else "") + (f" ({row['style']})" if row.get("style") else "")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def save_comparison_grid(real: torch.Tensor, generated: torch.Tensor, labels: list[str], path: Path, *, columns: int = 8,
                         scale: int = 2) -> Path:
    """Blocks of `columns` captions: a row of real images, a row of samples, then the wrapped captions."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from train import common

    side = real.shape[-1] * scale
    font = ImageFont.load_default(size=11)
    wrap = max(8, side // 6)
    text_h = 4 * 13 + 6
    blocks = math.ceil(len(labels) / columns)
    canvas = Image.new("RGB", (columns * (side + 4) + 60, blocks * (2 * side + text_h + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    to_pil = lambda x: Image.fromarray(common.to_uint8(x).permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST)
    for i, text in enumerate(labels):
        block, col = divmod(i, columns)
        x, y = 60 + col * (side + 4), block * (2 * side + text_h + 8)
        canvas.paste(to_pil(real[i]), (x, y))
        canvas.paste(to_pil(generated[i]), (x, y + side))
        draw.multiline_text((x, y + 2 * side + 3), "\n".join(textwrap.wrap(text, wrap)[:4]), fill="black", font=font, spacing=2)
        if col == 0:
            draw.text((4, y + side // 2 - 6), "real", fill="black", font=font)
            draw.text((4, y + side + side // 2 - 6), "model", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# --- the command ---------------------------------------------------------------------------------


def evaluate(args) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    model_dir, data_dir = Path(args.model), Path(args.data)
    tower_dir = Path(args.eval_tower) if args.eval_tower else model_dir / "eval_tower"
    out_dir = Path(args.out) if args.out else model_dir / "eval"
    if not (model_dir / "model_index.json").is_file():
        raise SystemExit(f"{model_dir} is not a pipeline folder (no model_index.json): pass the folder a train/ script saved.")
    if not (tower_dir / "config.json").is_file():
        raise SystemExit(f"{tower_dir} holds no evaluation network (no config.json): pass --eval_tower, e.g. models/emoji-teacher/eval_tower.")
    for split in ("train", "val"):
        if not (data_dir / split / "metadata.jsonl").is_file():
            raise SystemExit(f"{data_dir / split} is not an imagefolder: --data takes the folder `python train/emoji_data.py --out DIR` writes.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tower = CLIPModel.from_pretrained(tower_dir, torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tower_dir if (tower_dir / "tokenizer_config.json").is_file() else model_dir / "tokenizer")
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor

    val, captions, rows = load_split(data_dir / "val", args.caption_column, resolution, limit=args.num_images)
    train_images, _, _ = load_split(data_dir / "train", args.caption_column, resolution, limit=len(val), pick_seed=args.seed)
    print(f"{len(val)} val images at {resolution} px; evaluation network {tower_dir}", file=sys.stderr)

    text = text_embeddings(tower, tokenizer, captions)
    real = image_embeddings(tower, val)

    def scores(emb: torch.Tensor) -> dict:
        return {"top1": round(retrieval_accuracy(emb, text, captions, 1), 4), "top5": round(retrieval_accuracy(emb, text, captions, 5), 4),
                "fd": round(frechet_distance(emb, real), 3)}

    metrics = {"model": str(model_dir), "eval_tower": str(tower_dir), "data": str(data_dir), "n_val": len(val), "resolution": resolution,
               "chance_top1": round(1 / len(val), 4), "real_val": scores(real),
               "real_train_vs_val": {"fd": round(frechet_distance(image_embeddings(tower, train_images), real), 3)}}  # other captions: FD only

    if type(pipe.vae).__name__ == "AutoencoderKL":  # a tiny decoder's encoder is not ours to score
        recon = reconstruct(pipe.vae, val)
        metrics["vae"] = {"psnr_db": round(psnr_db(recon, val), 2),
                          "mae_8bit": round(F.l1_loss(recon.clamp(-1, 1), val).item() * 127.5, 2), **scores(image_embeddings(tower, recon))}

    generated = sample(pipe, captions, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    metrics["samples"] = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "scheduler": type(pipe.scheduler).__name__,
                          **scores(image_embeddings(tower, generated))}
    metrics["seconds"] = round(time.perf_counter() - started, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shown = torch.linspace(0, len(val) - 1, min(args.grid, len(val))).round().long().tolist()
    save_comparison_grid(val[shown], generated[shown], [label(rows[i], captions[i]) for i in shown], out_dir / "samples.png")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1; got {getattr(args, name)}.")
    metrics = evaluate(args)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
