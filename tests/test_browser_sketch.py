"""End to end in a real headless browser: draw a stroke in demo_sketch.py, an image appears, no button pressed."""

from browser import browser_page, require_browser, screenshot, serve
from conftest import ROOT


def draw_stroke(page, points):
    box = page.locator("#canvas canvas").first.bounding_box()
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + points[0][0] * box["width"], y0 + points[0][1] * box["height"])
    page.mouse.down()
    for fx, fy in points[1:]:
        page.mouse.move(x0 + fx * box["width"], y0 + fy * box["height"], steps=8)
    page.mouse.up()


def test_a_stroke_makes_an_image_without_a_button(tiny_model_dir, tmp_path):
    require_browser()
    with serve(ROOT / "demo_sketch.py", tiny_model_dir, tmp_path / "sketch.log") as url, browser_page(tmp_path) as page:
        page.goto(url)
        page.locator("#canvas canvas").first.wait_for(state="visible", timeout=30_000)
        assert "Draw on the canvas" in page.locator("#status").inner_text()  # empty canvas: a hint, no error
        draw_stroke(page, [(0.2, 0.2), (0.5, 0.6), (0.8, 0.3)])
        page.locator("#status").get_by_text("image(s) in").wait_for(timeout=60_000)
        image = page.locator("#output img").first
        image.wait_for(state="visible", timeout=30_000)
        assert image.evaluate("img => img.naturalWidth") == 512
        first_src = image.get_attribute("src")
        draw_stroke(page, [(0.3, 0.8), (0.7, 0.8)])  # another stroke: another image, still no button
        page.wait_for_function(
            "prev => { const img = document.querySelector('#output img'); return img && img.src !== prev; }",
            arg=first_src, timeout=60_000,
        )
        page.locator("#status").get_by_text("image(s) in").wait_for(timeout=30_000)
        screenshot(page, "sketch.png", tmp_path)
