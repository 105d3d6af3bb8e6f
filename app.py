"""SDXS text-to-image Space: one step, real time. Runs on ZeroGPU, on a GPU, or on a laptop CPU.

    python app.py                            # IDKiro/sdxs-512-dreamshaper (+ its anime LoRA) from the HF cache/hub
    python app.py --model tiny-model         # any local diffusers folder (python -m sdxs make-tiny tiny-model)
    python app.py --host 0.0.0.0 --port 7860 --share
"""

from __future__ import annotations

import argparse
import random
import sys

import gradio as gr

from sdxs import DEFAULT_MODEL, MODELS, ModelNotFoundError, SDXSEngine
from sdxs.registry import ANIME_LORA
from sdxs.webapp import MAX_SEED, add_common_flags, display_name, gpu, load_engine_or_exit, status_line

MAX_IMAGES = 4
EXAMPLES = [
    "a close-up picture of an old man standing in the rain",
    "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece",
]
DECODER_LABELS = {"tiny": "Tiny (TAESD, fast)", "large": "Large (SD VAE, quality)"}


def as_choices(engines: dict[str, SDXSEngine] | SDXSEngine) -> dict[str, SDXSEngine]:
    return {display_name(engines): engines} if isinstance(engines, SDXSEngine) else engines


def make_generate(engines: dict[str, SDXSEngine] | SDXSEngine):
    """The event handler: UI values in, (images, seed used, status line) out.

    `engines` maps a model label to an engine (or is one engine); style variants share every
    module but the U-Net, and each was built once at start-up, so no request mutates anything."""
    engines = as_choices(engines)

    @gpu
    def run(style: str, prompt: str, seed: int, num_images: int, decoder: str):
        return engines[style].text_to_image(prompt, seed=seed, num_images=num_images, decoder=decoder)

    def generate(prompt: str, seed: float, randomize_seed: bool, num_images: float, decoder: str, style: str | None = None):
        style = style if style in engines else next(iter(engines))
        seed = random.randint(0, MAX_SEED) if randomize_seed else int(seed)
        try:
            result = run(style, prompt or "", seed, int(num_images), decoder)
        except ValueError as err:  # bad input: say what to change, keep the server up
            raise gr.Error(str(err)) from None
        for warning in result.warnings:
            gr.Warning(warning)
        return result.images, seed, status_line(result, engines[style], seed)

    return generate


def build_demo(engines: dict[str, SDXSEngine] | SDXSEngine) -> gr.Blocks:
    engines = as_choices(engines)
    generate = make_generate(engines)
    first = next(iter(engines.values()))
    with gr.Blocks(title="SDXS one-step text-to-image") as demo:
        gr.Markdown(
            f"# SDXS: real-time one-step text-to-image\n"
            f"Model: **{display_name(first)}** on {first.device.type} ({str(first.dtype).removeprefix('torch.')}). "
            f"One U-Net step at t=999, no guidance; trained at 512x512."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Enter your prompt", max_lines=2, scale=5, elem_id="prompt")
            run_button = gr.Button("Run", variant="primary", scale=1, elem_id="run")
        gallery = gr.Gallery(label="Images", format="png", columns=2, height=560, object_fit="contain", buttons=["download", "fullscreen"], elem_id="gallery")
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Settings", open=False):
            style = gr.Radio(list(engines), value=next(iter(engines)), label="Model", visible=len(engines) > 1, elem_id="style")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, minimum=0, maximum=MAX_SEED, precision=0)
                randomize_seed = gr.Checkbox(label="Randomise seed", value=True)
            num_images = gr.Slider(label="Number of images", minimum=1, maximum=MAX_IMAGES, step=1, value=1)
            decoder = gr.Radio(
                [(DECODER_LABELS.get(d, d), d) for d in first.decoders],
                value=first.decoders[0],
                label="Image decoder",
                info="Tiny is fastest; large is the original SD decoder, slower, finer detail.",
            )
        gr.Examples(EXAMPLES, inputs=[prompt])
        gr.on(
            [prompt.submit, run_button.click],
            fn=generate,
            inputs=[prompt, seed, randomize_seed, num_images, decoder, style],
            outputs=[gallery, seed, status],
            api_name="generate",
            concurrency_limit=1,
        )
    return demo


def load_engines(args) -> dict[str, SDXSEngine]:
    """The base model, plus the LoRA style variant when one is asked for (or by default, the
    anime LoRA over the default DreamShaper). A LoRA that cannot be loaded is skipped, loudly."""
    engine = load_engine_or_exit(args)
    engines = {display_name(engine): engine}
    lora = args.lora if args.lora is not None else (ANIME_LORA if args.model == DEFAULT_MODEL else "none")
    if lora != "none":
        try:
            variant = engine.with_lora(lora)
        except (ModelNotFoundError, ValueError, OSError) as err:
            print(f"warning: style LoRA '{lora}' not loaded, running without it: {err}", file=sys.stderr)
        else:
            if variant.backend != "torch":
                variant.warm_up()
            engines[MODELS[lora].title if lora in MODELS else f"{display_name(engine)} + {display_name(variant)}"] = variant
    return engines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SDXS text-to-image web app.")
    add_common_flags(parser, DEFAULT_MODEL)
    parser.add_argument("--lora", default=None, help=f"style LoRA offered as a second model (default: {ANIME_LORA} with the default model; 'none' to skip)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    demo = build_demo(load_engines(args))
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
