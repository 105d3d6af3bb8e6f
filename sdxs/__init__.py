"""SDXS: real-time one-step latent diffusion (arXiv 2403.16627), as a small inference package.

    from sdxs import SDXSEngine
    engine = SDXSEngine.from_pretrained("IDKiro/sdxs-512-dreamshaper")
    image = engine.text_to_image("a cat in a spacesuit", seed=1).images[0]
"""

from sdxs.engine import Generation, SDXSEngine, check_one_step_settings
from sdxs.loading import ModelNotFoundError, pick_device_and_dtype
from sdxs.registry import DEFAULT_MODEL, MODELS

__all__ = ["SDXSEngine", "Generation", "ModelNotFoundError", "MODELS", "DEFAULT_MODEL", "check_one_step_settings", "pick_device_and_dtype"]
__version__ = "0.1.0"
