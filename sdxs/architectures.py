"""Exact architectures of the released SDXS checkpoints and of the SDXL family (SDXL base, the
paper's unreleased SDXS-1024), as data.

Each dict holds the constructor kwargs of one component (diffusers or transformers), so the same
class builds the real model (`from_pretrained`) and a random one (`from_config`) for tests and
benchmarks. Parameter counts are pinned by tests/test_architectures.py (values from ../shared/SPEC.md).
"""

# --- text encoders (transformers CLIPTextConfig) ---------------------------------------------------

# CLIP ViT-L/14 text tower, as in SD-1.5 and DreamShaper.
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

# OpenCLIP ViT-H/14 text tower as SD-2.x uses it: the last of 24 layers is dropped.
OPENCLIP_H_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)

# SDXL's second text encoder (text_encoder_2/): the OpenCLIP ViT-bigG/14 text tower with its
# projection (transformers CLIPTextModelWithProjection), all 32 layers. 694,659,840 parameters, of
# which 1,638,400 are the projection to the pooled embedding SDXL's U-Net reads through text_time.
# SDXL's first text encoder (text_encoder/) is CLIP_L_TEXT as above (123,060,480).
OPENCLIP_BIGG_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)

# --- one-step U-Nets (diffusers UNet2DConditionModel) ----------------------------------------------

# SDXS-512-DreamShaper: SD-1.5 minus the mid block, the last down / first up stage, the
# highest-resolution transformers, and one resnet per stage. 315,746,244 parameters.
DREAMSHAPER_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type=None,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    use_linear_projection=False,
    transformer_layers_per_block=1,
)

# SDXS-512-0.9: SD-2.x style; stage 0 keeps only cross-attention to the text. ~328.18 M parameters.
SDXS_09_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    mid_block_type=None,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    only_cross_attention=(True, False, False),
)

# --- ControlNet (diffusers ControlNetModel) ---------------------------------------------------------

# IDKiro/sdxs-512-dreamshaper-sketch: the student encoder plus diffusers' default mid block,
# emitting 7 residuals (6 down + 1 mid). 186,551,440 parameters.
DREAMSHAPER_SKETCH_CONTROLNET = dict(
    in_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)

# --- image decoders ---------------------------------------------------------------------------------

# vae/: TAESD-shaped AutoencoderTiny, scaling_factor 1.0. Decoder and encoder ~1.2225 M each.
TAESD = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    latent_channels=4,
    latent_magnitude=3,
    latent_shift=0.5,
    scaling_factor=1.0,
    upsampling_scaling_factor=2,
    act_fn="relu",
)

# vae_large/: the SD AutoencoderKL (83.65 M), the "quality" decoder.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# --- schedulers (class name, config) ----------------------------------------------------------------

_SD_BETAS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)
# DreamShaper ships a DEIS scheduler; with one step it lands on t=999 (linspace spacing).
DEIS_SCHEDULER = ("DEISMultistepScheduler", dict(_SD_BETAS, timestep_spacing="linspace"))
# 0.9 ships Euler with trailing spacing; "leading" would silently run at t=0.
EULER_TRAILING_SCHEDULER = ("EulerDiscreteScheduler", dict(_SD_BETAS, timestep_spacing="trailing"))

# --- the SDXL family: SDXL base (the teacher) and SDXS-1024 (the paper's student, never released) -------

# stabilityai/stable-diffusion-xl-base-1.0 unet/: 2,567,463,684 parameters. Three stages like the
# SDXS-512 students (no fourth, lowest-resolution stage, no transformers at the highest), but two resnets per
# stage, transformers 2 and 10 layers deep, a mid block, and SDXL's micro-conditioning: the pooled
# OpenCLIP-bigG embedding (1280) and six size/crop numbers (6 x 256) enter through "text_time"
# (1280 + 1536 = 2816 inputs).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # CLIP-L (768) and OpenCLIP-bigG (1280) hidden states, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

# SDXS-1024's U-Net. The paper gives its size (0.74 B) and that it comes from SDXL by block removal
# and feature distillation, not the blocks; this removal is ours, stage B's SD-1.5 recipe
# (train/distill_unet.py derive_student_config) carried over to SDXL. That recipe cuts four things:
#   (1) the mid block, (2) one resnet per stage, with its transformer,
#   (3) the lowest-resolution stage, (4) the transformers of the highest-resolution stage.
# SDXL was designed with (3) and (4) already made: it has three stages and no transformers at 128x128
# latents. Its weight sits in the transformer stacks instead: six Transformer2DModels of 10 layers at
# 1280 channels (350.8 M each) are 82 % of the U-Net, and (1) + (2) alone leave 1.30 B. So:
#   (1) no mid block (413.1 M: two resnets and a 10-layer transformer at 32x32),
#   (2) one resnet per down stage, two per up stage (layers_per_block 2 -> 1; with each dropped
#       resnet goes its transformer, as in SD-1.5),
#   (5) half the layers of every kept transformer (transformer_layers_per_block (1, 2, 10) ->
#       (1, 1, 5); the first one is unused, stage 0 has none): the layer-level removal that
#       Segmind's SSD-1B/Vega and KOALA apply to SDXL.
# Every student block is a teacher block with its first layers, so stage B copies each student weight
# from the teacher (train/README.md, "SDXS-1024's U-Net"). 752,807,364 parameters (pinned by
# tests/test_architectures_sdxl.py): 1.7 % over the paper's 0.74 B; Segmind-Vega, the public
# block-removed SDXL U-Net, has 0.745 B (keeping depth 2 at 640 channels would give 0.78 B, KOALA-700M's size).
SDXS_1024_REMOVAL = dict(mid_block_type=None, layers_per_block=1, transformer_layers_per_block=(1, 1, 5))
SDXS_1024_UNET = dict(SDXL_UNET, **SDXS_1024_REMOVAL)

# SDXL's AutoencoderKL (vae/ of the base model): SD's shape, its own weights and latent scale.
# 83,653,863 parameters, 49,490,199 of them in the decoder (with post_quant_conv).
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# A TAESD-shaped tiny decoder for SDXL's latent space, as madebyollin/taesdxl publishes it: the shape
# and config of TAESD (scaling_factor 1.0: it reads the U-Net's latents as they are), other weights.
TAESDXL = dict(TAESD)

# SDXL base samples 25-50 Euler steps ("leading" spacing); the one-step student needs t = 999,
# which Euler gives only with "trailing" spacing (see EULER_TRAILING_SCHEDULER).
SDXL_EULER_SCHEDULER = ("EulerDiscreteScheduler", dict(_SD_BETAS, timestep_spacing="leading"))

# --- tiny versions with the same structure, for tests, demos and bug reports ------------------------

TINY_TEXT = dict(
    CLIP_L_TEXT,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)
TINY_UNET = dict(
    DREAMSHAPER_UNET,
    block_out_channels=(16, 32, 32),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_CONTROLNET = dict(
    DREAMSHAPER_SKETCH_CONTROLNET,
    block_out_channels=(16, 32, 32),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 16, 16, 16),
)
TINY_TAESD = dict(
    TAESD,
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
)
TINY_SD_VAE = dict(SD_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
