"""The peer's engine for `python -m sdxs.bench`: FastSD CPU's way of running SDXS.

FastSD CPU runs SDXS through optimum-intel: an OpenVINO export of the pipeline
(`OVStableDiffusionPipeline`), statically reshaped and compiled, with a tiny decoder (TAESD) in
OpenVINO format swapped in for the VAE decoder. optimum-intel cannot be installed beside this
project's pins (it requires older transformers and huggingface-hub), so this file runs under a
separate interpreter, `--peer-python`, and imports nothing from `sdxs`:

    python -m venv peer-venv
    peer-venv/bin/pip install torch==2.13.0 openvino==2026.4.1
    peer-venv/bin/pip install --no-deps optimum-intel==2.2.0
    peer-venv/bin/pip install "optimum~=2.3.0" "transformers<5.6" "huggingface-hub<1.22" nncf openvino-tokenizers diffusers accelerate
    python -m sdxs.bench --rows torch,openvino,peer,peer-fp32 --peer-python peer-venv/bin/python

(optimum-intel also lists torchvision, which nothing here uses and which would pull a second
torch build.) Two steps, each a command of this file:

    export FOLDER OUT   SDXS diffusers folder -> optimum's OpenVINO folder + TAESD decoder IR
    run OUT ...         the benchmark worker; writes the same JSON as sdxs.bench's workers
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def export(folder: Path, out: Path) -> None:
    """optimum-cli exports a pipeline with a KL VAE (it cannot export AutoencoderTiny's encoder), so
    export with the folder's `vae_large`, then put the tiny decoder in place of `vae_decoder`, as
    FastSD CPU does with its pre-converted TAESD."""
    import openvino as ov
    import torch
    from diffusers import AutoencoderTiny

    with tempfile.TemporaryDirectory() as tmp:
        kl = Path(tmp) / "pipeline"
        kl.mkdir()
        for part in ("scheduler", "text_encoder", "tokenizer", "unet"):
            (kl / part).symlink_to((folder / part).resolve())
        (kl / "vae").symlink_to((folder / "vae_large").resolve())
        index = json.loads((folder / "model_index.json").read_text())
        index["vae"] = ["diffusers", "AutoencoderKL"]
        (kl / "model_index.json").write_text(json.dumps(index))
        cli = "from optimum.commands.optimum_cli import main; main()"
        subprocess.run([sys.executable, "-c", cli, "export", "openvino", "--model", str(kl), "--task", "text-to-image",
                        "--weight-format", "fp32", str(out)], check=True)

    class Decode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample).sample

    tiny = AutoencoderTiny.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        model = ov.convert_model(Decode(tiny), example_input={"latent_sample": torch.randn(1, 4, 64, 64)})
    model.outputs[0].get_tensor().set_names({"sample"})
    decoder_dir = out / "vae_decoder"
    shutil.rmtree(decoder_dir)
    decoder_dir.mkdir()
    ov.save_model(model, decoder_dir / "openvino_model.xml", compress_to_fp16=False)
    shutil.copy(folder / "vae" / "config.json", decoder_dir / "config.json")


def _timed(part, times: dict, key: str):
    forward = part.forward

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = forward(*args, **kwargs)
        times[key] += time.perf_counter() - start
        return result

    part.forward = wrapper


def _static_shapes(pipe, batch: int) -> None:
    """FastSD CPU's `reshape(batch_size=1, height, width, num_images_per_prompt)`, except that the
    U-Net gets `batch` and not 2 x `batch`: optimum assumes classifier-free guidance, SDXS has none."""
    pipe.reshape(batch_size=1, height=512, width=512, num_images_per_prompt=batch)
    unet = pipe.unet.model
    shapes = {}
    for port in unet.inputs:
        shape = port.get_partial_shape()
        if port.get_any_name() != "timestep":
            shape[0] = batch
        shapes[port] = shape
    unet.reshape(shapes)
    pipe.compile()


def run(args) -> dict:
    import numpy as np
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    ov_config = {"CACHE_DIR": ""}  # FastSD CPU's configuration; OpenVINO picks the precision
    if args.precision == "f32":
        ov_config["INFERENCE_PRECISION_HINT"] = "f32"
    pipe = OVStableDiffusionPipeline.from_pretrained(args.folder, compile=False, ov_config=ov_config)
    pipe.set_progress_bar_config(disable=True)
    times = {"text_encoder": 0.0, "unet": 0.0, "decoder": 0.0}
    _timed(pipe.text_encoder, times, "text_encoder")
    _timed(pipe.unet, times, "unet")
    _timed(pipe.vae_decoder, times, "decoder")
    noise = torch.from_numpy(np.load(args.noise))

    def generate(batch: int):
        for key in times:
            times[key] = 0.0
        start = time.perf_counter()
        images = pipe(prompt=args.prompt, num_images_per_prompt=batch, latents=noise[:1].repeat(batch, 1, 1, 1),
                      guidance_scale=0.0, num_inference_steps=1, output_type="pil").images
        return images, dict(times, total=time.perf_counter() - start)

    start = time.perf_counter()
    _static_shapes(pipe, 1)
    images, _ = generate(1)
    first_call = time.perf_counter() - start
    stages = {key: [] for key in ("text_encoder", "unet", "decoder", "total")}
    for _ in range(args.runs):
        images, timings = generate(1)
        for key in stages:
            stages[key].append(timings[key])
    image_path = Path(args.json_out).with_suffix(".png")
    images[0].save(image_path)
    _static_shapes(pipe, args.batch)
    generate(args.batch)
    batched = [generate(args.batch)[1]["total"] for _ in range(max(1, args.runs // 2))]
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in stages.items()}
    import openvino

    return {
        "row": args.row,
        "backend": f"optimum-intel OVStableDiffusionPipeline, OpenVINO {openvino.__version__.split('-')[0]}, "
                   f"precision {'f32' if args.precision == 'f32' else openvino.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT')}",
        "first_call_s": first_call,
        "stages_s": summary,
        "images_per_s_batch1": 1.0 / summary["total"]["median"],
        f"images_per_s_batch{args.batch}": args.batch / statistics.median(batched),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "image": str(image_path),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export")
    ex.add_argument("folder", type=Path)
    ex.add_argument("out", type=Path)
    rn = commands.add_parser("run")
    rn.add_argument("folder")
    rn.add_argument("--row", required=True)
    rn.add_argument("--precision", choices=["default", "f32"], default="default")
    rn.add_argument("--noise", required=True, help=".npy of the batch-1 initial latents")
    rn.add_argument("--prompt", required=True)
    rn.add_argument("--runs", type=int, default=5)
    rn.add_argument("--batch", type=int, default=4)
    rn.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.folder, args.out)
        return 0
    Path(args.json_out).write_text(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
