"""SDXS sketch-to-image Space: draw, and the image follows every stroke (one step per update).

    python demo_sketch.py                           # IDKiro/sdxs-512-dreamshaper-sketch on its DreamShaper base;
                                                    # offline and not cached: the built-in mini model's sketch ControlNet
    python demo_sketch.py --model mini              # the built-in 128 px emoji model (models/mini-sdxs/controlnet/)
    python demo_sketch.py --model tiny-model        # a local folder with a controlnet/ subfolder
    python demo_sketch.py --host 0.0.0.0 --port 7860 --share
"""

from __future__ import annotations

import argparse
import sys

import gradio as gr
from gradio.components.image_editor import EditorData

from sdxs import SDXSEngine
from sdxs.registry import SKETCH_MODEL, builtin_model, get_spec
from sdxs.sketch import blank_sketch, prepare_sketch_with_notes
from sdxs.styles import DEFAULT_STYLE, STYLES, apply_style
from sdxs.validation import EMPTY_PROMPT_NOTE, MAX_SEED, clean_text, open_image, parse_seed, parse_strength, random_seed
from sdxs.webapp import (add_common_flags, concurrency_limit, configure_console, display_name, errors_as_messages, fallback_notice, gpu,
                         is_fallback, launch, limit_malloc_arenas, load_engine_or_exit, prompt_for, request_runner, sketch_size, status_line)

EMPTY_MESSAGE = "Draw on the canvas (or upload a line drawing) to start: the image follows every stroke."
DEFAULT_PROMPT = "a cute cat"  # the built-in model's default is its first example ("grinning face")
DISPLAY_SIZE = 512  # the side the canvas and the image are shown at, about; smaller models' images are enlarged
# Gradio's image only ever shrinks a picture to its box (a 128 px emoji would stay a 128 px speck), and a
# browser smooths what it enlarges: fill the box, with nearest neighbours, as app.py's gallery does.
PIXELATED_IMAGES_CSS = "#output img, #seen img { object-fit: contain; image-rendering: pixelated; }"


def page_css(engine: SDXSEngine) -> str | None:
    """Style rules for a model whose images the page enlarges (128 px emoji); None for 512 px models."""
    return PIXELATED_IMAGES_CSS if engine.native_size < DISPLAY_SIZE else None


def canvas_reader(canvas: gr.ImageEditor | None):
    """A function: the canvas value as sent (the events run with preprocess=False) -> PIL images.

    Files (an upload through the API) are opened here, by sdxs.validation.open_image, under the
    app's size and pixel limits, so a damaged file or a decompression bomb gets the app's own
    message instead of failing inside Gradio. Strokes drawn in the browser arrive as blobs that
    only the component can read (its preprocess, under PIL's pixel limit set at launch). Values
    that are already images (tests, Python callers) pass through."""

    def read_file(file):
        return open_image(file["path"]) if isinstance(file, dict) and "path" in file else file

    def read(value):
        if not isinstance(value, dict):
            return value
        if value.get("id") is not None and canvas is not None:
            return canvas.preprocess(EditorData(**value))
        return {
            "background": read_file(value.get("background")),
            "layers": [read_file(layer) for layer in value.get("layers") or []],
            "composite": read_file(value.get("composite")),
        }

    return read


def make_generate(engine: SDXSEngine, canvas_component: gr.ImageEditor | None = None, runner=None):
    """The event handler: canvas and settings in, (image, sketch as seen, status) out.
    An empty canvas gives a white image and a hint, never an error; any bad value a gr.Error
    that says what to change, and the server keeps serving. `runner`: what requests run on (a
    RequestBatcher on a GPU, see sdxs.webapp.request_runner); default: the engine."""
    read_canvas = canvas_reader(canvas_component)
    runner = runner or engine

    @gpu
    def run(sketch, prompt: str, seed: int, control_strength: float):
        return runner.sketch_to_image(sketch, prompt, seed=seed, control_strength=control_strength)  # the default decoder

    def generate(canvas, prompt, template, control_strength, seed):
        try:
            seed = parse_seed(seed)
            control_strength = parse_strength(control_strength)
            template, notes = clean_text(template, "The style template")
            prompt, prompt_notes = clean_text(prompt)
            prompt = apply_style(template or "{prompt}", prompt)
            notes += prompt_notes + ([] if prompt else [EMPTY_PROMPT_NOTE])
        except ValueError as err:
            raise gr.Error(str(err)) from None
        try:
            sketch, sketch_notes = prepare_sketch_with_notes(read_canvas(canvas), sketch_size(engine))
        except Exception as err:  # a damaged or oversized upload; ValueErrors say which
            raise gr.Error(f"Could not read that sketch: {err if isinstance(err, ValueError) else type(err).__name__}") from None
        notes += sketch_notes
        if sketch is None:
            return blank_sketch(engine.native_size), None, "\n\n".join([EMPTY_MESSAGE, *(f"Note: {note}" for note in sketch_notes)])
        model_prompt = prompt_for(engine, prompt)  # the built-in model's caption form: "an emoji of ..."
        with errors_as_messages():
            result = run(sketch, model_prompt, seed, control_strength)
        notes += result.warnings
        for note in notes:
            gr.Warning(note)
        expanded = model_prompt if model_prompt != prompt else None
        return result.images[0], result.sketch, status_line(result, engine, seed, notes, expanded_prompt=expanded)

    generate.runner = runner  # what serves the requests, for tests

    return generate


def default_strength(engine: SDXSEngine) -> float:
    """The Control strength slider's start: the upstream demo's 0.8, and 1.0 for the built-in model, whose
    ControlNet was trained and measured at full strength (models/mini-sdxs/README.md)."""
    return 1.0 if builtin_model(engine.name) else 0.8


def build_demo(engine: SDXSEngine, notice: str | None = None, batch_requests: bool | None = None) -> gr.Blocks:
    """The page; `notice` (markdown), when given, is shown at the top (the built-in model's fallback
    notice). The built-in model gets its own default prompt and no style templates: it reads short
    prompts through its caption form (prompt_for), which a style would turn into nonsense.
    `batch_requests`: serve visitors at once in shared forwards (default: on a GPU), else one at a time."""
    builtin = builtin_model(engine.name)
    runner = request_runner(engine, batch_requests)
    with gr.Blocks(title="SDXS sketch-to-image") as demo:
        gr.Markdown(
            f"# SDXS sketch-to-image, live\nModel: **{display_name(engine)}** on {engine.device.type}. "
            "Draw with the pencil (erase, undo and clear in the canvas toolbar) or upload a line drawing; "
            "each stroke makes a new image in one step."
            + (f" It makes {engine.native_size}x{engine.native_size} pixel images from {sketch_size(engine)}x{sketch_size(engine)} "
               f"sketches (dark strokes on white). Short prompts become the captions it was trained on: *{builtin.examples[0]}* "
               f"is read as `{builtin.expand_prompt(builtin.examples[0])}`." if builtin else "")
        )
        if notice:
            gr.Markdown(notice, elem_id="fallback-notice")
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
                prompt = gr.Textbox(label="Prompt", value=builtin.examples[0] if builtin else DEFAULT_PROMPT, max_lines=2, elem_id="prompt")
                with gr.Row(visible=builtin is None, elem_id="styles"):
                    style = gr.Dropdown(list(STYLES), value=DEFAULT_STYLE, label="Style", scale=1)
                    template = gr.Textbox(STYLES[DEFAULT_STYLE], label="Style template ({prompt} is replaced)", max_lines=2, scale=2)
                strength = gr.Slider(0, 1, value=default_strength(engine), step=0.01, label="Control strength",
                                     info="How closely the image follows the sketch")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, info=f"A whole number from 0 to {MAX_SEED}", scale=3)
                    dice = gr.Button("Random seed", scale=1)
            with gr.Column():
                output = gr.Image(label="Image", type="pil", format="png", height=560, buttons=["download"], elem_id="output")
                status = gr.Markdown(EMPTY_MESSAGE, label="Status", elem_id="status")
                seen = gr.Image(label="Sketch as seen", type="pil", format="png", height=256, buttons=["download"], elem_id="seen")

        inputs = [canvas, prompt, template, strength, seed]
        outputs = [output, seen, status]
        # Only the latest state matters: while one image is being made, further strokes collapse
        # into one pending update (trigger_mode="always_last"). One concurrency group for every
        # trigger: one request at a time, or on a GPU many, batched. Raw values go to `generate`,
        # which checks them.
        live = dict(
            fn=make_generate(engine, canvas, runner), inputs=inputs, outputs=outputs, preprocess=False,
            trigger_mode="always_last", concurrency_limit=concurrency_limit(runner), concurrency_id="sketch",
        )
        # `input` fires on every stroke, erase, undo and upload (`change` skips the first stroke).
        triggers = [canvas.input, canvas.upload, canvas.clear, prompt.submit, template.submit, strength.release, seed.submit]
        gr.on(triggers, api_name="sketch", show_progress="minimal", **live)  # the one API endpoint: /sketch
        # A new style or seed re-runs the same function; not separate endpoints.
        style.change(lambda name: STYLES.get(name, STYLES[DEFAULT_STYLE]), inputs=style, outputs=template, api_visibility="private").then(
            show_progress="hidden", api_visibility="private", **live
        )
        dice.click(random_seed, outputs=seed, api_visibility="private").then(show_progress="hidden", api_visibility="private", **live)
    return demo


def no_controlnet_message(model_arg: str | None, engine: SDXSEngine) -> str:
    """What to do when the loaded model has no sketch ControlNet (no controlnet/ folder)."""
    builtin = builtin_model(engine.name)
    if builtin is None:
        return f"'{model_arg}' has no ControlNet; use {SKETCH_MODEL} or a folder with controlnet/."
    folder = f"models/{builtin.folder.name}"
    why = f"{SKETCH_MODEL} could not be loaded (see the warning above), and " if model_arg is None else ""
    return (
        f"{why}the built-in model '{builtin.name}' has no sketch ControlNet: {folder}/controlnet/ is missing, so the checkout "
        f"is incomplete or older than the built-in sketch model. Restore it (`git checkout -- {folder}`, or clone the "
        f"repository again), or pass --model a folder with controlnet/ (train/distill_controlnet.py writes one in "
        f"OUTPUT_DIR/final/), or run the 512 px sketch model: start once with network, or fetch it with "
        f"`hf download {SKETCH_MODEL}` and its base `hf download {get_spec(SKETCH_MODEL).base}`."
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SDXS sketch-to-image web app.")
    add_common_flags(parser, SKETCH_MODEL, builtin_fallback=True)
    parser.add_argument("--base", default=None, help="base pipeline for a bare ControlNet folder (default: the registry's, DreamShaper)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_malloc_arenas()  # before loading: a server's RSS stays flat under load
    configure_console()
    engine = load_engine_or_exit(args, default_model=SKETCH_MODEL, base=args.base)
    if engine.components.controlnet is None:
        print(f"error: {no_controlnet_message(args.model, engine)}", file=sys.stderr)
        return 2
    notice = fallback_notice(SKETCH_MODEL) if is_fallback(args.model, engine) else None
    launch(build_demo(engine, notice), args, max_queue=16, css=page_css(engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
