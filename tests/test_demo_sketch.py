"""The sketch app's handler, called directly: empty canvas, strokes, styles, bad input; its built-in model."""

import inspect
import json
import logging
import shutil
from dataclasses import replace

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

import demo_sketch
from conftest import ROOT
from sdxs import SDXSEngine
from sdxs.registry import BUILTIN, BUILTIN_MODEL, SKETCH_MODEL
from sdxs.sketch import prepare_sketch
from sdxs.styles import STYLES, apply_style
from sdxs.webapp import fallback_notice, sketch_size


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
    shutil.copytree(tiny_model_dir, tmp_path / "text-only", ignore=shutil.ignore_patterns("controlnet"))
    assert demo_sketch.main(["--model", str(tmp_path / "text-only"), "--backend", "torch"]) == 2
    assert "has no ControlNet; use IDKiro/sdxs-512-dreamshaper-sketch or a folder with controlnet/" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        demo_sketch.main(["--model", str(tmp_path / "missing"), "--backend", "torch"])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


# --- the built-in sketch model: `python demo_sketch.py` offline runs models/mini-sdxs with its controlnet/ ----------
# Built here, in temporary copies of models/mini-sdxs, with a random ControlNet of the built-in one's architecture:
# nothing depends on what the bundled (or a stand-in) ControlNet draws, nor on whether the checkout has one yet.

MINI = BUILTIN[BUILTIN_MODEL]


def write_mini_sketch_controlnet(folder) -> None:
    """`folder`/controlnet/: the student ControlNet of the built-in model (issue 15's mini architecture: the
    mini U-Net's encoder, 128x128 sketches through a conditioning embedding that halves three times), random weights
    with its zero convolutions perturbed so the sketch acts (as make-tiny's)."""
    from diffusers import ControlNetModel

    from sdxs.build import _randomise_zero_convs

    unet = json.loads((folder / "unet" / "config.json").read_text())
    shared = {k: v for k, v in unet.items() if k in inspect.signature(ControlNetModel.__init__).parameters}
    controlnet = ControlNetModel(**dict(
        shared, in_channels=4, block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1, attention_head_dim=4, cross_attention_dim=128, conditioning_embedding_out_channels=(16, 32, 64, 64),
        mid_block_type="UNetMidBlock2DCrossAttn",
    ))
    _randomise_zero_convs(controlnet)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)


def copy_builtin_folder(dest, *, with_controlnet: bool):
    """A copy of models/mini-sdxs at `dest`, with a random sketch ControlNet or with none."""
    shutil.copytree(MINI.folder, dest, ignore=shutil.ignore_patterns("controlnet"))
    if with_controlnet:
        write_mini_sketch_controlnet(dest)
    return dest


def sketch_checkout(dest):
    """A fresh checkout whose models/mini-sdxs has a sketch ControlNet: the package, demo_sketch.py and the
    built-in folder (sdxs finds models/ next to itself); run `python DEST/demo_sketch.py` with PYTHONPATH=DEST."""
    shutil.copytree(ROOT / "sdxs", dest / "sdxs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "demo_sketch.py", dest / "demo_sketch.py")
    copy_builtin_folder(dest / "models" / MINI.folder.name, with_controlnet=True)
    return dest


def load_builtin(folder) -> SDXSEngine:
    """The built-in model ("mini", so the apps treat it as such) loaded from `folder`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BUILTIN, BUILTIN_MODEL, replace(MINI, folder=folder))
        return SDXSEngine.from_pretrained(BUILTIN_MODEL, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def builtin_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    return {"sketch": copy_builtin_folder(root / "with-controlnet" / "mini-sdxs", with_controlnet=True),
            "text": copy_builtin_folder(root / "text-only" / "mini-sdxs", with_controlnet=False)}


@pytest.fixture(scope="module")
def builtin_sketch_engine(builtin_dirs):
    return load_builtin(builtin_dirs["sketch"])


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Offline with an empty Hugging Face cache, in this process: every hub id is a ModelNotFoundError."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def launched(monkeypatch):
    """main() up to Gradio's launch: what it would serve (the Blocks and launch's kwargs), no server."""
    served = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: served.update(kwargs, blocks=self))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # launch() lowers it; restored after
    return served


def component(demo, elem_id):
    return next((b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id), None)


def strength_slider(demo):
    [slider] = [b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == "Control strength"]
    return slider


def served_generate(demo):
    """The handler the page's strokes call (the /sketch endpoint)."""
    [fn] = [fn for fn in demo.fns.values() if fn.api_name == "sketch"]
    return fn.fn


def test_without_model_offline_serves_the_built_in_sketch_model_with_a_notice(builtin_dirs, hub_unreachable, launched, monkeypatch, caplog):
    monkeypatch.setitem(BUILTIN, BUILTIN_MODEL, replace(MINI, folder=builtin_dirs["sketch"]))
    with caplog.at_level(logging.WARNING, logger="sdxs"):
        assert demo_sketch.main(["--backend", "torch", "--port", "7997"]) == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"Could not find or download model '{SKETCH_MODEL}'" in warning and MINI.title in warning
    demo = launched["blocks"]
    notice = component(demo, "fallback-notice").value
    assert notice == fallback_notice(SKETCH_MODEL)
    assert f"the full model {SKETCH_MODEL} could not be loaded" in notice  # the sketch model, and its base, to fetch
    assert f"`hf download {SKETCH_MODEL}` and its base `hf download IDKiro/sdxs-512-dreamshaper`" in notice
    assert launched["css"] == demo_sketch.PIXELATED_IMAGES_CSS  # 128 px images fill their boxes, pixelated
    assert component(demo, "prompt").value == "grinning face"
    # What a stroke on that page makes: a 128 px emoji from a 128 px sketch, read through the caption form.
    image, seen, status = served_generate(demo)(canvas_value(), "grinning face", "{prompt}", 0.8, 2)
    assert image.size == seen.size == (128, 128) and f"`{MINI.captions()['grinning face']}`" in status


def test_model_mini_is_served_without_a_notice(builtin_dirs, launched, monkeypatch):
    monkeypatch.setitem(BUILTIN, BUILTIN_MODEL, replace(MINI, folder=builtin_dirs["sketch"]))
    assert demo_sketch.main(["--model", "mini", "--backend", "torch", "--port", "7996"]) == 0
    assert component(launched["blocks"], "fallback-notice") is None and launched["css"] == demo_sketch.PIXELATED_IMAGES_CSS


@pytest.mark.parametrize("argv", [[], ["--model", "mini"]], ids=["fallback", "model-mini"])
def test_a_built_in_model_without_controlnet_says_what_to_do(builtin_dirs, hub_unreachable, launched, monkeypatch, capsys, argv):
    monkeypatch.setitem(BUILTIN, BUILTIN_MODEL, replace(MINI, folder=builtin_dirs["text"]))
    assert demo_sketch.main([*argv, "--backend", "torch", "--port", "7995"]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "the built-in model 'mini' has no sketch ControlNet: models/mini-sdxs/controlnet/ is missing" in line
    assert "git checkout -- models/mini-sdxs" in line and f"hf download {SKETCH_MODEL}" in line
    assert (f"{SKETCH_MODEL} could not be loaded" in line) == (argv == [])  # the fallback says why the built-in model ran
    assert "Traceback" not in err and not launched  # nothing served


def test_the_built_in_sketch_model_reads_64_px_sketches_and_captions(builtin_sketch_engine):
    engine = builtin_sketch_engine
    assert sketch_size(engine) == 128 and engine.native_size == 128
    caption = MINI.captions()["grinning face"]
    image, seen, status = demo_sketch.make_generate(engine)(canvas_value(), "grinning face", "{prompt}", 0.8, 3)
    assert seen.tobytes() == prepare_sketch(canvas_value(), 128).tobytes()  # the drawn circle, at the ControlNet's size
    expected = engine.sketch_to_image(canvas_value(), caption, seed=3, control_strength=0.8).images[0]
    assert image.size == (128, 128) and image.tobytes() == expected.tobytes()
    assert f"Prompt as the model read it: `{caption}`" in status and f"seed 3 · {MINI.title}" in status
    without_sketch = engine.sketch_to_image(canvas_value(), caption, seed=3, control_strength=0.0).images[0]
    assert image.tobytes() != without_sketch.tobytes()  # the sketch acts
    # The page: its own default prompt, no style templates (a style would garble the caption form).
    demo = demo_sketch.build_demo(engine)
    assert component(demo, "prompt").value == "grinning face"
    assert component(demo, "styles").visible is False
    assert strength_slider(demo).value == 1.0  # the strength its ControlNet was trained and measured at
    assert any(f"`{caption}`" in b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown))


def test_a_512_px_model_keeps_its_page(tiny_engine):
    demo = demo_sketch.build_demo(tiny_engine)
    assert demo_sketch.page_css(tiny_engine) is None and sketch_size(tiny_engine) == 512
    assert component(demo, "prompt").value == demo_sketch.DEFAULT_PROMPT and component(demo, "fallback-notice") is None
    assert component(demo, "styles").visible is True
    assert strength_slider(demo).value == 0.8  # the upstream demo's default


def test_app_text_to_image_is_unchanged_by_the_built_in_controlnet(builtin_dirs, builtin_sketch_engine, launched, monkeypatch):
    import app

    text_only = load_builtin(builtin_dirs["text"])
    with_controlnet, _, status = app.make_generate(builtin_sketch_engine)("grinning face", 4, False, 2, "tiny")
    without, _, _ = app.make_generate(text_only)("grinning face", 4, False, 2, "tiny")
    assert [i.tobytes() for i in with_controlnet] == [i.tobytes() for i in without] and MINI.captions()["grinning face"] in status
    monkeypatch.setitem(BUILTIN, BUILTIN_MODEL, replace(MINI, folder=builtin_dirs["sketch"]))
    assert app.main(["--model", "mini", "--backend", "torch", "--port", "7994"]) == 0  # app.py serves it as before
    assert "image-rendering: pixelated" in launched["css"]


def test_batched_serving_of_strokes_gives_each_visitor_their_own_image(tiny_engine):
    """On a GPU (forced here) every trigger's event serves visitors at once through one batcher:
    two visitors' strokes share a forward, and each image is the one that visitor gets alone."""
    import threading

    from sdxs.webapp import GPU_CONCURRENCY

    engine = SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch")
    runs = [fn for fn in demo_sketch.build_demo(engine, batch_requests=True).fns.values() if fn.name == "generate"]
    assert all(fn.concurrency_limit == GPU_CONCURRENCY and fn.concurrency_id == "sketch" for fn in runs)
    assert len({id(fn.fn.runner) for fn in runs}) == 1  # one batcher behind every trigger
    runner = runs[0].fn.runner
    runner.window_s = 1.0
    line = canvas_value(draw=False)
    ImageDraw.Draw(line["layers"][0]).line([(60, 60), (450, 450)], fill=(0, 0, 0, 255), width=10)
    line["composite"] = Image.alpha_composite(line["background"], line["layers"][0])
    canvases, answers, start = [canvas_value(), line], [None, None], threading.Barrier(2)

    def visit(i):
        start.wait()
        answers[i] = runs[0].fn(canvases[i], "a cat", "{prompt}", 1.0, 3)

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert runner.forwards == 1
    for canvas, (image, seen, _) in zip(canvases, answers):
        alone, alone_seen, _ = demo_sketch.make_generate(tiny_engine)(canvas, "a cat", "{prompt}", 1.0, 3)
        assert np.abs(np.asarray(image).astype(int) - np.asarray(alone).astype(int)).max() <= 1
        assert np.array_equal(np.asarray(seen), np.asarray(alone_seen))
    assert not np.array_equal(np.asarray(answers[0][0]), np.asarray(answers[1][0]))
