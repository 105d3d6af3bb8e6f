"""The one-step engine: prompts in, images out, the SDXS way (one U-Net call at t=999, no guidance)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdxs.loading import Components, load_components, pick_device_and_dtype
from sdxs.registry import SKETCH_MODEL
from sdxs.validation import MAX_SEED

log = logging.getLogger(__name__)

MAX_SIDE = 2048
# Images per forward: a call of any size runs in micro-batches of at most this many (memory stays
# bounded). On a GPU, batching is where the throughput is (issue 16: 5x from batch 1 to 16); on a
# CPU it gains ~5% and costs memory.
DEFAULT_MICRO_BATCH = {"cuda": 64, "cpu": 4}
# Fast (Rust) tokenizers keep their truncation/padding settings as shared state that every call
# resets: two threads tokenizing at once (a style variant's batcher next to the base model's, which
# share the tokenizer) can fail ("Already borrowed") or encode under the other call's settings.
TOKENIZER_LOCK = threading.Lock()
PROMPT_CACHE_SIZE = 64  # prompt embeddings kept (LRU): the live sketch app re-sends its prompt on every stroke
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


@dataclass(frozen=True)
class OneStepUpdate:
    """The single SDXS step as four numbers, read once from the model's scheduler.

    latents = noise * noise_scale; the U-Net reads latents * input_scale at `timestep`; the clean
    latents are latents_coef * latents + prediction_coef * prediction. The one-step update of every
    deterministic diffusers scheduler is this linear map (one_step_update checks it), so a call needs
    no scheduler object: no Python work per call, no shared state to race on, one region to compile."""

    timestep: float
    noise_scale: float
    input_scale: float
    latents_coef: float
    prediction_coef: float

    def clean_latents(self, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        clean = self.latents_coef * latents.float() + self.prediction_coef * prediction.float()  # fp32, as schedulers step
        return clean.to(prediction.dtype)


def one_step_update(scheduler_config: dict) -> OneStepUpdate:
    """The numbers of the scheduler's single step at t=T-1, probed on fresh schedulers; a ValueError
    when its step is not linear in (latents, prediction), e.g. one that adds noise."""

    def step(prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        scheduler = one_step_scheduler(scheduler_config)  # fresh: multistep schedulers keep history
        t = scheduler.timesteps[0]
        scheduler.scale_model_input(latents, t)  # some schedulers insist it comes first
        return scheduler.step(prediction, t, latents).prev_sample

    scheduler = one_step_scheduler(scheduler_config)
    t = scheduler.timesteps[0]
    one, zero = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    update = OneStepUpdate(
        timestep=float(t),
        noise_scale=float(scheduler.init_noise_sigma),
        input_scale=float(scheduler.scale_model_input(one, t)),
        latents_coef=float(step(zero, one)),
        prediction_coef=float(step(one, zero)),
    )
    latents, prediction = torch.randn(2, 1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    if not torch.allclose(step(prediction, latents), update.clean_latents(latents, prediction), rtol=1e-4, atol=1e-5):
        raise ValueError(f"{type(scheduler).__name__}'s single step is not a linear update of (latents, prediction); "
                         "SDXS needs a deterministic one-step scheduler (Euler, DDIM, DEIS, DPM-Solver, LCM).")
    return update


def validate_request(prompts, num_images: int, width: int, height: int, decoder: str, decoders, size_multiple: int,
                     max_images: int | None = None) -> list[str]:
    """Check a request up front; return the prompts as a list. Raises ValueError saying what to fix.

    `size_multiple`: image sides must be multiples of it (SDXSEngine.size_multiple); `max_images`:
    the most images one call may ask for in total (None: no limit)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings.")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"Number of images must be a whole number of at least 1; got {num_images!r}.")
    if max_images is not None and num_images * len(prompts) > max_images:
        raise ValueError(f"Number of images must be from 1 to {max_images} in total (prompts x images per prompt); "
                         f"{num_images * len(prompts)} were asked for.")
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, (int, np.integer)) or side % size_multiple or not size_multiple <= side <= MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {size_multiple} between {size_multiple} and {MAX_SIDE} for this model; got {side}.")
    if decoder not in decoders:
        raise ValueError(f"Unknown decoder '{decoder}'; this model has: {', '.join(decoders)}.")
    return list(prompts)


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}.")


def image_seeds(seed: int, count: int) -> list[int]:
    """Image i of a call gets seed + i, so any image can be reproduced alone."""
    return [int(seed) + i for i in range(count)]


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
    if dtype != torch.float32:
        raise ValueError(f"The {backend} backend reads fp32 weights and picks its own precision (openvino-bf16 computes in bf16); "
                         "use --dtype fp32, or --backend torch for PyTorch in bf16.")
    if not openvino_available():
        raise ValueError(f"The {backend} backend needs the openvino package: pip install openvino.")
    return backend


def seeded_noise(seeds: list[int], channels: int, height: int, width: int, scale_factor: int = 8) -> torch.Tensor:
    """Unit Gaussian latents (fp32, CPU) for height x width images, `scale_factor` pixels per latent,
    one generator per image: seed s gives the same image on any device and in any batch position."""
    shape = (1, channels, height // scale_factor, width // scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(noise)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, so the copy does not stall the host."""
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


# --- the three stages of a one-step call, as functions of the networks ------------------------------

def encode_text(text_encoder, input_ids: torch.Tensor, text_encoder_2=None, input_ids_2: torch.Tensor | None = None):
    """(text embeddings (N, tokens, width), pooled embedding (N, projection) or None) of tokenised prompts.

    SD-1.x/2.x: the text encoder's last hidden state, no pooled embedding. SDXL family (with
    `text_encoder_2`), as diffusers' StableDiffusionXLPipeline.encode_prompt: both encoders'
    penultimate hidden states, CLIP-L's first, concatenated along the features (768 + 1280 = 2048 for
    SDXL); the pooled embedding is text_encoder_2's projected end-of-text state (text_embeds)."""
    if text_encoder_2 is None:
        return text_encoder(input_ids)[0], None
    first = text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def sdxl_time_ids(count: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's six size numbers per image (count, 6): original size (h, w), crop top-left (0, 0),
    target size (h, w), as StableDiffusionXLPipeline builds them by default: the image is asked
    for whole, uncropped, at the size it is made."""
    return torch.tensor([[height, width, 0, 0, height, width]] * count, dtype=dtype, device=device)


def denoise(unet, update: OneStepUpdate, noise: torch.Tensor, text_embeddings: torch.Tensor,
            controlnet=None, control: torch.Tensor | None = None, control_strength=0.0, added_cond: dict | None = None) -> torch.Tensor:
    """The single step: predict at t=999 and jump straight to the clean latents.

    In sketch mode the ControlNet adds its residuals (one per skip connection + one after the mid
    block) to the U-Net, scaled by `control_strength` (a number or a 0-d tensor). `added_cond`:
    an SDXL-family U-Net's {"text_embeds": pooled, "time_ids": sizes} (None for SD models)."""
    latents = noise * update.noise_scale
    model_input = latents * update.input_scale
    extra = {} if added_cond is None else {"added_cond_kwargs": added_cond}
    if control is not None:
        down, mid = controlnet(model_input, update.timestep, encoder_hidden_states=text_embeddings, controlnet_cond=control,
                               conditioning_scale=control_strength, return_dict=False)
        extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    prediction = unet(model_input, update.timestep, encoder_hidden_states=text_embeddings, **extra).sample
    return update.clean_latents(latents, prediction)


def decode_to_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 images (N, H, W, 3) on the latents' device: the conversion runs where the
    decoder does, so only the final pixels cross to the host. Latents are cast to the decoder's dtype
    (SDXL's VAE runs in fp32 in an fp16 model: sdxs.loading.decoder_dtype)."""
    latents = latents.to(getattr(vae, "dtype", latents.dtype))  # wrappers (OpenVINO, AOT) have no dtype: as given
    images = vae.decode(latents / vae.config.scaling_factor).sample  # in [-1, 1]
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def render(unet, vae, update: OneStepUpdate, noise, text_embeddings, controlnet=None, control=None, control_strength=0.0,
           added_cond: dict | None = None) -> torch.Tensor:
    """Noise + text embeddings -> uint8 pixels: the whole one-step call after the text encoder."""
    return decode_to_pixels(vae, denoise(unet, update, noise, text_embeddings, controlnet, control, control_strength, added_cond))


def batch_bucket(n: int, micro_batch: int) -> int:
    """The batch a compiled path runs `n` images at: the next power of two (at most `micro_batch`),
    so that a few captured shapes serve every request size."""
    return min(1 << (n - 1).bit_length(), micro_batch)


class CompiledPath:
    """The torch-compile backend: the text encoder (always batch 1, see SDXSEngine.encode_prompt)
    and, per decoder, the whole rest of the call (U-Net [+ ControlNet] -> step -> decoder -> uint8
    pixels) each compiled as one region, per batch bucket. On a GPU "reduce-overhead" captures each
    shape as a CUDA graph: inputs are copied into static buffers, one replay, no host syncs but the
    final copy of the pixels.

    Every compiled call runs on one dedicated thread: PyTorch keeps CUDA graphs per thread, so calls
    from a web server's many threads would each record (and hold memory for) their own. A graph's
    outputs are overwritten by its next replay, so they are copied out on that thread (embeddings
    cloned, pixels to the host) before the next call can start."""

    def __init__(self, components: Components, update: OneStepUpdate, device: torch.device):
        import torch._dynamo

        mode = "reduce-overhead" if device.type == "cuda" else "default"
        # One compiled function per decoder, each with a few batch buckets: more entries than
        # dynamo's default of 8 per function, which would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        unet = components.unet.to(memory_format=torch.channels_last)
        # fullgraph: each region is one graph or an error at warm-up. A graph break would split a call
        # into several CUDA graphs, and the step counter that lets graph memory be reused is process-wide:
        # another engine's compiled thread (a style variant) marking a step between them could reuse
        # memory still in use. Exception: transformers' hidden-state capture (SDXL reads the
        # penultimate states of both encoders) takes a lock, which dynamo cannot trace.
        self.text_encoder = torch.compile(functools.partial(encode_text, components.text_encoder, text_encoder_2=components.text_encoder_2),
                                          mode=mode, dynamic=False, fullgraph=components.text_encoder_2 is None)
        self.renders = {}
        for name, vae in components.decoders.items():
            vae = vae.to(memory_format=torch.channels_last)
            self.renders[name] = torch.compile(
                functools.partial(render, unet, vae, update, controlnet=components.controlnet), mode=mode, dynamic=False, fullgraph=True)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxs-compiled")

    def encode(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None):
        """encode_text's (embeddings, pooled or None), copies that the next call does not overwrite."""
        def call():
            embedding, pooled = self.text_encoder(input_ids, input_ids_2=input_ids_2)
            return embedding.clone(), None if pooled is None else pooled.clone()

        return self._run(call)

    def pixels(self, decoder: str, noise, embeddings, control=None, control_strength=None, added_cond=None) -> torch.Tensor:
        """uint8 images (N, H, W, 3) on the host."""
        return self._run(lambda: self.renders[decoder](noise, embeddings, control=control, control_strength=control_strength,
                                                       added_cond=added_cond).cpu())

    def _run(self, call):
        def on_compiled_thread():
            with torch.inference_mode():
                torch.compiler.cudagraph_mark_step_begin()  # earlier outputs were copied out: their buffers may be reused
                return call()

        return self._thread.submit(on_compiled_thread).result()


def _shorten(text: str, limit: int = 40, tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if tail else text[:limit] + "..."


class SDXSEngine:
    """One-step text-to-image over built components; device and dtype are fixed at construction.

    Calls never move, cast or swap shared modules, so concurrent requests are safe.
    """

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype, backend: str = "torch", *,
                 micro_batch: int | None = None, max_images: int | None = None, prompt_cache_size: int = PROMPT_CACHE_SIZE):
        """`backend`: "torch"; "torch-compile" (the GPU path: see CompiledPath); "openvino" (CPU, fp32
        kernels of OpenVINO); "openvino-bf16" (CPU with native bf16: faster, slightly different
        images); "auto" picks "openvino" on a CPU when it is installed, else "torch".
        `micro_batch`: images per forward (default DEFAULT_MICRO_BATCH for the device); a call of
        any size runs in chunks of it. `max_images`: the most images one call may ask for (None: no
        limit; the apps set their own). `prompt_cache_size`: prompt embeddings kept (0: none)."""
        self.torch_components = components
        self.geometry = model_geometry(components)  # before any conversion: fail early, on the configs
        self.device = device
        self.dtype = dtype
        self.micro_batch = DEFAULT_MICRO_BATCH.get(device.type, DEFAULT_MICRO_BATCH["cpu"]) if micro_batch is None else micro_batch
        for name, value in (("micro_batch", self.micro_batch), ("max_images", max_images)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1; got {value!r}.")
        self.max_images = max_images
        self.update = one_step_update(components.scheduler_config)  # fails at start-up, not on the first request
        self.backend = resolve_backend(backend, device, dtype)
        if components.is_sdxl and self.backend.startswith("openvino"):  # its IR has no inputs for SDXL's added conditions
            if backend != "auto":
                raise ValueError(f"The {backend} backend runs SD-1.x/2.x models only; '{components.source}' is an SDXL-family "
                                 "model: use --backend torch (or torch-compile on a GPU).")
            self.backend = "torch"
        if backend == "auto" and self.backend == "openvino":
            from sdxs.openvino_backend import memory_shortfall

            shortfall = memory_shortfall(components)
            if shortfall:
                log.warning("%s Using --backend torch (slower, same images); pass --backend openvino to insist.", shortfall)
                self.backend = "torch"
        self.compiled = None
        if self.backend.startswith("openvino"):
            from sdxs.openvino_backend import ir_cache_dir, to_openvino

            precision = "bf16" if self.backend == "openvino-bf16" else "f32"
            components = to_openvino(components, precision, ir_cache_dir(components.folders, precision))
            log.info("Backend %s: each network is converted (first start) or read from the cache, then compiled, at warm-up.", self.backend)
        elif self.backend == "torch-compile":
            self.compiled = CompiledPath(components, self.update, device)
            log.info("Backend torch-compile: the text encoder and the one-step call are compiled per batch size, at warm-up.")
        self.components = components
        self.max_tokens = components.tokenizer.model_max_length
        self.prompt_cache_size = prompt_cache_size
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None, str | None]] = OrderedDict()
        self._prompt_cache_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, model: str, *, device: str | None = None, dtype: str | torch.dtype | None = None, base: str | None = None, backend: str = "auto",
        **options,
    ) -> "SDXSEngine":
        """Load a hub id or local diffusers folder (see sdxs.loading) on the chosen device/dtype/backend;
        `options` (micro_batch, max_images, prompt_cache_size) go to the constructor. Refuses
        (sdxs.loading.UnsupportedModelError) what is not a one-step model, e.g. a multi-step teacher."""
        device, dtype = pick_device_and_dtype(device, dtype)
        start = time.perf_counter()
        log.info("Loading %s on %s (%s)...", model, device, str(dtype).removeprefix("torch."))
        components = load_components(model, device, dtype, base=base)
        log.info("Loaded %s in %.1f s: decoders %s%s.", model, time.perf_counter() - start, ", ".join(components.decoders),
                 ", sketch ControlNet" if components.controlnet is not None else "")
        return cls(components, device, dtype, backend, **options)

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

    def truncation_warning(self, prompt: str) -> str | None:
        """What is cut from a prompt longer than the text encoder reads, or None."""
        tokenizer = self.components.tokenizer
        with TOKENIZER_LOCK:
            ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        if len(ids) <= self.max_tokens:
            return None
        kept = tokenizer.decode(ids[1 : self.max_tokens - 1])
        dropped = tokenizer.decode(ids[self.max_tokens - 1 : -1])
        return (f"Prompt longer than the text encoder's {self.max_tokens} tokens ({len(ids)} given): "
                f"ignored the end '{_shorten(dropped)}' after '{_shorten(kept, tail=True)}'.")

    def _token_ids(self, tokenizer, prompt: str) -> torch.Tensor:
        with TOKENIZER_LOCK:
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return to_device(ids, self.device)

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        """One prompt's CLIP text embedding (1, tokens, width; see encode_text), its pooled embedding
        (1, projection; SDXL family, else None), and its truncation warning. Always alone (batch 1):
        a prompt's embedding is the same in any request and batch, and the compiled text encoder
        needs one shape. Cached (LRU) when enabled."""
        with self._prompt_cache_lock:
            if prompt in self._prompt_cache:
                self._prompt_cache.move_to_end(prompt)
                return self._prompt_cache[prompt]
        components = self.components
        ids = self._token_ids(components.tokenizer, prompt)
        ids_2 = self._token_ids(components.tokenizer_2, prompt) if components.tokenizer_2 is not None else None
        if self.compiled:
            embedding, pooled = self.compiled.encode(ids, ids_2)
        else:
            embedding, pooled = encode_text(components.text_encoder, ids, components.text_encoder_2, ids_2)
        entry = (embedding.to(self.dtype), None if pooled is None else pooled.to(self.dtype), self.truncation_warning(prompt))
        if self.prompt_cache_size > 0:
            with self._prompt_cache_lock:
                self._prompt_cache[prompt] = entry
                while len(self._prompt_cache) > self.prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
        return entry

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Embeddings (N, tokens, width) for a list of prompts (each distinct prompt encoded once);
        warnings about truncated prompts."""
        embeddings, _, warnings = self.text_conditioning(prompts)
        return embeddings, warnings

    def text_conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """Embeddings (N, tokens, width), pooled embeddings (N, projection; SDXL family, else None)
        and truncation warnings of a list of prompts, each distinct prompt encoded once."""
        encoded = {prompt: self.encode_prompt(prompt) for prompt in dict.fromkeys(prompts)}
        warnings = [warning for _, _, warning in encoded.values() if warning]
        embeddings = torch.cat([encoded[prompt][0] for prompt in prompts])
        pooled = torch.cat([encoded[prompt][1] for prompt in prompts]) if self.components.is_sdxl else None
        return embeddings, pooled, warnings

    def added_conditioning(self, pooled: torch.Tensor | None, height: int, width: int) -> dict | None:
        """An SDXL-family U-Net's added_cond_kwargs for images of height x width: the pooled text
        embeddings and the size numbers (sdxl_time_ids); None for SD models."""
        if pooled is None:
            return None
        return {"text_embeds": pooled, "time_ids": sdxl_time_ids(pooled.shape[0], height, width, pooled.dtype, pooled.device)}

    def initial_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Seeded latents for height x width images."""
        noise = seeded_noise(seeds, self.components.unet.config.in_channels, height, width, self.vae_scale_factor)
        return to_device(noise, self.device, self.dtype)

    def denoise(self, noise: torch.Tensor, text_embeddings: torch.Tensor, control: torch.Tensor | None = None, control_strength: float = 0.0,
                added_cond: dict | None = None) -> torch.Tensor:
        """The single step on this engine's networks (see sdxs.engine.denoise); an SDXL-family model
        needs `added_cond` (added_conditioning)."""
        return denoise(self.components.unet, self.update, noise, text_embeddings, self.components.controlnet, control, control_strength,
                       added_cond)

    def decode(self, latents: torch.Tensor, decoder: str) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self._decode_to_pixels(latents, decoder).cpu().numpy()]

    def _decode_to_pixels(self, latents: torch.Tensor, decoder: str) -> torch.Tensor:
        if self.backend == "torch" and self.device.type == "cpu":
            # NHWC latents make oneDNN run the decoder's convolutions in channels_last: the tiny
            # decoder 1.3x faster on a CPU, same values to float rounding (docs/benchmarks.md).
            latents = latents.to(memory_format=torch.channels_last)
        return decode_to_pixels(self.components.decoders[decoder], latents)

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
        """Generate `num_images` images per prompt, in forwards of up to `micro_batch` images.

        Image i of a call gets seed `seed + i`, so any image can be reproduced alone. `decoder`
        defaults to `default_decoder`, `width` and `height` to `native_size`.
        """
        return self._generate(*self.prepare_text_request(prompt, seed, num_images, decoder, width, height, num_inference_steps, guidance_scale))

    def prepare_text_request(self, prompt, seed, num_images, decoder, width, height, num_inference_steps, guidance_scale):
        """A text request checked and expanded: (one prompt per image, their seeds, decoder, width,
        height), the defaults filled in; a ValueError that says what to fix."""
        decoder = self.default_decoder if decoder is None else decoder
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        check_one_step_settings(num_inference_steps, guidance_scale)
        prompts = validate_request(prompt, num_images, width, height, decoder, self.decoders, self.size_multiple, self.max_images)
        check_seed(seed)
        prompts = [p for p in prompts for _ in range(num_images)]
        return prompts, image_seeds(seed, len(prompts)), decoder, width, height

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
        prompts, control, control_image = self.prepare_sketch_request(sketch, prompt, num_images, control_strength, decoder,
                                                                      num_inference_steps, guidance_scale)
        check_seed(seed)
        decoder = self.default_decoder if decoder is None else decoder
        result = self._generate(prompts, image_seeds(seed, len(prompts)), decoder, self.native_size, self.native_size, control, float(control_strength))
        result.sketch = control_image
        return result

    def prepare_sketch_request(self, sketch, prompt, num_images, control_strength, decoder, num_inference_steps, guidance_scale):
        """A sketch request checked: (one prompt per image, the control tensor (1, 3, H, W) on the
        device, the control image as the ControlNet sees it); a ValueError that says what to fix."""
        from sdxs.sketch import prepare_sketch, sketch_to_tensor

        if self.components.is_sdxl:
            raise ValueError(f"'{self.name}' is an SDXL-family model; sketch mode (the ControlNet) runs SDXS-512 models only. "
                             f"Use text-to-image with it, or load {SKETCH_MODEL} for sketches.")
        if self.components.controlnet is None:
            raise ValueError(
                f"'{self.name}' has no ControlNet, so it cannot draw from sketches. Load "
                "IDKiro/sdxs-512-dreamshaper-sketch (or a folder with a controlnet/ subfolder)."
            )
        check_one_step_settings(num_inference_steps, guidance_scale)
        if isinstance(control_strength, bool) or not isinstance(control_strength, (int, float)) or not 0 <= control_strength <= 1:
            raise ValueError(f"control_strength must be between 0 and 1; got {control_strength!r}.")
        decoder, size = self.default_decoder if decoder is None else decoder, self.native_size
        prompts = validate_request(prompt, num_images, size, size, decoder, self.decoders, self.size_multiple, self.max_images)
        control_image = prepare_sketch(sketch, size // self.vae_scale_factor * self.geometry.control_scale_factor)
        if control_image is None:
            raise ValueError("The sketch is empty: draw some dark strokes (or upload a line drawing) first.")
        control = to_device(sketch_to_tensor(control_image), self.device, self.dtype)
        return [p for p in prompts for _ in range(num_images)], control, control_image

    def _generate(self, prompts: list[str], seeds: list[int], decoder: str, width: int, height: int,
                  control: torch.Tensor | None = None, control_strength=0.0) -> Generation:
        """Image i from prompts[i] and seeds[i], in micro-batches; the requests are already checked.
        `control`: one control image for all (1, 3, H, W) or one per image (N, 3, H, W) (sdxs.batching)."""
        start = time.perf_counter()
        embeddings, pooled, _ = self.text_conditioning(prompts)
        timings = {} if self.compiled else {"text_encoder": self._lap(start), "unet": 0.0, "decoder": 0.0}
        images = []
        for first in range(0, len(prompts), self.micro_batch):
            chunk = slice(first, first + self.micro_batch)
            noise = self.initial_noise(seeds[chunk], height, width)
            per_image = lambda x: x[chunk] if torch.is_tensor(x) and x.shape[0] > 1 else x  # noqa: E731
            added_cond = self.added_conditioning(None if pooled is None else pooled[chunk], height, width)
            pixels = self._render_chunk(noise, embeddings[chunk], decoder, per_image(control), control_strength, timings, added_cond)
            images += [Image.fromarray(a) for a in pixels.cpu().numpy()]  # the one host sync of a chunk
        timings["total"] = time.perf_counter() - start
        warnings = self.request_warnings(prompts, width, height)
        for w in warnings:
            log.warning(w)
        return Generation(images, list(seeds), list(prompts), warnings, timings)

    def request_warnings(self, prompts: list[str], width: int, height: int) -> list[str]:
        """What a person should know about a request: truncated prompts, a size the model was not trained at."""
        warnings = [warning for warning in map(self.truncation_warning, dict.fromkeys(prompts)) if warning]
        if (width, height) != (self.native_size, self.native_size):
            warnings.append(f"This model is trained at {self.native_size}x{self.native_size}; {width}x{height} may look worse.")
        return warnings

    def _render_chunk(self, noise, embeddings, decoder, control, control_strength, timings, added_cond=None) -> torch.Tensor:
        """uint8 pixels of one micro-batch. Eager backends run stage by stage and add each stage's
        time to `timings` (a sync per stage on a GPU); the compiled path runs its one region at the
        chunk's batch bucket (rows repeated to fill it, then dropped) and takes no stage times."""
        n = noise.shape[0]
        if control is not None:
            # contiguous: a compiled graph is specialised on strides too, and a batcher's control
            # (one row per request, concatenated) must hit the graph the warm-up's expanded one made
            control = control.expand(n, -1, -1, -1).contiguous()
        if self.compiled:
            bucket = batch_bucket(n, self.micro_batch)
            pad = lambda x: x if x is None or bucket == n else torch.cat([x, x[-1:].expand(bucket - n, *x.shape[1:])])  # noqa: E731
            strength = None
            if control is not None:  # a tensor, so that each strength does not compile a graph of its own
                strength = to_device(torch.tensor(float(control_strength)), self.device, self.dtype)
            if added_cond is not None:
                added_cond = {name: pad(value) for name, value in added_cond.items()}
            return self.compiled.pixels(decoder, pad(noise), pad(embeddings), pad(control), strength, added_cond)[:n]
        start = time.perf_counter()
        latents = self.denoise(noise, embeddings, control, control_strength, added_cond)
        timings["unet"] += self._lap(start)
        start = time.perf_counter()
        pixels = self._decode_to_pixels(latents, decoder)
        timings["decoder"] += self._lap(start)
        return pixels

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
        engine = SDXSEngine(variant, self.device, self.dtype, self.backend, micro_batch=self.micro_batch, max_images=self.max_images,
                            prompt_cache_size=self.prompt_cache_size)
        if self.backend.startswith("openvino"):  # share the converted networks that did not change
            engine.components = dataclasses.replace(self.components, unet=engine.components.unet, source=str(adapter))
        return engine

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Throw-away calls at the native size, through every decoder and (with a ControlNet) the
        sketch mode, so that converting/compiling (OpenVINO, torch.compile) happens at start-up and
        not on a visitor's first request. `batch_sizes`: the batches to prepare (the compiled path
        captures each batch bucket once). Returns seconds.

        The compiled path runs each shape twice: CUDA graph trees run a new function eagerly on its
        first call and record its graph on the second."""
        start = time.perf_counter()
        size = self.native_size
        modes = f"decoders {', '.join(self.decoders)} at {size}x{size}" + (", sketch mode" if self.components.controlnet is not None else "")
        log.info("Warming up (%s backend; %s; batch %s)...", self.backend, modes, ", ".join(map(str, batch_sizes)))
        for batch in [b for b in batch_sizes for _ in range(2 if self.compiled else 1)]:
            for decoder in self.decoders:
                self.text_to_image("warm-up", seed=0, num_images=batch, decoder=decoder)
            if self.components.controlnet is not None and not self.components.is_sdxl:
                sketch = Image.new("L", (64, 64), 255)
                ImageDraw.Draw(sketch).line([(8, 8), (56, 56)], fill=0, width=3)
                self.sketch_to_image(sketch, "warm-up", seed=0, num_images=batch)
        self.clear_prompt_cache()
        seconds = time.perf_counter() - start
        log.info("Warm-up done in %.1f s.", seconds)
        return seconds

    def clear_prompt_cache(self) -> None:
        with self._prompt_cache_lock:
            self._prompt_cache.clear()

    def _lap(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start
