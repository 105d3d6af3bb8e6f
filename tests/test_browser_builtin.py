"""End to end in a real headless browser: `python app.py` with no --model, offline and with an empty
Hugging Face cache, serves the built-in model: the notice shows, short prompts give 128 px images shown
enlarged without blur, and the download is the native PNG.

SDXS_SAVE_SCREENSHOTS=1 also writes docs/screenshots/builtin-*.png (regenerate them with the trained
model in models/mini-sdxs, not with a stand-in)."""

import os
import shutil

from PIL import Image

from browser import browser_page, require_browser, screenshot, serve
from conftest import ROOT, offline_env
from sdxs.registry import BUILTIN, BUILTIN_MODEL

SCREENSHOT_DIR = ROOT / "docs" / "screenshots"


def save_for_docs(path, name: str) -> None:
    if os.environ.get("SDXS_SAVE_SCREENSHOTS") == "1":
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOT_DIR / name)


def test_app_without_model_offline_serves_the_built_in_model(tmp_path):
    require_browser()
    title = BUILTIN[BUILTIN_MODEL].title
    with serve(ROOT / "app.py", None, tmp_path / "app.log", env=offline_env(tmp_path)) as url, browser_page(tmp_path) as page:
        page.goto(url)
        notice = page.locator("#fallback-notice")
        notice.wait_for(state="visible", timeout=30_000)
        assert "IDKiro/sdxs-512-dreamshaper" in notice.inner_text() and "hf download" in notice.inner_text()

        for prompt, name in [("grinning face", "builtin-grinning-face.png"), ("red apple", "builtin-red-apple.png"),
                             ("rocket", "builtin-rocket.png")]:  # short prompts as a user types them (issue 18)
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#run").click()
            caption = BUILTIN[BUILTIN_MODEL].expand_prompt(prompt)  # its training caption (captions.json)
            assert caption.startswith(f"an emoji of {prompt}, ") and "category" in caption
            page.locator("#status").get_by_text(caption).wait_for(timeout=60_000)
            assert title in page.locator("#status").inner_text()
            image = page.locator("#gallery img").first
            image.wait_for(state="visible", timeout=30_000)
            # Native 128 px file, shown at least 2x larger, with nearest-neighbour scaling, whole inside the gallery.
            natural, shown, rendering = image.evaluate("img => [img.naturalWidth, img.clientWidth, getComputedStyle(img).imageRendering]")
            assert natural == 128 and shown >= 256 and rendering == "pixelated"
            box, gallery = image.bounding_box(), page.locator("#gallery").bounding_box()
            assert box["y"] + box["height"] <= gallery["y"] + gallery["height"] + 1
            save_for_docs(screenshot(page, name, tmp_path), name)

        # The download offered for the image is the native PNG, as made.
        image.click()
        with page.expect_download(timeout=30_000) as download:
            page.locator("#gallery").get_by_role("button", name="Download").first.click()
        downloaded = Image.open(download.value.path())
        assert downloaded.format == "PNG" and downloaded.size == (128, 128)
    log = (tmp_path / "app.log").read_text()
    [warning] = [line for line in log.splitlines() if line.startswith("warning:")]  # one line: what happened, what to do
    assert "could not be loaded" in warning and "hf download" in warning
    assert "this machine only" in log and "Traceback" not in log
