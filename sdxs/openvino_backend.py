"""OpenVINO backend for the CPU: the one-step networks converted with static shapes.

Why: on a CPU, OpenVINO's kernels run the TAESD decoder, the text encoder and the U-Net faster
than PyTorch eager at the same fp32 precision (docs/benchmarks.md has the measured numbers). Each
network is traced once from the loaded PyTorch module (`ov.convert_model`), the IR is cached on disk
for real checkpoints and always compiled from there (so a cold and a warm cache give the same bytes),
and the compiled model is wrapped to look like the module it replaces, so `SDXSEngine` does not know
which backend runs.

Precision: "f32" (the default) keeps outputs equal to PyTorch within float rounding; "bf16" is
offered as an option on CPUs with native bf16 (AVX512-BF16/AMX): about 2x faster, slightly
different images (PSNR in docs/benchmarks.md). It is never chosen silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

log = logging.getLogger(__name__)

PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_shortfall(components) -> str | None:
    """Why OpenVINO would not fit beside the loaded PyTorch modules, or None.

    OpenVINO's CPU plugin keeps a repacked copy of every weight it compiles next to the original
    constants: measured here, the engine's peak grows by about the weights of the networks it
    compiles at start-up (then text encoder, U-Net, ControlNet, tiny decoder: 2.4 -> 3.9 GiB for
    SDXS-512). The warm-up now compiles every decoder, so the large one counts too."""
    networks = [components.text_encoder, components.unet, components.controlnet, *components.decoders.values()]
    needed = sum(p.numel() * 4 for net in networks if net is not None for p in net.parameters())
    available = available_memory_bytes()
    if available is None or available >= needed:
        return None
    return f"OpenVINO would need about {needed / 2**30:.1f} GiB more memory, and {available / 2**30:.1f} GiB is available."


class _Compiled:
    """One network: a torch `forward(*tensors)` traced once into an OpenVINO model, then reshaped
    and compiled once per input-shape signature (static shapes are OpenVINO's fast path)."""

    def __init__(self, name: str, module: torch.nn.Module, precision: str, cache_dir: Path | None):
        import openvino as ov

        self.name, self.module, self.cache_dir = name, module, cache_dir
        self.core = ov.Core()
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISIONS[precision]}
        self.model = None  # the traced ov.Model, kept to reshape for new input shapes
        self.compiled: dict[tuple, object] = {}
        self.lock = threading.Lock()  # tracing and compiling happen once per shape, not per request
        self.convert_seconds = 0.0

    def __call__(self, *inputs: torch.Tensor) -> list[np.ndarray]:
        batch = inputs[0].shape[0]
        if batch > 1:
            # A batch runs as batch-1 calls: on a CPU batching gains ~5% throughput (measured 0.40 vs
            # 0.42 images/s), while each new static batch size costs another compile (20-35 s for
            # the U-Net) and another repacked copy of every weight (+1.6 GiB for SDXS-512).
            parts = [self._run([x[i : i + 1] if x.shape[0] == batch else x for x in inputs]) for i in range(batch)]
            return [np.concatenate(outputs) for outputs in zip(*parts)]
        return self._run(inputs)

    def _run(self, inputs) -> list[np.ndarray]:
        arrays = [x.detach().cpu().numpy() for x in inputs]
        key = tuple(a.shape for a in arrays)
        compiled = self.compiled.get(key)
        if compiled is None:
            with self.lock:
                compiled = self.compiled.get(key) or self._compile(key, inputs)
        request = compiled.create_infer_request()  # one request per call: safe across threads
        request.infer(arrays)
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    def _compile(self, key: tuple, inputs: tuple[torch.Tensor, ...]):
        start = time.perf_counter()
        if self.model is None:
            self.model = self._load_or_trace(inputs)
        model = self.model.clone()
        model.reshape({port: list(shape) for port, shape in zip(model.inputs, key)})
        compile_start = time.perf_counter()
        compiled = self.core.compile_model(model, "CPU", self.config)
        self.compiled[key] = compiled
        self.convert_seconds += time.perf_counter() - start
        log.info("OpenVINO: %s compiled for input %s in %.1f s", self.name, list(key[0]), time.perf_counter() - compile_start)
        return compiled

    def _load_or_trace(self, inputs: tuple[torch.Tensor, ...]):
        import openvino as ov

        if self.cache_dir is None:  # weights only in memory (benchmarks): no cache to stay consistent with
            return self._trace(inputs)
        ir = self.cache_dir / f"{self.name}-ov{ov.__version__.split('-')[0]}.xml"
        start = time.perf_counter()
        converted = not ir.is_file()
        if converted:
            model = self._trace(inputs)
            ir.parent.mkdir(parents=True, exist_ok=True)
            tmp = ir.with_name(ir.stem + ".tmp.xml")  # write, then move: a killed run leaves no half IR
            ov.save_model(model, tmp, compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(ir.with_suffix(".bin"))
            tmp.replace(ir)
            log.info("OpenVINO: %s converted from PyTorch and cached in %.1f s", self.name, time.perf_counter() - start)
        # Compile from the saved IR even right after converting: the model convert_model returns and
        # the one read back compile to slightly different kernels (a pixel off by 1/255, measured), and
        # the same seed must give the same bytes whether the cache was cold or warm.
        model = self.core.read_model(ir)
        if not converted:
            log.info("OpenVINO: %s read from the cache in %.1f s", self.name, time.perf_counter() - start)
        return model

    def _trace(self, inputs: tuple[torch.Tensor, ...]):
        import openvino as ov

        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python-level shape check in diffusers: library noise, since
            # each compiled model runs only the static shapes it was traced and reshaped for.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return ov.convert_model(self.module, example_input=tuple(x.detach().cpu() for x in inputs))


# --- traceable forwards: tensors in, tensors out -----------------------------------------------------

class _TextForward(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


class _UNetForward(torch.nn.Module):
    def __init__(self, unet, with_residuals: bool):
        super().__init__()
        self.unet, self.with_residuals = unet, with_residuals

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        extra = {}
        if self.with_residuals:
            extra = dict(down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1])
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **extra).sample


class _ControlNetForward(torch.nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, cond, scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond, return_dict=False)
        return (*[d * scale for d in down], mid * scale)


class _DecodeForward(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


# --- drop-in replacements for the modules SDXSEngine calls -------------------------------------------

def _timestep(t, batch: int) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32).reshape(1).expand(batch).contiguous()


class OVTextEncoder:
    def __init__(self, text_encoder, precision, cache_dir):
        self.net = _Compiled("text_encoder", _TextForward(text_encoder).eval(), precision, cache_dir)

    def __call__(self, input_ids):
        return (torch.from_numpy(self.net(input_ids.to(torch.int64))[0]),)


def residual_shapes(unet_config, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """Shapes of the ControlNet residuals a U-Net takes: conv_in, each resnet and downsampler of the
    down path, then the mid residual (added even when the U-Net has no mid block)."""
    channels, layers = unet_config.block_out_channels, unet_config.layers_per_block
    h, w, shapes = height, width, [(batch, channels[0], height, width)]
    for i, c in enumerate(channels):
        shapes += [(batch, c, h, w)] * layers
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, c, h, w))
    return shapes + [(batch, channels[-1], h, w)]


class OVUNet:
    def __init__(self, unet, precision, cache_dir, with_residuals: bool):
        self.config = unet.config
        self.with_residuals = with_residuals
        self.net = _Compiled("unet" + ("-controlled" if with_residuals else ""), _UNetForward(unet, with_residuals).eval(), precision, cache_dir)

    def __call__(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None, mid_block_additional_residual=None):
        batch = sample.shape[0]
        inputs = [sample.float(), _timestep(timestep, batch), encoder_hidden_states.float()]
        if self.with_residuals:
            if down_block_additional_residuals is None:  # text-only call on a sketch model: zero residuals
                residuals = [torch.zeros(s) for s in residual_shapes(self.config, batch, *sample.shape[2:])]
            else:
                residuals = [*down_block_additional_residuals, mid_block_additional_residual]
            inputs += [r.float() for r in residuals]
        return SimpleNamespace(sample=torch.from_numpy(self.net(*inputs)[0]))


class OVControlNet:
    def __init__(self, controlnet, precision, cache_dir):
        self.net = _Compiled("controlnet", _ControlNetForward(controlnet).eval(), precision, cache_dir)

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, return_dict=False):
        batch = sample.shape[0]
        scale = torch.tensor([float(conditioning_scale)], dtype=torch.float32)
        outputs = [torch.from_numpy(o) for o in self.net(sample.float(), _timestep(timestep, batch), encoder_hidden_states.float(), controlnet_cond.float(), scale)]
        return outputs[:-1], outputs[-1]


class OVDecoder:
    def __init__(self, vae, name, precision, cache_dir):
        self.config = vae.config
        self.net = _Compiled(name, _DecodeForward(vae).eval(), precision, cache_dir)

    def decode(self, latents):
        return SimpleNamespace(sample=torch.from_numpy(self.net(latents.float())[0]))


def ir_cache_dir(folders: tuple[str, ...], precision: str) -> Path | None:
    """A cache folder for IR converted from real checkpoints, keyed by their files' paths, sizes and
    times; None for weights that exist only in memory (random weights in benchmarks)."""
    if not folders:
        return None
    from sdxs.tokenizer import cache_dir

    root = Path(os.environ.get("SDXS_OPENVINO_CACHE") or cache_dir() / "openvino")
    stamp = []
    for folder in map(Path, folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stamp += [str(folder.resolve())] + [f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    # "fp32 weights": the networks are traced from fp32 modules only (the engine refuses other
    # dtypes for OpenVINO). Caches from before that rule may hold IR traced from bf16 modules, which
    # gave broken images (PSNR 17 dB) through openvino-bf16; the new key leaves them unused.
    return root / hashlib.sha1(json.dumps([stamp, precision, "fp32 weights"]).encode()).hexdigest()[:16]


def to_openvino(components, precision: str = "f32", cache_dir: Path | None = None):
    """Components whose networks run on OpenVINO; tokenizer and scheduler config are unchanged."""
    import dataclasses

    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "bf16" and not cpu_supports_bf16():
        raise ValueError("This CPU has no native bf16 (AVX512-BF16 or AMX); use the f32 OpenVINO backend.")
    has_controlnet = components.controlnet is not None
    return dataclasses.replace(
        components,
        text_encoder=OVTextEncoder(components.text_encoder, precision, cache_dir),
        unet=OVUNet(components.unet, precision, cache_dir, with_residuals=has_controlnet),
        controlnet=OVControlNet(components.controlnet, precision, cache_dir) if has_controlnet else None,
        decoders={name: OVDecoder(vae, f"decoder-{name}", precision, cache_dir) for name, vae in components.decoders.items()},
    )
