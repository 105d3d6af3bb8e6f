"""train/short_prompts.py: short prompts expanded with each model's own data, drawn row by row."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from train_helpers import one_torch_thread  # noqa: F401

from train import short_prompts
from train.evaluate import sample

TEACHER = ROOT / "models" / "emoji-teacher"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def caption_folder(root, style):
    """An emoji-like data folder's metadata (no images: the captions are all the script reads of it)."""
    rows = [{"file_name": f"{i}.png", "name": name, "style": style, "skin_tone": None,
             "text": f"an emoji of {name.lower()}, {short}, category food & drink, {style} style"}
            for i, (name, short) in enumerate([("RED APPLE", "apple"), ("ROCKET", "rocket ship")])]
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_short_prompt_becomes_the_data_caption_or_the_shortest_form():
    table = {"red apple": "an emoji of red apple, apple, noto style"}
    assert short_prompts.expand("  Red   APPLE ", table, "noto") == "an emoji of red apple, apple, noto style"
    assert short_prompts.expand("Purple dinosaur", table, "noto") == "an emoji of purple dinosaur, noto style"


def test_each_row_is_its_model_drawing_the_captions_of_its_own_data(tmp_path):
    google, noto = caption_folder(tmp_path / "v1-data", "google"), caption_folder(tmp_path / "v2-data", "noto")
    out = tmp_path / "grid.png"
    short_prompts.main(["--model", str(TEACHER), "--data", str(google), "--model", str(TEACHER), "--data", str(noto),
                        "--label", "v1", "--label", "v2", "--prompts", "rocket ship, purple dinosaur", "--steps", "2",
                        "--seed", "5", "--tile", "128", "--out", str(out)])
    written = json.loads(out.with_suffix(".json").read_text())
    assert [row["captions"] for row in written["rows"]] == [
        {"rocket ship": "an emoji of rocket, rocket ship, category food & drink, google style",
         "purple dinosaur": "an emoji of purple dinosaur, google style"},
        {"rocket ship": "an emoji of rocket, rocket ship, category food & drink, noto style",
         "purple dinosaur": "an emoji of purple dinosaur, noto style"}]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    for r, row in enumerate(written["rows"]):
        for c, caption in enumerate(row["captions"].values()):  # column c: seed + c, whatever the row
            expected = sample(pipe, [caption], steps=2, guidance=4.0, seed=5 + c, batch_size=1)[0]
            expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
            x, y = 90 + c * (128 + 4), 32 + r * (128 + 4)  # the teacher's 128 px at --tile 128: no resizing
            assert np.abs(grid[y : y + 128, x : x + 128] - expected).max() <= 2, (r, c)


@pytest.mark.parametrize("argv, message", [
    (["--model", "a", "--model", "b", "--data", "d"], "one --data per --model"),
    (["--model", str(TEACHER), "--data", "d", "--label", "x", "--label", "y"], "one --label per --model"),
    (["--model", str(TEACHER), "--data", "d", "--prompts", " , "], "--prompts has no prompt"),
    (["--model", "nowhere", "--data", "d"], "--model nowhere: not a pipeline folder"),
    (["--model", str(TEACHER), "--data", "nowhere"], "--data nowhere: no train/metadata.jsonl"),
])
def test_bad_arguments_say_what_to_give(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        short_prompts.main([*argv, "--out", str(tmp_path / "grid.png")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()
