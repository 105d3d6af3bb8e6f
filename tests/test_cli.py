import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from conftest import offline_env
from sdxs.cli import main, output_paths


def run_cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "sdxs", *args], cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)


def test_make_tiny_then_generate_is_byte_identical(tmp_path):
    assert run_cli(["make-tiny", "tiny-model"], tmp_path).returncode == 0
    for out in ("a.png", "b.png"):
        proc = run_cli(["generate", "--model", "tiny-model", "--prompt", "cat", "--seed", "1", "--out", out], tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert run_cli(["make-tiny", "tiny-model"], tmp_path).returncode == 2  # never overwrites


def test_arch_json_counts_the_dreamshaper_unet(capsys):
    assert main(["arch", "--model", "IDKiro/sdxs-512-dreamshaper", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["unet"] == 315746244 and {"text_encoder", "vae_decoder"} <= set(counts)


def test_generate_several_into_a_folder(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "cat", "--n", "2", "--seed", "5", "--out", str(tmp_path / "out"), "--backend", "torch"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seed-5.png", "seed-6.png"]


def test_bad_settings_exit_2_with_explanation(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "cat", "--steps", "4"]) == 2
    assert "exactly one step" in capsys.readouterr().err
    assert main(["arch", "--model", "nope/nope"]) == 2


def test_output_paths():
    assert [p.name for p in output_paths("x.png", 2, [1, 2])] == ["x-1.png", "x-2.png"]
    assert [p.name for p in output_paths("dir", 1, [9])] == ["seed-9.png"]


def test_generate_from_a_sketch(tiny_model_dir, tmp_path, capsys):
    sketch = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(sketch).line([(10, 10), (290, 190)], fill=0, width=5)
    sketch.save(tmp_path / "sketch.png")
    args = ["generate", "--backend", "torch", "--model", str(tiny_model_dir), "--prompt", "cat", "--sketch", str(tmp_path / "sketch.png")]
    assert main([*args, "--control-strength", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--control-strength", "0", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert main([*args[:-1], str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_arch_json_counts_the_sketch_controlnet(capsys):
    assert main(["arch", "--model", "IDKiro/sdxs-512-dreamshaper-sketch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["controlnet"] == 186551440


# --- bad input: one `error:` line that says what to change, exit code 2, no traceback -------------

def generate_args(model, *extra):
    return ["generate", "--backend", "torch", "--model", str(model), "--prompt", "cat", *extra]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--seed", "18446744073709551616", "Seed must be a whole number from 0 to 4294967295; got 18446744073709551616"),
        ("--seed", "-1", "got -1"),
        ("--seed", "1.5", "got '1.5'"),
        ("--seed", "abc", "got 'abc'"),
        ("--n", "0", "--n must be a whole number from 1 to 4096; got 0"),
        ("--micro-batch", "0", "--micro-batch must be a whole number from 1 to 4096; got 0"),
        ("--n", "5000", "got 5000"),
        ("--n", "2.5", "got '2.5'"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "never-loaded", "--prompt", "cat", flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "a-file").write_text("x")
    cases = [
        (tmp_path / "taken.png", "is an existing folder; give a file name"),
        (tmp_path / "a-file", "is an existing file, not a folder"),
        (tmp_path / "a-file" / "sub" / "cat.png", "which is a file"),
        (tmp_path / "cat.gif", ".gif is not written here"),
    ]
    for out, message in cases:  # the model does not exist: the output is checked first
        assert main(generate_args(tmp_path / "no-model", "--out", str(out))) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_failed_write_is_an_error_line_and_missing_folders_are_made(tiny_model_dir, tmp_path, capsys):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc, where nothing can be created")
    assert main(generate_args(tiny_model_dir, "--out", "/proc/sdxs-test/cat.png")) == 2
    err = capsys.readouterr().err
    assert "Could not write '/proc/sdxs-test/cat.png'" in err
    assert main(generate_args(tiny_model_dir, "--out", str(tmp_path / "new" / "folder" / "cat.png"))) == 0
    assert (tmp_path / "new" / "folder" / "cat.png").is_file()


def test_bad_sketch_files_are_error_lines(tiny_model_dir, tmp_path, capsys):
    from test_validation import png_bytes, write_animation

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "bomb.png").write_bytes(png_bytes(20000, 20000))
    Image.new("RGB", (300, 200), "white").save(tmp_path / "blank.png")
    for name, message in [("corrupt.png", "is not an image"), ("bomb.png", "pixels"), ("blank.png", "has no strokes")]:
        assert main(generate_args(tiny_model_dir, "--sketch", str(tmp_path / name), "--out", str(tmp_path / "o.png"))) == 2
        err = capsys.readouterr().err
        assert f"error: " in err and message in err, err
    gif = write_animation(tmp_path / "blank-first.gif", frames_with_ink={2})
    assert main(generate_args(tiny_model_dir, "--sketch", str(gif), "--out", str(tmp_path / "gif.png"))) == 0
    assert "note: Animated image: used frame 3 of 4" in capsys.readouterr().err


def test_empty_and_huge_prompts_get_a_note(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--backend", "torch", "--model", str(tiny_model_dir), "--prompt", " ", "--out", str(tmp_path / "e.png")]) == 0
    assert "note: The prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--backend", "torch", "--model", str(tiny_model_dir), "--prompt", "cat " * 5000, "--out", str(tmp_path / "h.png")]) == 0
    assert "note: The prompt has 20,000 characters; only the first 1,000" in capsys.readouterr().err


def test_defaults_follow_the_model_decoder_and_size(tiny_model_dir, tmp_path):
    from sdxs import SDXSEngine

    large_only = tmp_path / "large-only"
    shutil.copytree(tiny_model_dir, large_only, ignore=shutil.ignore_patterns("vae"))
    assert main(generate_args(large_only, "--out", str(tmp_path / "x.png"))) == 0  # no tiny decoder: large, no error
    engine = SDXSEngine.from_pretrained(str(large_only), device="cpu", backend="torch")
    expected = engine.text_to_image("cat", seed=0, decoder="large").images[0]
    made = Image.open(tmp_path / "x.png")
    assert made.size == (engine.native_size,) * 2 and made.tobytes() == expected.tobytes()


def test_unknown_models_are_error_lines(tmp_path, capsys):
    assert main(generate_args(tmp_path / "missing", "--out", str(tmp_path / "x.png"))) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_console_hides_library_noise_but_not_ours():
    import warnings

    import torch

    from sdxs.webapp import configure_console

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        configure_console()
        warnings.warn_explicit("traced", torch.jit.TracerWarning, "modeling_clip.py", 1, module="transformers.models.clip")
        warnings.warn_explicit("deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", UserWarning, "engine.py", 1, module="sdxs.engine")
    assert [str(w.message) for w in seen] == ["ours"]


def test_pyproject_installs_the_package_and_the_sdxs_command():
    import importlib
    import tomllib

    from conftest import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "sdxs" and project["project"]["requires-python"] == ">=3.10"
    assert project["tool"]["setuptools"]["packages"] == ["sdxs"]  # not train/ or tests/
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    module, function = project["project"]["scripts"]["sdxs"].split(":")
    assert getattr(importlib.import_module(module), function) is main
    assert project["project"]["version"] == importlib.import_module("sdxs").__version__


def test_bad_sizes_and_decoders_are_error_lines(tiny_model_dir, tmp_path, capsys):
    large_only = tmp_path / "large-only"
    shutil.copytree(tiny_model_dir, large_only, ignore=shutil.ignore_patterns("vae"))
    for extra, message in [
        (["--width", "500"], "width must be a multiple of 32"),
        (["--height", "4096"], "height must be a multiple of 32 between 32 and 2048"),
        (["--width", "16"], "got 16"),
        (["--decoder", "tiny"], "Unknown decoder 'tiny'; this model has: large"),
    ]:
        assert main(generate_args(large_only, *extra, "--out", str(tmp_path / "x.png"))) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        main(generate_args(large_only, "--width", "5.5"))
    assert "invalid int value: '5.5'" in capsys.readouterr().err


def test_many_images_run_in_micro_batches_of_the_flag(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--n is not capped at the UI's limit; --micro-batch reaches the engine: 5 images in forwards of 2."""
    from diffusers import UNet2DConditionModel

    forwards = []
    original = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, sample, *a, **k: forwards.append(sample.shape[0]) or original(self, sample, *a, **k))
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "cat", "--n", "5", "--micro-batch", "2", "--width", "64",
                 "--height", "64", "--backend", "torch", "--out", str(tmp_path / "many")])
    assert code == 0 and forwards == [2, 2, 1]
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [f"seed-{s}.png" for s in range(5)]
