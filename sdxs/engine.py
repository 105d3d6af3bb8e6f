"""The one-step engine: prompts in, images out, the SDXS way (one U-Net call at t=999, no guidance)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdxs.loading import Components, load_components, pick_device_and_dtype
from sdxs.validation import MAX_SEED

log = logging.getLogger(__name__)

MAX_IMAGES = 16
MAX_SIDE = 2048
DECODER_PREFERENCE = ("tiny", "large")  # the fast decoder first: the default when a model has it


@dataclass
class Generation:
    """What one call returns: the images, the seed of each, warnings for the UI, stage timings."""

    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: text_encoder, unet, decoder, total
    sketch: Image.Image | None = None  # sketch mode: the control image as the ControlNet saw it


def check_one_step_settings(num_inference_steps: int = 1, guidance_scale: float = 0.0) -> None:
    """SDXS checkpoints are one-step generators: refuse settings that silently give broken images."""
    if num_inference_steps != 1:
        raise ValueError(
            f"SDXS runs in exactly one step, but num_inference_steps={num_inference_steps} was asked for. "
            "More steps do not refine a one-step model: they give broken 'coloured glass' images "
            "(upstream issue 10). Use 1 step."
        )
    if guidance_scale != 0:
        raise ValueError(
            f"SDXS was trained without classifier-free guidance, but guidance_scale={guidance_scale} was asked "
            "for; guidance over-saturates and breaks its images. Use guidance_scale=0."
        )


def one_step_scheduler(scheduler_config: dict):
    """A fresh scheduler set to the single timestep T-1 (999).

    Built per call: diffusers schedulers carry state (step index, history), so sharing one between
    concurrent requests would race. With "leading" spacing Euler/DDIM/DDPM would silently run at
    t=0 or 1; we switch those to "trailing", which lands on 999.
    """
    import diffusers

    config = dict(scheduler_config)
    scheduler_class = getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler"))
    scheduler = scheduler_class.from_config(config)
    if scheduler.config.get("clip_sample"):  # DDPM/DDIM default: clipping x0 to [-1, 1] ruins latents
        config["clip_sample"] = False
        scheduler = scheduler_class.from_config(config)
    scheduler.set_timesteps(1)
    last = scheduler.config.num_train_timesteps - 1
    if int(scheduler.timesteps[0]) != last:
        scheduler = scheduler_class.from_config({**config, "timestep_spacing": "trailing"})
        scheduler.set_timesteps(1)
    if int(scheduler.timesteps[0]) != last:
        raise ValueError(f"{scheduler_class.__name__} cannot be set to the single timestep {last} that SDXS needs.")
    return scheduler


def validate_request(prompts, num_images: int, width: int, height: int, decoder: str, decoders, size_multiple: int) -> list[str]:
    """Check a request up front; return the prompts as a list. Raises ValueError saying what to fix.

    `size_multiple`: image sides must be multiples of it (SDXSEngine.size_multiple)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings.")
    if not isinstance(num_images, int) or not 1 <= num_images * len(prompts) <= MAX_IMAGES:
        raise ValueError(f"Number of images must be an integer from 1 to {MAX_IMAGES} in total (prompts x images per prompt).")
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, (int, np.integer)) or side % size_multiple or not size_multiple <= side <= MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {size_multiple} between {size_multiple} and {MAX_SIDE} for this model; got {side}.")
    if decoder not in decoders:
        raise ValueError(f"Unknown decoder '{decoder}'; this model has: {', '.join(decoders)}.")
    return list(prompts)


def vae_scale_factor(vae_config) -> int:
    """Image pixels per latent along each side, from a decoder's config. AutoencoderKL halves the
    image after every block but the last: 2**(len(block_out_channels)-1) (8 for SD's VAE, 4 for the
    emoji teacher's); AutoencoderTiny upsamples by `upsampling_scaling_factor` between its decoder
    blocks (8 for TAESD)."""
    if "decoder_block_out_channels" in vae_config:  # AutoencoderTiny
        return int(vae_config["upsampling_scaling_factor"]) ** (len(vae_config["decoder_block_out_channels"]) - 1)
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


@dataclass(frozen=True)
class Geometry:
    """Sizes a model's configs fix: read once at start-up, used wherever latents are sized."""

    vae_scale_factor: int  # image pixels per latent along each side
    native_size: int  # the image side it is trained at: U-Net sample_size x vae_scale_factor
    size_multiple: int  # image sides must be multiples of it: the latents must halve evenly in the U-Net
    control_scale_factor: int | None = None  # sketch pixels per latent (the ControlNet's embedding), if any


def model_geometry(components: Components) -> Geometry:
    """The geometry of `components`; a ValueError when its parts cannot work together."""
    unet = components.unet.config
    if not components.decoders:
        raise ValueError(f"'{components.source}' has no image decoder (vae/ or vae_large/).")
    factors = {name: vae_scale_factor(vae.config) for name, vae in components.decoders.items()}
    if len(set(factors.values())) > 1:
        found = ", ".join(f"the {name} decoder {f}x{f}" for name, f in factors.items())
        raise ValueError(f"'{components.source}': its decoders cannot decode the same latents: pixels per latent differ ({found}). Keep only one of them.")
    for name, vae in components.decoders.items():
        if vae.config.latent_channels != unet.out_channels:
            raise ValueError(
                f"'{components.source}': the {name} decoder reads {vae.config.latent_channels}-channel latents, "
                f"but the U-Net makes {unet.out_channels}-channel ones; they are not parts of one model."
            )
    factor = next(iter(factors.values()))
    sample_size = unet.sample_size[0] if isinstance(unet.sample_size, (list, tuple)) else unet.sample_size
    # Each U-Net down stage but the last halves the latents; odd sizes break the skip connections of
    # traced (OpenVINO) graphs, so sides must be multiples of every halving.
    multiple = factor * 2 ** (len(unet.block_out_channels) - 1)
    control = None
    if components.controlnet is not None:
        control = 2 ** (len(components.controlnet.config.conditioning_embedding_out_channels) - 1)
    return Geometry(factor, int(sample_size) * factor, multiple, control)


BACKENDS = ("auto", "torch", "torch-compile", "openvino", "openvino-bf16")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a request for `backend` gets on this device, with a clear error when impossible."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    if backend in ("torch", "torch-compile"):
        return backend
    from sdxs.openvino_backend import openvino_available

    if backend == "auto":
        return "openvino" if device.type == "cpu" and dtype == torch.float32 and openvino_available() else "torch"
    if device.type != "cpu":
        raise ValueError(f"The {backend} backend runs on the CPU; use --device cpu or --backend torch.")
    if not openvino_available():
        raise ValueError(f"The {backend} backend needs the openvino package: pip install openvino.")
    return backend


class _CompiledDecoder:
    def __init__(self, vae, mode: str):
        self.config = vae.config
        self.decode = torch.compile(vae.decode, mode=mode)


def compile_torch(components: Components, device: torch.device) -> Components:
    """The GPU path: channels_last U-Net and decoders, compiled once (CUDA graphs on a GPU via
    "reduce-overhead"). Compilation happens on the first call of each shape."""
    import dataclasses

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    unet = torch.compile(components.unet.to(memory_format=torch.channels_last), mode=mode)
    decoders = {name: _CompiledDecoder(vae.to(memory_format=torch.channels_last), mode) for name, vae in components.decoders.items()}
    return dataclasses.replace(components, unet=unet, decoders=decoders)


def seeded_noise(seeds: list[int], channels: int, height: int, width: int, scale_factor: int = 8) -> torch.Tensor:
    """Unit Gaussian latents (fp32, CPU) for height x width images, `scale_factor` pixels per latent,
    one generator per image: seed s gives the same image on any device and in any batch position."""
    shape = (1, channels, height // scale_factor, width // scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(noise)


def _shorten(text: str, limit: int = 40, tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if tail else text[:limit] + "..."


class SDXSEngine:
    """One-step text-to-image over built components; device and dtype are fixed at construction.

    Calls never move, cast or swap shared modules, so concurrent requests are safe.
    """

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype, backend: str = "torch"):
        """`backend`: "torch"; "torch-compile" (the GPU path); "openvino" (CPU, fp32 kernels of
        OpenVINO); "openvino-bf16" (CPU with native bf16: faster, slightly different images);
        "auto" picks "openvino" on a CPU when it is installed, else "torch"."""
        self.torch_components = components
        self.geometry = model_geometry(components)  # before any conversion: fail early, on the configs
        self.device = device
        self.dtype = dtype
        self.backend = resolve_backend(backend, device, dtype)
        if backend == "auto" and self.backend == "openvino":
            from sdxs.openvino_backend import memory_shortfall

            shortfall = memory_shortfall(components)
            if shortfall:
                log.warning("%s Using --backend torch (slower, same images); pass --backend openvino to insist.", shortfall)
                self.backend = "torch"
        if self.backend.startswith("openvino"):
            from sdxs.openvino_backend import ir_cache_dir, to_openvino

            precision = "bf16" if self.backend == "openvino-bf16" else "f32"
            components = to_openvino(components, precision, ir_cache_dir(components.folders, precision))
            log.info("Backend %s: each network is converted (first start) or read from the cache, then compiled, at warm-up.", self.backend)
        elif self.backend == "torch-compile":
            components = compile_torch(components, device)
            log.info("Backend torch-compile: each network is compiled on its first call, at warm-up.")
        self.components = components
        one_step_scheduler(components.scheduler_config)  # fail at start-up, not on the first request
        self.max_tokens = components.tokenizer.model_max_length

    @classmethod
    def from_pretrained(
        cls, model: str, *, device: str | None = None, dtype: str | torch.dtype | None = None, base: str | None = None, backend: str = "auto"
    ) -> "SDXSEngine":
        """Load a hub id or local diffusers folder (see sdxs.loading) on the chosen device/dtype/backend.
        Refuses (sdxs.loading.UnsupportedModelError) what is not a one-step model, e.g. a multi-step teacher."""
        device, dtype = pick_device_and_dtype(device, dtype)
        start = time.perf_counter()
        log.info("Loading %s on %s (%s)...", model, device, str(dtype).removeprefix("torch."))
        components = load_components(model, device, dtype, base=base)
        log.info("Loaded %s in %.1f s: decoders %s%s.", model, time.perf_counter() - start, ", ".join(components.decoders),
                 ", sketch ControlNet" if components.controlnet is not None else "")
        return cls(components, device, dtype, backend)

    @property
    def decoders(self) -> list[str]:
        """The image decoders this model has, fast first: e.g. ["tiny", "large"], or ["large"]."""
        return sorted(self.components.decoders, key=lambda name: DECODER_PREFERENCE.index(name))

    @property
    def default_decoder(self) -> str:
        """The fastest decoder the model has: "tiny" when it has one, else "large"."""
        return self.decoders[0]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent along each side (8 for SD's VAE and TAESD, 4 for the emoji teacher's)."""
        return self.geometry.vae_scale_factor

    @property
    def native_size(self) -> int:
        """The image side (pixels) the model is trained at, and the default size: 512 for SDXS-512."""
        return self.geometry.native_size

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (32 for SDXS-512: 8 pixels per latent, 2 halvings in the U-Net)."""
        return self.geometry.size_multiple

    @property
    def name(self) -> str:
        return self.components.source

    # --- stages ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """CLIP text embeddings (last hidden state, as SD uses); warns about truncated prompts."""
        tokenizer, warnings = self.components.tokenizer, []
        for prompt in prompts:
            ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
            if len(ids) > self.max_tokens:
                kept = tokenizer.decode(ids[1 : self.max_tokens - 1])
                dropped = tokenizer.decode(ids[self.max_tokens - 1 : -1])
                warnings.append(
                    f"Prompt longer than the text encoder's {self.max_tokens} tokens ({len(ids)} given): "
                    f"ignored the end '{_shorten(dropped)}' after '{_shorten(kept, tail=True)}'."
                )
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt").input_ids
        embeddings = self.components.text_encoder(ids.to(self.device))[0]
        return embeddings, warnings

    def initial_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Seeded latents for height x width images."""
        noise = seeded_noise(seeds, self.components.unet.config.in_channels, height, width, self.vae_scale_factor)
        return noise.to(self.device, self.dtype)

    def denoise(self, noise: torch.Tensor, text_embeddings: torch.Tensor, control: torch.Tensor | None = None, control_strength: float = 0.0) -> torch.Tensor:
        """The single step: predict at t=999 and jump straight to the clean latents.

        In sketch mode the ControlNet adds its 7 residuals (6 skip connections + 1 added after the
        missing mid block) to the U-Net, scaled by `control_strength`."""
        scheduler = one_step_scheduler(self.components.scheduler_config)
        t = scheduler.timesteps[0]
        latents = noise * scheduler.init_noise_sigma
        model_input = scheduler.scale_model_input(latents, t)
        residuals = {}
        if control is not None:
            down, mid = self.components.controlnet(
                model_input, t, encoder_hidden_states=text_embeddings, controlnet_cond=control,
                conditioning_scale=control_strength, return_dict=False,
            )
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        prediction = self.components.unet(model_input, t, encoder_hidden_states=text_embeddings, **residuals).sample
        return scheduler.step(prediction, t, latents).prev_sample

    def decode(self, latents: torch.Tensor, decoder: str) -> list[Image.Image]:
        vae = self.components.decoders[decoder]
        if self.backend == "torch" and self.device.type == "cpu":
            # NHWC latents make oneDNN run the decoder's convolutions in channels_last: the tiny
            # decoder 1.3x faster on a CPU, same values to float rounding (docs/benchmarks.md).
            latents = latents.to(memory_format=torch.channels_last)
        images = vae.decode(latents / vae.config.scaling_factor).sample  # in [-1, 1]
        array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]

    # --- public calls ---------------------------------------------------------------------------

    @torch.inference_mode()
    def text_to_image(
        self,
        prompt: str | list[str],
        *,
        seed: int = 0,
        num_images: int = 1,
        decoder: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
    ) -> Generation:
        """Generate `num_images` images per prompt in one batched forward.

        Image i of a call gets seed `seed + i`, so any image can be reproduced alone. `decoder`
        defaults to `default_decoder`, `width` and `height` to `native_size`.
        """
        decoder = self.default_decoder if decoder is None else decoder
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        check_one_step_settings(num_inference_steps, guidance_scale)
        prompts = validate_request(prompt, num_images, width, height, decoder, self.decoders, self.size_multiple)
        return self._generate(prompts, seed, num_images, decoder, width, height)

    @torch.inference_mode()
    def sketch_to_image(
        self,
        sketch,
        prompt: str | list[str],
        *,
        seed: int = 0,
        num_images: int = 1,
        control_strength: float = 0.8,
        decoder: str | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
    ) -> Generation:
        """Sketch + prompt -> images, in one step through the sketch ControlNet.

        `sketch`: anything sdxs.sketch.prepare_sketch reads (canvas value, PIL image, array, path).
        `control_strength` (controlnet_conditioning_scale) in [0, 1]: 0 ignores the sketch.
        Images come at `native_size`; the ControlNet sees the sketch at its own scale per latent.
        """
        from sdxs.sketch import prepare_sketch, sketch_to_tensor

        if self.components.controlnet is None:
            raise ValueError(
                f"'{self.name}' has no ControlNet, so it cannot draw from sketches. Load "
                "IDKiro/sdxs-512-dreamshaper-sketch (or a folder with a controlnet/ subfolder)."
            )
        check_one_step_settings(num_inference_steps, guidance_scale)
        if not isinstance(control_strength, (int, float)) or not 0 <= control_strength <= 1:
            raise ValueError(f"control_strength must be between 0 and 1; got {control_strength!r}.")
        decoder, size = self.default_decoder if decoder is None else decoder, self.native_size
        prompts = validate_request(prompt, num_images, size, size, decoder, self.decoders, self.size_multiple)
        control_image = prepare_sketch(sketch, size // self.vae_scale_factor * self.geometry.control_scale_factor)
        if control_image is None:
            raise ValueError("The sketch is empty: draw some dark strokes (or upload a line drawing) first.")
        control = sketch_to_tensor(control_image).to(self.device, self.dtype)
        result = self._generate(prompts, seed, num_images, decoder, size, size, control, float(control_strength))
        result.sketch = control_image
        return result

    def _generate(self, prompts, seed, num_images, decoder, width, height, control=None, control_strength=0.0) -> Generation:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}.")
        prompts = [p for p in prompts for _ in range(num_images)]
        seeds = [int(seed) + i for i in range(len(prompts))]
        if control is not None:
            control = control.expand(len(prompts), -1, -1, -1)

        timings, start = {}, time.perf_counter()
        embeddings, warnings = self.encode_prompts(prompts)
        timings["text_encoder"] = self._lap(start)
        latents = self.denoise(self.initial_noise(seeds, height, width), embeddings, control, control_strength)
        timings["unet"] = self._lap(start, timings)
        images = self.decode(latents, decoder)
        timings["decoder"] = self._lap(start, timings)
        timings["total"] = time.perf_counter() - start
        if (width, height) != (self.native_size, self.native_size):
            warnings.append(f"This model is trained at {self.native_size}x{self.native_size}; {width}x{height} may look worse.")
        warnings = list(dict.fromkeys(warnings))
        for w in warnings:
            log.warning(w)
        return Generation(images, seeds, prompts, warnings, timings)

    def with_lora(self, adapter: str) -> "SDXSEngine":
        """A variant of this engine with a PEFT LoRA (e.g. the anime style) merged into a copy of
        the U-Net; the text encoder, decoders and ControlNet are shared, not copied."""
        import copy
        import dataclasses

        from sdxs.loading import merge_lora, resolve_model_dir

        adapter_dir = resolve_model_dir(adapter, subfolders_with_weights=("",))
        unet = merge_lora(copy.deepcopy(self.torch_components.unet), adapter_dir)
        folders = (*self.torch_components.folders, str(adapter_dir)) if self.torch_components.folders else ()
        variant = dataclasses.replace(self.torch_components, unet=unet, source=str(adapter), folders=folders)
        engine = SDXSEngine(variant, self.device, self.dtype, self.backend)
        if self.backend.startswith("openvino"):  # share the converted networks that did not change
            engine.components = dataclasses.replace(self.components, unet=engine.components.unet, source=str(adapter))
        return engine

    def warm_up(self) -> float:
        """Throw-away calls at the native size, through every decoder and (with a ControlNet) the
        sketch mode, so that converting/compiling (OpenVINO, torch.compile) happens at start-up and
        not on a visitor's first request. Returns seconds."""
        start = time.perf_counter()
        size = self.native_size
        modes = f"decoders {', '.join(self.decoders)} at {size}x{size}" + (", sketch mode" if self.components.controlnet is not None else "")
        log.info("Warming up (%s backend; %s)...", self.backend, modes)
        with torch.inference_mode():
            embeddings, _ = self.encode_prompts(["warm-up"])
            latents = self.denoise(self.initial_noise([0], size, size), embeddings)
            for decoder in self.decoders:
                self.decode(latents, decoder)
        if self.components.controlnet is not None:
            sketch = Image.new("L", (64, 64), 255)
            ImageDraw.Draw(sketch).line([(8, 8), (56, 56)], fill=0, width=3)
            self.sketch_to_image(sketch, "warm-up", seed=0)
        seconds = time.perf_counter() - start
        log.info("Warm-up done in %.1f s.", seconds)
        return seconds

    def _lap(self, start: float, done: dict | None = None) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start - sum((done or {}).values())
