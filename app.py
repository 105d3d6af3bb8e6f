"""SDXS text-to-image Space: one step, real time. Runs on ZeroGPU, on a GPU, or on a laptop CPU.

    python app.py                            # IDKiro/sdxs-512-dreamshaper from the Hugging Face cache/hub
    python app.py --model tiny-model         # any local diffusers folder (python -m sdxs make-tiny tiny-model)
    python app.py --host 0.0.0.0 --port 7860 --share
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import gradio as gr

from sdxs import DEFAULT_MODEL, MODELS, ModelNotFoundError, SDXSEngine

try:  # ZeroGPU on Hugging Face Spaces; elsewhere the decorator is not needed
    import spaces

    gpu = spaces.GPU(duration=30)
except ImportError:  # pragma: no cover - depends on the environment

    def gpu(fn):
        return fn


MAX_SEED = 2**31 - 1
MAX_IMAGES = 4
EXAMPLES = [
    "a close-up picture of an old man standing in the rain",
    "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece",
]
DECODER_LABELS = {"tiny": "Tiny (TAESD, fast)", "large": "Large (SD VAE, quality)"}


def display_name(engine: SDXSEngine) -> str:
    """The registry title for known ids; only the folder name for local folders (no machine paths)."""
    if engine.name in MODELS:
        return MODELS[engine.name].title
    return Path(engine.name).name or engine.name


def make_generate(engine: SDXSEngine):
    """The event handler: UI values in, (images, seed used, status line) out."""

    @gpu
    def run(prompt: str, seed: int, num_images: int, decoder: str):
        return engine.text_to_image(prompt, seed=seed, num_images=num_images, decoder=decoder)

    def generate(prompt: str, seed: float, randomize_seed: bool, num_images: float, decoder: str):
        seed = random.randint(0, MAX_SEED) if randomize_seed else int(seed)
        try:
            result = run(prompt or "", seed, int(num_images), decoder)
        except ValueError as err:  # bad input: say what to change, keep the server up
            raise gr.Error(str(err)) from None
        for warning in result.warnings:
            gr.Warning(warning)
        t = result.timings
        status = (
            f"{len(result.images)} image(s) in **{t['total'] * 1000:.0f} ms** "
            f"(text encoder {t['text_encoder'] * 1000:.0f} ms, U-Net {t['unet'] * 1000:.0f} ms, "
            f"decoder {t['decoder'] * 1000:.0f} ms) · seed {seed} · {display_name(engine)} on {engine.device.type}"
        )
        return result.images, seed, status

    return generate


def build_demo(engine: SDXSEngine) -> gr.Blocks:
    generate = make_generate(engine)
    with gr.Blocks(title="SDXS one-step text-to-image") as demo:
        gr.Markdown(
            f"# SDXS: real-time one-step text-to-image\n"
            f"Model: **{display_name(engine)}** on {engine.device.type} ({str(engine.dtype).removeprefix('torch.')}). "
            f"One U-Net step at t=999, no guidance; trained at 512x512."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Enter your prompt", max_lines=2, scale=5, elem_id="prompt")
            run_button = gr.Button("Run", variant="primary", scale=1, elem_id="run")
        gallery = gr.Gallery(label="Images", format="png", columns=2, height=560, object_fit="contain", buttons=["download", "fullscreen"], elem_id="gallery")
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, minimum=0, maximum=MAX_SEED, precision=0)
                randomize_seed = gr.Checkbox(label="Randomise seed", value=True)
            num_images = gr.Slider(label="Number of images", minimum=1, maximum=MAX_IMAGES, step=1, value=1)
            decoder = gr.Radio(
                [(DECODER_LABELS.get(d, d), d) for d in engine.decoders],
                value=engine.decoders[0],
                label="Image decoder",
                info="Tiny is fastest; large is the original SD decoder, slower, finer detail.",
            )
        gr.Examples(EXAMPLES, inputs=[prompt])
        gr.on(
            [prompt.submit, run_button.click],
            fn=generate,
            inputs=[prompt, seed, randomize_seed, num_images, decoder],
            outputs=[gallery, seed, status],
            api_name="generate",
            concurrency_limit=1,
        )
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SDXS text-to-image web app.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local diffusers folder (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="default 7860")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        engine = SDXSEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    except (ModelNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_demo(engine)
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
