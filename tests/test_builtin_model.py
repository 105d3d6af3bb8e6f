"""The built-in model (models/mini-sdxs, `--model mini`): its registry entry and prompt template, and the
fallback of `python app.py` / `python -m sdxs generate` without --model when the hub model cannot be
loaded. "Hub unreachable" is real: HF_HUB_OFFLINE=1 and an empty HF_HOME (conftest.offline_env).

Nothing here depends on what the model draws: the folder may be a stand-in or the trained one."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import gradio as gr
import pytest
from PIL import Image

from conftest import ROOT, offline_env
from sdxs import DEFAULT_MODEL, ModelNotFoundError, SDXSEngine
from sdxs.loading import resolve_model_dir
from sdxs.registry import BUILTIN, BUILTIN_MODEL, builtin_model
from sdxs.webapp import display_name, fallback_notice, is_fallback, prompt_for
from train.emoji_data import build_caption

sys.path.insert(0, str(ROOT))
import app  # noqa: E402

MINI = BUILTIN[BUILTIN_MODEL]


@pytest.fixture(scope="module")
def mini_engine():
    return SDXSEngine.from_pretrained(BUILTIN_MODEL, device="cpu", backend="torch")


def run(args, tmp_path, cwd=None, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd or tmp_path, env=env or offline_env(tmp_path), capture_output=True, text=True, timeout=300)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# --- the registry entry and its prompt template ---------------------------------------------------------


@pytest.mark.parametrize("prompt, caption", [
    ("red apple", "an emoji of red apple, apple, category food & drink, subcategory food-fruit, noto style"),
    ("  Grinning   FACE ", "an emoji of grinning face, grinning, category smileys & emotion, subcategory face-smiling, noto style"),
    ("pizza", "an emoji of slice of pizza, pizza, category food & drink, subcategory food-prepared, noto style"),  # a short name
])
def test_a_known_emoji_name_becomes_its_training_caption(prompt, caption):
    assert MINI.captions()[" ".join(prompt.lower().split())] == caption  # the folder's captions.json
    assert MINI.expand_prompt(prompt) == caption


@pytest.mark.parametrize("prompt", ["purple dinosaur", "  A   Cat on a Skateboard "])
def test_an_unknown_short_prompt_gets_the_shortest_caption_form(prompt):
    # The shortest caption train/emoji_data.py writes: an emoji with only a name, noto style.
    assert MINI.expand_prompt(prompt) == build_caption({"name": " ".join(prompt.split())}, "noto")
    assert MINI.expand_prompt("purple dinosaur") == "an emoji of purple dinosaur, noto style"


def test_without_a_caption_table_every_short_prompt_gets_the_template(tmp_path):
    import dataclasses

    bare = dataclasses.replace(MINI, folder=tmp_path)  # no captions.json there
    assert bare.captions() == {} and bare.expand_prompt("red apple") == "an emoji of red apple, noto style"


@pytest.mark.parametrize("prompt", ["an emoji of red apple, apple, category food & drink, twitter style", "An Emoji of a cat", ""])
def test_a_caption_and_an_empty_prompt_are_kept(prompt):
    assert MINI.expand_prompt(prompt) == prompt


def test_the_template_applies_to_the_built_in_model_only(mini_engine, tiny_engine):
    assert prompt_for(mini_engine, "purple dinosaur") == "an emoji of purple dinosaur, noto style"
    assert prompt_for(mini_engine, "red apple") == MINI.captions()["red apple"]
    assert prompt_for(tiny_engine, "red apple") == "red apple"
    assert builtin_model("IDKiro/sdxs-512-dreamshaper") is None


def test_mini_names_the_repository_folder_in_the_released_layout(mini_engine):
    assert BUILTIN_MODEL == "mini" and MINI.folder == ROOT / "models" / "mini-sdxs"
    assert resolve_model_dir("mini") == MINI.folder
    # What the registry states is what the folder's configs give: 128 px from 16x16x4 latents, f=8.
    assert mini_engine.name == "mini" and mini_engine.native_size == MINI.native_size == 128
    assert mini_engine.vae_scale_factor == 8 and mini_engine.components.unet.config.sample_size == 16
    assert mini_engine.components.unet.config.in_channels == 4
    unet = json.loads((MINI.folder / "unet" / "config.json").read_text())
    assert unet["mid_block_type"] is None  # the SDXS U-Net: no mid block
    assert json.loads((MINI.folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DEISMultistepScheduler"
    assert mini_engine.decoders == ["tiny", "large"]  # vae/ AutoencoderTiny, vae_large/ the teacher's AutoencoderKL
    assert display_name(mini_engine) == MINI.title


def test_a_missing_built_in_folder_is_a_clear_error(monkeypatch, tmp_path):
    from dataclasses import replace

    monkeypatch.setitem(BUILTIN, BUILTIN_MODEL, replace(MINI, folder=tmp_path / "mini-sdxs"))
    with pytest.raises(ModelNotFoundError, match="models/mini-sdxs/, but that folder is missing: the checkout is incomplete"):
        SDXSEngine.from_pretrained("mini", device="cpu", backend="torch")


# --- the app's handler and page on the built-in model -------------------------------------------------------


def test_the_handler_reads_the_expanded_prompt_and_returns_native_images(mini_engine):
    images, seed, status = app.make_generate(mini_engine)("grinning face", 3, False, 2, "tiny")
    assert seed == 3 and [image.size for image in images] == [(128, 128)] * 2  # native: the download is the file as made
    caption = MINI.captions()["grinning face"]
    expected = mini_engine.text_to_image(caption, seed=3, num_images=2, decoder="tiny").images
    assert [image.tobytes() for image in images] == [image.tobytes() for image in expected]
    assert f"Prompt as the model read it: `{caption}`" in status
    # A prompt already in the caption form goes as typed, and the status does not repeat it.
    _, _, status = app.make_generate(mini_engine)("an emoji of red apple, twitter style", 3, False, 1, "tiny")
    assert "Prompt as the model read it" not in status


def test_the_page_enlarges_small_images_without_blur_and_leaves_512_px_models_alone(mini_engine, tiny_engine):
    assert "image-rendering: pixelated" in app.gallery_css(mini_engine.native_size)
    assert app.gallery_css(tiny_engine.native_size) is None  # 512 px: as before

    def gallery(engine):
        return next(b for b in app.build_demo(engine).blocks.values() if isinstance(b, gr.Gallery))

    small, large = gallery(mini_engine), gallery(tiny_engine)
    assert (small.columns, small.fit_columns, small.format) == (3, False, "png")  # whole images, native PNGs
    assert (large.columns, large.fit_columns, large.height) == (2, True, 560)


def test_the_page_shows_the_template_the_notice_and_emoji_examples(mini_engine):
    demo = app.build_demo(mini_engine, notice=fallback_notice())
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    notice = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "fallback-notice")
    assert DEFAULT_MODEL in notice.value and f"hf download {DEFAULT_MODEL}" in notice.value and "--model mini" in notice.value
    assert any(f"`{MINI.captions()['grinning face']}`" in text for text in texts)
    examples = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataset))
    assert [row[0] for row in examples.raw_samples] == list(MINI.examples)
    assert not any(getattr(b, "elem_id", None) == "fallback-notice" for b in app.build_demo(mini_engine).blocks.values())


def test_main_with_model_mini_serves_it_pixelated_without_a_notice(monkeypatch):
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # launch() lowers it; restored after
    assert app.main(["--model", "mini", "--backend", "torch", "--port", "7998"]) == 0
    assert "image-rendering: pixelated" in launched["css"]
    assert not any(getattr(b, "elem_id", None) == "fallback-notice" for b in launched["blocks"].blocks.values())  # asked for: no notice


def test_only_a_missing_model_argument_counts_as_a_fallback(mini_engine):
    assert is_fallback(None, mini_engine) and not is_fallback("mini", mini_engine)


# --- the fallback, for real: offline, empty cache, in subprocesses -----------------------------------------------


def test_generate_without_model_falls_back_with_one_warning(tmp_path):
    proc = run(["-m", "sdxs", "generate", "--prompt", "red apple", "--out", "apple.png", "--backend", "torch"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "apple.png").size == (128, 128)
    [warning] = warning_lines(proc.stderr)
    assert DEFAULT_MODEL in warning and "could not be loaded" in warning and "HF_HUB_OFFLINE is set" in warning  # what happened
    assert MINI.title in warning and f"hf download {DEFAULT_MODEL}" in warning and "HF_HOME" in warning  # what runs, how to get the full one
    assert f"note: the prompt as the model reads it: '{MINI.captions()['red apple']}'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_explicit_model_that_fails_never_falls_back(tmp_path, capsys):
    proc = run(["-m", "sdxs", "generate", "--model", DEFAULT_MODEL, "--prompt", "red apple", "--out", "x.png", "--backend", "torch"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("error: ") == 1 and f"Could not find or download model '{DEFAULT_MODEL}'" in proc.stderr
    assert "built-in" not in proc.stderr and warning_lines(proc.stderr) == [] and not (tmp_path / "x.png").exists()
    from sdxs.cli import main  # a missing local folder: the same, in this process (no hub involved)

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "red apple", "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "built-in" not in err and not (tmp_path / "y.png").exists()


def test_generate_with_model_mini_uses_it_without_trying_the_hub(tmp_path):
    proc = run(["-m", "sdxs", "generate", "--model", "mini", "--prompt", "grinning face", "--out", "face.png", "--backend", "torch"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "face.png").size == (128, 128)
    assert DEFAULT_MODEL not in proc.stderr and warning_lines(proc.stderr) == []


def test_a_checkout_without_the_built_in_model_keeps_the_hub_error_with_a_note(tmp_path):
    checkout = tmp_path / "checkout"  # the package without models/: a broken checkout
    shutil.copytree(ROOT / "sdxs", checkout / "sdxs", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(offline_env(tmp_path), PYTHONPATH=str(checkout))
    proc = run(["-m", "sdxs", "generate", "--prompt", "red apple", "--out", "x.png", "--backend", "torch"], tmp_path, cwd=checkout, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: Could not find or download model '{DEFAULT_MODEL}'" in proc.stderr  # the existing error
    assert "Note: the built-in model 'mini'" in proc.stderr and "models/mini-sdxs/, but that folder is missing" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_without_model_serves_the_built_in_model_with_a_notice(tmp_path):
    """`python app.py` offline: one warning in the log, the notice in the page, 128 px images from its API."""
    from gradio_client import Client

    port, log_path = _free_port(), tmp_path / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--backend", "torch", "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=offline_env(tmp_path), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                config = json.load(urllib.request.urlopen(url + "config", timeout=2))
                break
            except OSError:
                assert time.time() < deadline, "app.py did not answer"
                time.sleep(0.5)
        [notice] = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "fallback-notice"]
        assert notice == fallback_notice()
        images, _, status = Client(url, verbose=False).predict("grinning face", 5, False, 1, "tiny", MINI.title, api_name="/generate")
        assert Image.open(images[0]["image"]).size == (128, 128)
        assert MINI.captions()["grinning face"] in status and f"seed 5 · {MINI.title}" in status
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    [warning] = warning_lines(log_path.read_text())
    assert DEFAULT_MODEL in warning and MINI.title in warning and f"hf download {DEFAULT_MODEL}" in warning
