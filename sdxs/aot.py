"""Ahead-of-time compilation of the U-Net and the default image decoder (the GPU path of issue 16).

torch.compile is not supported on ZeroGPU Spaces, so the networks are exported once at start-up
(torch.export, with a dynamic batch dimension) and compiled ahead of time. Which path runs where:

- ZeroGPU Spaces (SPACES_ZERO_GPU=true, the rule of the `spaces` package): export and compile run in
  a `spaces.GPU` task, the only place CUDA exists there, with `spaces.aoti_compile`; the compiled
  programs come back to the main process. This path needs ZeroGPU itself and a CUDA build of torch
  (spaces' AoT module does not even import on a CPU-only torch), so it cannot run, nor be tested,
  anywhere else.
- Anywhere else, a CUDA GPU or the CPU: the same export, compiled by AOTInductor
  (torch._inductor.aoti_compile_and_package, then aoti_load_package). It needs a C++ compiler.
- Any failure (no compiler, an export or compile error, a backend other than "torch"): one warning,
  and the engine keeps its eager networks; same images, no speed-up.

The compiled networks replace `engine.components.unet` and the default decoder by wrappers that run
the compiled program for the shapes it was compiled for (the native size, a batch between the
smallest and largest of `batch_sizes`) and the eager module for anything else: ControlNet residuals
(sketch mode), other sizes, larger batches. Unlike `spaces.aoti_apply`, which empties the eager
module's weights, the eager modules stay whole (`engine.torch_components`), so sketch mode and
`engine.with_lora` keep working, at the cost of a second copy of those weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)

ZERO_GPU_COMPILE_SECONDS = 1500  # the longest GPU task ZeroGPU grants at start-up; compiling takes minutes


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space: the `spaces` package's own rule (spaces.config)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def batch_range(batch_sizes) -> tuple[int, int]:
    """The smallest and largest batch the compiled programs take; a ValueError for impossible ones."""
    sizes = list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise ValueError(f"batch_sizes must be whole numbers of at least 1 (images per forward); got {batch_sizes!r}.")
    return min(sizes), max(sizes)


# --- what is exported: tensors in, one tensor out ----------------------------------------------------

class _UNetProgram(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _DecodeProgram(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def _timestep(t, device) -> torch.Tensor:
    # One dtype for every scheduler (DEIS gives int64 timesteps, Euler float32): the compiled program
    # does not check its inputs' dtypes, and the U-Net turns t into a float anyway.
    return torch.as_tensor(t, dtype=torch.float32, device=device)


def _export(module, args, dims) -> torch.export.ExportedProgram:
    """`module` exported for `args`; `dims` gives each input's dynamic dimensions (None: static)."""
    with torch.no_grad():
        return torch.export.export(module.eval(), args, dynamic_shapes=dims)


def _export_and_compile(engine, low: int, high: int, compile_program) -> dict[str, object]:
    """Export and compile the U-Net and the default decoder for batches low..high at the native
    size. Returns {part: compiled program, or the reason it failed}: one failure spares the other part."""
    components = engine.torch_components
    batch = max(low, 2) if high > low else low  # torch.export fixes a batch of 1 seen in the example
    dynamic = torch.export.Dim("batch", min=low, max=high) if high > low else None
    size = engine.native_size
    with torch.no_grad():
        embeddings, _ = engine.encode_prompts([""] * batch)
        noise = engine.initial_noise(list(range(batch)), size, size)
    parts = {
        "unet": lambda: _export(_UNetProgram(components.unet), (noise, _timestep(999, noise.device), embeddings),
                                ({0: dynamic}, None, {0: dynamic})),
        f"decoder-{engine.default_decoder}": lambda: _export(_DecodeProgram(components.decoders[engine.default_decoder]),
                                                             (noise,), ({0: dynamic},)),
    }
    results = {}
    for name, export in parts.items():
        step = "torch.export"
        try:
            program = export()
            step = "compiling"
            results[name] = compile_program(program)
        except Exception as err:  # export or compiler errors of any kind: keep this part eager
            results[name] = f"{step} failed with {type(err).__name__}: {_first_line(err)}"
    return results


def _aoti_compile(program: torch.export.ExportedProgram):
    """AOTInductor: compile to a package, then load it (the loaded program holds its own weights)."""
    with tempfile.TemporaryDirectory(prefix="sdxs-aot-") as folder:
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(folder) / "program.pt2"))
        return torch._inductor.aoti_load_package(package)


def _compile_on_zero_gpu(engine, low: int, high: int) -> dict[str, object]:
    """The ZeroGPU recipe: export and `spaces.aoti_compile` inside a GPU task; the compiled
    programs (and their weights) are pickled back to this process. The task takes no arguments, so
    nothing but its result crosses the process boundary."""
    import spaces

    @spaces.GPU(duration=ZERO_GPU_COMPILE_SECONDS)
    def compile_on_gpu():
        return _export_and_compile(engine, low, high, spaces.aoti_compile)

    return compile_on_gpu()


def _check_compiler() -> None:
    """AOTInductor builds its programs with a C++ compiler, on a GPU too: fail early when none works."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    get_cpp_compiler()  # raises InvalidCxxCompiler when none of config.cpp.cxx (CXX, g++) runs


# --- drop-in replacements for the modules SDXSEngine calls -------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Coverage:
    """The inputs a compiled program was compiled for: batches low..high, one shape per sample."""

    low: int
    high: int
    sample_shape: tuple[int, ...]
    dtype: torch.dtype

    def covers(self, x: torch.Tensor) -> bool:
        return self.low <= x.shape[0] <= self.high and tuple(x.shape[1:]) == self.sample_shape and x.dtype == self.dtype


class AotUNet:
    """The compiled U-Net for text-to-image calls it was compiled for; the eager one for the rest
    (ControlNet residuals, other sizes or batches). Returns what the eager U-Net returns: `.sample`."""

    def __init__(self, eager, compiled, coverage: _Coverage, text_shape: tuple[int, ...]):
        self.config = eager.config
        self.eager, self.compiled, self.coverage, self.text_shape = eager, compiled, coverage, text_shape

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        t = torch.as_tensor(timestep)
        compiled_for = (
            not kwargs and t.ndim == 0 and self.coverage.covers(sample)
            and tuple(encoder_hidden_states.shape) == (sample.shape[0], *self.text_shape)
        )
        if not compiled_for:
            return self.eager(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        # The compiled program assumes the example's contiguous layout: other strides give wrong values.
        prediction = self.compiled(sample.contiguous(), _timestep(t, sample.device), encoder_hidden_states.contiguous())
        return SimpleNamespace(sample=prediction)


class AotDecoder:
    """The compiled `decode` for the latents it was compiled for; the eager decoder for the rest."""

    def __init__(self, eager, compiled, coverage: _Coverage):
        self.config = eager.config
        self.eager, self.compiled, self.coverage = eager, compiled, coverage

    def decode(self, latents, **kwargs):
        if kwargs or not self.coverage.covers(latents):
            return self.eager.decode(latents, **kwargs)
        # On the CPU the engine passes channels_last latents; the program was compiled for contiguous ones.
        return SimpleNamespace(sample=self.compiled(latents.contiguous()))


# --- the public call ----------------------------------------------------------------------------------

def compile_ahead_of_time(engine, batch_sizes=(1, 2, 3, 4), *, use_spaces: bool | None = None) -> list[str]:
    """Compile `engine`'s U-Net and default decoder ahead of time for batches from min to max of
    `batch_sizes` at its native size, and install them in `engine.components`; other calls keep
    running eagerly. `use_spaces`: the ZeroGPU path (default: when on ZeroGPU), else AOTInductor.

    Returns the parts now compiled, e.g. ["unet", "decoder-tiny"]. A part that cannot be compiled
    stays eager, with one warning that says why; when none can, the engine is left as it was and
    the result is []. A ValueError for impossible `batch_sizes`."""
    low, high = batch_range(batch_sizes)
    if engine.backend != "torch":
        log.warning("Ahead-of-time compilation is for the torch backend; this engine runs %s, which stays as it is.",
                    engine.backend)
        return []
    use_spaces = on_zero_gpu() if use_spaces is None else use_spaces
    path = "spaces.aoti_compile on ZeroGPU" if use_spaces else "AOTInductor"
    start = time.perf_counter()
    try:
        _check_compiler()
        if use_spaces:
            results = _compile_on_zero_gpu(engine, low, high)
        else:
            results = _export_and_compile(engine, low, high, _aoti_compile)
    except Exception as err:  # no compiler, ZeroGPU refused the task, ...: the eager networks stay
        log.warning("Could not compile ahead of time (%s), so the eager networks run (same images, slower): %s: %s",
                    path, type(err).__name__, _first_line(err))
        return []
    for name, reason in results.items():
        if isinstance(reason, str):
            log.warning("Could not compile the %s ahead of time (%s), so it runs eagerly (same images, slower): %s",
                        name, path, reason)
    compiled = {name: program for name, program in results.items() if not isinstance(program, str)}
    if compiled:
        engine.components = _install(engine, compiled, low, high)
        log.info("Compiled %s ahead of time (%s; batches %d-%d at %dx%d) in %.1f s.", ", ".join(compiled), path, low, high,
                 engine.native_size, engine.native_size, time.perf_counter() - start)
    return list(compiled)


def _install(engine, compiled: dict[str, object], low: int, high: int):
    """engine.components with the compiled parts in place of the eager ones."""
    eager, name = engine.torch_components, engine.default_decoder
    side = engine.native_size // engine.vae_scale_factor
    latents = _Coverage(low, high, (eager.unet.config.in_channels, side, side), engine.dtype)
    unet, decoders = engine.components.unet, dict(engine.components.decoders)
    if "unet" in compiled:
        text_shape = (engine.max_tokens, eager.text_encoder.config.hidden_size)
        unet = AotUNet(eager.unet, compiled["unet"], latents, text_shape)
    if f"decoder-{name}" in compiled:
        decoders[name] = AotDecoder(eager.decoders[name], compiled[f"decoder-{name}"], latents)
    return dataclasses.replace(engine.components, unet=unet, decoders=decoders)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
