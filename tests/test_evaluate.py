"""train/evaluate.py: the Frechet distance and retrieval it reports, and a run on a smoke teacher."""

import json
import math

import pytest
import torch
from train_helpers import one_torch_thread, run_stage  # noqa: F401

from train import evaluate
from train import train_teacher as teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_frechet_distance_matches_the_closed_form_of_diagonal_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64) + 1.0
    # ||mu_a - mu_b||^2 + sum (sigma_a - sigma_b)^2 for diagonal covariances: 3 + (1 + 0 + 4)
    assert evaluate.frechet_distance(a, b) == pytest.approx(8.0, rel=0.03)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert evaluate.frechet_distance(a, b) == pytest.approx(evaluate.frechet_distance(b, a), rel=1e-6)


def test_retrieval_counts_the_true_caption_and_its_duplicates():
    text = torch.eye(4)
    captions = ["cat", "dog", "cat", "owl"]
    assert evaluate.retrieval_accuracy(torch.eye(4), text, captions) == 1.0
    # every image looks like text 0 ("cat"): right for images 0 and 2 (a duplicate caption), wrong for 1 and 3
    assert evaluate.retrieval_accuracy(torch.tensor([[1.0, 0, 0, 0]] * 4), text, captions) == 0.5
    shifted = torch.roll(torch.eye(4), 1, dims=1)  # image i looks like caption i+1 first, caption i second
    assert evaluate.retrieval_accuracy(shifted + 0.5 * torch.eye(4), text, captions, k=1) == 0.0
    assert evaluate.retrieval_accuracy(shifted + 0.5 * torch.eye(4), text, captions, k=2) == 1.0


def test_evaluate_scores_a_smoke_teacher_and_draws_the_grid(tmp_path):
    run = tmp_path / "run"
    assert run_stage(teacher, run) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(run / "final"), "--data", str(run / "synthetic-data"), "--out", str(out),
                          "--steps", "2", "--guidance", "3", "--grid", "5", "--batch_size", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_val"] == 8 and metrics["resolution"] == 32
    for part in ("real_val", "vae", "samples"):
        assert 0 <= metrics[part]["top1"] <= metrics[part]["top5"] <= 1
        assert math.isfinite(metrics[part]["fd"]) and metrics[part]["fd"] >= 0
    assert metrics["real_val"]["fd"] == pytest.approx(0, abs=1e-3)  # the reference against itself
    assert math.isfinite(metrics["vae"]["psnr_db"]) and metrics["samples"]["steps"] == 2
    from PIL import Image

    assert Image.open(out / "samples.png").width > 5 * 64  # five captions, images shown at 2x


def test_evaluate_refuses_a_folder_without_an_evaluation_network(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="--eval_tower"):
        evaluate.main(["--model", str(tmp_path), "--data", str(tmp_path)])


def test_images_of_another_side_than_the_towers_are_resized_to_it():
    """A 128 px model scored by the 64 px v1 evaluation tower: its images are brought to the tower's side
    (bilinear, antialiased) before embedding, not refused or cropped."""
    import torch.nn.functional as F
    from transformers import CLIPModel

    from train import evaluate as ev

    from conftest import ROOT

    tower = CLIPModel.from_pretrained(ROOT / "models" / "emoji-teacher" / "eval_tower").eval()
    side = tower.config.vision_config.image_size
    big = torch.rand(3, 3, 2 * side, 2 * side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    small = F.interpolate(big, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(ev.image_embeddings(tower, big), ev.image_embeddings(tower, small), atol=1e-6)
    assert not torch.allclose(ev.image_embeddings(tower, big), ev.image_embeddings(tower, small.flip(0)), atol=1e-3)
