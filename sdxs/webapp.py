"""What the two Gradio front-ends (app.py, demo_sketch.py) share: flags, start-up (quiet libraries,
progress lines, loading), launching, the ZeroGPU decorator, and the status line. No Gradio import
here, so it is cheap to import and test; the CLI uses the start-up part too."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from sdxs.aot import on_zero_gpu
from sdxs.engine import BACKENDS, Generation, SDXSEngine, batch_bucket
from sdxs.loading import ModelNotFoundError
from sdxs.registry import BUILTIN_MODEL, DEFAULT_MODEL, MODELS, builtin_model
from sdxs.validation import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS

log = logging.getLogger(__name__)
MALLOC_ARENAS = 2
TEMP_FILE_MAX_AGE_S = 3600
STAGE_LABELS = {"text_encoder": "text encoder", "unet": "U-Net", "decoder": "decoder"}  # Gradio deletes its temporary files older than this, checking as often
# Libraries whose own warnings (deprecations, tracing notes) are not a user's business; ours stay.
NOISY_LIBRARIES = r"(torch|transformers|diffusers|huggingface_hub|accelerate|peft|openvino|nncf|gradio|gradio_client|PIL)(\.|$)"

try:  # ZeroGPU on Hugging Face Spaces; elsewhere `spaces.GPU` returns the function unchanged
    import spaces

    gpu = spaces.GPU(duration=30)
except ImportError:  # pragma: no cover - depends on the environment

    def gpu(fn):
        return fn


# Requests served at once on a GPU: their forwards are gathered into shared batches (sdxs.batching).
GPU_CONCURRENCY = 16


def batches_requests(engine: SDXSEngine) -> bool:
    """Whether an app gathers concurrent visitors' requests into shared forwards: on a GPU, where a
    batch of 16 gives ~5x the images/s of 16 single calls; not on a CPU (~5% gain, more memory) nor
    on ZeroGPU (each request holds its own GPU slot)."""
    return engine.device.type == "cuda" and not on_zero_gpu()


def request_runner(engine: SDXSEngine, batch_requests: bool | None = None):
    """What an app's handler calls text_to_image / sketch_to_image on: a RequestBatcher over the
    engine when requests are batched (`batch_requests`, default batches_requests(engine)), else the
    engine itself."""
    if batches_requests(engine) if batch_requests is None else batch_requests:
        from sdxs.batching import RequestBatcher

        return RequestBatcher(engine, max_batch=GPU_CONCURRENCY)
    return engine


def warm_up_sizes(engine: SDXSEngine) -> tuple[int, ...]:
    """The batch sizes to prepare at start-up: the compiled path captures one graph per batch bucket,
    and with batched serving a forward holds up to GPU_CONCURRENCY images."""
    if engine.backend != "torch-compile" or not batches_requests(engine):
        return (1,)
    return tuple(sorted({batch_bucket(n, engine.micro_batch) for n in range(1, GPU_CONCURRENCY + 1)}))


def concurrency_limit(runner) -> int:
    """Requests an event serves at once: many when a RequestBatcher gathers them, else one."""
    from sdxs.batching import RequestBatcher

    return GPU_CONCURRENCY if isinstance(runner, RequestBatcher) else 1


def add_common_flags(parser: argparse.ArgumentParser, default_model: str, *, builtin_fallback: bool = False) -> argparse.ArgumentParser:
    """The flags both apps share. `builtin_fallback`: --model defaults to None, which loads
    `default_model` or, when that cannot be found, the built-in model (load_default_or_builtin)."""
    if builtin_fallback:
        parser.add_argument("--model", default=None, help=f"hub id, local diffusers folder, or '{BUILTIN_MODEL}' for the built-in "
                            f"{builtin_model(BUILTIN_MODEL).native_size} px emoji model (default {default_model}; the built-in "
                            "model when that is neither cached nor downloadable)")
    else:
        parser.add_argument("--model", default=default_model, help=f"hub id or local diffusers folder (default {default_model})")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS), help="auto: OpenVINO on a CPU when installed, else PyTorch; openvino-bf16 is a faster, slightly different option on CPUs with native bf16")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="default 7860")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return parser


class _ConsoleFormat(logging.Formatter):
    """Progress lines as they are; warnings and errors with their level in front."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_console() -> None:
    """Start-up output for people: the "sdxs" logger's progress lines (INFO) and warnings on
    stderr; library chatter (TracerWarnings, config notices, load bars, deprecations) off."""
    import diffusers
    import huggingface_hub
    import torch
    import transformers

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormat("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # no-op when the host app configured logging
    logging.getLogger("sdxs").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # OpenVINO traces the networks once
    warnings.filterwarnings("ignore", module=NOISY_LIBRARIES)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo


def full_model_hint(model: str = DEFAULT_MODEL) -> str:
    """How to get the full `model` (and the base pipeline a ControlNet or LoRA runs on), for the
    fallback's log line and page notice."""
    spec = MODELS.get(model)
    fetch = f"`hf download {model}`" + (f" and its base `hf download {spec.base}`" if spec is not None and spec.base else "")
    return (
        f"For the full 512 px model, start once with network (it is then kept in the Hugging Face cache: HF_HOME, "
        f"~/.cache/huggingface by default) or fetch it with {fetch}; "
        f"`--model {BUILTIN_MODEL}` runs the built-in model without trying the hub."
    )


def load_default_or_builtin(*, default_model: str = DEFAULT_MODEL, **kwargs) -> SDXSEngine:
    """What runs when no --model is given: `default_model`, else, when it cannot be found (offline and
    not cached: a ModelNotFoundError), the built-in model, with one warning that says so. Other
    errors (a bad --device, a corrupt model) are not hidden by the fallback. `kwargs` go to
    SDXSEngine.from_pretrained."""
    try:
        return SDXSEngine.from_pretrained(default_model, **kwargs)
    except ModelNotFoundError as err:
        hub_error = err
    reason = str(hub_error).splitlines()[0]
    log.warning("No --model given, and the default model could not be loaded: %s Running the built-in model instead: %s. %s",
                reason.rstrip(".") + ".", builtin_model(BUILTIN_MODEL).title, full_model_hint(default_model))
    try:
        return SDXSEngine.from_pretrained(BUILTIN_MODEL, **kwargs)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"{hub_error}\nNote: the built-in model '{BUILTIN_MODEL}', which runs when {default_model} "
                                 f"cannot be loaded, could not be loaded either: {err}") from None


def is_fallback(model_arg: str | None, engine: SDXSEngine) -> bool:
    """The built-in model runs because no --model was given and the default could not be loaded."""
    return model_arg is None and engine.name == BUILTIN_MODEL


def fallback_notice(default_model: str = DEFAULT_MODEL) -> str:
    """The page's notice (markdown) when the app runs the built-in model in place of `default_model`."""
    return (
        f"**Running the built-in model, {builtin_model(BUILTIN_MODEL).title}:** the full model {default_model} could "
        f"not be loaded (no network and not in the Hugging Face cache; the server log says why). {full_model_hint(default_model)}"
    )


def load_engine_or_exit(args, *, default_model: str = DEFAULT_MODEL, aot_batch_sizes: tuple[int, ...] = (), **kwargs) -> SDXSEngine:
    """Load once at start-up (and warm up, so tracing/compiling is not a visitor's wait); on
    failure print one actionable message (no traceback) and exit 2. `args.model` None (flags with
    builtin_fallback): `default_model`, else the built-in one (load_default_or_builtin).
    On ZeroGPU, where torch.compile is not supported, the U-Net and decoder are compiled ahead of
    time for `aot_batch_sizes` (sdxs.aot; none given: eager)."""
    try:
        options = dict(device=args.device, dtype=args.dtype, backend=args.backend, **kwargs)
        if args.model is None:
            engine = load_default_or_builtin(default_model=default_model, **options)
        else:
            engine = SDXSEngine.from_pretrained(args.model, **options)
    except (ModelNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if aot_batch_sizes and on_zero_gpu():
        from sdxs.aot import compile_ahead_of_time

        compile_ahead_of_time(engine, aot_batch_sizes)  # logs what it compiled, or why it stays eager
    if engine.backend != "torch":
        engine.warm_up(warm_up_sizes(engine))  # logs its progress
    return engine


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas, as MALLOC_ARENA_MAX does (unless that is set). glibc gives threads
    their own arenas and keeps what they free: under load a Gradio server's worker threads grew RSS
    by 22% over 1,000 requests, with two arenas it stays flat (docs/reliability.md, Load). Takes
    effect for arenas made after the call, so the apps call it before loading anything; a no-op
    (False) off glibc."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


@contextlib.contextmanager
def errors_as_messages():
    """Around the work of an app's event handler: bad input (a ValueError) becomes a message for the
    person, any other failure is logged with its traceback and answered in one line, and the server
    keeps serving. A gr.Error raised below (e.g. ZeroGPU's quota message; it is a ValueError too)
    passes unchanged."""
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except ValueError as err:  # bad input: say what to change
        raise gr.Error(str(err)) from None
    except Exception as err:  # a bug or a broken model: log it, keep the server up
        log.exception("generation failed")
        raise gr.Error(f"Generation failed on the server ({type(err).__name__}); the app is still running, try again.") from None


def launch(demo, args, *, max_queue: int, css: str | None = None) -> None:
    """Serve `demo` (a gr.Blocks) as the flags say: loopback unless --host, uploads capped at
    MAX_UPLOAD_BYTES by Gradio itself, Gradio's temporary files (outputs, uploads) deleted once they
    are TEMP_FILE_MAX_AGE_S old, and one line saying where it runs and who can reach it. `css`: the
    page's own style rules (Gradio takes them at launch)."""
    from PIL import Image

    # Anywhere in this server (Gradio's own decoding too) PIL then refuses images over twice this;
    # files the apps open themselves are held to it exactly (sdxs.validation.open_image).
    Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
    # Every request leaves an output PNG (and the sketch app every stroke's canvas) in Gradio's cache;
    # without this they pile up for the server's whole life.
    demo.delete_cache = (TEMP_FILE_MAX_AGE_S, TEMP_FILE_MAX_AGE_S)
    demo.queue(max_size=max_queue).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES,
        quiet=True, prevent_thread_lock=True, css=css,
    )
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    log.info("Running on %s (%s).", demo.local_url, "this machine only" if loopback else f"bound to {args.host}: other machines can reach it")
    if demo.share_url:
        log.info("Public share link (anyone with it can use the app for up to a week): %s", demo.share_url)
    demo.block_thread()


def display_name(engine: SDXSEngine) -> str:
    """The registry title for known ids and the built-in model; only the folder name for local
    folders (no machine paths)."""
    if engine.name in MODELS:
        return MODELS[engine.name].title
    if builtin := builtin_model(engine.name):
        return builtin.title
    return Path(engine.name).name or engine.name


def sketch_size(engine: SDXSEngine) -> int:
    """The side of the control image the engine's ControlNet reads (512 for SDXS-512-Sketch)."""
    return engine.native_size // engine.vae_scale_factor * engine.geometry.control_scale_factor


def prompt_for(engine: SDXSEngine, prompt: str) -> str:
    """The prompt as `engine`'s model reads it: the built-in model's template applied to a short
    prompt ("red apple" -> "an emoji of red apple, noto style"), any other model's unchanged."""
    builtin = builtin_model(engine.name)
    return builtin.expand_prompt(prompt) if builtin else prompt


def status_line(result: Generation, engine: SDXSEngine, seed: int, notes: list[str] = (), expanded_prompt: str | None = None) -> str:
    """One line of what was made and how long each stage took, the prompt as the model read it when
    a template expanded it, then the notes (what was changed in the request, engine warnings), one
    per line: the API's callers read them here too."""
    t = result.timings
    # The compiled path times only the whole call: stage times would need a device sync per stage.
    stages = ", ".join(f"{label} {t[key] * 1000:.0f} ms" for key, label in STAGE_LABELS.items() if key in t)
    line = (
        f"{len(result.images)} image(s) in **{t['total'] * 1000:.0f} ms** "
        f"({stages or 'one compiled call'}) · seed {seed} · {display_name(engine)} on {engine.device.type}"
    )
    shown = (expanded_prompt or "").replace("`", "'")  # a code span: the prompt as typed, no markdown
    expanded = [f"Prompt as the model read it: `{shown}`"] if expanded_prompt else []
    return "\n\n".join([line, *expanded, *(f"Note: {note}" for note in notes)])
