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


# --- uploads and values as the API sends them (preprocess=False: the app opens files itself) ------

def upload(path):
    """The canvas value of an API call that uploads one file as the background."""
    return {"background": {"path": str(path), "meta": {"_type": "gradio.FileData"}}, "layers": [], "composite": None, "id": None}


def test_a_line_drawing_upload_makes_an_image(tiny_engine, tmp_path):
    drawing = Image.new("L", (900, 300), 255)
    ImageDraw.Draw(drawing).line([(0, 150), (900, 150)], fill=0, width=3)
    drawing.save(tmp_path / "line.png")
    image, seen, status = demo_sketch.make_generate(tiny_engine)(upload(tmp_path / "line.png"), "a cat", "{prompt}", 0.8, 4)
    assert image.size == (512, 512) and np.asarray(seen).min() < 128 and "seed 4" in status


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "Could not read that sketch: 'corrupt.png' is not an image"),
        ("notes.png", b"hello", "'notes.png' is not an image"),
        ("bomb.png", "bomb", "has too many pixels|20000x20000 pixels"),
    ],
)
def test_bad_uploads_get_the_apps_own_message(tiny_engine, tmp_path, name, content, message):
    from test_validation import png_bytes

    (tmp_path / name).write_bytes(png_bytes(20000, 20000) if content == "bomb" else content)
    generate = demo_sketch.make_generate(tiny_engine)
    with pytest.raises(gr.Error, match=message):
        generate(upload(tmp_path / name), "a cat", "{prompt}", 0.8, 0)
    image, _, _ = generate(canvas_value(), "a cat", "{prompt}", 0.8, 0)  # still serving
    assert image.size == (512, 512)


def test_animated_upload_uses_the_first_frame_with_strokes(tiny_engine, tmp_path):
    from test_validation import write_animation

    path = write_animation(tmp_path / "blank-first.gif", frames_with_ink={1})
    image, seen, status = demo_sketch.make_generate(tiny_engine)(upload(path), "a cat", "{prompt}", 0.8, 0)
    assert seen is not None and np.asarray(seen).min() < 128
    assert "Note: Animated image: used frame 2 of 4, the first with strokes." in status


@pytest.mark.parametrize(
    "prompt, template, strength, seed, message",
    [
        ("a cat", "{prompt}", 0.8, None, "Seed is empty"),
        ("a cat", "{prompt}", 0.8, 2**64, "Seed must be a whole number from 0 to 4294967295"),
        ("a cat", "{prompt}", 0.8, 2.5, "got 2.5"),
        ("a cat", "{prompt}", 5, 0, "Control strength must be a number from 0 to 1; got 5"),
        ("a cat", "{prompt}", None, 0, "Control strength"),
        (7, "{prompt}", 0.8, 0, "The prompt must be text"),
    ],
)
def test_bad_values_are_clear_messages(tiny_engine, prompt, template, strength, seed, message):
    with pytest.raises(gr.Error, match=message):
        demo_sketch.make_generate(tiny_engine)(canvas_value(), prompt, template, strength, seed)


def test_empty_prompt_is_noted_unless_a_style_fills_it(tiny_engine):
    generate = demo_sketch.make_generate(tiny_engine)
    _, _, status = generate(canvas_value(), "  ", "{prompt}", 0.8, 0)
    assert "Note: The prompt is empty" in status
    _, _, status = generate(canvas_value(), "", STYLES["Pixel art"], 0.8, 0)
    assert "Note" not in status


def test_api_is_one_named_live_endpoint_that_drops_stale_strokes(tiny_engine):
    demo = demo_sketch.build_demo(tiny_engine)
    api = demo.get_api_info()
    assert list(api["named_endpoints"]) == ["/sketch"]
    endpoint = api["named_endpoints"]["/sketch"]
    assert [p["label"] for p in endpoint["returns"]] == ["Image", "Sketch as seen", "Status"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == ["canvas", "prompt", "template", "control_strength", "seed"]
    # Every trigger that makes an image (strokes, style, seed) runs the same handler, one at a
    # time in one queue, and keeps only the latest pending request ("always_last").
    runs = [fn for fn in demo.fns.values() if fn.name == "generate"]
    assert len(runs) == 3 and sum(len(fn.targets) for fn in runs) == 9
    assert all(fn.trigger_mode == "always_last" and fn.concurrency_limit == 1 and fn.concurrency_id == "sketch" for fn in runs)
    assert all(fn.preprocess is False for fn in runs)


def test_a_model_without_controlnet_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "text-only", ignore=shutil.ignore_patterns("controlnet"))
    assert demo_sketch.main(["--model", str(tmp_path / "text-only"), "--backend", "torch"]) == 2
    assert "has no ControlNet; use IDKiro/sdxs-512-dreamshaper-sketch or a folder with controlnet/" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        demo_sketch.main(["--model", str(tmp_path / "missing"), "--backend", "torch"])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err
