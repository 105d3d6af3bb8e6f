import json
import subprocess
import sys

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
