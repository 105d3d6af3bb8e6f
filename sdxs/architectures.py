"""Exact architectures of the released SDXS checkpoints, as data.

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
