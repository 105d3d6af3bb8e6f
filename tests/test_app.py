"""The Gradio app's handlers, called directly, and its start-up error."""

import subprocess
import sys

import gradio as gr
import pytest

from conftest import ROOT, offline_env

sys.path.insert(0, str(ROOT))
import app  # noqa: E402


def test_generate_handler(tiny_engine):
    generate = app.make_generate(tiny_engine)
    images, seed, status = generate("a cat", 42, False, 2, "tiny")
    assert len(images) == 2 and seed == 42
    assert "2 image(s)" in status and "seed 42" in status and "ms" in status
    again, _, _ = generate("a cat", 42, False, 2, "tiny")
    assert images[0].tobytes() == again[0].tobytes()


def test_randomised_seed_is_returned(tiny_engine):
    generate = app.make_generate(tiny_engine)
    _, seed, status = generate("a cat", 0, True, 1, "large")
    assert 0 <= seed <= app.MAX_SEED and f"seed {seed}" in status


def test_bad_input_becomes_a_gradio_error(tiny_engine):
    generate = app.make_generate(tiny_engine)
    with pytest.raises(gr.Error, match="Unknown decoder"):
        generate("a cat", 0, False, 1, "nope")


def test_demo_builds(tiny_engine):
    demo = app.build_demo(tiny_engine)
    assert isinstance(demo, gr.Blocks)
    assert any(getattr(fn, "api_name", None) == "generate" for fn in demo.fns.values())


def test_no_network_gives_one_actionable_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "app.py")], env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "IDKiro/sdxs-512-dreamshaper" in proc.stderr and "--model" in proc.stderr


def test_style_variant_choice(tiny_engine, tiny_lora_dir):
    variant = tiny_engine.with_lora(str(tiny_lora_dir))
    engines = {"Base": tiny_engine, "Styled": variant}
    generate = app.make_generate(engines)
    base, _, _ = generate("a cat", 9, False, 1, "tiny", "Base")
    styled, _, status = generate("a cat", 9, False, 1, "tiny", "Styled")
    assert base[0].tobytes() != styled[0].tobytes() and "tiny-lora" in status
    app.build_demo(engines)


def test_load_engines_adds_a_lora_variant_and_survives_a_missing_one(tiny_model_dir, tiny_lora_dir, capsys):
    engines = app.load_engines(app.parse_args(["--model", str(tiny_model_dir), "--lora", str(tiny_lora_dir), "--device", "cpu", "--backend", "torch"]))
    assert len(engines) == 2
    engines = app.load_engines(app.parse_args(["--model", str(tiny_model_dir), "--lora", "/no/such/lora", "--device", "cpu", "--backend", "torch"]))
    assert len(engines) == 1 and "not loaded" in capsys.readouterr().err
