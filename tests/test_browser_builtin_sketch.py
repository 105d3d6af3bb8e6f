"""End to end in a real headless browser: `python demo_sketch.py` with no --model, offline and with an empty
Hugging Face cache, serves the built-in sketch model (models/mini-sdxs with its controlnet/): the notice
shows, a circle drawn on the canvas with the prompt "grinning face" gives a 128 px image, shown enlarged
without blur.

It runs the repository itself when models/mini-sdxs has its controlnet/, else a copy of the checkout with a
random ControlNet of the same architecture: nothing here depends on what the model draws.
SDXS_SAVE_SCREENSHOTS=1 also writes docs/screenshots/builtin-sketch.png, from the repository's own model only
(regenerate it with the trained ControlNet in models/mini-sdxs, not with a stand-in)."""

import math

from browser import browser_page, require_browser, screenshot, serve
from conftest import ROOT, offline_env
from test_browser_builtin import save_for_docs
from test_demo_sketch import MINI, sketch_checkout

from sdxs.registry import SKETCH_MODEL

CIRCLE = [(0.5 + 0.3 * math.cos(2 * math.pi * k / 16), 0.5 + 0.3 * math.sin(2 * math.pi * k / 16)) for k in range(17)]


def draw_polyline(page, points):
    """One stroke through `points` (fractions of the canvas), one pointer move per point: the canvas redraws
    on every move, slowly in a headless browser without a GPU (a circle in 8-step moves took minutes)."""
    box = page.locator("#canvas canvas").first.bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y)
    page.mouse.up()


def test_demo_sketch_without_model_offline_serves_the_built_in_sketch_model(tmp_path):
    require_browser()
    from_repository = (MINI.folder / "controlnet").is_dir()
    checkout = ROOT if from_repository else sketch_checkout(tmp_path / "checkout")
    env = dict(offline_env(tmp_path), PYTHONPATH=str(checkout))
    log_path = tmp_path / "sketch.log"
    with serve(checkout / "demo_sketch.py", None, log_path, env=env, args=("--backend", "torch")) as url, browser_page(tmp_path) as page:
        page.goto(url)
        notice = page.locator("#fallback-notice")
        notice.wait_for(state="visible", timeout=30_000)
        assert SKETCH_MODEL in notice.inner_text() and f"hf download {SKETCH_MODEL}" in notice.inner_text()
        assert page.locator("#prompt textarea").input_value() == "grinning face"
        page.locator("#canvas canvas").first.wait_for(state="visible", timeout=30_000)
        assert "Draw on the canvas" in page.locator("#status").inner_text()

        draw_polyline(page, CIRCLE)  # no button: the stroke alone makes the image
        caption = MINI.expand_prompt("grinning face")  # its training caption (captions.json)
        page.locator("#status").get_by_text(caption).wait_for(timeout=60_000)
        assert MINI.title in page.locator("#status").inner_text()
        for elem_id, shown_at_least in [("output", 256), ("seen", 128)]:
            image = page.locator(f"#{elem_id} img").first
            image.wait_for(state="visible", timeout=30_000)
            # Native 128 px files (the image and the sketch the ControlNet read), enlarged with nearest neighbours.
            natural, shown, rendering = image.evaluate("img => [img.naturalWidth, img.clientWidth, getComputedStyle(img).imageRendering]")
            assert natural == 128 and shown >= shown_at_least and rendering == "pixelated", elem_id
        path = screenshot(page, "builtin-sketch.png", tmp_path)
        if from_repository:
            save_for_docs(path, "builtin-sketch.png")
    log = log_path.read_text()
    [warning] = [line for line in log.splitlines() if line.startswith("warning:")]  # one line: what happened, what to do
    assert SKETCH_MODEL in warning and "could not be loaded" in warning and MINI.title in warning
    assert "this machine only" in log and "Traceback" not in log
