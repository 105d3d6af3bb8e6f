"""SDXS sketch-to-image Space: draw, and the image follows every stroke (one step per update).

    python demo_sketch.py                           # IDKiro/sdxs-512-dreamshaper-sketch on its DreamShaper base
    python demo_sketch.py --model tiny-model        # a local folder with a controlnet/ subfolder
    python demo_sketch.py --host 0.0.0.0 --port 7860 --share
"""

from __future__ import annotations

import argparse
import random
import sys

import gradio as gr

from sdxs import SDXSEngine
from sdxs.registry import SKETCH_MODEL
from sdxs.sketch import blank_sketch, prepare_sketch
from sdxs.styles import DEFAULT_STYLE, STYLES, apply_style
from sdxs.webapp import MAX_SEED, add_common_flags, display_name, gpu, load_engine_or_exit, status_line

EMPTY_MESSAGE = "Draw on the canvas (or upload a line drawing) to start: the image follows every stroke."


def make_generate(engine: SDXSEngine):
    """The event handler: canvas and settings in, (image, sketch as seen, status) out.
    An empty canvas gives a white image and a hint, never an error."""

    @gpu
    def run(sketch, prompt: str, seed: int, control_strength: float):
        return engine.sketch_to_image(sketch, prompt, seed=seed, control_strength=control_strength)

    def generate(canvas, prompt: str, template: str, control_strength: float, seed: float):
        seed = int(seed or 0)
        try:
            sketch = prepare_sketch(canvas)
        except (ValueError, OSError) as err:
            raise gr.Error(f"Could not read that sketch: {err}") from None
        if sketch is None:
            return blank_sketch(), None, EMPTY_MESSAGE
        try:
            result = run(sketch, apply_style(template or "{prompt}", prompt or ""), seed, float(control_strength))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        for warning in result.warnings:
            gr.Warning(warning)
        return result.images[0], result.sketch, status_line(result, engine, seed)

    return generate


def build_demo(engine: SDXSEngine) -> gr.Blocks:
    generate = make_generate(engine)
    with gr.Blocks(title="SDXS sketch-to-image") as demo:
        gr.Markdown(
            f"# SDXS sketch-to-image, live\nModel: **{display_name(engine)}** on {engine.device.type}. "
            "Draw with the pencil (erase, undo and clear in the canvas toolbar) or upload a line drawing; "
            "each stroke makes a new image in one step."
        )
        with gr.Row():
            with gr.Column():
                canvas = gr.Sketchpad(
                    value={"background": blank_sketch(), "layers": [], "composite": None},
                    label="Sketch",
                    type="pil",
                    image_mode="RGBA",
                    canvas_size=(512, 512),
                    fixed_canvas=True,
                    sources=["upload", "clipboard"],
                    transforms=[],
                    layers=False,
                    brush=gr.Brush(default_size=6, colors=["#000000"], default_color="#000000", color_mode="fixed"),
                    eraser=gr.Eraser(default_size=24),
                    buttons=["download"],
                    height=560,
                    elem_id="canvas",
                )
                prompt = gr.Textbox(label="Prompt", value="a cute cat", max_lines=2, elem_id="prompt")
                with gr.Row():
                    style = gr.Dropdown(list(STYLES), value=DEFAULT_STYLE, label="Style", scale=1)
                    template = gr.Textbox(STYLES[DEFAULT_STYLE], label="Style template ({prompt} is replaced)", max_lines=2, scale=2)
                strength = gr.Slider(0, 1, value=0.8, step=0.01, label="Control strength", info="How closely the image follows the sketch")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, minimum=0, maximum=MAX_SEED, precision=0, scale=3)
                    dice = gr.Button("Random seed", scale=1)
            with gr.Column():
                output = gr.Image(label="Output", type="pil", format="png", height=560, buttons=["download"], elem_id="output")
                status = gr.Markdown(EMPTY_MESSAGE, elem_id="status")
                seen = gr.Image(label="Sketch as the ControlNet sees it", type="pil", format="png", height=256, buttons=["download"])

        inputs = [canvas, prompt, template, strength, seed]
        outputs = [output, seen, status]
        # Only the latest state matters: while one image is being made, further strokes collapse
        # into one pending update (trigger_mode="always_last"), and one runs at a time.
        live = dict(fn=generate, inputs=inputs, outputs=outputs, trigger_mode="always_last", concurrency_limit=1, concurrency_id="sketch")
        # `input` fires on every stroke, erase, undo and upload (`change` skips the first stroke).
        triggers = [canvas.input, canvas.upload, canvas.clear, prompt.submit, template.submit, strength.release, seed.submit]
        gr.on(triggers, api_name="sketch", show_progress="minimal", **live)
        style.change(lambda name: STYLES[name], inputs=style, outputs=template, api_visibility="private").then(show_progress="hidden", **live)
        dice.click(lambda: random.randint(0, MAX_SEED), outputs=seed, api_visibility="private").then(show_progress="hidden", **live)
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SDXS sketch-to-image web app.")
    add_common_flags(parser, SKETCH_MODEL)
    parser.add_argument("--base", default=None, help="base pipeline for a bare ControlNet folder (default: the registry's, DreamShaper)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = load_engine_or_exit(args, base=args.base)
    if engine.components.controlnet is None:
        print(f"error: '{args.model}' has no ControlNet; use {SKETCH_MODEL} or a folder with controlnet/.", file=sys.stderr)
        return 2
    build_demo(engine).queue(max_size=16).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
