"""Sketch preprocessing: whatever a canvas or an upload gives -> what the sketch ControlNet expects.

The SDXS sketch ControlNet was trained on dark strokes on a white background, RGB, 512x512, values
in [0, 1] (the upstream demo inverts its white-on-black canvas to get there). We accept:
- None, or an empty canvas                         -> None (nothing drawn; callers decide what to show)
- a Gradio ImageEditor/Sketchpad value (dict with "composite", "background", "layers")
- a PIL image or a numpy array of any size and mode (L, LA, RGB, RGBA, P, I, F, 1)
Transparent pixels count as paper (white). Colour strokes become their grey level. A picture that
is mostly dark (white or coloured lines on black, as edge maps are drawn) is inverted. Non-square
inputs are padded with white to a square (never stretched), then resized.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

SKETCH_SIZE = 512
BLANK_LEVEL = 250  # grey levels at or above this are paper, not ink
DARK_PICTURE = 0.5  # mean brightness below this: light strokes on a dark ground, invert


def _to_pil(value) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, dict):  # gr.ImageEditor / gr.Sketchpad value
        composite = value.get("composite")
        if composite is None:  # no composite yet: flatten background and layers ourselves
            parts = [p for p in [value.get("background"), *(value.get("layers") or [])] if p is not None]
            if not parts:
                return None
            images = [_to_pil(p) for p in parts]
            composite = Image.new("RGBA", images[0].size, (255, 255, 255, 0))
            for image in images:
                composite.alpha_composite(image.convert("RGBA").resize(composite.size))
        return _to_pil(composite)
    if isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8:  # floats in [0, 1] or wider ints
            scale = 255.0 if array.dtype.kind == "f" and array.max(initial=0) <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return Image.fromarray(array)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        return Image.open(value)
    raise ValueError(f"Cannot read a sketch from {type(value).__name__}; give an image, an array or a file path.")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Grey levels with transparency composited over white paper."""
    if image.mode in ("I", "I;16", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = array.max(initial=0)
        image = Image.fromarray((array / peak * 255 if peak > 255 else array).clip(0, 255).astype(np.uint8))
    rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, rgba).convert("L")


def prepare_sketch(value, size: int = SKETCH_SIZE) -> Image.Image | None:
    """Dark strokes on white, RGB, size x size; None when nothing is drawn."""
    image = _to_pil(value)
    if image is None or image.width == 0 or image.height == 0:
        return None
    image.thumbnail((4 * size, 4 * size))  # huge uploads: cheap first shrink (keeps aspect ratio)
    grey = _flatten_on_white(image)
    if np.asarray(grey).mean() / 255.0 < DARK_PICTURE:
        grey = ImageOps.invert(grey)
    if is_blank(grey):
        return None
    side = max(grey.size)
    square = Image.new("L", (side, side), 255)
    square.paste(grey, ((side - grey.width) // 2, (side - grey.height) // 2))
    return square.resize((size, size), Image.LANCZOS).convert("RGB")


def is_blank(image: Image.Image) -> bool:
    """True when no pixel is darker than paper."""
    return int(np.asarray(image.convert("L")).min(initial=255)) >= BLANK_LEVEL


def sketch_to_tensor(sketch: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1], as the ControlNet's conditioning input."""
    array = np.asarray(sketch.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def blank_sketch(size: int = SKETCH_SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 255, 255))
