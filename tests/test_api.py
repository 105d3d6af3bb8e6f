"""The README's API examples, exactly as written there, against the running apps (tiny model,
127.0.0.1, a free port): the endpoints, their arguments and outputs, and a bad value's message."""

import os
import re

import pytest
from PIL import Image, ImageDraw

from browser import serve
from conftest import ROOT


def readme_examples() -> list[str]:
    """The ```python blocks of README.md's "## API" section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_example(code: str, url: str, folder) -> dict:
    """Run one example with its URL pointed at the live app, in `folder`; its variables back."""
    code, replaced = re.subn(r'Client\("http://127\.0\.0\.1:\d+/"\)', f'Client("{url}")', code)
    assert replaced == 1, "the example no longer builds its client from a local URL"
    namespace, cwd = {}, os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_readme_has_one_example_per_app():
    examples = readme_examples()
    assert len(examples) == 2
    assert 'api_name="/generate"' in examples[0] and 'api_name="/sketch"' in examples[1]


def test_text_to_image_example_runs_against_the_app(tiny_model_dir, tmp_path):
    from gradio_client import Client

    with serve(ROOT / "app.py", tiny_model_dir, tmp_path / "app.log", args=("--backend", "torch")) as url:
        result = run_example(readme_examples()[0], url, tmp_path)
        assert result["seed"] == 1 and len(result["images"]) == 2
        assert all(Image.open(image["image"]).size == (512, 512) for image in result["images"])
        assert "2 image(s)" in result["status"] and "seed 1" in result["status"]
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="Seed must be a whole number from 0 to 4294967295; got 18446744073709551616"):
            client.predict("a cat", 2**64, False, 1, "tiny", api_name="/generate")
        _, seed, _ = client.predict("a cat", 5, False, 1, "tiny", api_name="/generate")  # still serving
        assert seed == 5
    # Start-up said what it did and where it listens, without library noise.
    log = (tmp_path / "app.log").read_text()
    assert "Loaded" in log and f"Running on {url} (this machine only)" in log
    assert not any(noise in log for noise in ("Loading weights", "TracerWarning", "FutureWarning", "config attributes"))


def test_sketch_example_runs_against_the_app(tiny_model_dir, tmp_path):
    from gradio_client import Client, handle_file

    drawing = Image.new("L", (700, 400), 255)
    ImageDraw.Draw(drawing).ellipse([100, 50, 600, 350], outline=0, width=6)
    drawing.save(tmp_path / "sketch.png")
    with serve(ROOT / "demo_sketch.py", tiny_model_dir, tmp_path / "sketch.log", args=("--backend", "torch")) as url:
        result = run_example(readme_examples()[1], url, tmp_path)
        assert Image.open(result["image"]).size == (512, 512)
        seen = Image.open(result["sketch_seen"]).convert("L")
        assert seen.getextrema()[0] < 128 and "seed 1" in result["status"]
        (tmp_path / "damaged.png").write_bytes((tmp_path / "sketch.png").read_bytes()[:200])
        client = Client(url, verbose=False)
        canvas = {"background": handle_file(str(tmp_path / "damaged.png")), "layers": [], "composite": None}
        with pytest.raises(Exception, match="Could not read that sketch: 'damaged.png' is damaged or truncated"):
            client.predict(canvas, "a cat", "{prompt}", 0.8, 1, api_name="/sketch")
