"""End to end in a real headless browser: `python app.py --model <tiny folder>` takes a prompt and shows an image."""

from browser import browser_page, require_browser, screenshot, serve
from conftest import ROOT


def test_app_shows_an_image_for_a_prompt(tiny_model_dir, tmp_path):
    require_browser()
    with serve(ROOT / "app.py", tiny_model_dir, tmp_path / "app.log") as url, browser_page(tmp_path) as page:
        page.goto(url)
        page.locator("#prompt textarea").fill("a cat wearing a hat")
        page.locator("#run").click()
        image = page.locator("#gallery img").first
        image.wait_for(state="visible", timeout=60_000)
        page.locator("#status").get_by_text("image(s) in").wait_for(timeout=30_000)
        assert "seed" in page.locator("#status").inner_text()
        assert image.evaluate("img => img.naturalWidth") == 512
        screenshot(page, "app.png", tmp_path)

        # An emptied seed box with randomise off: the app's own message, then the next run works.
        page.locator("#settings").get_by_text("Settings").first.click()
        page.locator("#randomize input").uncheck()
        page.locator("#seed input").fill("")
        page.locator("#run").click()
        page.get_by_text("Seed is empty").first.wait_for(timeout=30_000)
        page.locator("#seed input").fill("7")
        page.locator("#run").click()
        page.locator("#status").get_by_text("seed 7").wait_for(timeout=60_000)
    # The OpenVINO start-up (auto backend on a CPU): progress lines, no tracing noise.
    log = (tmp_path / "app.log").read_text()
    assert "Warm-up done" in log and "this machine only" in log and "TracerWarning" not in log
