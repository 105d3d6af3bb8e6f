"""How far each precision and backend moves the images from the fp32 eager engine's.

    python tools/precision_check.py                                   # the built-in model, CPU: bf16, OpenVINO, compiled
    python tools/precision_check.py --device cuda                     # fp16 and bf16, eager and compiled
    python tools/precision_check.py --model DIR --variants fp32:torch-compile,bf16:torch --out report.json

Every variant makes the same prompts and seeds as the reference (fp32, `--backend torch`); per image
the largest pixel difference and the PSNR against the reference, then the median and worst over the
images. The built-in model has trained weights, so these are differences a person would see; random
weights (the exact SDXS architectures) would only show rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["grinning face", "red apple", "rocket", "cat face", "sun with face", "pizza", "thumbs up", "red heart"]
DEFAULT_VARIANTS = {"cpu": "bf16:torch,fp32:openvino,fp32:openvino-bf16,fp32:torch-compile", "cuda": "fp16:torch,bf16:torch,fp32:torch-compile,fp16:torch-compile,bf16:torch-compile"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def images(model: str, device: str, dtype: str, backend: str, prompts: list[str]) -> list[np.ndarray]:
    from sdxs import SDXSEngine
    from sdxs.webapp import prompt_for

    engine = SDXSEngine.from_pretrained(model, device=device, dtype=dtype, backend=backend)
    return [np.asarray(engine.text_to_image(prompt_for(engine, p), seed=i).images[0]) for i, p in enumerate(prompts)]


def compare(reference: list[np.ndarray], variant: list[np.ndarray]) -> dict:
    diffs = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(reference, variant)]
    scores = [psnr(a, b) for a, b in zip(reference, variant)]
    return {"max_abs_diff": max(diffs), "median_max_abs_diff": statistics.median(diffs),
            "psnr_db_median": statistics.median(scores), "psnr_db_min": min(scores)}


def main(argv=None) -> int:
    from sdxs.registry import BUILTIN_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BUILTIN_MODEL, help=f"model id or folder (default {BUILTIN_MODEL}: trained weights, offline)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=None, help="comma-separated DTYPE:BACKEND (default: on a CPU bf16 eager, OpenVINO fp32 and bf16, compiled fp32; on CUDA fp16/bf16, eager and compiled)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts (default all)")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    prompts = PROMPTS[: args.prompts]
    variants = (args.variants or DEFAULT_VARIANTS.get(args.device.split(":")[0], "bf16:torch")).split(",")
    reference = images(args.model, args.device, "fp32", "torch", prompts)
    report = {"model": args.model, "device": args.device, "images": len(prompts), "reference": "fp32:torch", "variants": {}}
    for variant in variants:
        dtype, _, backend = variant.partition(":")
        try:
            report["variants"][variant] = compare(reference, images(args.model, args.device, dtype, backend or "torch", prompts))
        except (ValueError, RuntimeError) as err:  # e.g. fp16 on a CPU, no compiler: say so, go on
            report["variants"][variant] = {"error": str(err).splitlines()[0][:200]}
        print(f"{variant}: {report['variants'][variant]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
