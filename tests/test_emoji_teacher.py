"""The bundled emoji teacher (models/emoji-teacher, v2 of issue 18, trained by train/train_teacher.py --preset v2):
plain diffusers loads it and samples 128 px emoji with guidance; the artifact stays within its size budget."""

import json
from pathlib import Path

import torch

TEACHER = Path(__file__).resolve().parents[1] / "models" / "emoji-teacher"


def test_teacher_folder_is_complete_and_small():
    weights = sorted(TEACHER.glob("*/*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder", "eval_tower"}
    assert sum(p.stat().st_size for p in weights) <= 60_000_000  # issue 7: at most 60 MB of safetensors
    assert not list(TEACHER.rglob("*.bin")) and not list(TEACHER.rglob("*.ckpt"))
    metrics = json.loads((TEACHER / "metrics.json").read_text())
    assert metrics["n_val"] == 786 and metrics["resolution"] == 128 and metrics["samples"]["steps"] == 25
    # Issue 18's targets, as measured by train/evaluate.py and written in the card.
    assert metrics["vae"]["psnr_db"] >= 27 and metrics["samples"]["top1"] >= 0.395
    assert metrics["samples"]["fd"] <= 1.15 * metrics["real_train_vs_val"]["fd"]
    card = (TEACHER / "README.md").read_text()
    assert (TEACHER / "samples.png").is_file() and "## Scores: v2 against v1" in card
    for value in (f'{metrics["vae"]["psnr_db"]:.2f} dB', f'{metrics["samples"]["top1"]:.3f}', f'{metrics["samples"]["fd"]:.2f}'):
        assert value in card, value


def test_plain_diffusers_samples_the_teacher_with_guidance():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    caption = "an emoji of grinning face, grinning, category smileys & emotion, subcategory face-smiling, noto style"
    images = pipe([caption, ""], num_inference_steps=25, guidance_scale=4.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]).images
    assert images.shape == (2, 3, 128, 128)
    # A trained teacher listens to its caption: same noise, different caption, different image.
    assert (images[0] - images[1]).abs().mean() > 0.05
    # The grinning face comes out yellow-orange: red and green well above blue at the centre.
    r, g, b = images[0, :, 48:80, 48:80].mean(dim=(1, 2)).tolist()
    assert r > b + 0.2 and g > b + 0.1, (r, g, b)
    tower = CLIPModel.from_pretrained(TEACHER / "eval_tower", torch_dtype=torch.float32)
    assert tower.config.projection_dim == 128
