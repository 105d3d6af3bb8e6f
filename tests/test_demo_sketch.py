"""The sketch app's handler, called directly: empty canvas, strokes, styles, bad input."""

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

import demo_sketch
from sdxs.styles import STYLES, apply_style


def canvas_value(draw=True):
    layer = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    if draw:
        ImageDraw.Draw(layer).ellipse([120, 120, 390, 390], outline=(0, 0, 0, 255), width=8)
    background = Image.new("RGBA", (512, 512), (255, 255, 255, 255))
    composite = Image.alpha_composite(background, layer)
    return {"background": background, "layers": [layer], "composite": composite}


def test_empty_canvas_gives_white_image_and_a_hint(tiny_engine):
    generate = demo_sketch.make_generate(tiny_engine)
    for empty in (None, canvas_value(draw=False)):
        image, seen, status = generate(empty, "a cat", "{prompt}", 0.8, 0)
        assert np.asarray(image).min() == 255 and seen is None and "Draw on the canvas" in status


def test_stroke_gives_an_image_and_the_sketch_as_seen(tiny_engine):
    generate = demo_sketch.make_generate(tiny_engine)
    image, seen, status = generate(canvas_value(), "a cat", STYLES["Anime"], 0.8, 3)
    assert image.size == (512, 512) and seen.size == (512, 512) and "seed 3" in status
    again, _, _ = generate(canvas_value(), "a cat", STYLES["Anime"], 0.8, 3)
    assert image.tobytes() == again.tobytes()
    weaker, _, _ = generate(canvas_value(), "a cat", STYLES["Anime"], 0.0, 3)
    assert image.tobytes() != weaker.tobytes()


def test_unreadable_canvas_is_a_gradio_error(tiny_engine):
    with pytest.raises(gr.Error, match="Could not read that sketch"):
        demo_sketch.make_generate(tiny_engine)(object(), "a cat", "{prompt}", 0.8, 0)


def test_styles():
    assert list(STYLES)[0] == "No Style" and len(STYLES) == 10
    assert all("{prompt}" in template for template in STYLES.values())
    assert apply_style("{prompt}", " a cat ") == "a cat"
    assert apply_style("watercolour", "a cat") == "a cat, watercolour"
    assert apply_style(STYLES["Pixel art"], "").startswith("pixel art of")


def test_demo_builds(tiny_engine):
    assert isinstance(demo_sketch.build_demo(tiny_engine), gr.Blocks)
