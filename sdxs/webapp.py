"""What the two Gradio front-ends (app.py, demo_sketch.py) share: flags, start-up, the ZeroGPU
decorator, and the status line. No Gradio here, so it is cheap to import and test."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdxs.engine import BACKENDS, Generation, SDXSEngine
from sdxs.loading import ModelNotFoundError
from sdxs.registry import MODELS

MAX_SEED = 2**31 - 1

try:  # ZeroGPU on Hugging Face Spaces; elsewhere `spaces.GPU` returns the function unchanged
    import spaces

    gpu = spaces.GPU(duration=30)
except ImportError:  # pragma: no cover - depends on the environment

    def gpu(fn):
        return fn


def add_common_flags(parser: argparse.ArgumentParser, default_model: str) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=default_model, help=f"hub id or local diffusers folder (default {default_model})")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS), help="auto: OpenVINO on a CPU when installed, else PyTorch; openvino-bf16 is a faster, slightly different option on CPUs with native bf16")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="default 7860")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return parser


def load_engine_or_exit(args, **kwargs) -> SDXSEngine:
    """Load once at start-up (and warm up, so tracing/compiling is not a visitor's wait); on
    failure print one actionable message (no traceback) and exit 2."""
    try:
        engine = SDXSEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend, **kwargs)
    except (ModelNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if engine.backend != "torch":
        print(f"Preparing the {engine.backend} backend (first start of a model converts it; later starts reuse the cache)...", file=sys.stderr)
        print(f"Ready in {engine.warm_up():.1f} s.", file=sys.stderr)
    return engine


def display_name(engine: SDXSEngine) -> str:
    """The registry title for known ids; only the folder name for local folders (no machine paths)."""
    if engine.name in MODELS:
        return MODELS[engine.name].title
    return Path(engine.name).name or engine.name


def status_line(result: Generation, engine: SDXSEngine, seed: int) -> str:
    t = result.timings
    return (
        f"{len(result.images)} image(s) in **{t['total'] * 1000:.0f} ms** "
        f"(text encoder {t['text_encoder'] * 1000:.0f} ms, U-Net {t['unet'] * 1000:.0f} ms, "
        f"decoder {t['decoder'] * 1000:.0f} ms) · seed {seed} · {display_name(engine)} on {engine.device.type}"
    )
