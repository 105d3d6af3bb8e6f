"""Helpers to drive a served Gradio app in a real headless Chromium (Playwright + the system browser)."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def require_browser():
    """Skip when no browser is installed, unless SDXS_REQUIRE_BROWSER=1 (CI), where it must run."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not find_chromium():
        missing.append("a Chromium browser (apt-get install chromium)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("SDXS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(script: Path, model: Path | None, log_path: Path, timeout: float = 180, args: tuple[str, ...] = (), env: dict | None = None):
    """Run `python SCRIPT --model MODEL --port P [ARGS]` (no --model when MODEL is None) and yield its
    URL once it answers; `env` (default: this one) gets GRADIO_ANALYTICS_ENABLED=False, HF_HUB_OFFLINE=1."""
    port = free_port()
    env = dict(os.environ if env is None else env, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    model_args = [] if model is None else ["--model", str(model)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), *model_args, "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{script.name} exited early:\n{log_path.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise TimeoutError(f"{script.name} did not answer within {timeout} s")
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def browser_page(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A persistent context with a fresh profile folder: Playwright's own way to set --user-data-dir.
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chrome-profile"), executable_path=find_chromium(), args=CHROMIUM_FLAGS,
            headless=True, viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """Save a screenshot to tmp_path, and to $SDXS_SCREENSHOT_DIR when set (docs/ screenshots)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if out_dir := os.environ.get("SDXS_SCREENSHOT_DIR"):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out_dir) / name)
    return path
