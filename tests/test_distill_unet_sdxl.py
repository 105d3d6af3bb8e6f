"""Stage B's recipe for SDXL-style teachers (issue 17): the student config is exactly SDXS-1024's U-Net,
every student weight is the teacher weight the reference mapping of tests/test_architectures_sdxl.py
names (paper scale on the meta device, and real weights on a tiny SDXL-shaped teacher), the feature-KD
pairs, the checks, SDXL's two-encoder text conditioning and micro-conditioning, and kd_step on tiny
SDXL U-Nets (the same added conditions for both; a loss that falls)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from test_architectures_sdxl import SDXS_1024_UNET_PARAMS, student_to_teacher_key
from test_distill_unet import TINY_SDXL_UNET, meta_unet, n_params, normalised, plan_for, read_blocks
from train_helpers import one_torch_thread  # noqa: F401

from sdxs.architectures import SDXL_UNET, SDXS_1024_UNET
from train import common
from train import distill_unet as stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers

# A tiny U-Net with SDXL base's structure: three stages, no transformers at the highest resolution, two
# resnets per stage, transformer depths (1, 2, 4), a mid block, the text_time added embedding (a pooled
# embedding of 32 plus six size/crop numbers of 8 each), two text encoders' states (32 + 32) concatenated.
POOLED_DIM = 32
SDXL_SHAPED_UNET = dict(
    SDXL_UNET, sample_size=8, block_out_channels=(32, 64, 64), norm_num_groups=8, transformer_layers_per_block=(1, 2, 4),
    attention_head_dim=(2, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * 8,
)


def test_recipe_on_sdxl_base_is_exactly_sdxs_1024s_unet_with_every_weight_from_the_reference_mapping():
    assert stage.derive_student_config(SDXL_UNET) == SDXS_1024_UNET  # the dicts themselves
    teacher, student, plan = plan_for(SDXL_UNET)  # through diffusers' configs, on the meta device
    assert normalised(student.config) == normalised(meta_unet(SDXS_1024_UNET).config)
    assert n_params(student) == SDXS_1024_UNET_PARAMS
    assert set(plan.copied) == set(student.state_dict())
    assert plan.copied == {key: student_to_teacher_key(key, SDXL_UNET["layers_per_block"]) for key in student.state_dict()}
    # the dropped transformer layers are named by the recipe: the second half of each kept transformer
    # (down stages: attentions.0; up stages: attentions.0 and .2, the teacher blocks the student copies)
    deep_layers = {f"{block}.transformer_blocks.{layer}."
                   for blocks, depth in [(["down_blocks.1.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.2"], 2),
                                         (["down_blocks.2.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.2"], 10)]
                   for block in blocks for layer in range(depth // 2, depth)}
    assert {p for p in stage.removed_prefixes(teacher.config) if ".transformer_blocks." in p} == deep_layers
    assert stage.feature_pairs(teacher.config) == [
        ("down_blocks.0", "down_blocks.0", "out"), ("down_blocks.1", "down_blocks.1", "out"), ("down_blocks.2", "down_blocks.2", "out"),
        ("up_blocks.0", "up_blocks.0", "out"), ("up_blocks.1", "up_blocks.1", "out"), ("up_blocks.2", "up_blocks.2", "out")]


def test_recipe_on_a_tiny_sdxl_shaped_teacher_halves_depths_and_copies_the_reference_weights():
    from diffusers import UNet2DConditionModel

    config = stage.derive_student_config(SDXL_SHAPED_UNET)
    assert config == dict(SDXL_SHAPED_UNET, mid_block_type=None, layers_per_block=1, transformer_layers_per_block=(1, 1, 2))
    teacher = UNet2DConditionModel(**SDXL_SHAPED_UNET).eval()
    student, plan = stage.init_student_from_teacher(teacher)
    teacher_state = teacher.state_dict()
    for key, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_state[student_to_teacher_key(key, 2)]), key
    assert "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k.weight" in student.state_dict()  # the skip-taking block, 2 layers
    assert plan.copied["up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k.weight"] == "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k.weight"
    assert "add_embedding.linear_1.weight" in plan.copied  # text_time kept
    assert all(k.startswith("mid_block.") or ".resnets.1." in k or ".attentions.1." in k or ".transformer_blocks." in k for k in plan.dropped)


def test_sdxl_shaped_teachers_pass_the_check_and_what_the_branch_cannot_handle_is_named():
    from diffusers import UNet2DConditionModel

    built = dict(UNet2DConditionModel.from_config(TINY_SDXL_UNET).config)  # lists, as diffusers stores them
    for config in (SDXL_UNET, SDXL_SHAPED_UNET, built):
        assert stage.unsupported_teacher_features(config) == []
        stage.check_teacher_unet(config)
    for change, named in [
        (dict(transformer_layers_per_block=((1, 1), (2, 2), (4, 4))), "one depth >= 1 per stage expected"),
        (dict(transformer_layers_per_block=(0, 2, 4)), "one depth >= 1 per stage expected"),
        (dict(reverse_transformer_layers_per_block=((4, 4, 4), (2, 2, 2), (1, 1, 1))), "reverse_transformer_layers_per_block"),
        (dict(class_embed_type="timestep"), "class_embed_type 'timestep'"),
        (dict(up_block_types=SDXL_UNET["up_block_types"][1:]), "3 down and 2 up stages"),
        (dict(down_block_types=("SimpleCrossAttnDownBlock2D",) + SDXL_UNET["down_block_types"][1:]), "SimpleCrossAttnDownBlock2D"),
    ]:
        problems = stage.unsupported_teacher_features({**SDXL_UNET, **change})
        assert len(problems) == 1 and named in problems[0], problems
        with pytest.raises(SystemExit, match="SDXL-style one"):
            stage.derive_student_config({**SDXL_UNET, **change})
    # depth > 1 without text_time is an SD-style teacher the recipe cannot handle: still refused
    assert stage.unsupported_teacher_features({**SDXL_UNET, "addition_embed_type": None}) == ["transformer_layers_per_block [1, 2, 10]"]


# --- SDXL conditioning ------------------------------------------------------------------------------


def tiny_sdxl_text(seed: int = 0):
    """(tokenizers, text encoders) shaped like SDXL's: CLIP-L style (no projection) and bigG style (with
    projection, its tokenizer padding with "!"), 32 wide each."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxs.architectures import TINY_TEXT
    from sdxs.tokenizer import cached_clip_tokenizer_dir

    torch.manual_seed(seed)
    tokenizers = (CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir()),
                  CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir(), pad_token="!"))
    encoders = (CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval(),
                CLIPTextModelWithProjection(CLIPTextConfig(**dict(TINY_TEXT, projection_dim=POOLED_DIM))).eval())
    return tokenizers, encoders


def test_sdxl_text_conditions_equal_the_sdxl_pipelines():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from sdxs.architectures import TINY_SD_VAE

    tokenizers, encoders = tiny_sdxl_text()
    pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(**TINY_SD_VAE), text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=UNet2DConditionModel(**SDXL_SHAPED_UNET),
                                     scheduler=EulerDiscreteScheduler())
    prompts = ["a photo of a cat", "", "an emoji of a red apple"]
    states, pooled = common.encode_sdxl_prompts(tokenizers, encoders, prompts)
    want_states, _, want_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert states.shape == (3, 77, 64) and pooled.shape == (3, POOLED_DIM)
    assert torch.equal(states, want_states) and torch.equal(pooled, want_pooled)
    assert not torch.equal(pooled[0], pooled[2])  # per prompt

    cond = common.sdxl_added_cond(pooled, original_size=(96, 64), target_size=(128, 112), crop_top_left=(8, 4))
    want_ids = pipe._get_add_time_ids((96, 64), (8, 4), (128, 112), dtype=pooled.dtype, text_encoder_projection_dim=POOLED_DIM)
    assert torch.equal(cond["text_embeds"], pooled) and torch.equal(cond["time_ids"], want_ids.expand(3, -1))


# --- one KD step on tiny SDXL U-Nets ---------------------------------------------------------------


def sdxl_kd_problem():
    """A tiny SDXL-shaped teacher (left trainable on purpose: kd_step alone must keep gradients out of
    it), its student, and three samples with different noise, timesteps, text and micro-conditions."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**SDXL_SHAPED_UNET).requires_grad_(True)
    student, _ = stage.init_student_from_teacher(teacher)
    gen = torch.Generator().manual_seed(1)
    x_t, states = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 77, 64, generator=gen)
    pooled = torch.randn(3, POOLED_DIM, generator=gen)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [1024, 768, 0, 0, 1024, 1024], [512, 512, 32, 16, 256, 256]])}
    return teacher, student.train(), x_t, torch.tensor([50, 500, 950]), states, cond


def test_kd_step_gives_both_sdxl_unets_the_same_text_and_micro_conditions_block_by_block():
    teacher, student, x_t, t, states, cond = sdxl_kd_problem()
    hooks = stage.FeatureHooks(student, teacher)
    losses = stage.kd_step(student, teacher, hooks, x_t, t, common.TextCond(states, cond), lambda_feat=0.5)

    blocks = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.0", "up_blocks.1", "up_blocks.2"]  # the same names

    def reference(teacher_cond, student_cond):
        with torch.no_grad():
            t_eps, t_feats = read_blocks(teacher, blocks, x_t, t, encoder_hidden_states=states, added_cond_kwargs=teacher_cond)
            s_eps, s_feats = read_blocks(student, blocks, x_t, t, encoder_hidden_states=states, added_cond_kwargs=student_cond)
        return F.mse_loss(s_eps, t_eps).item(), sum(F.mse_loss(s_feats[b], t_feats[b]) for b in blocks).item()

    out, feat = reference(cond, cond)
    assert losses["loss_out"].item() == pytest.approx(out, rel=1e-5)
    assert losses["loss_feat"].item() == pytest.approx(feat, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(out + 0.5 * feat, rel=1e-5)  # Eq. 8
    # the checks can tell: another sample's pooled embedding or size ids, on either side, moves the loss
    for other in ({**cond, "text_embeds": cond["text_embeds"].roll(1, 0)}, {**cond, "time_ids": cond["time_ids"].roll(1, 0)}):
        for teacher_cond, student_cond in ((other, cond), (cond, other)):
            assert reference(teacher_cond, student_cond)[0] != pytest.approx(out, rel=1e-3)

    assert torch.autograd.grad(losses["loss_out"], student.add_embedding.linear_1.weight, retain_graph=True)[0].abs().sum() > 0
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_a_few_sdxl_kd_steps_move_the_student_toward_the_teacher():
    teacher, student, x_t, t, states, cond = sdxl_kd_problem()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    hooks = stage.FeatureHooks(student, teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    values = []
    for _ in range(8):
        losses = stage.kd_step(student, teacher, hooks, x_t, t, common.TextCond(states, cond), lambda_feat=1.0)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append({k: v.item() for k, v in losses.items()})
    for name in ("loss_out", "loss_feat"):
        assert values[-1][name] < 0.8 * values[0][name], [v[name] for v in values]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_kd_inputs_of_an_sdxl_teacher_share_the_sd_draws_and_drop_text_and_pooled_together():
    from diffusers import DDPMScheduler

    tokenizers, encoders = tiny_sdxl_text()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    batch = {"latents": torch.randn(200, 4, 8, 8, generator=torch.Generator().manual_seed(3)), "prompt": ["a photo of a cat"] * 200}
    x_t, t, text = stage.kd_inputs(batch, torch.Generator().manual_seed(0), noise_scheduler=scheduler,
                                   encode=common.PromptEncoder(tokenizers, encoders, 64), caption_dropout=0.3, device=torch.device("cpu"))
    states, cond = text.states, text.added
    sd_x_t, sd_t, sd_text = stage.kd_inputs(batch, torch.Generator().manual_seed(0), noise_scheduler=scheduler,
                                            encode=common.PromptEncoder(tokenizers[:1], encoders[:1], 64), caption_dropout=0.3,
                                            device=torch.device("cpu"))
    sd_states = sd_text.states
    assert torch.equal(x_t, sd_x_t) and torch.equal(t, sd_t)  # the SD path's noise, timesteps and caption dropout
    (uncond, cond_states), (uncond_pooled, cond_pooled) = (pair.unbind(0) for pair in common.encode_sdxl_prompts(tokenizers, encoders, ["", "a photo of a cat"]))
    close = partial(torch.allclose, atol=1e-5)  # a batch of 200 and one of 2 may round differently
    dropped = [close(s, uncond) for s in states]
    assert all(d or close(s, cond_states) for s, d in zip(states, dropped)) and 0.2 < sum(dropped) / 200 < 0.4
    sd_uncond = common.encode_prompts(tokenizers[0], encoders[0], [""])[0]
    assert dropped == [close(s, sd_uncond) for s in sd_states]  # the same captions dropped as the SD path
    assert all(close(p, uncond_pooled if d else cond_pooled) for p, d in zip(cond["text_embeds"], dropped))  # text and pooled together
    assert not close(uncond_pooled, cond_pooled)
    assert torch.equal(cond["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(200, -1))

