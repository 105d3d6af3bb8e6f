"""Checks of what people type or upload, shared by app.py, demo_sketch.py and the CLI.

Each check returns the value normalised, or raises ValueError with a message that says what to do;
no other exception escapes (tests/test_validation.py checks that with hypothesis). No Gradio here.

The ranges, in one place:
- seed: a whole number from 0 to MAX_SEED = 2**32 - 1 (NumPy's seed range; exact in a browser's
  JavaScript numbers, unlike 2**63). Image i of a request uses seed + i.
- prompt: control characters become spaces; more than MAX_PROMPT_CHARS characters are cut BEFORE
  the tokenizer sees them (the text encoder reads 77 tokens, a few hundred characters, anyway), with
  a note. An empty prompt is allowed (a sketch alone, or an unconditional sample) with a note.
- uploads: at most MAX_UPLOAD_BYTES on disk and MAX_UPLOAD_PIXELS pixels, checked from the file's
  header before any pixel is decoded.
"""

from __future__ import annotations

import numbers
import os
import random
import unicodedata
from pathlib import Path

from PIL import Image

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 1000
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # e.g. 8000x5000; the sketch is 512x512 in the end
EMPTY_PROMPT_NOTE = "The prompt is empty, so nothing but the noise (and a sketch, if any) steers the image. Type what you want to see."


def _show(value, limit: int = 40) -> str:
    """A value as it appears in a message: short, whatever was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def whole_number(value, what: str, expected: str = "a whole number") -> int:
    """An int from an int, an integral float (3.0, "3", "1e3") or a numeric string; else a
    ValueError that says `what` must be `expected`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{what} is empty: enter {expected}.")
    wrong = ValueError(f"{what} must be {expected}; got {_show(value)}.")
    if isinstance(value, bool):
        raise wrong
    if isinstance(value, numbers.Integral):
        return int(value)
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            raise wrong from None
    if not isinstance(number, numbers.Real):
        raise wrong
    try:
        whole = int(number)
    except (ValueError, OverflowError):  # nan, inf
        raise wrong from None
    if whole != number:  # 1.5 is refused, not rounded: it is not the seed 2
        raise wrong
    return whole


def parse_seed(value) -> int:
    """A seed in 0..MAX_SEED."""
    expected = f"a whole number from 0 to {MAX_SEED}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"Seed is empty: enter {expected}, or let the app pick one at random.")
    seed = whole_number(value, "Seed", expected)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"Seed must be {expected}; got {_show(seed)}.")
    return seed


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def parse_count(value, what: str, maximum: int) -> int:
    """A whole number in 1..maximum (number of images)."""
    expected = f"a whole number from 1 to {maximum}"
    count = whole_number(value, what, expected)
    if not 1 <= count <= maximum:
        raise ValueError(f"{what} must be {expected}; got {_show(count)}.")
    return count


def clean_text(value, what: str = "The prompt") -> tuple[str, list[str]]:
    """(text, notes): the length capped first, then control characters out and whitespace collapsed."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text; got {type(value).__name__}.")
    notes = []
    if len(value) > MAX_PROMPT_CHARS:  # cut before any per-character work or tokenizing
        notes.append(
            f"{what} has {len(value):,} characters; only the first {MAX_PROMPT_CHARS:,} are used "
            "(the text encoder reads at most 77 tokens, a few hundred characters)."
        )
        value = value[:MAX_PROMPT_CHARS]
    # Cc: control characters (NUL, escape codes, newlines); Cs: lone surrogates, which cannot be encoded.
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in value)
    return " ".join(text.split()), notes


def clean_prompt(value) -> tuple[str, list[str]]:
    """(prompt, notes) as clean_text, with a note when nothing is left: an empty prompt still makes
    an image (one step from noise, steered by no text), so say so instead of refusing."""
    text, notes = clean_text(value)
    if not text:
        notes.append(EMPTY_PROMPT_NOTE)
    return text, notes


def parse_strength(value) -> float:
    """The ControlNet's conditioning scale, a number from 0 to 1."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"Control strength must be a number from 0 to 1; got {_show(value)}.")
    return float(value)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an uploaded image under the size limits and decode it; a ValueError says what is wrong.

    The file size and the pixel count (read from the header, before decoding) are checked first, so
    a decompression bomb never reaches the decoder. Animated images keep all their frames."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise ValueError(f"'{name}' does not exist or cannot be read.") from None
    if not path.is_file():
        raise ValueError(f"'{name}' is not a file.")
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"'{name}' is {size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB. Use a smaller image.")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"'{name}' has too many pixels (the limit is {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels). Shrink it first.") from None
    except Exception:  # PIL raises many types on files it cannot identify
        raise ValueError(f"'{name}' is not an image PIL can read (PNG, JPEG, WebP, GIF, BMP...).") from None
    check_pixels(image.size, name)
    try:
        image.load()  # decode now: a corrupt or truncated file fails here, not later
    except Exception as err:  # zlib, struct, OSError, SyntaxError...: all mean a damaged file
        raise ValueError(f"'{name}' is damaged or truncated and cannot be decoded ({type(err).__name__}). Save it again and retry.") from None
    return image


def check_pixels(size: tuple[int, int], name: str = "The image") -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{name} is empty ({width}x{height} pixels).")
    if width * height > MAX_UPLOAD_PIXELS:
        raise ValueError(
            f"{name} is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels "
            "(the sketch is 512x512 in the end). Shrink it first."
        )
