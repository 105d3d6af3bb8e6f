"""SDXS text-to-image Space: one step, real time. Runs on ZeroGPU, on a GPU, or on a laptop CPU.

    python app.py                            # IDKiro/sdxs-512-dreamshaper (+ its anime LoRA) from the HF cache/hub;
                                             # offline and not cached: the built-in mini model (models/mini-sdxs), with a notice
    python app.py --model mini               # the built-in 128 px emoji model (short prompts: "grinning face")
    python app.py --model tiny-model         # any local diffusers folder (python -m sdxs make-tiny tiny-model)
    python app.py --host 0.0.0.0 --port 7860 --share
"""

from __future__ import annotations

import argparse
import sys

import gradio as gr

from sdxs import DEFAULT_MODEL, MODELS, ModelNotFoundError, SDXSEngine
from sdxs.registry import ANIME_LORA, builtin_model
from sdxs.validation import MAX_SEED, clean_prompt, parse_count, parse_seed, random_seed
from sdxs.webapp import (add_common_flags, concurrency_limit, configure_console, display_name, errors_as_messages, fallback_notice, gpu,
                         is_fallback, launch, limit_malloc_arenas, load_engine_or_exit, prompt_for, request_runner, status_line,
                         warm_up_sizes)


MAX_IMAGES = 4
EXAMPLES = [
    "a close-up picture of an old man standing in the rain",
    "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece",
]
DECODER_LABELS = {"tiny": "Tiny (TAESD, fast)", "large": "Large (SD VAE, quality)"}
DISPLAY_SIZE = 512  # the side the gallery shows images at, about; smaller models' images are enlarged
# Browsers smooth an enlarged image (a 128 px emoji turns to mush); nearest-neighbour keeps its pixels sharp.
PIXELATED_GALLERY_CSS = "#gallery img { image-rendering: pixelated; }"


def enlarged(native_size: int) -> bool:
    """Whether the page shows a model's images larger than they are made (128 px emoji, not SDXS-512)."""
    return native_size < DISPLAY_SIZE


def gallery_css(native_size: int) -> str | None:
    """Style rules for a model whose images the gallery enlarges; None for 512 px models, whose
    images the browser scales smoothly as before."""
    return PIXELATED_GALLERY_CSS if enlarged(native_size) else None


def as_choices(engines: dict[str, SDXSEngine] | SDXSEngine) -> dict[str, SDXSEngine]:
    return {display_name(engines): engines} if isinstance(engines, SDXSEngine) else engines


def make_generate(engines: dict[str, SDXSEngine] | SDXSEngine, runners: dict | None = None):
    """The event handler: UI values in, (images, seed used, status line) out.

    `engines` maps a model label to an engine (or is one engine); style variants share every
    module but the U-Net, and each was built once at start-up, so no request mutates anything.
    `runners`: what each label's requests run on (sdxs.webapp.request_runner: a RequestBatcher on a
    GPU, which gathers concurrent requests into shared forwards); default: the engines.
    The values arrive as sent (the event runs with preprocess=False): every one is checked here,
    and any bad one becomes a gr.Error that says what to change; the server keeps serving."""
    engines = as_choices(engines)
    runners = runners or engines

    @gpu
    def run(style: str, prompt: str, seed: int, num_images: int, decoder: str):
        return runners[style].text_to_image(prompt, seed=seed, num_images=num_images, decoder=decoder)  # at the native size

    def generate(prompt, seed, randomize_seed, num_images, decoder, style=None):
        style = style if isinstance(style, str) and style in engines else next(iter(engines))  # a label, never a path
        with errors_as_messages():
            prompt, notes = clean_prompt(prompt)
            model_prompt = prompt_for(engines[style], prompt)  # the built-in model's template: "an emoji of ..."
            seed = random_seed() if randomize_seed is True else parse_seed(seed)
            num_images = parse_count(num_images, "Number of images", MAX_IMAGES)
            result = run(style, model_prompt, seed, num_images, decoder)
        notes += result.warnings
        for note in notes:
            gr.Warning(note)
        expanded = model_prompt if model_prompt != prompt else None
        # At the native size (a 128 px model's PNGs stay 128 px: the gallery's download gives them as
        # made; gallery_css enlarges them on the page without blur).
        return result.images, seed, status_line(result, engines[style], seed, notes, expanded_prompt=expanded)

    generate.runners = runners  # what serves the requests, for tests and the benchmark
    return generate


def build_demo(engines: dict[str, SDXSEngine] | SDXSEngine, notice: str | None = None, batch_requests: bool | None = None) -> gr.Blocks:
    """The page; `notice` (markdown), when given, is shown at the top (e.g. the built-in model's
    fallback notice). `batch_requests`: serve concurrent requests in shared forwards (default: on a
    GPU, see sdxs.webapp.batches_requests), else one at a time."""
    engines = as_choices(engines)
    runners = {style: request_runner(engine, batch_requests) for style, engine in engines.items()}
    generate = make_generate(engines, runners)
    first = next(iter(engines.values()))
    builtin = builtin_model(first.name)
    with gr.Blocks(title="SDXS one-step text-to-image") as demo:
        gr.Markdown(
            f"# SDXS: real-time one-step text-to-image\n"
            f"Model: **{display_name(first)}** on {first.device.type} ({str(first.dtype).removeprefix('torch.')}). "
            f"One U-Net step at t=999, no guidance; {first.native_size}x{first.native_size} pixels, the size it was trained at."
            + (f" Short prompts become the captions it was trained on: *{builtin.examples[0]}* is read as "
               f"`{builtin.expand_prompt(builtin.examples[0])}`." if builtin else "")
        )
        if notice:
            gr.Markdown(notice, elem_id="fallback-notice")
        with gr.Row():
            placeholder = f"e.g. {builtin.examples[0]}" if builtin else "Enter your prompt"
            prompt = gr.Textbox(label="Prompt", placeholder=placeholder, max_lines=2, scale=5, elem_id="prompt")
            run_button = gr.Button("Run", variant="primary", scale=1, elem_id="run")
        # A small model's images three to a row, however many: one image alone would fill the whole
        # width, enlarged past the gallery's height and cropped.
        small = enlarged(first.native_size)
        gallery = gr.Gallery(label="Images", format="png", columns=3 if small else 2, fit_columns=not small, height=560, object_fit="contain",
                             buttons=["download", "fullscreen"], elem_id="gallery")
        status = gr.Markdown(label="Status", elem_id="status")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            style = gr.Radio(list(engines), value=next(iter(engines)), label="Model", visible=len(engines) > 1, elem_id="style")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, info=f"A whole number from 0 to {MAX_SEED}", elem_id="seed")
                randomize_seed = gr.Checkbox(label="Randomise seed", value=True, elem_id="randomize")
            num_images = gr.Slider(label="Number of images", minimum=1, maximum=MAX_IMAGES, step=1, value=1)
            decoder = gr.Radio(
                [(DECODER_LABELS.get(d, d), d) for d in first.decoders],
                value=first.default_decoder,
                label="Image decoder",
                info="Tiny is fastest; large is the original SD decoder, slower, finer detail.",
            )
        gr.Examples(list(builtin.examples) if builtin else EXAMPLES, inputs=[prompt])
        gr.on(
            [prompt.submit, run_button.click],
            fn=generate,
            inputs=[prompt, seed, randomize_seed, num_images, decoder, style],
            outputs=[gallery, seed, status],
            api_name="generate",
            concurrency_limit=concurrency_limit(next(iter(runners.values()))),
            preprocess=False,  # raw values to `generate`, which checks them (sdxs.validation) with its own messages
        )
    return demo


def load_engines(args) -> dict[str, SDXSEngine]:
    """The base model, plus the LoRA style variant when one is asked for (or by default, the
    anime LoRA over the default DreamShaper). A LoRA that cannot be loaded is skipped, loudly.
    No --model: the default, or the built-in model when the default cannot be loaded."""
    engine = load_engine_or_exit(args, aot_batch_sizes=tuple(range(1, MAX_IMAGES + 1)))  # ZeroGPU: compiled for 1-4 images
    engines = {display_name(engine): engine}
    lora = args.lora if args.lora is not None else (ANIME_LORA if engine.name == DEFAULT_MODEL else "none")
    if lora != "none":
        try:
            variant = engine.with_lora(lora)
        except (ModelNotFoundError, ValueError, OSError) as err:
            print(f"warning: style LoRA '{lora}' not loaded, running without it: {err}", file=sys.stderr)
        else:
            if variant.backend != "torch":
                variant.warm_up(warm_up_sizes(variant))
            engines[MODELS[lora].title if lora in MODELS else f"{display_name(engine)} + {display_name(variant)}"] = variant
    return engines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SDXS text-to-image web app.")
    add_common_flags(parser, DEFAULT_MODEL, builtin_fallback=True)
    parser.add_argument("--lora", default=None, help=f"style LoRA offered as a second model (default: {ANIME_LORA} with the default model; 'none' to skip)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_malloc_arenas()  # before loading: a server's RSS stays flat under load
    configure_console()
    engines = load_engines(args)
    first = next(iter(engines.values()))
    notice = fallback_notice() if is_fallback(args.model, first) else None
    launch(build_demo(engines, notice), args, max_queue=32, css=gallery_css(first.native_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
