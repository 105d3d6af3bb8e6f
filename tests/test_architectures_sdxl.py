"""The SDXL family's exact architectures (SDXL base, SDXS-1024): parameter counts through
`sdxs arch --json`, and the SDXS-1024 U-Net as exactly the removal documented in
sdxs/architectures.py and train/README.md. Everything is built on the meta device (no memory)."""

import contextlib
import io
import json

import pytest

from sdxs import architectures as arch
from sdxs.cli import main
from sdxs.registry import MODELS, REFERENCE_MODELS, SDXL_BASE, SDXS_1024, get_spec

SDXL_UNET_PARAMS = 2_567_463_684  # diffusers' count of stabilityai/stable-diffusion-xl-base-1.0 unet/
CLIP_L_PARAMS = 123_060_480
OPENCLIP_BIGG_PARAMS = 694_659_840  # with its 1280 x 1280 text projection
SDXL_VAE_PARAMS = 83_653_863
TAESD_DECODER_PARAMS = 1_222_531
SDXS_1024_UNET_PARAMS = 752_807_364  # what the documented removal gives
PAPER_SDXS_1024_UNET = 0.74e9


def arch_json(model: str) -> dict:
    """`python -m sdxs arch --model MODEL --json`, through main(), parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["arch", "--model", model, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def sdxl_counts():
    return arch_json(SDXL_BASE)


@pytest.fixture(scope="module")
def sdxs_1024_counts():
    return arch_json(SDXS_1024)


def test_sdxl_base_counts(sdxl_counts):
    assert sdxl_counts == {
        "text_encoder": CLIP_L_PARAMS,
        "text_encoder_2": OPENCLIP_BIGG_PARAMS,
        "unet": SDXL_UNET_PARAMS,
        "vae_large": SDXL_VAE_PARAMS,
        "total": CLIP_L_PARAMS + OPENCLIP_BIGG_PARAMS + SDXL_UNET_PARAMS + SDXL_VAE_PARAMS,  # a teacher: no one-step total
    }


def test_sdxs_1024_counts(sdxs_1024_counts):
    counts = sdxs_1024_counts
    assert counts["unet"] == SDXS_1024_UNET_PARAMS
    assert abs(counts["unet"] / PAPER_SDXS_1024_UNET - 1) < 0.02  # the paper: 0.74 B
    assert (counts["text_encoder"], counts["text_encoder_2"]) == (CLIP_L_PARAMS, OPENCLIP_BIGG_PARAMS)  # SDXL's, untouched
    assert counts["vae_decoder"] == TAESD_DECODER_PARAMS and counts["vae_large"] == SDXL_VAE_PARAMS
    # one image: both text encoders, the U-Net once, the tiny decoder; not the VAE encoders nor the large decoder
    assert counts["one_step_total"] == CLIP_L_PARAMS + OPENCLIP_BIGG_PARAMS + SDXS_1024_UNET_PARAMS + TAESD_DECODER_PARAMS
    assert "total" not in counts


def test_arch_text_output_says_sdxs_1024_was_never_released(capsys):
    assert main(["arch", "--model", SDXS_1024]) == 0
    out = capsys.readouterr().out
    assert "never released" in out and "752,807,364" in out


# --- the SDXS-1024 U-Net is SDXL with blocks removed, as documented ---------------------------------

def documented_removal(teacher: dict) -> dict:
    """The removal of sdxs/architectures.py (SDXS_1024_UNET) and train/README.md, applied to a teacher
    config: (1) no mid block, (2) one resnet fewer per stage (never none), (5) half the layers of every
    transformer (rounded down, never none)."""
    return dict(
        teacher,
        mid_block_type=None,
        layers_per_block=max(teacher["layers_per_block"] - 1, 1),
        transformer_layers_per_block=tuple(max(depth // 2, 1) for depth in teacher["transformer_layers_per_block"]),
    )


def test_sdxs_1024_unet_is_the_documented_removal_of_sdxl():
    assert arch.SDXS_1024_UNET == documented_removal(arch.SDXL_UNET)
    changed = {k for k in arch.SDXL_UNET if arch.SDXL_UNET[k] != arch.SDXS_1024_UNET[k]}
    assert changed == {"mid_block_type", "layers_per_block", "transformer_layers_per_block"}  # channels, heads, conditioning kept


def student_to_teacher_key(key: str, teacher_layers: int) -> str:
    """The teacher weight a student weight is copied from (train/README.md, "SDXS-1024's U-Net"): blocks
    keep their names, except an up stage's last resnet/transformer, which is the teacher's last (its skip
    comes from the stage below); kept transformers are the teacher's first layers, under their names."""
    parts = key.split(".")
    if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions") and int(parts[3]) == 1:  # student's last of 2
        parts[3] = str(teacher_layers)  # teacher's last of teacher_layers + 1
    return ".".join(parts)


def test_every_sdxs_1024_weight_is_an_sdxl_weight_of_the_same_shape():
    """Block removal, not a new network: stage B can start the student as a copy of SDXL's kept blocks,
    and every SDXL weight it does not copy lies in a block the removal names."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        teacher = {k: v.shape for k, v in diffusers.UNet2DConditionModel(**arch.SDXL_UNET).state_dict().items()}
        student = {k: v.shape for k, v in diffusers.UNet2DConditionModel(**arch.SDXS_1024_UNET).state_dict().items()}
    copied = {key: student_to_teacher_key(key, arch.SDXL_UNET["layers_per_block"]) for key in student}
    assert all(teacher.get(copied[key]) == shape for key, shape in student.items())
    assert len(set(copied.values())) == len(copied)
    removed = ("mid_block.",
               "down_blocks.0.resnets.1.", "down_blocks.1.resnets.1.", "down_blocks.1.attentions.1.",
               "down_blocks.2.resnets.1.", "down_blocks.2.attentions.1.",
               *(f"up_blocks.{j}.{kind}.1." for j in range(3) for kind in ("resnets", "attentions")))
    deep_layers = tuple(f"{stage}.attentions.{k}.transformer_blocks.{layer}."
                        for stage, kept, depth in [("down_blocks.1", 1, 2), ("down_blocks.2", 1, 10), ("up_blocks.1", 3, 2), ("up_blocks.0", 3, 10)]
                        for k in range(kept) for layer in range(depth // 2, depth))
    dropped = set(teacher) - set(copied.values())
    assert dropped and all(key.startswith(removed + deep_layers) for key in dropped)
    assert not any(key.startswith(removed) for key in copied.values())


# --- how the SDXL pieces fit together ---------------------------------------------------------------

def test_sdxl_conditioning_widths_match_its_text_encoders():
    """The U-Net reads both encoders' hidden states (768 + 1280 = 2048) and, through text_time, the
    pooled bigG projection plus six size/crop numbers of addition_time_embed_dim each (1280 + 6 x 256)."""
    clip_l, big_g = arch.CLIP_L_TEXT, arch.OPENCLIP_BIGG_TEXT
    for unet in (arch.SDXL_UNET, arch.SDXS_1024_UNET):
        assert unet["cross_attention_dim"] == clip_l["hidden_size"] + big_g["hidden_size"]
        assert unet["projection_class_embeddings_input_dim"] == big_g["projection_dim"] + 6 * unet["addition_time_embed_dim"]


def test_tiny_decoder_reads_sdxl_latents():
    assert arch.TAESDXL["latent_channels"] == arch.SDXL_VAE["latent_channels"] == arch.SDXS_1024_UNET["out_channels"]
    assert arch.TAESDXL["scaling_factor"] == 1.0  # reads the U-Net's latents unscaled, as madebyollin/taesdxl
    assert arch.SDXL_VAE["scaling_factor"] == 0.13025  # SDXL's, not SD's 0.18215


def test_the_sdxl_family_is_known_but_never_loaded_as_a_one_step_model(tmp_path, capsys):
    """Apps, loading and the bench list MODELS; the architecture-only ids stay out of it, and asking to
    generate with the unreleased one ends in one clear error, not a random-weight model."""
    assert set(REFERENCE_MODELS) == {SDXL_BASE, SDXS_1024} and not set(REFERENCE_MODELS) & set(MODELS)
    assert get_spec(SDXL_BASE).kind == "teacher" and get_spec(SDXS_1024).architecture.vae is not None
    out = tmp_path / "x.png"
    assert main(["generate", "--backend", "torch", "--model", SDXS_1024, "--prompt", "cat", "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
