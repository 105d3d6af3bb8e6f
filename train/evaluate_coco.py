#!/usr/bin/env python
"""The SDXS paper's evaluation (Table 3): FID and CLIP score on MS-COCO 2017 val, 5K captions.

    python train/evaluate_coco.py --model IDKiro/sdxs-512-dreamshaper --coco data/coco --out outputs/coco-sdxs
    python train/evaluate_coco.py --model models/mini-sdxs --coco DIR --out OUT --num_images 100 --backend torch

What it needs (all checked before any image is generated; every missing piece is listed at once, with
where to get it):
- --coco DIR: DIR/annotations/captions_val2017.json and DIR/val2017/*.jpg (5,000 images): unzip
  val2017.zip and annotations_trainval2017.zip from cocodataset.org (images.cocodataset.org/zips/val2017.zip,
  images.cocodataset.org/annotations/annotations_trainval2017.zip) into DIR.
- --model: an SDXS pipeline folder or hub id, run through sdxs.SDXSEngine in one step at its native size,
  without guidance, as users run it (a multi-step pipeline is refused by the engine).
- --inception_weights: the FID Inception weights file (train/fid_inception.py says which and where from);
  by default the one torchmetrics / torch-fidelity / pytorch-fid keep in the torch hub cache.
- --clip: a transformers CLIPModel, hub id or folder (default openai/clip-vit-large-patch14, the ViT-L/14
  torchmetrics' CLIPScore uses by default; the paper does not say which CLIP it used, so compare CLIP
  scores only between rows measured with the same model).

Protocol:
- captions: the images of captions_val2017.json sorted by image id, the first --num_images of them, each
  with its first caption (the lowest annotation id): one caption per image, the same on every run.
- generation: image i from caption i with seed --seed + i (batching does not change an image).
- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the 2048 pool_3 features of the
  TensorFlow FID Inception (train/fid_inception.py) of the generated images and of the real images of the
  same captions. A real image is centre-cropped to a square and resized (PIL bicubic) to the generated
  size; both sets then go through the network's own resize to 299 x 299. Features and the distance in
  float64 (train/evaluate.py's frechet_distance).
- CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore computes it): max(100 * mean_i cos(E_image_i,
  E_caption_i), 0), the image through the CLIP model's own preprocessing, the caption cut to 77 tokens.

Writes OUT/metrics.json (the numbers, settings and protocol) and OUT/metrics.md (one markdown table row);
--save_images also keeps every generated image as OUT/images/IMAGE_ID.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from sdxs.engine import BACKENDS
from sdxs.registry import DEFAULT_MODEL

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CAPTIONS_FILE = Path("annotations") / "captions_val2017.json"
IMAGES_DIR = "val2017"
COCO_HOW_TO = (
    "Expected layout: DIR/annotations/captions_val2017.json and DIR/val2017/*.jpg (5,000 images). Get them where you "
    "have network: download images.cocodataset.org/zips/val2017.zip (778 MB) and "
    "images.cocodataset.org/annotations/annotations_trainval2017.zip (241 MB) and unzip both into DIR."
)
MAX_BATCH = 16  # the engine's limit on images per call


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/evaluate_coco.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- what to evaluate, on what ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"SDXS pipeline folder or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--coco", required=True, help="COCO folder with annotations/captions_val2017.json and val2017/")
    parser.add_argument("--out", required=True, help="folder for metrics.json, metrics.md (and images/ with --save_images)")
    parser.add_argument("--num_images", type=int, default=5000, help="captions (= generated and real images), at least 2 (default 5000)")
    parser.add_argument("--inception_weights", default=None, help="FID Inception weights file (default: the torch hub cache's)")
    parser.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIPModel hub id or folder for the CLIP score (default {DEFAULT_CLIP})")
    # --- sampling ---
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--batch_size", type=int, default=8, help=f"images per batch, 1..{MAX_BATCH} (default 8)")
    parser.add_argument("--decoder", default=None, choices=["tiny", "large"], help="SDXS image decoder (default: the model's fastest)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="generator dtype (default fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS), help="SDXS engine backend (default auto: OpenVINO on a CPU when installed)")
    parser.add_argument("--save_images", action="store_true", help="keep the generated images in OUT/images/")
    return parser


class MissingInput(ValueError):
    """An input of the evaluation is missing or unusable; the message says what to do."""


# --- COCO captions and images --------------------------------------------------------------------


@dataclass(frozen=True)
class CocoItem:
    image_id: int
    path: Path
    caption: str


def read_coco_val(folder: str | Path, num_images: int) -> list[CocoItem]:
    """The first `num_images` val images by image id, each with its first caption (lowest annotation id)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingInput(f"COCO folder '{folder}' does not exist. {COCO_HOW_TO}")
    captions_path, images_dir = folder / CAPTIONS_FILE, folder / IMAGES_DIR
    missing = ([] if captions_path.is_file() else [str(captions_path)]) + ([] if images_dir.is_dir() else [f"{images_dir}/"])
    if missing:
        raise MissingInput(f"COCO folder '{folder}' lacks {' and '.join(missing)}. {COCO_HOW_TO}")
    try:
        data = json.loads(captions_path.read_text(encoding="utf-8"))
        files = {int(image["id"]): image["file_name"] for image in data["images"]}
        first_caption: dict[int, tuple[int, str]] = {}
        for note in data["annotations"]:
            image_id, note_id = int(note["image_id"]), int(note["id"])
            if image_id in files and (image_id not in first_caption or note_id < first_caption[image_id][0]):
                first_caption[image_id] = (note_id, " ".join(str(note["caption"]).split()))
    except (ValueError, KeyError, TypeError) as err:
        raise MissingInput(f"{captions_path} is not a COCO captions file ({type(err).__name__}: {err}); download it again. {COCO_HOW_TO}") from None
    ids = sorted(first_caption)
    if num_images > len(ids):
        raise MissingInput(f"{captions_path} has {len(ids)} captioned images; --num_images {num_images} asks for more. Use at most {len(ids)}.")
    items = [CocoItem(i, images_dir / files[i], first_caption[i][1]) for i in ids[:num_images]]
    absent = [item.path.name for item in items if not item.path.is_file()]
    if absent:
        raise MissingInput(f"{len(absent)} of the {num_images} images are missing from {images_dir}/ (e.g. {', '.join(absent[:3])}). {COCO_HOW_TO}")
    return items


def real_image(path: Path, size: int) -> Image.Image:
    """A real image as compared with the generated ones: centre-cropped to a square, resized to size x size."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> uint8 (N, 3, H, W), the FID network's input."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2).contiguous()


# --- the metrics ---------------------------------------------------------------------------------


@dataclass
class ClipModel:
    model: torch.nn.Module
    tokenizer: object
    processor: object
    device: torch.device

    @torch.no_grad()
    def cosines(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        """cos(E_image_i, E_caption_i) for each pair (N,)."""
        from train.evaluate import _embeddings

        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        ids = self.tokenizer(captions, padding=True, truncation=True, max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt")
        image_emb = _embeddings(self.model.get_image_features(pixel_values=pixels)).float()
        text_emb = _embeddings(self.model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                                            attention_mask=ids.attention_mask.to(self.device))).float()
        return torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1).cpu()


def clip_score(cosines: torch.Tensor) -> float:
    """torchmetrics' CLIPScore: max(100 * mean cosine, 0)."""
    return max(0.0, 100 * float(cosines.double().mean()))


def fid(generated: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two sets of pool_3 features (N, 2048)."""
    from train.evaluate import frechet_distance

    return frechet_distance(generated, real)


# --- loading everything, or saying all that is missing ------------------------------------------


def clip_folder(name: str) -> Path:
    """The local folder of a CLIP model: `name` itself, or its hub snapshot (downloaded when online)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise MissingInput(f"CLIP model folder '{name}' does not exist; give a folder or a hub id such as {DEFAULT_CLIP}.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as err:  # offline and not cached, unknown repo, network down
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingInput(f"CLIP model '{name}' is not in the Hugging Face cache and could not be downloaded ({type(err).__name__}: {first}). "
                           f"Download it once where you have network (`hf download {name} --local-dir DIR`) and pass --clip DIR.") from None


def load_clip(name: str, device: torch.device) -> ClipModel:
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # needs no torchvision

    folder = clip_folder(name)
    need = ["config.json", "preprocessor_config.json", "tokenizer_config.json"]
    absent = [n for n in need if not (folder / n).is_file()] + ([] if list(folder.glob("*.safetensors")) else ["model.safetensors"])
    if absent:
        raise MissingInput(f"CLIP model '{name}' ({folder}) lacks {', '.join(absent)}: give a transformers CLIPModel folder "
                           f"with its tokenizer and image processor (as openai/clip-vit-large-patch14 ships them).")
    try:
        model = CLIPModel.from_pretrained(folder).to(device).eval()
        return ClipModel(model, CLIPTokenizer.from_pretrained(folder), CLIPImageProcessorPil.from_pretrained(folder), device)
    except (OSError, ValueError) as err:
        raise MissingInput(f"CLIP model '{name}' ({folder}) could not be loaded: {err}") from None


def load_engine(args):
    """The SDXS engine as users run it (one step, no guidance), and the decoder to use."""
    from sdxs import SDXSEngine

    engine = SDXSEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    decoder = args.decoder or engine.default_decoder
    if decoder not in engine.decoders:
        raise MissingInput(f"--decoder {decoder}: '{args.model}' has only {', '.join(engine.decoders)}.")
    return engine, decoder


def check_arguments(args) -> None:
    if args.num_images < 2:
        raise SystemExit(f"error: --num_images must be at least 2 (FID fits a covariance); got {args.num_images}.")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise SystemExit(f"error: --batch_size must be from 1 to {MAX_BATCH}; got {args.batch_size}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out '{out}' is a file; give a folder.")


@dataclass
class Setup:
    items: list[CocoItem]
    inception: torch.nn.Module
    clip: ClipModel
    engine: object  # sdxs.SDXSEngine
    decoder: str

    def generate(self, captions: list[str], first_seed: int) -> list[Image.Image]:
        """One image per caption at the model's native size; caption j gets seed first_seed + j."""
        return self.engine.text_to_image(captions, seed=first_seed, decoder=self.decoder).images


def prepare(args) -> Setup:
    """Load every input; when any is missing, one SystemExit that lists them all (before any long work)."""
    from sdxs.loading import ModelNotFoundError, pick_device_and_dtype
    from train.fid_inception import InceptionWeightsError, default_weights_path, load_fid_inception

    try:
        device, _ = pick_device_and_dtype(args.device, "fp32")
    except ValueError as err:  # e.g. --device cuda on a machine without a GPU
        raise SystemExit(f"error: {err}") from None
    problems: list[str] = []

    def attempt(what: str, load):
        try:
            return load()
        except (MissingInput, InceptionWeightsError, ModelNotFoundError, OSError, ValueError) as err:
            problems.append(f"- {what}: {err}")
            return None

    items = attempt("COCO val 2017", lambda: read_coco_val(args.coco, args.num_images))
    weights = args.inception_weights or default_weights_path()
    inception = attempt("FID Inception", lambda: load_fid_inception(weights).to(device))
    clip = attempt("CLIP score model", lambda: load_clip(args.clip, device))
    engine, decoder = attempt("model", lambda: load_engine(args)) or (None, None)
    if problems:
        raise SystemExit(f"error: {len(problems)} of the evaluation's inputs are missing or unusable; nothing was generated.\n" + "\n".join(problems))
    return Setup(items, inception, clip, engine, decoder)


# --- the run ---------------------------------------------------------------------------------------


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def real_features(setup: Setup, batch_size: int) -> torch.Tensor:
    from tqdm.auto import tqdm

    device, size, out = next(setup.inception.parameters()).device, setup.engine.native_size, []
    for _, chunk in tqdm(list(batches(setup.items, batch_size)), desc="real images", unit="batch"):
        out.append(setup.inception(to_uint8([real_image(item.path, size) for item in chunk]).to(device)).double().cpu())
    return torch.cat(out)


def generated_features(setup: Setup, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception features (N, 2048) and CLIP cosines (N,) of the generated images, one batch at a time."""
    from tqdm.auto import tqdm

    device, features, cosines = next(setup.inception.parameters()).device, [], []
    image_dir = Path(args.out) / "images"
    for start, chunk in tqdm(list(batches(setup.items, args.batch_size)), desc="generating", unit="batch"):
        captions = [item.caption for item in chunk]
        images = setup.generate(captions, args.seed + start)
        features.append(setup.inception(to_uint8(images).to(device)).double().cpu())
        cosines.append(setup.clip.cosines(images, captions))
        if args.save_images:
            image_dir.mkdir(parents=True, exist_ok=True)
            for item, image in zip(chunk, images):
                image.save(image_dir / f"{item.image_id:012d}.png")
    return torch.cat(features), torch.cat(cosines)


def evaluate(args) -> dict:
    from train.fid_inception import default_weights_path

    check_arguments(args)
    setup = prepare(args)
    start = time.perf_counter()
    real = real_features(setup, args.batch_size)
    generated, cosines = generated_features(setup, args)
    metrics = {
        "model": args.model,
        "fid": fid(generated, real),
        "clip_score": clip_score(cosines),
        "num_images": len(setup.items),
        "image_size": setup.engine.native_size,
        "seed": args.seed,
        "decoder": setup.decoder,
        "backend": setup.engine.backend,
        "dtype": str(setup.engine.dtype).removeprefix("torch."),
        "clip_model": args.clip,
        "inception_weights": str(args.inception_weights or default_weights_path()),
        "protocol": "COCO 2017 val, first N images by id, first caption each; FID: TF Inception pool_3, real images "
                    "centre-cropped and resized (bicubic) to the generated size; CLIP score: max(100 * mean cosine, 0)",
        "seconds": round(time.perf_counter() - start, 1),
    }
    if not (math.isfinite(metrics["fid"]) and math.isfinite(metrics["clip_score"])):
        raise SystemExit(f"error: a metric is not finite (FID {metrics['fid']}, CLIP score {metrics['clip_score']}); the generated images hold NaN/inf.")
    write_results(metrics, Path(args.out))
    return metrics


def markdown_row(metrics: dict) -> str:
    return (f"| {metrics['model']} | {metrics['decoder']} | {metrics['image_size']} | {metrics['num_images']} "
            f"| {metrics['fid']:.2f} | {metrics['clip_score']:.2f} |")


def write_results(metrics: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    header = "| model | decoder | size | images | FID | CLIP score |\n|---|---|---|---|---|---|\n"
    (out / "metrics.md").write_text(header + markdown_row(metrics) + "\n")
    print(f"{markdown_row(metrics)}\nwritten to {out / 'metrics.json'} and {out / 'metrics.md'}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    evaluate(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
