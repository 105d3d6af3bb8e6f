"""Command line: `python -m sdxs {generate,arch,make-tiny} ...` (see --help of each)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sdxs.engine import BACKENDS
from sdxs.registry import DEFAULT_MODEL, MODELS, SKETCH_MODEL

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _quiet_libraries() -> None:
    """Keep library chatter (config notices, load bars) off the terminal; our own warnings stay."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def output_paths(out: str, n: int, seeds: list[int]) -> list[Path]:
    """FILE.png for one image (FILE-1.png, FILE-2.png... for several), else DIR/seed-S.png."""
    out_path = Path(out)
    if out_path.suffix.lower() in IMAGE_SUFFIXES:
        if n == 1:
            return [out_path]
        return [out_path.with_name(f"{out_path.stem}-{i + 1}{out_path.suffix}") for i in range(n)]
    return [out_path / f"seed-{seed}.png" for seed in seeds]


def cmd_generate(args) -> int:
    from sdxs.engine import SDXSEngine

    _quiet_libraries()
    model = args.model or (SKETCH_MODEL if args.sketch else DEFAULT_MODEL)
    engine = SDXSEngine.from_pretrained(model, device=args.device, dtype=args.dtype, base=args.base, backend=args.backend)
    common = dict(seed=args.seed, num_images=args.n, decoder=args.decoder, num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.sketch:
        if not Path(args.sketch).is_file():
            raise ValueError(f"Sketch file '{args.sketch}' does not exist.")
        result = engine.sketch_to_image(args.sketch, args.prompt, control_strength=args.control_strength, **common)
    else:
        result = engine.text_to_image(args.prompt, width=args.width, height=args.height, **common)
    paths = output_paths(args.out, len(result.images), result.seeds)
    for image, path in zip(result.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    print(f"{len(paths)} image(s) from {engine.name} on {engine.device} ({timings})", file=sys.stderr)
    return 0


def cmd_arch(args) -> int:
    from sdxs.build import count_parameters

    counts = count_parameters(args.model)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        for name, count in counts.items():
            print(f"{name:>14}: {count:>13,}")
    return 0


def cmd_make_tiny(args) -> int:
    from sdxs.build import make_tiny

    _quiet_libraries()
    path = make_tiny(args.dir, seed=args.seed)
    print(f"Tiny random model written to {path}; try: python -m sdxs generate --model {path} --prompt cat --out cat.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdxs", description="SDXS one-step text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True)
    known = ", ".join(MODELS)

    gen = sub.add_parser("generate", help="generate images in one step", description="Generate images in one step.")
    gen.add_argument("--model", default=None, help=f"hub id or local diffusers folder (default {DEFAULT_MODEL}, or {SKETCH_MODEL} with --sketch; known: {known})")
    gen.add_argument("--base", default=None, help="base pipeline for a LoRA or bare ControlNet folder (default: the registry's or the adapter's own)")
    gen.add_argument("--prompt", required=True, help="text prompt (longer than 77 CLIP tokens is truncated, with a warning)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    gen.add_argument("--n", type=int, default=1, help="number of images, generated in one batch (default 1)")
    gen.add_argument("--out", default="sdxs.png", help="output FILE.png, or a folder for seed-S.png files (default sdxs.png)")
    gen.add_argument("--sketch", default=None, metavar="FILE", help="sketch image (dark strokes on white, any size): sketch-to-image through the ControlNet")
    gen.add_argument("--control-strength", type=float, default=0.8, help="how closely to follow the sketch, 0..1 (default 0.8)")
    gen.add_argument("--decoder", default="tiny", choices=["tiny", "large"], help="tiny TAESD (fast) or large SD VAE (quality)")
    gen.add_argument("--width", type=int, default=512, help="multiple of 8; SDXS is trained at 512 (default 512)")
    gen.add_argument("--height", type=int, default=512, help="multiple of 8; SDXS is trained at 512 (default 512)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    gen.add_argument("--backend", default="auto", choices=list(BACKENDS), help="auto: OpenVINO on a CPU when installed, else PyTorch")
    gen.add_argument("--steps", type=int, default=1, help="must be 1: SDXS is a one-step model (kept to explain why)")
    gen.add_argument("--guidance", type=float, default=0.0, help="must be 0: SDXS runs without guidance (kept to explain why)")
    gen.set_defaults(func=cmd_generate)

    arch = sub.add_parser("arch", help="parameter counts of a known model's exact architecture (random weights, no download)")
    arch.add_argument("--model", default=DEFAULT_MODEL, help=f"one of: {known}")
    arch.add_argument("--json", action="store_true", help="print a JSON object")
    arch.set_defaults(func=cmd_arch)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model in the released checkpoints' folder layout")
    tiny.add_argument("dir", help="new folder to write")
    tiny.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sdxs.loading import ModelNotFoundError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelNotFoundError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
