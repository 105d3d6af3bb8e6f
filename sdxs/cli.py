"""Command line: `sdxs {generate,arch,make-tiny} ...` or `python -m sdxs ...` (see --help of each).

Every bad argument ends with one `error: ...` line that says what to change, and exit code 2;
the model is loaded only after the arguments, the sketch file and the output path were checked."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image

from sdxs.build import FAMILIES
from sdxs.engine import BACKENDS
from sdxs.registry import BUILTIN_MODEL, DEFAULT_MODEL, MODELS, REFERENCE_MODELS, SKETCH_MODEL, builtin_model, get_spec
from sdxs.validation import MAX_SEED, clean_prompt, open_image, parse_count, parse_seed

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# The images of one call are held in memory until written: a bound against typos (a 512 px image is
# 0.75 MiB), not a speed limit; the forwards run in micro-batches whatever the count.
MAX_IMAGES = 4096


def _argument(parse):
    """An argparse `type` from a validation function, keeping its message."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def output_paths(out: str, n: int, seeds: list[int]) -> list[Path]:
    """FILE.png for one image (FILE-1.png, FILE-2.png... for several), else DIR/seed-S.png."""
    out_path = Path(out)
    if out_path.suffix.lower() in IMAGE_SUFFIXES:
        if n == 1:
            return [out_path]
        return [out_path.with_name(f"{out_path.stem}-{i + 1}{out_path.suffix}") for i in range(n)]
    return [out_path / f"seed-{seed}.png" for seed in seeds]


def check_output(out: str) -> None:
    """Refuse, before a model is loaded, an --out that cannot be written. Missing folders are
    fine: they are created."""
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        if path.is_dir():
            raise ValueError(f"--out '{out}' is an existing folder; give a file name (e.g. {path / 'image.png'}) or the folder without an image suffix.")
        folder = path.parent
    else:
        if suffix in Image.registered_extensions():
            raise ValueError(f"--out '{out}': {suffix} is not written here; use {', '.join(sorted(IMAGE_SUFFIXES))}, or a folder name.")
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out '{out}' is an existing file, not a folder; give FILE.png or a folder for seed-S.png files.")
        folder = path
    existing = next(p for p in [folder.absolute(), *folder.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out '{out}': cannot make a folder inside '{existing}', which is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out '{out}': no permission to write in '{existing}'; choose another place.")


def save_images(images, paths: list[Path]) -> None:
    for image, path in zip(images, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as err:  # full disk, read-only file system, a race with another program
            raise ValueError(f"Could not write '{path}': {err.strerror or err}.") from None
        print(path)


def read_sketch(path: str):
    """The sketch file, opened under the upload limits and checked for strokes before any model is
    loaded (notes, e.g. which frame of an animation, go to stderr); the engine prepares it."""
    from sdxs.sketch import prepare_sketch_with_notes

    image = open_image(path)
    sketch, notes = prepare_sketch_with_notes(image)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if sketch is None:
        raise ValueError(f"The sketch '{path}' has no strokes (it is blank paper); draw dark lines on white, or light lines on black.")
    return image


def load_engine(args):
    """--model when given (its failure is an error); without it, text-to-image runs the default
    model or, when that cannot be found offline, the built-in one; sketch mode the sketch model."""
    from sdxs.engine import SDXSEngine
    from sdxs.webapp import load_default_or_builtin

    options = dict(device=args.device, dtype=args.dtype, base=args.base, backend=args.backend, micro_batch=args.micro_batch)
    if args.model is not None:
        return SDXSEngine.from_pretrained(args.model, **options)
    if args.sketch:  # no built-in sketch model (yet): the released one or an error
        return SDXSEngine.from_pretrained(SKETCH_MODEL, **options)
    return load_default_or_builtin(**options)


def cmd_generate(args) -> int:
    from sdxs.webapp import prompt_for

    prompt, notes = clean_prompt(args.prompt)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.sketch and (args.width or args.height):
        raise ValueError("--width and --height do not apply to --sketch: sketch mode makes images at the model's native size.")
    check_output(args.out)
    sketch = read_sketch(args.sketch) if args.sketch else None
    engine = load_engine(args)
    model_prompt = prompt_for(engine, prompt)  # the built-in model's template: "an emoji of ..."
    if model_prompt != prompt:
        print(f"note: the prompt as the model reads it: {model_prompt!r}", file=sys.stderr)
    prompt = model_prompt
    # decoder None: the model's fastest; width/height None: its native size.
    common = dict(seed=args.seed, num_images=args.n, decoder=args.decoder, num_inference_steps=args.steps, guidance_scale=args.guidance)
    if sketch is not None:
        result = engine.sketch_to_image(sketch, prompt, control_strength=args.control_strength, **common)
    else:
        result = engine.text_to_image(prompt, width=args.width, height=args.height, **common)
    paths = output_paths(args.out, len(result.images), result.seeds)
    save_images(result.images, paths)
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    print(f"{len(paths)} image(s) from {engine.name} on {engine.device} ({timings})", file=sys.stderr)
    return 0


def cmd_arch(args) -> int:
    from sdxs.build import count_parameters

    counts = count_parameters(args.model)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        spec = get_spec(args.model)
        print(f"{spec.title}: {spec.description}")
        for name, count in counts.items():
            print(f"{name:>14}: {count:>13,}")
    return 0


def cmd_make_tiny(args) -> int:
    from sdxs.build import make_tiny

    path = make_tiny(args.dir, seed=args.seed, family=args.family)
    print(f"Tiny random model written to {path}; try: python -m sdxs generate --model {path} --prompt cat --out cat.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxs", description="SDXS one-step text-to-image (also: python -m sdxs).")
    sub = parser.add_subparsers(dest="command", required=True)
    known = ", ".join(MODELS)

    gen = sub.add_parser("generate", help="generate images in one step", description="Generate images in one step.")
    gen.add_argument("--model", default=None, help=f"hub id, local diffusers folder, or '{BUILTIN_MODEL}' for the built-in "
                     f"{builtin_model(BUILTIN_MODEL).native_size} px emoji model "
                     f"(default {DEFAULT_MODEL}, or the built-in model when that is neither cached nor downloadable; {SKETCH_MODEL} "
                     f"with --sketch; known: {known})")
    gen.add_argument("--base", default=None, help="base pipeline for a LoRA or bare ControlNet folder (default: the registry's or the adapter's own)")
    gen.add_argument("--prompt", required=True, help="text prompt (longer than 77 CLIP tokens is truncated, with a warning; empty is allowed, with a note)")
    gen.add_argument("--seed", type=_argument(parse_seed), default=0, help=f"seed of the first image, 0..{MAX_SEED}; image i uses seed+i (default 0)")
    gen.add_argument("--n", type=_argument(lambda text: parse_count(text, "--n", MAX_IMAGES)), default=1, help=f"number of images, 1..{MAX_IMAGES}, generated in forwards of --micro-batch images (default 1)")
    gen.add_argument("--micro-batch", type=_argument(lambda text: parse_count(text, "--micro-batch", MAX_IMAGES)), default=None,
                     help="images per forward (default: 64 on a GPU, 4 on a CPU); lower it when memory runs out")
    gen.add_argument("--out", default="sdxs.png", help="output FILE.png (.jpg, .webp), or a folder for seed-S.png files; missing folders are created (default sdxs.png)")
    gen.add_argument("--sketch", default=None, metavar="FILE", help="sketch image (dark strokes on white, any size): sketch-to-image through the ControlNet")
    gen.add_argument("--control-strength", type=float, default=0.8, help="how closely to follow the sketch, 0..1 (default 0.8)")
    gen.add_argument("--decoder", default=None, choices=["tiny", "large"], help="tiny TAESD (fast) or large SD VAE (quality); default: tiny when the model has it")
    gen.add_argument("--width", type=int, default=None, help="pixels, a multiple of 32 for SDXS-512 (the VAE factor x the U-Net's halvings); default: the size the model was trained at (512 for SDXS-512)")
    gen.add_argument("--height", type=int, default=None, help="pixels, a multiple of 32 for SDXS-512 (the VAE factor x the U-Net's halvings); default: the size the model was trained at (512 for SDXS-512)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    gen.add_argument("--backend", default="auto", choices=list(BACKENDS), help="auto: OpenVINO on a CPU when installed, else PyTorch")
    gen.add_argument("--steps", type=int, default=1, help="must be 1: SDXS is a one-step model (kept to explain why)")
    gen.add_argument("--guidance", type=float, default=0.0, help="must be 0: SDXS runs without guidance (kept to explain why)")
    gen.set_defaults(func=cmd_generate)

    arch = sub.add_parser("arch", help="parameter counts of a known model's exact architecture (random weights, no download)")
    arch.add_argument("--model", default=DEFAULT_MODEL, help=f"one of: {known}; architecture only (no weights here to run): {', '.join(REFERENCE_MODELS)}")
    arch.add_argument("--json", action="store_true", help="print a JSON object")
    arch.set_defaults(func=cmd_arch)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model in the released checkpoints' folder layout")
    tiny.add_argument("dir", help="new folder to write")
    tiny.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    tiny.add_argument("--family", choices=FAMILIES, default="sd",
                      help="sd: SDXS-512-shaped, 512 px, with a sketch ControlNet (default); sdxl: SDXS-1024-shaped "
                           "(two text encoders, text_time conditioning), StableDiffusionXLPipeline layout, 128 px")
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sdxs.loading import ModelNotFoundError
    from sdxs.webapp import configure_console

    args = build_parser().parse_args(argv)
    configure_console()
    try:
        return args.func(args)
    except (ModelNotFoundError, ValueError, OSError) as err:  # OSError: FileExistsError of make-tiny, unreadable files
        print(f"error: {err}", file=sys.stderr)
        return 2
