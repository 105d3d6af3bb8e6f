"""Benchmark: the upstream demo's way vs this engine's backends, side by side in one run.

    python -m sdxs.bench                                  # exact SDXS-512-DreamShaper, random weights, CPU
    python -m sdxs.bench --rows torch,openvino --runs 3   # a subset
    python -m sdxs.bench --device cuda --clients 16                # GPU rows: batch 1, batch 64, 16 clients
    python -m sdxs.bench --device cuda --dtype bf16 --batch 128 --micro-batch 64
    python -m sdxs.bench --model path/to/folder           # a real (or the mini) model folder
    python -m sdxs.bench --model sdxs-1024 --runs 3 --batch 2 --out docs/benchmarks-1024   # SDXS-1024 at 1024x1024
    python -m sdxs.bench --rows torch,openvino,peer,peer-fp32 --peer-python peer-venv/bin/python

Each row runs in its own process (clean peak RSS / GPU memory, no shared caches): the model is
built (exact architecture, random weights: compute does not depend on the values) or loaded, and
runs at its native size (512 for SDXS-512, 1024 for the SDXL family: sdxs-1024, whose upstream-style
row is diffusers' StableDiffusionXLPipeline; no OpenVINO, sketch or peer rows there), one
warm-up call is timed as the first call (tracing/compiling included), then `--runs` timed calls at
batch 1 and at `--batch` (run by the engine in forwards of `--micro-batch` images). The engine's
prompt cache is off: every call encodes its prompt, as a visitor's new prompt does. With
`--clients N`, N threads then each send batch-1 requests (own prompt, own seeds) through
sdxs.batching.RequestBatcher, which gathers concurrent requests into shared forwards; the same
requests run one after another give the solo figure, and each batched answer is compared with its
solo answer. The parent measures the matmul peak in the rows' dtype and the U-Net's FLOPs,
compares every row's image with the plain engine's image for the same seed, and writes JSON +
markdown. The peer rows (FastSD CPU's engine) run under a separate interpreter: see sdxs/bench_peer.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROWS = {
    "upstream": "(a) upstream demo: diffusers pipeline, `pipe.to()` + VAE swap per request",
    "torch": "(b) this engine, PyTorch eager",
    "openvino": "(c) this engine, OpenVINO fp32 (static shapes)",
    "openvino-bf16": "(c) this engine, OpenVINO bf16 (option; CPUs with native bf16)",
    "torch-compile": "(c) this engine, torch.compile + channels_last (GPU path)",
    "peer": "(d) peer: FastSD CPU's engine (optimum-intel OV pipeline + TAESD), OpenVINO's default precision",
    "peer-fp32": "(d) peer: FastSD CPU's engine, fp32 precision hint",
}
PEER_ROWS = ("peer", "peer-fp32")
PEER_SCRIPT = str(Path(__file__).with_name("bench_peer.py"))  # run by --peer-python, not imported
PROMPT = "a close-up picture of an old man standing in the rain"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}
STAGES = ("text_encoder", "unet", "decoder", "total")
DEFAULT_BATCH = {"cuda": 64, "cpu": 4}  # the issue's GPU row is "batch 64 or more"; on a CPU batching gains ~5%
# batch-1 requests each client sends, one after another, in the timed clients run: on a GPU enough
# for the batched run to last well over the window and a few forwards (16 clients: 256 requests)
CLIENT_ROUNDS = {"cuda": 16, "cpu": 4}


# --- worker: one row, in its own process ----------------------------------------------------------

def known_spec(model: str):
    """The ModelSpec of a known id the bench builds with random weights (a released model, or sdxs-1024,
    known by its architecture only); None for a folder."""
    from sdxs.registry import MODELS, REFERENCE_MODELS, SDXS_1024

    if Path(model).exists():
        return None
    return MODELS.get(model) or (REFERENCE_MODELS[model] if model == SDXS_1024 else None)


def is_sdxl_model(model: str) -> bool:
    """An SDXL-family model (two text encoders, text_time conditioning): a known id's architecture or a folder's U-Net."""
    from sdxs.loading import is_sdxl_unet, resolve_model_dir

    spec = known_spec(model)
    if spec is not None:
        return spec.architecture.text_encoder_2 is not None
    return is_sdxl_unet(json.loads((resolve_model_dir(model) / "unet" / "config.json").read_text()))


def _build_engine(model: str, row: str, device: str, dtype: str | None, micro_batch: int | None = None):
    from sdxs.engine import SDXSEngine
    from sdxs.loading import Components, load_components, pick_device_and_dtype

    dev, dt = pick_device_and_dtype(device, dtype)
    spec = known_spec(model)
    if spec is not None:
        from transformers import CLIPTokenizer

        from sdxs.build import build_components
        from sdxs.tokenizer import cached_clip_tokenizer_dir

        built = build_components(spec.architecture)
        for name in ("text_encoder", "text_encoder_2", "unet", "vae", "vae_large", "controlnet"):
            if name in built:
                built[name] = built[name].to(dev, dt).requires_grad_(False)
        sdxl = "text_encoder_2" in built
        if sdxl and dt == torch.float16:  # SDXL's VAE overflows in fp16 (force_upcast), as the engine's loader keeps it
            built["vae_large"].to(torch.float32)
        components = Components(
            tokenizer=CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir()),
            text_encoder=built["text_encoder"], unet=built["unet"],
            scheduler_config=dict(built["scheduler"].config, _class_name=type(built["scheduler"]).__name__),
            decoders={"tiny": built["vae"], "large": built["vae_large"]}, source=model, controlnet=built.get("controlnet"),
            text_encoder_2=built.get("text_encoder_2"),
            # SDXL's second tokenizer pads with "!" (sdxs.build.write_sdxl_tokenizer_2)
            tokenizer_2=CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir(), pad_token="!") if sdxl else None,
        )
    else:
        components = load_components(model, dev, dt)
    backend = "torch" if row == "upstream" else row
    # prompt cache off: the rows time a new prompt's full cost (the cache only spares repeats)
    return SDXSEngine(components, dev, dt, backend, micro_batch=micro_batch, prompt_cache_size=0)


def bench_sketch():
    """A fixed line drawing for the sketch rows."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([96, 96, 416, 416], outline="black", width=8)
    draw.line([(160, 300), (352, 300)], fill="black", width=8)
    return image


def upstream_pipeline(engine, sketch=None):
    """The upstream demos' diffusers pipeline over the engine's own networks: StableDiffusionPipeline
    (with a ControlNet in sketch mode), or StableDiffusionXLPipeline for an SDXL-family model; the
    model's one-step scheduler (DEIS when its config names none)."""
    import diffusers

    tc = engine.torch_components
    scheduler_class = getattr(diffusers, tc.scheduler_config.get("_class_name", "DEISMultistepScheduler"))
    parts = dict(vae=tc.decoders["tiny"], text_encoder=tc.text_encoder, tokenizer=tc.tokenizer, unet=tc.unet,
                 scheduler=scheduler_class.from_config(tc.scheduler_config))
    if tc.is_sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(text_encoder_2=tc.text_encoder_2, tokenizer_2=tc.tokenizer_2,
                                                   add_watermarker=False, **parts)  # the engine adds none either
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = (diffusers.StableDiffusionControlNetPipeline(controlnet=tc.controlnet, **parts) if sketch
                else diffusers.StableDiffusionPipeline(**parts))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _upstream_call(engine, pipe, noise, sketch=None):
    """What the upstream demos do per request: swap the VAE, move/cast the pipeline, run 1 step at the model's size."""
    pipe.vae = engine.torch_components.decoders["tiny"]
    pipe.to(torch_device=engine.device, torch_dtype=engine.dtype)
    size = engine.native_size
    extra = {} if sketch is None else dict(image=sketch, controlnet_conditioning_scale=0.8)
    return pipe(prompt=[PROMPT] * noise.shape[0], guidance_scale=0.0, num_inference_steps=1, latents=noise, width=size, height=size,
                output_type="pil", **extra).images


def _stage_timer(modules: dict):
    """Forward hooks that add each module's wall time to `timings` (for the upstream pipeline); a stage
    may be several modules (SDXL's two text encoders), given as a list."""
    timings = {name: 0.0 for name in modules}

    def pre(name):
        def hook(module, args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings[f"_{name}"] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, args, output):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings[name] += time.perf_counter() - timings.pop(f"_{name}")
        return hook

    for name, stage in modules.items():
        for module in stage if isinstance(stage, list) else [stage]:
            module.register_forward_pre_hook(pre(name))
            module.register_forward_hook(post(name))
    return timings


def client_requests(clients: int, rounds: int) -> list[list[tuple[str, int]]]:
    """Per client, its batch-1 requests (prompt, seed): its own prompt variant, a new seed each round."""
    return [[(f"{PROMPT}, variant {client}", client * rounds + r) for r in range(rounds)] for client in range(clients)]


def _send_concurrently(call, requests: list[list[tuple[str, int]]]) -> tuple[float, list[list]]:
    """Each client in its own thread sends its requests one after another (the next once the last is
    answered), all starting together. Returns the wall seconds until every answer is in, and the answers."""
    answers = [[None] * len(client) for client in requests]
    start_line = threading.Barrier(len(requests) + 1)

    def client(index):
        start_line.wait()
        for r, (prompt, seed) in enumerate(requests[index]):
            answers[index][r] = call(prompt, seed)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [pool.submit(client, index) for index in range(len(requests))]
        start_line.wait()
        start = time.perf_counter()
        for future in futures:
            future.result()  # re-raises a client's error here
        seconds = time.perf_counter() - start
    return seconds, answers


def _only_image(generation, seed: int):
    """The one image of a batch-1 answer, after checking that it is this request's."""
    if len(generation.images) != 1 or generation.seeds != [seed]:
        raise RuntimeError(f"a batch-1 request of seed {seed} got {len(generation.images)} images of seeds {generation.seeds}")
    return generation.images[0]


def through_engine_batch(engine, batch: int, sketch=None):
    """One engine call of `batch` images (text, or sketch mode with the bench's sketch)."""
    if sketch is not None:
        return engine.sketch_to_image(sketch, PROMPT, seed=0, num_images=batch, control_strength=0.8)
    return engine.text_to_image(PROMPT, seed=0, num_images=batch)


def run_clients(engine, clients: int, rounds: int, sketch=None) -> dict:
    """N concurrent clients through the request batcher vs the same requests one after another."""
    from sdxs.batching import RequestBatcher
    from sdxs.engine import batch_bucket

    def through(target):
        if sketch is not None:
            return lambda prompt, seed: _only_image(target.sketch_to_image(sketch, prompt, seed=seed, control_strength=0.8), seed)
        return lambda prompt, seed: _only_image(target.text_to_image(prompt, seed=seed), seed)

    requests = client_requests(clients, rounds)
    batcher = RequestBatcher(engine)
    # Warm-up: every batch the batcher can form (one request per client at a time, at most max_batch)
    # runs at one of these buckets; the compiled path compiles each once, here and not while timed.
    for size in sorted({batch_bucket(n, engine.micro_batch) for n in range(1, min(clients, batcher.max_batch) + 1)}):
        through_engine_batch(engine, size, sketch)
    try:
        _send_concurrently(through(batcher), [client[:1] for client in requests])  # warm-up of the batcher's path
        forwards_before = batcher.forwards
        batched_s, batched = _send_concurrently(through(batcher), requests)
        forwards = batcher.forwards - forwards_before
    finally:
        batcher.close()
    solo_call = through(engine)
    start = time.perf_counter()
    solo = [[solo_call(prompt, seed) for prompt, seed in client] for client in requests]
    solo_s = time.perf_counter() - start
    diffs = [max_abs_diff(a, b) for batched_client, solo_client in zip(batched, solo) for a, b in zip(batched_client, solo_client)]
    count = clients * rounds
    return {
        "clients": clients, "rounds": rounds, "requests": count, "forwards": forwards,
        "batched_s": batched_s, "solo_s": solo_s,
        "images_per_s": count / batched_s, "images_per_s_solo": count / solo_s,
        "vs_solo_max_abs_diff": max(diffs), "vs_solo_compared": len(diffs),
    }


def max_abs_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def run_worker(args) -> dict:
    torch.manual_seed(0)
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    engine = _build_engine(args.model, args.worker, args.device, args.dtype, args.micro_batch)
    sketch = bench_sketch() if args.mode == "sketch" else None
    if args.worker == "upstream":
        tc = engine.torch_components
        pipe = upstream_pipeline(engine, sketch)
        text_encoders = [tc.text_encoder] + ([tc.text_encoder_2] if tc.is_sdxl else [])
        stage_modules = {"text_encoder": text_encoders, "unet": tc.unet, "decoder": tc.decoders["tiny"].decoder}
        stage_times = _stage_timer(stage_modules)
        control_times = _stage_timer({"controlnet": tc.controlnet}) if sketch else {"controlnet": 0.0}

        def generate(batch):
            for key in stage_modules:
                stage_times[key] = 0.0
            control_times["controlnet"] = 0.0
            start = time.perf_counter()
            size = engine.native_size
            images = _upstream_call(engine, pipe, engine.initial_noise(list(range(batch)), size, size), sketch)
            times = dict(stage_times, total=time.perf_counter() - start)
            times["unet"] += control_times["controlnet"]  # the engine counts the ControlNet in its U-Net stage
            return images, times
    else:
        def generate(batch):
            result = through_engine_batch(engine, batch, sketch)
            return result.images, result.timings

    start = time.perf_counter()
    images, _ = generate(1)
    first_call = time.perf_counter() - start
    # The stages each call reports: all four on eager backends; "total" alone on the compiled path,
    # whose one fused region has no stage boundaries to time (that would take a sync per stage).
    stages = {}
    for _ in range(args.runs):
        images, run_timings = generate(1)
        for key in STAGES:
            if key in run_timings:
                stages.setdefault(key, []).append(run_timings[key])
    start = time.perf_counter()
    generate(args.batch)  # warm-up for the batched shape (the compiled path compiles its buckets here)
    first_batched_call = time.perf_counter() - start
    batched = []
    for _ in range(max(1, args.runs // 2)):
        batch_images, run_timings = generate(args.batch)
        batched.append(run_timings["total"])
    image_path = Path(args.json_out).with_suffix(".png")
    images[0].save(image_path)
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in stages.items()}
    result = {
        "row": args.worker,
        "backend": engine.backend,
        "dtype": DTYPE_NAMES[engine.dtype],
        "micro_batch": engine.micro_batch,
        "size": engine.native_size,
        "first_call_s": first_call,
        f"first_call_batch{args.batch}_s": first_batched_call,
        "stages_s": summary,
        "images_per_s_batch1": 1.0 / summary["total"]["median"],
        f"images_per_s_batch{args.batch}": args.batch / statistics.median(batched),
        "batched_images": len(batch_images),
        "image": str(image_path),
    }
    if args.clients and args.worker != "upstream":  # the upstream demo serves one request at a time
        result["clients"] = run_clients(engine, args.clients, client_rounds(args.device), sketch)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if on_gpu:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


# --- parent: machine facts, reference numbers, the table ------------------------------------------

def client_rounds(device: str) -> int:
    return CLIENT_ROUNDS.get(torch.device(device).type, CLIENT_ROUNDS["cpu"])


def default_batch(device: str) -> int:
    return DEFAULT_BATCH.get(torch.device(device).type, DEFAULT_BATCH["cpu"])


def rows_dtype(device: str, dtype: str | None) -> str:
    """The dtype the rows run in (the engine's default when --dtype is not given: fp16 on a GPU, fp32
    on a CPU); the matmul peak is measured in it, since a GPU's fp16/bf16 peak is ~50x its fp32 one."""
    return dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")


def matmul_peak(device: str, dtype: str, n: int | None = None, repeats: int = 10) -> dict:
    """The best of `repeats` timed n x n matmuls in `dtype`: {"gflops", "dtype" (read from the
    product, so it says what really ran), "n"}. On a GPU n is larger and each timing averages 10
    back-to-back matmuls, so launch and sync overheads do not hide the peak."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    n = n or (8192 if on_gpu else 2048)
    a, b = (torch.randn(n, n, device=dev).to(DTYPES[dtype]) for _ in range(2))
    per_timing = 10 if on_gpu else 1
    best = float("inf")
    for trial in range(repeats + 2):  # the first two warm up
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(per_timing):
            product = a @ b
        if on_gpu:
            torch.cuda.synchronize()
        if trial >= 2:
            best = min(best, (time.perf_counter() - start) / per_timing)
    return {"gflops": 2 * n**3 / best / 1e9, "dtype": DTYPE_NAMES[product.dtype], "n": n}


def unet_gflop_per_image(model: str, with_controlnet: bool = False) -> float:
    """FLOPs of one batch-1 U-Net call at the model's native size (512x512; SDXL family 1024x1024, with
    its pooled embedding and size ids), plus the ControlNet's in sketch mode. Counted on the meta device:
    from the configs alone (no weights built or read), and attention counted as its matmuls (on a CPU
    tensor, scaled_dot_product_attention runs a fused kernel the FLOP counter does not see: 3% of
    SDXS-512's FLOPs, 9% of SDXS-1024's)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdxs.registry import REFERENCE_MODELS

    spec = known_spec(model) or REFERENCE_MODELS.get(model)  # SDXL base too: the paper's "60x faster than SDXL"
    if spec is not None:
        unet_config, controlnet_config = spec.architecture.unet, spec.architecture.controlnet
    else:
        from sdxs.loading import resolve_model_dir

        root = resolve_model_dir(model)
        unet_config = UNet2DConditionModel.load_config(root / "unet")
        controlnet_config = ControlNetModel.load_config(root / "controlnet") if with_controlnet else None
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config).eval()
        controlnet = ControlNetModel.from_config(controlnet_config).eval() if with_controlnet else None
    meta = torch.device("meta")
    size = unet.config.sample_size
    sample = torch.randn(1, unet.config.in_channels, size, size, device=meta)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=meta)
    t = torch.tensor([999], device=meta)
    added = {}
    if unet.config.addition_embed_type == "text_time":  # pooled embedding + six size numbers (each addition_time_embed_dim wide)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, device=meta), "time_ids": torch.randn(1, 6, device=meta)}}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, t, encoder_hidden_states=text, **added)
        if controlnet is not None:
            factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)  # sketch pixels per latent (8, or 4 for mini)
            controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=torch.rand(1, 3, size * factor, size * factor, device=meta))
    return counter.get_total_flops() / 1e9


def machine_description() -> dict:
    cpu = platform.processor() or "unknown"
    flags = ""
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_features": features,
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import openvino

        info["openvino"] = openvino.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _stage_ms(stages: dict, key: str) -> str:
    return f"{stages[key]['median'] * 1000:.0f} ms" if key in stages else "fused"


def _gflops(gflops: float, peak: float, lower_bound: bool) -> str:
    return f"{'≥ ' if lower_bound else ''}{gflops:.0f} ({100 * gflops / peak:.0f}%)"


def _clients_cell(row: dict) -> str:
    clients = row.get("clients")
    if not clients:
        return "n/a"
    gain = clients["images_per_s"] / clients["images_per_s_solo"]
    return f"**{clients['images_per_s']:.2f}** (solo {clients['images_per_s_solo']:.2f}: {gain:.1f}x)"


def markdown(report: dict) -> str:
    rows, batch, clients = report["rows"], report["batch"], report.get("clients", 0)
    unet_label = "U-Net + ControlNet" if report["mode"] == "sketch" else "U-Net"
    on_gpu = report["device"].startswith("cuda")
    peak, peak_dtype = report["matmul_peak_gflops"], report.get("matmul_peak_dtype", "fp32")
    ref = rows.get("upstream")
    machine = report["machine"]
    size = next((r["size"] for r in rows.values() if "size" in r), "?")
    columns = ["row", "text enc.", unet_label, "decoder", "end-to-end (median, min-max)", "vs (a)", "img/s b1", f"img/s b{batch}"]
    columns += [f"img/s {clients} clients (solo)"] if clients else []
    columns += ["first call", "peak GPU memory" if on_gpu else "peak RSS", f"{unet_label} GFLOP/s b1 (% peak)",
                f"{unet_label} GFLOP/s b{batch} (% peak)", f"image vs {report.get('dtype', 'fp32')} engine (b)"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; model: `{report['model']}` (exact architecture, random weights unless a folder), {report['mode']}-to-image "
        f"at {size}x{size}; "
        f"device: {report['device']}, {report.get('dtype', 'fp32')}; runs: {report['runs']} after one warm-up; batch {batch} in forwards of "
        f"{report.get('micro_batch') or 'the engine default (64 on cuda, 4 on cpu)'}.  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"features {', '.join(machine['cpu_features']) or 'none'}" + (f"; GPU {machine['gpu']}" if "gpu" in machine else "")
        + f"; torch {machine['torch']}" + (f", OpenVINO {machine['openvino']}" if "openvino" in machine else "") + ".  ",
        f"{peak_dtype} matmul peak measured in this run: {peak:.0f} GFLOP/s; {unet_label}: {report['unet_gflop']:.0f} GFLOP per image.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    notes = []
    for name, r in rows.items():
        if "error" in r or "not_run" in r:
            why = f"not run: {r['not_run']}" if "not_run" in r else f"failed: {r['error']}"
            lines.append(f"| {ROWS.get(name, name)} | {why} |" + " |" * (len(columns) - 2))
            continue
        s = r["stages_s"]
        speedup = f"{ref['stages_s']['total']['median'] / s['total']['median']:.2f}x" if ref and "stages_s" in ref else "n/a"
        # Without a U-Net stage time (the compiled path) the end-to-end time bounds the U-Net's rate from below.
        unet_s = s["unet"]["median"] if "unet" in s else s["total"]["median"]
        batched = r[f"images_per_s_batch{batch}"]
        agreement = r.get("agreement", {})
        agree = f"max diff {agreement['max_abs_diff']}/255, PSNR {agreement['psnr_db']:.1f} dB" if agreement else "reference"
        memory = r.get("peak_gpu_bytes") if on_gpu else r.get("peak_rss_bytes")
        cells = [ROWS.get(name, name), _stage_ms(s, "text_encoder"), _stage_ms(s, "unet"), _stage_ms(s, "decoder"),
                 f"**{s['total']['median'] * 1000:.0f} ms** ({s['total']['min'] * 1000:.0f}-{s['total']['max'] * 1000:.0f})",
                 speedup, f"{r['images_per_s_batch1']:.2f}", f"{batched:.2f}"]
        cells += [_clients_cell(r)] if clients else []
        first_batched = r.get(f"first_call_batch{batch}_s")
        cells += [f"{r['first_call_s']:.1f} s" + ("" if first_batched is None else f" (b{batch}: {first_batched:.1f} s)"),
                  "n/a" if memory is None else f"{memory / 2**30:.2f} GiB",
                  _gflops(report["unet_gflop"] / unet_s, peak, lower_bound="unet" not in s),
                  _gflops(report["unet_gflop"] * batched, peak, lower_bound=True), agree]
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("clients"):
            c = r["clients"]
            notes.append(f"{ROWS.get(name, name)}: {c['requests']} requests in {c['forwards']} forwards "
                         f"({c['requests'] / max(1, c['forwards']):.1f} images per forward); each answer vs the same request "
                         f"run alone: max diff {c['vs_solo_max_abs_diff']}/255 over {c['vs_solo_compared']} images.")
    networks = ("text encoder + U-Net + ControlNet + both VAEs" if report["mode"] == "sketch" else
                "both text encoders + U-Net + both VAEs" if report.get("sdxl") else "text encoder + U-Net + both VAEs")
    lines += ["", f"fp32 weights of the one-step networks ({networks}): {report['fp32_weights_bytes'] / 2**30:.2f} GiB."]
    if any("stages_s" in r and "unet" not in r["stages_s"] for r in rows.values()):
        lines += ["", "fused: the compiled path (the text encoder, then U-Net, step and decoder as one region: CUDA graphs on a "
                  "GPU) takes no stage times (that would take a sync per stage); its b1 GFLOP/s use the end-to-end time."]
    lines += ["", f"≥: {unet_label} GFLOP/s from the end-to-end time, a lower bound (the b{batch} column always: "
              f"{unet_label} FLOPs x images/s at batch {batch})."]
    if clients:
        rounds = report["client_rounds"]
        lines += ["", f"{clients} clients: {clients} threads each send {rounds} batch-1 requests (own prompt variant, own seeds), "
                  "the next once the last is answered, through sdxs.batching.RequestBatcher, which gathers concurrent requests "
                  "into shared forwards; solo: the same requests one after another on the engine.", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def peer_problem(args) -> str | None:
    """Why the peer rows cannot run here, or None."""
    if args.mode != "text":
        return "the peer rows are text-to-image only"
    if args.device != "cpu":
        return "the peer rows run on the CPU"
    if not args.peer_python:
        return "needs --peer-python, an interpreter with optimum-intel (see sdxs/bench_peer.py)"
    if not Path(args.peer_python).is_file():
        return f"--peer-python {args.peer_python} does not exist"
    return None


def prepare_peer(args, tmp: Path) -> Path:
    """The peer's OpenVINO export of the benchmarked model (saved first when it is built with random
    weights), and the batch-1 initial noise of seed 0, so its image compares with row (b)'s."""
    from sdxs.engine import seeded_noise

    np.save(tmp / "noise.npy", seeded_noise([0], 4, 512, 512).numpy())
    folder = Path(args.model)
    if not folder.is_dir():
        import dataclasses

        from sdxs.build import build_components, save_pipeline_folder
        from sdxs.registry import MODELS
        from sdxs.tokenizer import cached_clip_tokenizer_dir

        architecture = dataclasses.replace(MODELS[args.model].architecture, controlnet=None)
        folder = tmp / "model"
        save_pipeline_folder(build_components(architecture), cached_clip_tokenizer_dir(), folder)
    print("[bench] exporting the model for the peer (optimum-cli export openvino) ...", file=sys.stderr, flush=True)
    subprocess.run([args.peer_python, PEER_SCRIPT, "export", str(folder), str(tmp / "peer-ov")],
                   check=True, capture_output=True)
    return tmp / "peer-ov"


def sdxl_row_problem(row: str) -> str | None:
    """Why a row cannot run an SDXL-family model, or None."""
    if row.startswith("openvino"):
        return "the OpenVINO backend has no SDXL path (its IR has no inputs for SDXL's added conditions); use the torch rows"
    if row in PEER_ROWS:
        return "the peer rows run SD-1.x/2.x models only"
    return None


def run_parent(args) -> dict:
    from sdxs.build import count_parameters

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    sdxl = is_sdxl_model(args.model)
    if sdxl and args.mode == "sketch":
        raise SystemExit(f"error: {args.model} is an SDXL-family model, which has no sketch ControlNet; use --mode text.")
    dtype = rows_dtype(args.device, args.dtype)
    peak = matmul_peak(args.device, dtype)
    report = {
        "command": "python -m sdxs.bench " + " ".join(args.argv),
        "date": datetime.date.today().isoformat(),
        "model": args.model, "mode": args.mode, "device": args.device, "dtype": dtype, "runs": args.runs, "batch": args.batch,
        "micro_batch": args.micro_batch, "clients": args.clients, "client_rounds": client_rounds(args.device),
        "machine": machine_description(),
        "matmul_peak_gflops": peak["gflops"], "matmul_peak_dtype": peak["dtype"], "matmul_peak_n": peak["n"],
        "unet_gflop": unet_gflop_per_image(args.model, with_controlnet=args.mode == "sketch"),
        "sdxl": sdxl,
        "rows": {},
    }
    if known_spec(args.model) is not None:
        counts = count_parameters(args.model)
        report["fp32_weights_bytes"] = 4 * sum(counts.get(name, 0) for name in (
            "text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "vae_large", "controlnet"))
    else:
        report["fp32_weights_bytes"] = sum(p.stat().st_size for p in Path(args.model).rglob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        peer_folder = None
        for row in rows:
            out = Path(tmp) / f"{row}.json"
            cmd = [sys.executable, "-m", "sdxs.bench", "--worker", row, "--json-out", str(out), "--model", args.model, "--mode", args.mode,
                   "--device", args.device, "--dtype", dtype, "--runs", str(args.runs), "--batch", str(args.batch),
                   "--clients", str(args.clients)] + (["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])
            if sdxl and sdxl_row_problem(row):
                report["rows"][row] = {"not_run": sdxl_row_problem(row)}
                print(f"[bench] {row}: not run: {report['rows'][row]['not_run']}", file=sys.stderr, flush=True)
                continue
            if row in PEER_ROWS:
                problem = peer_problem(args)
                if problem:
                    report["rows"][row] = {"not_run": problem}
                    print(f"[bench] {row}: not run: {problem}", file=sys.stderr, flush=True)
                    continue
                peer_folder = peer_folder or prepare_peer(args, Path(tmp))
                cmd = [args.peer_python, PEER_SCRIPT, "run", str(peer_folder), "--row", row,
                       "--precision", "f32" if row == "peer-fp32" else "default", "--noise", str(Path(tmp) / "noise.npy"),
                       "--prompt", PROMPT, "--runs", str(args.runs), "--batch", str(args.batch), "--json-out", str(out)]
            print(f"[bench] {row} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                report["rows"][row] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            report["rows"][row] = json.loads(out.read_text())
            print(f"[bench] {row}: {report['rows'][row]['stages_s']['total']['median'] * 1000:.0f} ms end to end", file=sys.stderr, flush=True)
        reference = report["rows"].get("torch", {}).get("image")
        if reference:
            ref = np.asarray(__import__("PIL.Image").Image.open(reference).convert("RGB"))
            for name, r in report["rows"].items():
                if name != "torch" and "image" in r:
                    img = np.asarray(__import__("PIL.Image").Image.open(r["image"]).convert("RGB"))
                    r["agreement"] = {"max_abs_diff": int(np.abs(img.astype(int) - ref).max()), "psnr_db": psnr(img, ref)}
        for r in report["rows"].values():
            r.pop("image", None)
    return report


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}; got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxs.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="IDKiro/sdxs-512-dreamshaper", help="known id (built with random weights) or a local folder")
    parser.add_argument("--rows", default=None, help=f"comma-separated rows from: {', '.join(ROWS)} (default: all that fit the device)")
    parser.add_argument("--mode", default="text", choices=["text", "sketch"], help="text-to-image, or sketch-to-image through the ControlNet (use --model IDKiro/sdxs-512-dreamshaper-sketch)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: fp16 on cuda, fp32 on cpu (bf16: CPUs with native bf16, or GPUs); the matmul peak is measured in it")
    parser.add_argument("--runs", type=positive_int, default=5, help="timed runs per row after the warm-up (default 5)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"images per call for the batched throughput (default {DEFAULT_BATCH['cuda']} on cuda, {DEFAULT_BATCH['cpu']} on cpu)")
    parser.add_argument("--micro-batch", type=positive_int, default=None,
                        help="images per forward; calls of any size run in chunks of it (default: the engine's, 64 on cuda, 4 on cpu)")
    parser.add_argument("--clients", type=non_negative_int, default=0,
                        help=f"also measure N concurrent clients, each sending {CLIENT_ROUNDS['cuda']} (cuda) or {CLIENT_ROUNDS['cpu']} (cpu) batch-1 requests through "
                             "sdxs.batching.RequestBatcher, against the same requests run alone (default 0: off; e.g. 16 on a GPU)")
    parser.add_argument("--peer-python", default=os.environ.get("SDXS_PEER_PYTHON"),
                        help="interpreter of a venv with optimum-intel, for the peer rows (see sdxs/bench_peer.py; default $SDXS_PEER_PYTHON)")
    parser.add_argument("--out", default="docs/benchmarks", help="writes OUT.json and OUT-table.md (default docs/benchmarks)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for the report's command line

    if args.worker:
        Path(args.json_out).write_text(json.dumps(run_worker(args)))
        return 0
    from sdxs.loading import pick_device_and_dtype

    try:  # a device or dtype this machine cannot run fails here, with what to use instead
        pick_device_and_dtype(args.device, args.dtype)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    args.batch = args.batch or default_batch(args.device)
    if args.rows is None:
        if is_sdxl_model(args.model):  # the SDXL family runs on the torch backends only
            args.rows = "upstream,torch" + ("" if args.device == "cpu" else ",torch-compile")
        elif args.device == "cpu":
            from sdxs.openvino_backend import cpu_supports_bf16, openvino_available

            args.rows = "upstream,torch" + (",openvino" if openvino_available() else "") + (",openvino-bf16" if openvino_available() and cpu_supports_bf16() else "")
        else:
            args.rows = "upstream,torch,torch-compile"
    report = run_parent(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    Path(f"{out}-table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
