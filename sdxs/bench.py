"""Benchmark: the upstream demo's way vs this engine's backends, side by side in one run.

    python -m sdxs.bench                                  # exact SDXS-512-DreamShaper, random weights, CPU
    python -m sdxs.bench --rows torch,openvino --runs 3   # a subset
    python -m sdxs.bench --device cuda --rows upstream,torch,torch-compile --batch 16
    python -m sdxs.bench --model path/to/folder           # a real (or the mini) model folder
    python -m sdxs.bench --rows torch,openvino,peer,peer-fp32 --peer-python peer-venv/bin/python

Each row runs in its own process (clean peak RSS, no shared caches): the model is built (exact
architecture, random weights: compute does not depend on the values) or loaded, one warm-up call
is timed as the first call (tracing/compiling included), then `--runs` timed calls at batch 1 and
at `--batch`. The parent measures this machine's fp32 matmul peak and the U-Net's FLOPs, compares
every row's image with the plain fp32 engine's image for the same seed, and writes JSON + markdown.
The peer rows (FastSD CPU's engine) run under a separate interpreter: see sdxs/bench_peer.py.
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
import time
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


# --- worker: one row, in its own process ----------------------------------------------------------

def _build_engine(model: str, row: str, device: str, dtype: str | None):
    from sdxs.engine import SDXSEngine
    from sdxs.loading import Components, load_components, pick_device_and_dtype
    from sdxs.registry import MODELS

    dev, dt = pick_device_and_dtype(device, dtype)
    if model in MODELS and not Path(model).exists():
        from transformers import CLIPTokenizer

        from sdxs.build import build_components
        from sdxs.tokenizer import cached_clip_tokenizer_dir

        built = build_components(MODELS[model].architecture)
        for name in ("text_encoder", "unet", "vae", "vae_large", "controlnet"):
            if name in built:
                built[name] = built[name].to(dev, dt).requires_grad_(False)
        components = Components(
            tokenizer=CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir()),
            text_encoder=built["text_encoder"], unet=built["unet"], scheduler_config=dict(built["scheduler"].config),
            decoders={"tiny": built["vae"], "large": built["vae_large"]}, source=model, controlnet=built.get("controlnet"),
        )
    else:
        components = load_components(model, dev, dt)
    backend = "torch" if row == "upstream" else row
    return SDXSEngine(components, dev, dt, backend)


def bench_sketch():
    """A fixed line drawing for the sketch rows."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([96, 96, 416, 416], outline="black", width=8)
    draw.line([(160, 300), (352, 300)], fill="black", width=8)
    return image


def _upstream_call(engine, pipe, noise, sketch=None):
    """What the upstream demos do per request: swap the VAE, move/cast the pipeline, run 1 step."""
    pipe.vae = engine.torch_components.decoders["tiny"]
    pipe.to(torch_device=engine.device, torch_dtype=engine.dtype)
    extra = {} if sketch is None else dict(image=sketch, controlnet_conditioning_scale=0.8, width=512, height=512)
    return pipe(prompt=[PROMPT] * noise.shape[0], guidance_scale=0.0, num_inference_steps=1, latents=noise, output_type="pil", **extra).images


def _stage_timer(modules: dict):
    """Forward hooks that add each module's wall time to `timings` (for the upstream pipeline)."""
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

    for name, module in modules.items():
        module.register_forward_pre_hook(pre(name))
        module.register_forward_hook(post(name))
    return timings


def run_worker(args) -> dict:
    torch.manual_seed(0)
    engine = _build_engine(args.model, args.worker, args.device, args.dtype)
    sketch = bench_sketch() if args.mode == "sketch" else None
    if args.worker == "upstream":
        from diffusers import DEISMultistepScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

        tc = engine.torch_components
        parts = dict(
            vae=tc.decoders["tiny"], text_encoder=tc.text_encoder, tokenizer=tc.tokenizer, unet=tc.unet,
            scheduler=DEISMultistepScheduler.from_config(tc.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe = StableDiffusionControlNetPipeline(controlnet=tc.controlnet, **parts) if sketch else StableDiffusionPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        stage_modules = {"text_encoder": tc.text_encoder, "unet": tc.unet, "decoder": tc.decoders["tiny"].decoder}
        stage_times = _stage_timer(stage_modules)
        control_times = _stage_timer({"controlnet": tc.controlnet}) if sketch else {"controlnet": 0.0}

        def generate(batch):
            for key in stage_modules:
                stage_times[key] = 0.0
            control_times["controlnet"] = 0.0
            start = time.perf_counter()
            images = _upstream_call(engine, pipe, engine.initial_noise(list(range(batch)), 512, 512), sketch)
            times = dict(stage_times, total=time.perf_counter() - start)
            times["unet"] += control_times["controlnet"]  # the engine counts the ControlNet in its U-Net stage
            return images, times
    else:
        def generate(batch):
            if sketch is not None:
                result = engine.sketch_to_image(sketch, PROMPT, seed=0, num_images=batch, control_strength=0.8)
            else:
                result = engine.text_to_image(PROMPT, seed=0, num_images=batch)
            return result.images, result.timings

    start = time.perf_counter()
    images, _ = generate(1)
    first_call = time.perf_counter() - start
    stages = {key: [] for key in ("text_encoder", "unet", "decoder", "total")}
    for _ in range(args.runs):
        images, run_timings = generate(1)
        for key in stages:
            stages[key].append(run_timings[key])
    generate(args.batch)  # warm-up for the batched shape
    batched = [generate(args.batch)[1]["total"] for _ in range(max(1, args.runs // 2))]
    image_path = Path(args.json_out).with_suffix(".png")
    images[0].save(image_path)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in stages.items()}
    return {
        "row": args.worker,
        "backend": engine.backend,
        "first_call_s": first_call,
        "stages_s": summary,
        "images_per_s_batch1": 1.0 / summary["total"]["median"],
        f"images_per_s_batch{args.batch}": args.batch / statistics.median(batched),
        "peak_rss_bytes": peak_rss,
        "image": str(image_path),
    }


# --- parent: machine facts, reference numbers, the table ------------------------------------------

def matmul_peak_gflops(device: str, n: int = 2048, repeats: int = 10) -> float:
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    times = []
    for _ in range(repeats + 2):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[2:]) / 1e9


def unet_gflop_per_image(model: str, with_controlnet: bool = False) -> float:
    """FLOPs of one batch-1 U-Net call at 512x512 (plus the ControlNet's in sketch mode)."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdxs.registry import MODELS

    if model in MODELS:
        architecture = MODELS[model].architecture
        unet = UNet2DConditionModel(**architecture.unet).eval()
        controlnet = ControlNetModel(**architecture.controlnet).eval() if with_controlnet else None
    else:
        from sdxs.loading import resolve_model_dir

        root = resolve_model_dir(model)
        unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        controlnet = ControlNetModel.from_pretrained(root / "controlnet").eval() if with_controlnet else None
    size = unet.config.sample_size
    sample = torch.randn(1, unet.config.in_channels, size, size)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([999]), encoder_hidden_states=text)
        if controlnet is not None:
            controlnet(sample, torch.tensor([999]), encoder_hidden_states=text, controlnet_cond=torch.rand(1, 3, size * 8, size * 8))
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


def markdown(report: dict) -> str:
    rows, batch = report["rows"], report["batch"]
    unet_label = "U-Net + ControlNet" if report["mode"] == "sketch" else "U-Net"
    ref = rows.get("upstream")
    lines = [
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; model: `{report['model']}` (exact architecture, random weights unless a folder), {report['mode']}-to-image; "
        f"device: {report['device']}; runs: {report['runs']} after one warm-up.  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores ({report['machine']['torch_threads']} torch threads), "
        f"features {', '.join(report['machine']['cpu_features']) or 'none'}; torch {report['machine']['torch']}"
        + (f", OpenVINO {report['machine']['openvino']}" if "openvino" in report["machine"] else "") + ".  ",
        f"fp32 matmul peak measured in this run: {report['matmul_peak_gflops']:.0f} GFLOP/s; {unet_label}: {report['unet_gflop']:.0f} GFLOP per image.",
        "",
        f"| row | text enc. | {unet_label} | decoder | end-to-end (median, min-max) | vs (a) | img/s b1 | img/s b{batch} | first call | peak RSS | {unet_label} GFLOP/s (% peak) | image vs fp32 engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "error" in r or "not_run" in r:
            why = f"not run: {r['not_run']}" if "not_run" in r else f"failed: {r['error']}"
            lines.append(f"| {ROWS.get(name, name)} | {why} |" + " |" * 10)
            continue
        s = r["stages_s"]
        speedup = f"{ref['stages_s']['total']['median'] / s['total']['median']:.2f}x" if ref and "stages_s" in ref else "n/a"
        unet_gflops = report["unet_gflop"] / s["unet"]["median"]
        agreement = r.get("agreement", {})
        agree = f"max diff {agreement['max_abs_diff']}/255, PSNR {agreement['psnr_db']:.1f} dB" if agreement else "reference"
        lines.append(
            f"| {ROWS.get(name, name)} | {s['text_encoder']['median'] * 1000:.0f} ms | {s['unet']['median'] * 1000:.0f} ms | "
            f"{s['decoder']['median'] * 1000:.0f} ms | **{s['total']['median'] * 1000:.0f} ms** ({s['total']['min'] * 1000:.0f}-{s['total']['max'] * 1000:.0f}) | "
            f"{speedup} | {r['images_per_s_batch1']:.2f} | {r[f'images_per_s_batch{batch}']:.2f} | {r['first_call_s']:.1f} s | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {unet_gflops:.0f} ({100 * unet_gflops / report['matmul_peak_gflops']:.0f}%) | {agree} |"
        )
    networks = "text encoder + U-Net + ControlNet + both VAEs" if report["mode"] == "sketch" else "text encoder + U-Net + both VAEs"
    lines += ["", f"fp32 weights of the one-step networks ({networks}): {report['fp32_weights_bytes'] / 2**30:.2f} GiB."]
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


def run_parent(args) -> dict:
    from sdxs.build import count_parameters
    from sdxs.registry import MODELS

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    report = {
        "command": "python -m sdxs.bench " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "model": args.model, "mode": args.mode, "device": args.device, "runs": args.runs, "batch": args.batch,
        "machine": machine_description(),
        "matmul_peak_gflops": matmul_peak_gflops(args.device),
        "unet_gflop": unet_gflop_per_image(args.model, with_controlnet=args.mode == "sketch"),
        "rows": {},
    }
    if args.model in MODELS:
        counts = count_parameters(args.model)
        report["fp32_weights_bytes"] = 4 * (counts["text_encoder"] + counts["unet"] + counts["vae_decoder"] + counts["vae_encoder"] + counts["vae_large"] + counts.get("controlnet", 0))
    else:
        report["fp32_weights_bytes"] = sum(p.stat().st_size for p in Path(args.model).rglob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        peer_folder = None
        for row in rows:
            out = Path(tmp) / f"{row}.json"
            cmd = [sys.executable, "-m", "sdxs.bench", "--worker", row, "--json-out", str(out), "--model", args.model, "--mode", args.mode,
                   "--device", args.device, "--runs", str(args.runs), "--batch", str(args.batch)] + (["--dtype", args.dtype] if args.dtype else [])
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxs.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="IDKiro/sdxs-512-dreamshaper", help="known id (built with random weights) or a local folder")
    parser.add_argument("--rows", default=None, help=f"comma-separated rows from: {', '.join(ROWS)} (default: all that fit the device)")
    parser.add_argument("--mode", default="text", choices=["text", "sketch"], help="text-to-image, or sketch-to-image through the ControlNet (use --model IDKiro/sdxs-512-dreamshaper-sketch)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16"], help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row after the warm-up (default 5)")
    parser.add_argument("--batch", type=int, default=4, help="batch size for the batched throughput (default 4)")
    parser.add_argument("--peer-python", default=os.environ.get("SDXS_PEER_PYTHON"),
                        help="interpreter of a venv with optimum-intel, for the peer rows (see sdxs/bench_peer.py; default $SDXS_PEER_PYTHON)")
    parser.add_argument("--out", default="docs/benchmarks", help="writes OUT.json and OUT-table.md (default docs/benchmarks)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        Path(args.json_out).write_text(json.dumps(run_worker(args)))
        return 0
    if args.rows is None:
        if args.device == "cpu":
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
