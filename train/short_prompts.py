#!/usr/bin/env python
"""Draw short prompts, typed as a user would ("red apple"), with one or more teachers: one grid, a row per
model, a column per prompt (issue 18: teacher v1 next to teacher v2).

    python train/short_prompts.py --model models/emoji-teacher --data data/emoji \\
        --model outputs/teacher-v2/final --data data/emoji128 --out docs/teacher-short-prompts.png

Each --model is paired with the --data it was trained on, in order. A short prompt becomes that data's
training caption for the emoji of that name or short name, in the data's first caption style (google for
the 64 px set, noto for the 128 px one), as the built-in model's apps expand prompts
(`reproduce_mini.caption_table`, captions.json); a prompt the data has no emoji for becomes the shortest
caption, "an emoji of PROMPT, STYLE style". Samples: plain diffusers (`StableDiffusionPipeline`, the
folder's scheduler), --steps and --guidance as `train/evaluate.py`, seed --seed + column for every row,
so each column starts every model from the same seed. The captions used are written beside the grid
(OUT with .json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import common  # noqa: E402
from train.emoji_data import build_caption  # noqa: E402
from train.evaluate import sample  # noqa: E402
from train.reproduce_mini import CAPTION_STYLES, caption_table  # noqa: E402

# Common emoji, each an emoji name or short name in both emoji sets: emoji.json's "heart" and "thumbs up
# sign", since the 64 px set has no cldr_names.json ("red heart", "thumbs up" find them in the 128 px set only).
DEFAULT_PROMPTS = (
    "grinning face", "red apple", "rocket", "smiling face with sunglasses", "pizza", "ghost", "heart", "thumbs up sign",
    "cat face", "dog face", "sun with face", "snowman", "birthday cake", "banana", "automobile", "house", "star", "fire",
    "crying face", "pile of poo", "christmas tree", "soccer ball", "four leaf clover", "alien",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="train/short_prompts.py")
    parser.add_argument("--model", action="append", required=True, help="an SD pipeline folder; repeat for more rows")
    parser.add_argument("--data", action="append", required=True, help="the data each --model was trained on (emoji_data.py's output), in order")
    parser.add_argument("--label", action="append", help="row labels, in order (default: each --model's folder name)")
    parser.add_argument("--prompts", default=",".join(DEFAULT_PROMPTS), help="comma-separated short prompts (default: 24 common emoji names)")
    parser.add_argument("--out", required=True, help="the grid (.png); the captions go to the same name with .json")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale; <= 1 turns it off (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=128, help="side of each image in the grid, pixels (nearest-neighbour; default 128)")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    return parser


def data_style(data: Path) -> str:
    """The caption style a short prompt is expanded in: the first of CAPTION_STYLES the data has."""
    styles = {json.loads(line).get("style") for line in (data / "train" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()}
    return next((style for style in CAPTION_STYLES if style in styles), "")


def expand(prompt: str, table: dict[str, str], style: str) -> str:
    """The data's training caption for a short prompt, or the shortest caption form of one it has no emoji for."""
    key = " ".join(prompt.lower().split())
    return table.get(key) or build_caption({"name": key}, style)


def save_grid(rows: list[torch.Tensor], row_labels: list[str], column_labels: list[str], path: Path, tile: int) -> Path:
    """Images (each row: (N, 3, H, W) in [-1, 1]) enlarged or shrunk to `tile` px, labelled on the left and on top."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    left, top, gap = 90, 32, 4
    canvas = Image.new("RGB", (left + len(column_labels) * (tile + gap), top + len(rows) * (tile + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, text in enumerate(column_labels):
        draw.multiline_text((left + col * (tile + gap), 2), "\n".join(textwrap.wrap(text, max(8, tile // 6))[:2]), fill="black", font=font)
    for r, (images, text) in enumerate(zip(rows, row_labels)):
        y = top + r * (tile + gap)
        draw.multiline_text((4, y + tile // 2 - 12), "\n".join(textwrap.wrap(text, 13)[:3]), fill="black", font=font)
        for col, image in enumerate(images):
            pil = Image.fromarray(common.to_uint8(image).permute(1, 2, 0).numpy())
            resample = Image.NEAREST if tile >= pil.width else Image.LANCZOS
            canvas.paste(pil.resize((tile, tile), resample), (left + col * (tile + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.model) != len(args.data):
        parser.error(f"give one --data per --model (the data it was trained on): got {len(args.model)} --model and {len(args.data)} --data.")
    if args.label is not None and len(args.label) != len(args.model):
        parser.error(f"give one --label per --model or none: got {len(args.label)} for {len(args.model)} models.")
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    if not prompts:
        parser.error("--prompts has no prompt: give comma-separated short prompts, e.g. --prompts 'red apple,rocket'.")
    if args.steps < 1 or args.tile < 8:
        parser.error("--steps must be at least 1 and --tile at least 8.")
    for model, data in zip(args.model, args.data):
        if not (Path(model) / "model_index.json").is_file():
            parser.error(f"--model {model}: not a pipeline folder (no model_index.json).")
        if not (Path(data) / "train" / "metadata.jsonl").is_file():
            parser.error(f"--data {data}: no train/metadata.jsonl; build it with python train/emoji_data.py --out {data}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from diffusers import StableDiffusionPipeline

    rows, captions = [], []
    for model, data in zip(args.model, args.data):
        style = data_style(Path(data))
        table = caption_table(Path(data), style) if style else {}
        row_captions = [expand(prompt, table, style) for prompt in prompts]
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        print(f"[short_prompts] {model}: {len(prompts)} prompts, {style or 'no'} style captions", file=sys.stderr)
        rows.append(sample(pipe, row_captions, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=len(prompts)))
        captions.append({"model": model, "data": data, "style": style, "captions": dict(zip(prompts, row_captions))})
    out = Path(args.out)
    labels = args.label or [Path(model).name for model in args.model]
    save_grid(rows, labels, prompts, out, args.tile)
    out.with_suffix(".json").write_text(json.dumps({"steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                                                    "rows": captions}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"[short_prompts] wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
