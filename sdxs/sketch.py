"""Sketch preprocessing: whatever a canvas or an upload gives -> what the sketch ControlNet expects.

The SDXS sketch ControlNet was trained on dark strokes on a white background, RGB, 512x512, values
in [0, 1] (the upstream demo inverts its white-on-black canvas to get there). We accept:
- None, or an empty canvas                         -> None (nothing drawn; callers decide what to show)
- a Gradio ImageEditor/Sketchpad value (dict with "composite", "background", "layers")
- a PIL image or a numpy array of any size and mode (L, LA, RGB, RGBA, P, I, I;16, F, 1, CMYK)
Transparent pixels count as paper (white). Colour strokes become their grey level. A picture that
is mostly dark (white or coloured lines on black, as edge maps are drawn) is inverted. Non-square
inputs are padded with white to a square (never stretched), then resized. Shrinking by a large
factor first takes the darkest pixel of each block (a min-pool: dilation of dark strokes), so a thin
line of a huge or very wide picture stays a visible line instead of fading into the paper. An
animated image uses its first frame that has strokes (`prepare_sketch_with_notes` says which).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

SKETCH_SIZE = 512
BLANK_LEVEL = 250  # grey levels at or above this are paper, not ink
DARK_PICTURE = 0.5  # mean brightness below this: light strokes on a dark ground, invert
MAX_FRAMES = 100  # frames of an animated image looked at for strokes


def _to_pil(value) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, dict):  # gr.ImageEditor / gr.Sketchpad value
        composite = value.get("composite")
        if composite is None:  # no composite yet: flatten background and layers ourselves
            parts = [p for p in [value.get("background"), *(value.get("layers") or [])] if p is not None]
            if not parts:
                return None
            if len(parts) == 1:  # an upload alone: as it is (an animation keeps its frames)
                return _to_pil(parts[0])
            images = [_to_pil(p) for p in parts]
            composite = Image.new("RGBA", images[0].size, (255, 255, 255, 0))
            for image in images:
                composite.alpha_composite(image.convert("RGBA").resize(composite.size))
        return _to_pil(composite)
    if isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8:  # floats in [0, 1] or wider ints
            scale = 255.0 if array.dtype.kind == "f" and array.max(initial=0) <= 1.0 else 1.0
            array = np.clip(np.nan_to_num(array * scale), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        try:
            return Image.fromarray(array)
        except TypeError:
            raise ValueError(f"Cannot read a sketch from an array of shape {array.shape}; give HxW, HxWx3 or HxWx4.") from None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        from sdxs.validation import open_image

        return open_image(value)
    raise ValueError(f"Cannot read a sketch from {type(value).__name__}; give an image, an array or a file path.")


def _white_level(mode: str, array: np.ndarray) -> float:
    """The value of white paper in a wide-range image: 65535 in 16-bit files; float images are in
    [0, 1] when their peak is; other 32-bit images have no fixed white: their peak, or 255 below it."""
    peak = float(array.max(initial=0))
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "F" and peak <= 1.0:
        return 1.0
    return max(peak, 255.0)


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Grey levels with transparency composited over white paper."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float32))
        image = Image.fromarray((array * 255 / _white_level(image.mode, array)).clip(0, 255).astype(np.uint8))
    try:
        rgba = image.convert("RGBA")
    except ValueError:  # modes PIL cannot turn into RGB (LAB, HSV...)
        raise ValueError(f"Cannot read a sketch in image mode {image.mode}; save it as RGB, RGBA or greyscale.") from None
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, rgba).convert("L")


def _ink_on_paper(image: Image.Image) -> Image.Image:
    """Grey, dark strokes on white: flattened, and inverted when the picture is mostly dark."""
    grey = _flatten_on_white(image)
    if np.asarray(grey).mean() / 255.0 < DARK_PICTURE:
        grey = ImageOps.invert(grey)
    return grey


def _first_frame_with_ink(image: Image.Image) -> tuple[Image.Image, str | None]:
    """(grey frame, note): the first frame of an animated (multi-frame) image that has strokes, and
    a note saying which one; a single-frame image as it is, without a note."""
    frames = getattr(image, "n_frames", 1)
    if frames <= 1:
        return _ink_on_paper(image), None
    first = None
    for index in range(min(frames, MAX_FRAMES)):
        try:
            image.seek(index)
            grey = _ink_on_paper(image)
        except EOFError:  # fewer frames than the header said
            break
        except ValueError:
            raise
        except Exception as err:  # a damaged later frame: say so rather than use half a picture
            raise ValueError(f"Frame {index + 1} of the animated image cannot be decoded ({type(err).__name__}).") from None
        if first is None:
            first = grey
        if not is_blank(grey):
            return grey, f"Animated image: used frame {index + 1} of {frames}, the first with strokes."
    return first, f"Animated image: none of its first {min(frames, MAX_FRAMES)} frames has strokes."


def _min_pool(grey: Image.Image, factor: int) -> Image.Image:
    """Shrink by an integer factor keeping the darkest pixel of each block, so strokes of any
    width survive (an average would fade a 1 px line by 1/factor)."""
    array = np.asarray(grey)
    height, width = -(-array.shape[0] // factor) * factor, -(-array.shape[1] // factor) * factor
    padded = np.full((height, width), 255, dtype=np.uint8)
    padded[: array.shape[0], : array.shape[1]] = array
    blocks = padded.reshape(height // factor, factor, width // factor, factor)
    return Image.fromarray(blocks.min(axis=(1, 3)))


def _shrink_keeping_strokes(grey: Image.Image, size: int) -> Image.Image:
    """Shrink so the longer side is about `size`, without letting thin dark strokes fade: a
    min-pool by the whole factor, then a 3x3 dilation of dark pixels before the last (< 1.5x)
    Lanczos shrink, which would otherwise average a 1 px line towards grey."""
    factor = round(max(grey.size) / size)
    if factor >= 2:
        grey = _min_pool(grey, factor)
    if max(grey.size) > size:
        grey = grey.filter(ImageFilter.MinFilter(3))
    return grey


def prepare_sketch_with_notes(value, size: int = SKETCH_SIZE) -> tuple[Image.Image | None, list[str]]:
    """(sketch, notes): dark strokes on white, RGB, size x size (None when nothing is drawn), and
    what a person should know about how the input was read (which frame of an animation)."""
    image = _to_pil(value)
    if image is None or image.width == 0 or image.height == 0:
        return None, []
    grey, note = _first_frame_with_ink(image)
    notes = [note] if note else []
    if is_blank(grey):
        return None, notes
    grey = _shrink_keeping_strokes(grey, size)
    side = max(grey.size)
    square = Image.new("L", (side, side), 255)
    square.paste(grey, ((side - grey.width) // 2, (side - grey.height) // 2))
    return _grow_keeping_paper(square, size).resize((size, size), Image.LANCZOS).convert("RGB"), notes


def _grow_keeping_paper(square: Image.Image, size: int) -> Image.Image:
    """Enlarge a small square by its whole factor with nearest neighbours, so the final Lanczos
    resize is under 2x: Lanczos alone at, say, 128x smears a 4 px sketch's strokes into greys
    that cover the paper."""
    factor = size // square.width
    if factor < 2:
        return square
    return square.resize((square.width * factor, square.height * factor), Image.NEAREST)


def prepare_sketch(value, size: int = SKETCH_SIZE) -> Image.Image | None:
    """Dark strokes on white, RGB, size x size; None when nothing is drawn."""
    return prepare_sketch_with_notes(value, size)[0]


def is_blank(image: Image.Image) -> bool:
    """True when no pixel is darker than paper."""
    return int(np.asarray(image.convert("L")).min(initial=255)) >= BLANK_LEVEL


def sketch_to_tensor(sketch: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1], as the ControlNet's conditioning input."""
    array = np.asarray(sketch.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def blank_sketch(size: int = SKETCH_SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 255, 255))
