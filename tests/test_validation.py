"""Bad input, property-based: request values and sketch images of any kind either come out valid and
normalised, or raise a ValueError with a message; never another exception. Uploads: damaged files,
non-images, decompression bombs, oversized files, animated images."""

import math
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from sdxs.sketch import BLANK_LEVEL, MAX_FRAMES, prepare_sketch, prepare_sketch_with_notes
from sdxs.validation import (
    EMPTY_PROMPT_NOTE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    clean_prompt,
    open_image,
    parse_count,
    parse_seed,
    parse_strength,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Anything a form, a JSON API call or a command line can carry.
any_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70).map(str), st.floats().map(repr),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


# --- request values ------------------------------------------------------------------------------

@FAST
@given(any_value)
def test_any_seed_is_a_valid_seed_or_a_value_error(value):
    try:
        seed = parse_seed(value)
    except ValueError as err:
        assert "Seed" in str(err)
        return
    assert type(seed) is int and 0 <= seed <= MAX_SEED
    assert seed == float(value)  # the number that was sent, never a rounded one


@FAST
@given(any_value)
def test_any_count_is_in_range_or_a_value_error(value):
    try:
        count = parse_count(value, "Number of images", 4)
    except ValueError as err:
        assert "Number of images" in str(err) and "1 to 4" in str(err)
        return
    assert type(count) is int and 1 <= count <= 4 and count == float(value)


@FAST
@given(any_value)
def test_any_strength_is_in_the_unit_interval_or_a_value_error(value):
    try:
        strength = parse_strength(value)
    except ValueError as err:
        assert "Control strength" in str(err)
        return
    assert type(strength) is float and 0 <= strength <= 1


@FAST
@given(st.one_of(st.text(), st.text(alphabet=st.characters(codec="utf-8"), min_size=MAX_PROMPT_CHARS - 5, max_size=MAX_PROMPT_CHARS + 50), any_value))
def test_any_prompt_is_clean_text_or_a_value_error(value):
    try:
        prompt, notes = clean_prompt(value)
    except ValueError as err:
        assert "prompt must be text" in str(err)
        return
    assert isinstance(value, str) or value is None
    assert len(prompt) <= MAX_PROMPT_CHARS and prompt == prompt.strip()
    assert not any(c in prompt for c in "\x00\n\r\t\x1b\x7f")
    assert (EMPTY_PROMPT_NOTE in notes) == (prompt == "")
    assert any("characters" in n for n in notes) == (len(value or "") > MAX_PROMPT_CHARS)


@pytest.mark.parametrize(
    "value, message",
    [(2**64, "from 0 to 4294967295; got 18446744073709551616"), (-1, "got -1"), (1.5, "got 1.5"), ("abc", "got 'abc'"),
     (None, "Seed is empty"), ("", "Seed is empty"), (float("nan"), "got nan"), (True, "got True")],
)
def test_seed_messages(value, message):
    with pytest.raises(ValueError, match="Seed") as err:
        parse_seed(value)
    assert message in str(err.value)


def test_seeds_that_are_whole_numbers_in_any_form():
    assert [parse_seed(v) for v in (0, 7.0, " 12 ", "1e3", np.int64(5), MAX_SEED)] == [0, 7, 12, 1000, 5, MAX_SEED]


def test_a_ten_megabyte_prompt_is_cut_before_anything_reads_it():
    prompt, notes = clean_prompt("a cat " * 2_000_000)
    assert len(prompt) <= MAX_PROMPT_CHARS and prompt.startswith("a cat a cat")
    assert "12,000,000 characters" in notes[0] and f"first {MAX_PROMPT_CHARS:,}" in notes[0]


def test_control_characters_become_spaces():
    assert clean_prompt("a\x00cat\n\twith\x1b[31m a hat\ud800") == ("a cat with [31m a hat", [])
    assert clean_prompt("  \n\t ") == ("", [EMPTY_PROMPT_NOTE])


# --- sketch images of any mode, size and aspect ---------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


def stroke_image(mode: str, width: int, height: int, points, stroke: int) -> Image.Image:
    """A black stroke on white paper (transparent paper for modes with alpha), in `mode`."""
    grey = Image.new("L", (width, height), 255)
    ImageDraw.Draw(grey).line(points, fill=0, width=stroke)
    array = np.asarray(grey)
    if mode == "I;16":
        return Image.fromarray((array.astype(np.uint16) * 257), mode="I;16")
    if mode == "I":
        return Image.fromarray(array.astype(np.int32) * 100)
    if mode == "F":
        return Image.fromarray(array.astype(np.float32) / 255.0)
    if mode in ("LA", "RGBA"):
        ink = Image.new(mode, (width, height), (0,) * len(mode))  # transparent paper
        ink.paste(Image.new(mode, (width, height), (0,) * (len(mode) - 1) + (255,)), mask=Image.fromarray(255 - array))
        return ink
    return grey.convert(mode)


@st.composite
def sketches(draw):
    width = draw(st.integers(4, 3000))
    height = draw(st.integers(4, max(4, min(3000, 400_000 // width))))  # any aspect, kept small for speed
    points = [(draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))) for _ in range(2)]
    stroke = draw(st.integers(1, max(1, min(width, height) // 8)))
    return draw(st.sampled_from(MODES)), width, height, points, stroke


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sketches())
@example(("1", 4, 4, [(0, 0), (1, 3)], 1))  # once failed CI: Lanczos alone smeared a 4 px sketch over the paper
def test_any_image_with_a_black_stroke_gives_a_white_rgb_sketch_with_the_stroke_dark(case):
    mode, width, height, points, stroke = case
    sketch = prepare_sketch(stroke_image(mode, width, height, points, stroke))
    assert sketch is not None, "a stroke was called empty"
    array = np.asarray(sketch)
    assert sketch.mode == "RGB" and sketch.size == (512, 512)
    assert (array[..., 0] == array[..., 2]).all()  # grey
    assert np.median(array) >= BLANK_LEVEL  # white paper, however small the picture
    assert array.min() < 128, f"the stroke faded to {array.min()}"  # strokes survive any downscaling


@pytest.mark.parametrize("size", [(6000, 300), (300, 6000), (20000, 40)])
def test_thin_lines_of_extreme_aspect_ratios_stay_black(size):
    image = Image.new("L", size, 255)
    ImageDraw.Draw(image).line([(0, 0), size], fill=0, width=8)
    array = np.asarray(prepare_sketch(image))
    assert array.min() == 0  # black, not a faded grey
    # ...and only where the line is: padded to a square, never stretched.
    ink_rows = np.where(array.min(axis=1) < 128)[0] if size[0] > size[1] else np.where(array.min(axis=0) < 128)[0]
    assert ink_rows.max() - ink_rows.min() < 512 * min(size) / max(size) + 8


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_fully_transparent_images_are_empty(mode):
    assert prepare_sketch(Image.new(mode, (300, 200))) is None


def test_palette_image_with_a_transparent_index():
    image = Image.new("P", (200, 200), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)  # index 0 black, 1 white
    ImageDraw.Draw(image).line([(10, 10), (190, 190)], fill=0, width=6)  # black line on white
    assert np.asarray(prepare_sketch(image)).min() == 0
    image.info["transparency"] = 1  # see-through ground: the line stays
    assert np.asarray(prepare_sketch(image)).min() == 0
    image.info["transparency"] = 0  # see-through line: nothing drawn
    assert prepare_sketch(image) is None


def write_animation(path, frames_with_ink, n=4, fmt="GIF"):
    frames = []
    for i in range(n):
        frame = Image.new("RGB", (120, 80), (255 - i,) * 3)  # paper, a shade apart: no frame merged away
        if i in frames_with_ink:
            ImageDraw.Draw(frame).line([(5 + i, 5), (110, 70 - i)], fill="black", width=4)
        frames.append(frame)
    extra = {"lossless": True, "minimize_size": False} if fmt == "WEBP" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, format=fmt, **extra)
    return path


@pytest.mark.parametrize("fmt, suffix", [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")])
def test_animation_uses_its_first_frame_with_strokes(tmp_path, fmt, suffix):
    path = write_animation(tmp_path / f"a.{suffix}", frames_with_ink={2, 3}, fmt=fmt)  # frames 1 and 2 blank (0 and 1 counted from 0)
    sketch, notes = prepare_sketch_with_notes(open_image(path))
    assert sketch is not None and np.asarray(sketch).min() < 128
    assert notes == ["Animated image: used frame 3 of 4, the first with strokes."]
    blank = write_animation(tmp_path / f"b.{suffix}", frames_with_ink=set(), fmt=fmt)
    sketch, notes = prepare_sketch_with_notes(open_image(blank))
    assert sketch is None and "none of its first 4 frames" in notes[0]
    assert MAX_FRAMES >= 4


# --- uploads: opened by our code, under limits, before anything decodes them ---------------------

def png_bytes(width, height) -> bytes:
    """A valid PNG header for width x height (what a decompression bomb looks like before decoding)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bytes(20000, 20000))
    with pytest.raises(ValueError, match="too many pixels|20000x20000 pixels"):
        open_image(tmp_path / "bomb.png")
    side = math.isqrt(MAX_UPLOAD_PIXELS) + 1  # just over our limit, under PIL's own
    (tmp_path / "big.png").write_bytes(png_bytes(side, side))
    with pytest.raises(ValueError, match=f"{side}x{side} pixels; the limit is 40 megapixels"):
        open_image(tmp_path / "big.png")


def test_damaged_and_non_image_files_are_value_errors(tmp_path):
    good = tmp_path / "good.png"
    image = Image.new("RGB", (300, 300), "white")
    ImageDraw.Draw(image).ellipse([50, 50, 250, 250], outline="black", width=5)
    image.save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "flipped.png").write_bytes(data[:60] + bytes(b ^ 0xFF for b in data[60:200]) + data[200:])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name, message in [("truncated.png", "damaged or truncated"), ("flipped.png", "damaged or truncated|not an image"),
                          ("notes.txt", "not an image PIL can read"), ("empty.png", "not an image"),
                          ("folder.png", "not a file"), ("missing.png", "does not exist")]:
        with pytest.raises(ValueError, match=message):
            open_image(tmp_path / name)
    assert open_image(good).size == (300, 300)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: no real disk use
    with pytest.raises(ValueError, match="MiB; the limit is 20 MiB"):
        open_image(path)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"]))
def test_any_bytes_open_or_give_a_value_error(tmp_path_factory, data, magic):
    path = tmp_path_factory.mktemp("bytes") / "upload.png"
    path.write_bytes(magic + data)
    try:
        prepare_sketch_with_notes(open_image(path))
    except ValueError as err:
        assert str(err)
