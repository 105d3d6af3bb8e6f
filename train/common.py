"""Shared training base of the SDXS stages: a few plain functions, no Trainer class.

- arguments and presets: `add_common_args`, `parse_args` (a preset fills every default it names;
  explicit flags win; --help shows each preset's value);
- teacher: `load_teacher` (hub id or local diffusers folder, through `resolve_model`: sdxs.loading's
  resolver with messages that name the script's flag), `model_fingerprint` (keys caches by content),
  `encode_prompts`, `sample_latents` (the teacher's multi-step sampler, DPM-Solver++ with CFG);
- data: a prompts file ("almost data-free") or an image-caption folder (Hugging Face imagefolder:
  images + metadata.jsonl), turned once into a cache of teacher latents (and teacher images) on disk:
  `read_sources`, `build_latent_cache`, `CachedSamples`, `make_loader` (a step-indexed sampler, so a
  resumed run sees exactly the batches it would have seen);
- run plumbing: `make_accelerator` (device, mixed precision, gradient accumulation, multi-GPU through
  `accelerate launch`), `step_generator` (per-step seeded noise), `ema_update`;
- checkpoints: `save_checkpoint` (accelerate state + meta.json with the step and the config, written to
  a temporary folder and renamed, keeping the last K), `find_checkpoint` / `load_checkpoint`
  (`--resume latest`);
- logging: `CsvLog`, `Progress` (tqdm with running losses), `save_image_grid`, `plot_loss_curve`;
- output: `save_sdxs_pipeline` (the final student in the released SDXS folder layout, via
  sdxs.build.save_pipeline_folder) and `atomic_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"
MAX_BAD_FRACTION = 0.05  # --max_bad_fraction's default: more unusable records than this in an image folder stop the run
# Settings a resumed run may change without --allow_changed: where, how often and until when it logs, samples,
# saves and stops, how it reads data and caches, how many bad steps it may skip. None changes what is trained.
RESUME_MAY_CHANGE = frozenset({
    "resume", "allow_changed", "output_dir", "max_steps", "stop_after_step", "stop_phase", "checkpoint_every",
    "keep_checkpoints", "log_every", "sample_every", "num_sample_images", "report_to", "num_workers", "num_threads",
    "cache_dir", "cache_batch_size", "skip_nonfinite", "max_bad_fraction",
})
SMOKE_PROMPTS = [
    "a photo of a cat",
    "a red bicycle leaning on a wall",
    "a bowl of ramen, studio lighting",
    "a mountain lake at sunrise",
    "portrait of an old sailor, oil painting",
    "a futuristic city at night, neon lights",
    "a watercolor of a fox in the snow",
    "a cup of coffee on a wooden table",
]


# --- arguments and presets -----------------------------------------------------------------------


# The mini reproduction's teacher (--preset mini's default --teacher): teacher v2, 128 px emoji, f=8 VAE, CFG U-Net.
EMOJI_TEACHER = Path(__file__).resolve().parents[1] / "models" / "emoji-teacher"

# What every stage's --preset mini shares: the emoji teacher's 128 px images on a 2-core CPU, fp32,
# both cores, resumable every few minutes. [ours] throughout: the paper has no such scale. (Teacher v1
# was 64 px with an f=4 VAE: train/reproduce_mini.py adds --resolution 64 and stage A's blocks for it.)
MINI_RUN = dict(
    resolution=128, num_samples=0, sampler_steps=25, guidance_scale=4.0, grad_accum=1, lr_warmup_steps=50,
    mixed_precision="no", gradient_checkpointing=False, num_threads=0, keep_checkpoints=2, log_every=10,
)

# What every stage's --preset smoke shares: tiny data, fp32, one thread, a log row every step.
SMOKE_RUN = dict(
    resolution=64, num_samples=8, sampler_steps=2, guidance_scale=2.0, batch_size=4, grad_accum=1, lr_warmup_steps=0,
    mixed_precision="no", gradient_checkpointing=False, num_threads=1, ema_decay=0.9, keep_checkpoints=2, log_every=1,
    sample_every=10,
)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every stage shares. Those whose help ends in "(preset)" default to the --preset's value (parse_args)."""
    run = parser.add_argument_group("run")
    run.add_argument("--preset", required=True,
                     help="smoke: tiny models, seconds on a CPU (what the tests run); smoke-sdxl: the same on a tiny SDXL-shaped "
                          "teacher (SDXS-1024's path); mini: the bundled emoji teacher on a CPU (train/reproduce_mini.py); "
                          "paper: SD-scale defaults for GPUs (SDXS-512); paper-1024: SDXL-scale defaults (SDXS-1024). "
                          "Every flag showing [preset ...] takes the chosen preset's value unless given.")
    run.add_argument("--output_dir", required=True, help="run folder: checkpoints/, samples/, log.csv, loss_curve.png, final/")
    run.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialisation (default 0)")
    run.add_argument("--resume", default=None,
                     help="'latest' (the newest complete checkpoint in OUTPUT_DIR/checkpoints; starts fresh if none) or a checkpoint folder")
    run.add_argument("--allow_changed", default="",
                     help="KEY,...: settings (flag names without --) that --resume may continue with changed values; "
                          "any other change from the checkpoint's settings is refused (default: none)")
    run.add_argument("--max_steps", type=int, help="optimizer steps in total, counting resumed ones")
    run.add_argument("--stop_after_step", type=int, default=None,
                     help="testing aid: exit right after this step without the final save, as a killed run would (default: off)")
    run.add_argument("--overfit_batch", action="store_true",
                     help="debug: train on the first batch with the same noise at every step; the loss must then fall")

    data = parser.add_argument_group("teacher and data")
    data.add_argument("--teacher", default=None,
                      help="teacher pipeline: hub id or local diffusers folder (SD-1.5 family, e.g. Lykon/dreamshaper-8, or "
                           "SD-2.1-base). With --preset smoke and no --teacher, a tiny random teacher is built in OUTPUT_DIR/tiny-teacher")
    data.add_argument("--prompts", default=None,
                      help="text file, one prompt per line: latents come from the teacher's sampler (the paper's 'almost data-free' "
                           "setting). With --preset smoke and no data given, 8 built-in prompts are used")
    data.add_argument("--image_folder", default=None,
                      help="image-caption folder in the Hugging Face imagefolder convention: images + metadata.jsonl "
                           "with 'file_name' and a caption column")
    data.add_argument("--caption_column", default="text", help="caption key in metadata.jsonl (default 'text')")
    data.add_argument("--max_bad_fraction", type=float, default=MAX_BAD_FRACTION,
                      help="an image folder's records with an undecodable image or no caption are skipped and counted; "
                           f"above this fraction of them the run is refused (default {MAX_BAD_FRACTION})")
    data.add_argument("--latents", choices=["sample", "encode"], default=None,
                      help="where latents come from: 'sample' runs the teacher's sampler on the prompts (or the folder's captions), "
                           "'encode' encodes the folder's images with the teacher VAE (faster). Default: sample for --prompts, "
                           "encode for --image_folder")
    data.add_argument("--num_samples", type=int, help="use only N prompts/images: the first N of --prompts, or a fixed pseudo-random N of "
                      "--image_folder's records spread over the folder; 0 = all (preset)")
    data.add_argument("--resolution", type=int, help="image side in pixels; latents are resolution/8 (preset)")
    data.add_argument("--sampler_steps", type=int, help="teacher sampler steps (DPM-Solver++) when generating latents (preset)")
    data.add_argument("--guidance_scale", type=float, help="teacher classifier-free guidance when generating latents (preset)")
    data.add_argument("--cache_dir", default=None,
                      help="where teacher latents/images are cached (default OUTPUT_DIR/cache); reused by later runs with the same settings")
    data.add_argument("--cache_batch_size", type=int, default=8, help="batch size of the teacher while building the cache (default 8)")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes reading the cache (default 0)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, help="samples per device per micro-step (preset)")
    opt.add_argument("--grad_accum", type=int, help="micro-steps per optimizer step; global batch = batch_size x grad_accum x GPUs (preset)")
    opt.add_argument("--lr", type=float, help="AdamW learning rate of the student (preset)")
    opt.add_argument("--lr_warmup_steps", type=int, help="linear warm-up steps, then constant (preset)")
    opt.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default 1.0)")
    opt.add_argument("--skip_nonfinite", type=int, default=0,
                     help="skip up to N optimizer steps whose loss or gradient norm is NaN/inf (as AMP's grad scaler does) "
                          "before stopping the run; 0 = stop at the first (default 0)")
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                     help="autocast precision of the student; frozen teacher parts run in this dtype; 'no' on a CPU (preset)")
    opt.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="recompute activations in the backward pass: less memory, ~30%% slower (preset)")
    opt.add_argument("--num_threads", type=int,
                     help="torch CPU threads (intra-op), 0 = torch's default; tiny smoke models run as fast on 1 and far "
                          "better on a shared CPU (preset)")
    opt.add_argument("--ema_decay", type=float, help="EMA of the student weights, 0 = off; the final model is the EMA when on (preset)")

    log = parser.add_argument_group("checkpoints and logging")
    log.add_argument("--checkpoint_every", type=int, help="save a resumable checkpoint every N steps (preset)")
    log.add_argument("--keep_checkpoints", type=int, help="keep only the last K checkpoints (preset)")
    log.add_argument("--log_every", type=int, help="write a log.csv row (and TensorBoard scalars) every N steps (preset)")
    log.add_argument("--sample_every", type=int, help="write a sample grid to samples/ every N steps, 0 = only at the end (preset)")
    log.add_argument("--num_sample_images", type=int, default=4, help="images per row of the sample grid (default 4)")
    log.add_argument("--report_to", choices=["none", "tensorboard"], default="none",
                     help="extra tracker besides log.csv: tensorboard writes OUTPUT_DIR/tensorboard (needs `pip install tensorboard`)")


def parse_args(parser: argparse.ArgumentParser, presets: dict[str, dict], argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; every default a preset names comes from the chosen preset, explicit flags win."""
    keys = set(presets["smoke"])
    assert all(set(p) == keys for p in presets.values()), "every preset must set the same keys"
    next(a for a in parser._actions if a.dest == "preset").choices = list(presets)  # each stage has its own
    for action in parser._actions:  # show each preset's value in --help
        if action.dest in keys:
            shown = "; ".join(f"{name}: {_flag_text(preset[action.dest])}" for name, preset in presets.items())
            action.help = f"{(action.help or '').replace(' (preset)', '')} [preset {shown}]"
    known, _ = parser.parse_known_args(argv)
    if known.preset in presets:
        parser.set_defaults(**presets[known.preset])
    args = parser.parse_args(argv)
    missing = [k for k in keys if getattr(args, k, None) is None]
    assert not missing, f"preset {args.preset} leaves {missing} unset"
    if args.resolution % 64:
        parser.error(f"--resolution must be a multiple of 64 (latents are 1/8 of it and the teacher U-Net halves them "
                     f"three times); got {args.resolution}.")
    for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}.")
    if args.prompts and args.image_folder:
        parser.error("give --prompts or --image_folder, not both.")
    if not 0 <= args.max_bad_fraction <= 1:
        parser.error(f"--max_bad_fraction must be between 0 and 1; got {args.max_bad_fraction}.")
    return args


def _flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def quiet_libraries() -> None:
    """Keep library notices and load bars off the terminal; our own progress bar stays."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --- teacher -------------------------------------------------------------------------------------


def resolve_teacher(teacher: str | None, preset: str, output_dir: Path, accelerator) -> str:
    """--teacher, or without one: under --preset smoke a tiny random SD-style teacher built once in
    OUTPUT_DIR/tiny-teacher (train/tiny_teacher.py), under smoke-sdxl a tiny SDXL-shaped one in
    OUTPUT_DIR/tiny-sdxl-teacher, under --preset mini the bundled models/emoji-teacher, under paper-1024
    SDXL base (stabilityai/stable-diffusion-xl-base-1.0)."""
    if teacher:
        return teacher
    if preset == "mini":
        return str(EMOJI_TEACHER)
    if preset == "paper-1024":  # SDXS-1024's teacher, from the HF cache (or the hub when online)
        from sdxs.registry import SDXL_BASE

        if accelerator.is_main_process:
            print(f"--preset paper-1024: teacher {SDXL_BASE} (give --teacher for another SDXL-family pipeline).", file=sys.stderr)
        return SDXL_BASE
    if not is_smoke(preset):
        raise SystemExit("--teacher is required with --preset paper: a hub id or diffusers folder of an SD-style pipeline, "
                         "e.g. Lykon/dreamshaper-8 (SD-1.5 family) or an SD-2.1-base folder.")
    from train.tiny_teacher import ensure_tiny_teacher

    family = "sdxl" if preset == "smoke-sdxl" else "sd"
    dest = Path(output_dir) / ("tiny-sdxl-teacher" if family == "sdxl" else "tiny-teacher")
    if accelerator.is_main_process:
        ensure_tiny_teacher(dest, family=family)
    accelerator.wait_for_everyone()
    return str(dest)


def is_smoke(preset: str) -> bool:
    """The smoke presets (smoke, smoke-sdxl): tiny random models and the built-in prompts."""
    return preset.startswith("smoke")


@dataclass
class Teacher:
    """The frozen parts of a teacher pipeline: SD-style, or SDXL-family with a second tokenizer and
    text encoder (tokenizer_2/, text_encoder_2/: CLIPTextModelWithProjection, the pooled embedding)."""

    root: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module | None
    vae: torch.nn.Module  # AutoencoderKL, always fp32 (SD VAEs overflow in fp16)
    scheduler_config: dict
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    zeros_for_empty_prompt: bool = False  # model_index.json's force_zeros_for_empty_prompt (SDXL base: true)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    def prompt_encoder(self, image_size: int) -> "PromptEncoder":
        """Prompts -> what this teacher's U-Net reads, for images of image_size x image_size pixels."""
        if self.is_sdxl:
            return PromptEncoder((self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2), image_size,
                                 self.zeros_for_empty_prompt)
        return PromptEncoder((self.tokenizer,), (self.text_encoder,), image_size)


@dataclass
class TextCond:
    """What a U-Net reads of a batch of prompts. SD: the text states (B, 77, D). SDXL: both encoders'
    states concatenated, plus `added` = {text_embeds: the pooled embedding (B, P), time_ids: the size and
    crop micro-conditioning (B, 6)}, which its U-Net takes as added_cond_kwargs. Indexing, expand, cat and
    to() act on every part at once, so no code path can pair one sample's text with another's pooled embedding."""

    states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.states)

    @property
    def device(self) -> torch.device:
        return self.states.device

    def unet_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.states, **({"added_cond_kwargs": self.added} if self.added is not None else {})}

    def _map(self, fn) -> "TextCond":
        return TextCond(fn(self.states), None if self.added is None else {k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, index) -> "TextCond":
        """Rows: an int gives that row as a batch of one; a slice, index tensor or boolean mask selects rows."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"row {index} of a batch of {len(self)}")
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda x: x[index])

    def expand(self, n: int) -> "TextCond":
        """A batch of one as a batch of n (the unconditional prompt of a batch)."""
        if len(self) != 1:
            raise ValueError(f"expand takes a batch of one, not {len(self)}")
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def to(self, *args, **kwargs) -> "TextCond":
        return self._map(lambda x: x.to(*args, **kwargs))

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        added = None if conds[0].added is None else {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
        return TextCond(torch.cat([c.states for c in conds]), added)


def as_cond(cond: "TextCond | torch.Tensor") -> TextCond:
    """A TextCond as it is; a bare tensor is SD text states."""
    return cond if isinstance(cond, TextCond) else TextCond(cond)


@dataclass
class PromptEncoder:
    """Prompts -> TextCond, as the teacher's pipeline conditions its U-Net. SD: encode_prompts. SDXL (two
    encoders): encode_sdxl_prompts, plus the micro-conditioning of an uncropped image_size x image_size
    image (sdxl_added_cond: training latents are whole images at that size, as the engine generates).
    With zeros_for_empty (SDXL base's force_zeros_for_empty_prompt) the empty prompt is all-zero text
    states and pooled embedding: StableDiffusionXLPipeline's CFG negative, so a dropped caption (stage B)
    and the negative of every guided sampler here are the same unconditional input."""

    tokenizers: tuple
    text_encoders: tuple
    image_size: int
    zeros_for_empty: bool = False

    def __call__(self, prompts: list[str]) -> TextCond:
        if len(self.text_encoders) == 1:
            return TextCond(encode_prompts(self.tokenizers[0], self.text_encoders[0], prompts))
        states, pooled = encode_sdxl_prompts(self.tokenizers, self.text_encoders, prompts)
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts], device=states.device)
            states, pooled = states.masked_fill(empty.view(-1, 1, 1), 0), pooled.masked_fill(empty.view(-1, 1), 0)
        size = (self.image_size, self.image_size)
        return TextCond(states, sdxl_added_cond(pooled, size, size))

    def unconditional(self) -> TextCond:
        """Classifier-free guidance's negative, a batch of one: the empty prompt's conditions."""
        return self([""])


def resolve_model(model: str, flag: str, *, subfolders_with_weights: tuple[str, ...] = ()) -> Path:
    """sdxs.loading.resolve_model_dir for a training script's flag: a model that is neither a folder nor
    fetchable stops the run with the loader's message, naming this script's flag (--teacher, --student,
    --psi_teacher, --tiny_decoder, ...) where the loader's says --model, and without the loader's list of
    the released one-step models (which are no teachers)."""
    from sdxs.loading import ModelNotFoundError, resolve_model_dir
    from sdxs.registry import MODELS

    try:
        return resolve_model_dir(model, subfolders_with_weights=subfolders_with_weights)
    except ModelNotFoundError as err:
        message = str(err).replace("--model", flag).replace(f" ({', '.join(MODELS)})", "")
        raise SystemExit(f"error: {flag} {model}: {message}") from None


def vae_factor(vae_config) -> int:
    """Pixels per latent side of an AutoencoderKL config: 2 ** (stages - 1); 8 for SD, 4 for the emoji teacher."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def teacher_vae_factor(root: Path) -> int:
    """vae_factor of a teacher pipeline folder's AutoencoderKL (vae_large/ in the SDXS layout, else vae/)."""
    vae_dir = root / "vae_large" if (root / "vae_large").is_dir() else root / "vae"
    return vae_factor(json.loads((vae_dir / "config.json").read_text()))


def teacher_native_size(root: Path) -> int:
    """The image side a teacher pipeline folder is trained at: its U-Net's latent side x its VAE factor
    (the emoji teachers: 16 x 4 = 64 for v1, 16 x 8 = 128 for v2; SD-1.5: 64 x 8 = 512)."""
    sample_size = json.loads((Path(root) / "unet" / "config.json").read_text())["sample_size"]
    return int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size) * teacher_vae_factor(Path(root))


def data_side(root: Path) -> int:
    """The image side of the emoji set a teacher folder is trained on: its own (128 px for v2, 64 for v1), or
    the mini preset's when its configs cannot tell (the teacher's own check then says what is wrong)."""
    try:
        return teacher_native_size(Path(root))
    except (OSError, ValueError, KeyError, TypeError):
        return MINI_RUN["resolution"]


def load_teacher(model: str, device: torch.device, dtype: torch.dtype, *, unet: bool = True, flag: str = "--teacher") -> Teacher:
    """Load a teacher (hub id or local diffusers folder) frozen, in eval mode, on `device`.

    The folder is found by sdxs.loading.resolve_model_dir (the project's loader: HF cache, HF_HOME and
    HF_HUB_OFFLINE respected); each part is read with diffusers/transformers from_pretrained. A pipeline
    in the SDXS layout (tiny vae/ + vae_large/) works too: its AutoencoderKL is taken from vae_large/.
    An SDXL-family pipeline (text_encoder_2/) brings its second tokenizer and text encoder.
    `flag` is the script's flag that named the model, for the error messages.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = resolve_model(model, flag, subfolders_with_weights=("unet", "text_encoder", "vae"))
    missing = [sub for sub in ("tokenizer", "text_encoder", "scheduler", "vae", *(["unet"] if unet else [])) if not (root / sub).is_dir()]
    sdxl = (root / "text_encoder_2").is_dir()
    if sdxl and not (root / "tokenizer_2").is_dir():
        missing.append("tokenizer_2 (it has text_encoder_2/)")
    if missing:
        raise SystemExit(f"{flag} {model} ({root}) is not a pipeline folder in diffusers layout: missing {', '.join(missing)}.")
    if unet and not sdxl and json.loads((root / "unet" / "config.json").read_text()).get("addition_embed_type") == "text_time":
        raise SystemExit(f"{flag} {model}: its U-Net takes SDXL's text_time conditioning, but the folder has no text_encoder_2/ "
                         "and tokenizer_2/ to make it; give the whole SDXL pipeline folder.")
    vae_dir = root / "vae_large" if (root / "vae_large").is_dir() else root / "vae"
    vae_class = json.loads((vae_dir / "config.json").read_text()).get("_class_name")
    if vae_class != "AutoencoderKL":
        raise SystemExit(f"{flag} {model}: {vae_dir} holds a {vae_class}; the teacher's decoder must be an AutoencoderKL.")
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    teacher = Teacher(
        root=root,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype) if unet else None,
        vae=AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32),
        scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2") if sdxl else None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", torch_dtype=dtype) if sdxl else None,
        # diffusers' StableDiffusionXLPipeline defaults it to True when model_index.json does not say
        zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)) if sdxl else False,
    )
    for module in (*teacher.text_encoders, teacher.unet, teacher.vae):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return teacher


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text states as SD conditions on them: the last hidden state of the padded 77 tokens."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_sdxl_prompts(tokenizers, text_encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text conditions as SDXL conditions on them (diffusers' StableDiffusionXLPipeline.encode_prompt):
    each encoder's penultimate hidden state over the padded 77 tokens, concatenated (768 + 1280 = 2048 for
    CLIP-L + OpenCLIP-bigG), and the pooled, projected embedding of the last encoder
    (CLIPTextModelWithProjection's text_embeds). Returns (states, pooled)."""
    states, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: its projected pooled embedding
    if pooled is None or pooled.ndim != 2:
        raise ValueError("the last SDXL text encoder must return a pooled embedding (a CLIPTextModelWithProjection, text_encoder_2/)")
    return torch.cat(states, dim=-1), pooled


def sdxl_added_cond(pooled: torch.Tensor, original_size: tuple[int, int], target_size: tuple[int, int],
                    crop_top_left: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning for the text_time added embedding, as the SDXL pipeline builds it:
    text_embeds = the pooled embedding, time_ids = (original h, w, crop top, left, target h, w) per sample."""
    time_ids = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(len(pooled), -1)}


@torch.no_grad()
def sample_latents(unet, scheduler_config: dict, cond: TextCond | torch.Tensor, uncond: TextCond | torch.Tensor | None,
                   noise: torch.Tensor, steps: int, guidance_scale: float) -> torch.Tensor:
    """The teacher's multi-step sampler: DPM-Solver++(2M) on the teacher's noise schedule, with
    classifier-free guidance when guidance_scale > 1. cond/uncond: TextCond (or SD text states), one row
    per noise. Returns clean latents in U-Net space (scaled)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    guided = guidance_scale > 1 and uncond is not None
    conditions = TextCond.cat([as_cond(uncond), as_cond(cond)]) if guided else as_cond(cond)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        eps = unet(x.to(unet.dtype), t, **conditions.unet_kwargs()).sample.float()
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def one_step_scheduler(scheduler_config: dict):
    """The scheduler a one-step SDXS folder ships: DEIS on the teacher's noise schedule, linspace
    spacing, so one step lands on t=999 (as in IDKiro/sdxs-512-dreamshaper)."""
    from diffusers import DEISMultistepScheduler

    keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    keep = {k: keep[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                                 "steps_offset", "trained_betas") if k in keep}
    return DEISMultistepScheduler.from_config({**keep, "timestep_spacing": "linspace"})


# --- data ----------------------------------------------------------------------------------------


@dataclass
class Source:
    """What the cache is built from: one prompt per sample, and an image path when encoding images."""

    prompts: list[str]
    images: list[Path] | None
    mode: str  # "sample" or "encode"
    fingerprint: str  # hash of the source's content
    records: list[dict] | None = None  # an image folder's kept metadata lines, aligned with prompts
    report: dict | None = None  # an image folder's DataReport.as_dict(): what was kept and skipped


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class DataReport:
    """What read_sources kept and skipped of an image-caption folder: each skipped record as a short
    label ("bad.png", "line 7") with its reason."""

    folder: str
    examined: int = 0
    kept: int = 0
    undecodable: list[tuple[str, str]] | None = None  # (label, reason): missing, not an image, truncated ...
    no_caption: list[tuple[str, str]] | None = None  # (label, reason): no caption key, empty caption, no metadata line

    def __post_init__(self):
        self.undecodable = list(self.undecodable or [])
        self.no_caption = list(self.no_caption or [])

    @property
    def skipped(self) -> int:
        return len(self.undecodable) + len(self.no_caption)

    def summary(self, examples: int = 3) -> str:
        """One line: "data: skipped 2 of 50 records in DIR (1 undecodable image: bad.png; 1 without a caption: line 7)"."""
        parts = []
        for items, one, many in ((self.undecodable, "undecodable image", "undecodable images"),
                                 (self.no_caption, "without a caption", "without a caption")):
            if items:
                names = ", ".join(label for label, _ in items[:examples]) + (", ..." if len(items) > examples else "")
                parts.append(f"{len(items)} {one if len(items) == 1 else many}: {names}")
        return f"data: skipped {self.skipped} of {self.examined} records in {self.folder} ({'; '.join(parts)})"

    def details(self, examples: int = 5) -> str:
        """The first few skipped records with their reasons, one per line."""
        items = (self.undecodable + self.no_caption)[:examples]
        return "\n".join(f"  {label}: {reason}" for label, reason in items)

    def as_dict(self) -> dict:
        return {"folder": self.folder, "examined": self.examined, "kept": self.kept, "skipped": self.skipped,
                "undecodable": [f"{label}: {reason}" for label, reason in self.undecodable],
                "without_caption": [f"{label}: {reason}" for label, reason in self.no_caption]}


def read_sources(prompts_file: str | None, image_folder: str | None, caption_column: str, latents: str | None,
                 num_samples: int, default_prompts: list[str] | None = None, *, max_bad_fraction: float = MAX_BAD_FRACTION) -> Source:
    """Read a prompts file or an imagefolder (images + metadata.jsonl); `default_prompts` when neither.

    In an image folder, records whose image does not decode (missing, not an image, truncated) or
    that have no caption (no caption key, an empty caption, an image without a metadata line) are
    skipped, counted, and summed up in one line on stderr and in Source.report; when more than
    `max_bad_fraction` of the records examined are bad the run is refused (see read_image_folder).
    """
    if prompts_file and image_folder:
        raise SystemExit("Give --prompts or --image_folder, not both.")
    records = report = None
    if image_folder:
        records, images, report, fingerprint = read_image_folder(Path(image_folder), caption_column, num_samples, max_bad_fraction)
        prompts = [r[caption_column] for r in records]
        mode = latents or "encode"
    else:
        if prompts_file:
            content = Path(prompts_file).read_bytes()
            prompts = [p.strip() for p in content.decode("utf-8").splitlines() if p.strip()]
        elif default_prompts:
            prompts = list(default_prompts)
            content = "\n".join(prompts).encode()
        else:
            raise SystemExit("No data: pass --prompts FILE (one prompt per line) or --image_folder DIR (images + metadata.jsonl).")
        images = None
        if latents == "encode":
            raise SystemExit("--latents encode needs images: pass --image_folder.")
        mode = "sample"
        prompts = prompts[:num_samples] if num_samples else prompts
        fingerprint = hashlib.sha1(content).hexdigest()[:16]
    if not prompts:
        raise SystemExit("The data source is empty.")
    return Source(prompts, images if mode == "encode" else None, mode, fingerprint, records, report.as_dict() if report else None)


def check_image(path: Path) -> str | None:
    """None when the file at `path` decodes as an image, else the reason it does not. Both PIL checks
    are needed: verify() reads the whole file and checks a PNG's chunk checksums (it catches a PNG cut
    short even where its pixels still decode) but passes a truncated JPEG; load() decodes the pixels and
    catches that. About 0.4 ms for a 64 px PNG, 10 ms for a 512 px PNG on one core (train/README.md)."""
    from PIL import Image

    if not Path(path).is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # verify() leaves the image unusable: open it again to decode
            image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ... for bad files
        return f"{type(err).__name__}: {err}"
    return None


def _parse_metadata(meta: Path) -> list[tuple[int, dict | None, str]]:
    """(line number, record or None, why not) for every non-blank line of metadata.jsonl."""
    parsed = []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            parsed.append((number, None, f"not a JSON line ({err.msg})"))
            continue
        parsed.append((number, record, "") if isinstance(record, dict) else (number, None, "not a JSON object"))
    return parsed


def read_image_folder(folder: Path, caption_column: str, num_samples: int, max_bad_fraction: float
                      ) -> tuple[list[dict], list[Path], DataReport, str]:
    """The usable records of an imagefolder in metadata order (0 = all of them; `num_samples` > 0: that many,
    a fixed pseudo-random choice spread over the folder, since data sets such as the emoji one are sorted by
    style and category), their image paths, what was skipped, and a fingerprint of what was kept. Every image is decoded once
    here (check_image, on a few threads), so a bad file is found now rather than hours into a run.
    Images in the folder that no metadata line names count as records without a caption when the whole
    folder is read. Refuses (SystemExit) when more than `max_bad_fraction` of the records examined are bad."""
    from concurrent.futures import ThreadPoolExecutor

    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise SystemExit(f"{folder} has no metadata.jsonl: an imagefolder holds images plus one JSON line per image, "
                         f'e.g. {{"file_name": "0001.png", "{caption_column}": "a photo of a cat"}}.')
    parsed = _parse_metadata(meta)
    if parsed and not any(record and caption_column in record for _, record, _ in parsed):
        keys = sorted({k for _, record, _ in parsed if record for k in record})
        raise SystemExit(f"{meta}: no line has the caption key '{caption_column}' (see --caption_column); the keys found are "
                         f"{', '.join(keys) or 'none'}.")
    report, kept, images, seen = DataReport(str(folder)), [], [], set()
    candidates = parsed
    if num_samples and num_samples < len(parsed):  # examined in a seeded order, so a bad record gives way to another
        candidates = random.Random(0).sample(parsed, len(parsed))

    def problem(entry) -> tuple[str, str, str] | None:
        """(kind, label, reason) of a bad record, None for a usable one; decodes the image."""
        number, record, why = entry
        if record is None:
            return "no_caption", f"line {number}", why
        name = record.get("file_name")
        if not isinstance(name, str) or not name:
            return "undecodable", f"line {number}", "no 'file_name'"
        caption = record.get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            reason = f"no '{caption_column}'" if caption_column not in record else f"empty or non-text caption {caption!r}"
            return "no_caption", f"line {number} ({name})", reason
        reason = check_image(folder / name)
        return ("undecodable", name, reason) if reason else None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        chunk = 64
        for start in range(0, len(candidates), chunk):
            part = candidates[start : start + chunk]
            for entry, bad in zip(part, pool.map(problem, part)):
                if num_samples and report.kept == num_samples:
                    break
                report.examined += 1
                if entry[1] is not None and isinstance(entry[1].get("file_name"), str):
                    seen.add(os.path.normpath(folder / entry[1]["file_name"]))
                if bad is None:
                    kept.append(entry)
                    report.kept += 1
                else:
                    getattr(report, bad[0]).append(bad[1:])
            if num_samples and report.kept == num_samples:
                break
    kept = [record for _, record, _ in sorted(kept, key=lambda entry: entry[0])]  # back in metadata order
    images = [folder / record["file_name"] for record in kept]
    if not num_samples or report.kept < num_samples:  # the whole folder was read: images no line names
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            if os.path.normpath(path) not in seen:
                report.examined += 1
                report.no_caption.append((str(path.relative_to(folder)), "no metadata line"))
    _refuse_bad_data(report, meta, max_bad_fraction)
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    # What was kept, with each image's size: fixing a bad image or replacing one changes the cache key.
    content = json.dumps([[r, p.stat().st_size] for r, p in zip(kept, images)], sort_keys=True).encode()
    return kept, images, report, hashlib.sha1(content).hexdigest()[:16]


def _refuse_bad_data(report: DataReport, meta: Path, max_bad_fraction: float) -> None:
    """SystemExit when more than `max_bad_fraction` of the records are bad (or none is usable)."""
    if not report.examined:
        raise SystemExit(f"The data source is empty: {meta} has no records.")
    if report.kept and report.skipped <= max_bad_fraction * report.examined:
        return
    raise SystemExit(
        f"error: {report.summary()}: {report.skipped / max(1, report.examined):.0%} of the records are unusable, more than "
        f"--max_bad_fraction {max_bad_fraction}. The first ones:\n{report.details()}\n"
        f"Fix or remove those images and their lines in {meta} (a record needs a 'file_name' that decodes and a non-empty "
        f"caption; empty captions are skipped), or pass a larger --max_bad_fraction to train on the usable "
        f"{report.kept} record(s).")


def write_data_report(output_dir: Path, reports: dict[str, dict | None]) -> Path:
    """OUTPUT_DIR/data_report.json: what each image folder of the run kept and skipped (Source.report), by name."""
    path = Path(output_dir) / "data_report.json"
    path.write_text(json.dumps({name: report for name, report in reports.items() if report is not None}, indent=2) + "\n")
    return path


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image, shorter side resized to `resolution`, centre-cropped, as a (3, H, W) tensor in [-1, 1]."""
    from PIL import Image

    try:
        image = Image.open(path).convert("RGB")
    except Exception as err:  # read_sources skips undecodable images, so this one changed since, or was never checked
        raise SystemExit(f"error: cannot decode the image {path} ({type(err).__name__}: {err}). Fix or remove it and its "
                         f"metadata line, then run again (a run reading an image folder skips such files when it starts).") from None
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def cache_folder(cache_dir: Path, teacher_root: Path, source: Source, *, resolution: int, sampler_steps: int,
                 guidance_scale: float, with_images: bool, seed: int) -> Path:
    """The cache folder of these settings: its name hashes everything that changes its content, so
    runs with the same teacher, data and sampler share one cache safely."""
    settings = cache_settings(teacher_root, source, resolution=resolution, sampler_steps=sampler_steps,
                              guidance_scale=guidance_scale, with_images=with_images, seed=seed)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{source.mode}-{digest}"


def cache_settings(teacher_root, source, *, resolution, sampler_steps, guidance_scale, with_images, seed) -> dict:
    """What a teacher cache's content depends on: the teacher (its path and its content, so a teacher
    retrained at the same path gets a new cache), the data, and the sampler."""
    return dict(teacher=str(teacher_root), teacher_content=model_fingerprint(teacher_root), source=source.fingerprint,
                mode=source.mode, n=len(source.prompts), resolution=resolution, seed=seed, with_images=with_images,
                sampler=["dpmsolver++", sampler_steps, guidance_scale] if source.mode == "sample" else None)


_NOT_MODEL_FILES = (".md", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".csv", ".log")  # a model card or its pictures change no output


def model_fingerprint(root: Path) -> str:
    """A hash of a model folder's content, cheap even for GB of weights, to key caches by what a model
    is rather than where it lies: every file's path and size; small files (configs, tokenizer files) whole;
    each safetensors file's header (names, dtypes, shapes) and the first, middle and last 64 bytes of every
    tensor in it (retraining changes every tensor); other large files (.bin, .ckpt) by size and mtime.
    Hidden files and folders (.cache/ of a hub download) and documents (README.md, pictures, logs) are left out. A change confined to the middle of
    a tensor (a few rows of an embedding) can go unseen: pass a new --cache_dir then."""
    root = Path(root)
    digest = hashlib.sha1()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in _NOT_MODEL_FILES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        if path.suffix == ".safetensors":
            digest.update(_safetensors_sample(path))
        elif size <= 1 << 20:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def _safetensors_sample(path: Path) -> bytes:
    """The header of a safetensors file and 3 x 64 bytes of each tensor (its first, middle and last)."""
    sample = []
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header_bytes = f.read(header_size)
            header = json.loads(header_bytes)
            sample.append(header_bytes)
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                for offset in sorted({begin, max(begin, (begin + end) // 2 - 32), max(begin, end - 64)}):
                    f.seek(8 + header_size + offset)
                    sample.append(f.read(min(64, end - offset)))
    except (OSError, ValueError, KeyError, TypeError):  # not a readable safetensors file: its mtime stands in
        sample.append(str(path.stat().st_mtime_ns).encode())
    return b"".join(sample)


def cache_is_complete(folder: Path) -> bool:
    return (Path(folder) / "meta.json").is_file()


def _sample_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The noise of sample `index` depends only on (seed, index): any sharding builds the same cache."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def build_latent_cache(teacher: Teacher, source: Source, folder: Path, *, resolution: int, sampler_steps: int,
                       guidance_scale: float, with_images: bool, seed: int, batch_size: int, accelerator) -> Path:
    """Turn the data source into one .pt file per sample in `folder` (see cache_folder):
    {"latents": fp16 (4, r/8, r/8) in U-Net space (scaled), "prompt": str, and with_images: "image":
    uint8 (3, r, r), the TEACHER decoder's image of those latents}. Latents come from the teacher's
    sampler (mode "sample") or from encoding the folder's images with the teacher VAE ("encode").

    Sharded over processes and written file by file atomically, so a killed build resumes where it
    stopped; meta.json marks a complete cache.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    if cache_is_complete(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device, sf, side = accelerator.device, teacher.vae.config.scaling_factor, resolution // vae_factor(teacher.vae.config)
    todo = [i for i in range(len(source.prompts)) if i % accelerator.num_processes == accelerator.process_index
            and not (folder / f"{i:07d}.pt").is_file()]
    encode = teacher.prompt_encoder(resolution)
    uncond = encode.unconditional() if source.mode == "sample" else None
    for start in tqdm(range(0, len(todo), batch_size), desc="teacher cache", disable=not todo or not accelerator.is_local_main_process):
        ids = todo[start : start + batch_size]
        prompts = [source.prompts[i] for i in ids]
        with torch.no_grad():
            if source.mode == "sample":
                noise = torch.cat([_sample_noise((1, 4, side, side), seed, i) for i in ids]).to(device)
                latents = sample_latents(teacher.unet, teacher.scheduler_config, encode(prompts), uncond.expand(len(ids)),
                                         noise, sampler_steps, guidance_scale)
            else:
                pixels = torch.stack([load_image(source.images[i], resolution) for i in ids]).to(device)
                posterior = teacher.vae.encode(pixels).latent_dist
                noise = torch.cat([_sample_noise((1, *posterior.mean.shape[1:]), seed, i) for i in ids]).to(device)
                latents = (posterior.mean + posterior.std * noise) * sf
            images = to_uint8(teacher.vae.decode(latents.float() / sf).sample) if with_images else None
        for k, i in enumerate(ids):
            item = {"latents": latents[k].to(torch.float16).cpu(), "prompt": prompts[k]}
            if images is not None:
                item["image"] = images[k].clone()
            torch.save(item, folder / f".{i:07d}.tmp")
            os.replace(folder / f".{i:07d}.tmp", folder / f"{i:07d}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        settings = cache_settings(teacher.root, source, resolution=resolution, sampler_steps=sampler_steps,
                                  guidance_scale=guidance_scale, with_images=with_images, seed=seed)
        (folder / "meta.json").write_text(json.dumps({**settings, "data_report": source.report}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return folder


class CachedSamples(torch.utils.data.Dataset):
    """The teacher cache as a dataset: {"latents": float32, "prompt": str[, "image": float32 in [-1, 1]]}."""

    def __init__(self, folder: Path):
        self.files = sorted(Path(folder).glob("*.pt"))
        if not self.files:
            raise SystemExit(f"The cache {folder} is empty.")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        item = torch.load(self.files[index], weights_only=True)
        item["latents"] = item["latents"].float()
        if "image" in item:
            item["image"] = item["image"].float() / 127.5 - 1
        return item


class StepSampler(torch.utils.data.Sampler):
    """Batches of indices for micro-steps first_micro_step, first_micro_step+1, ...: the stream of
    indices is a concatenation of seeded permutations of the dataset, and each process takes its slice
    of every global batch. A batch depends only on (seed, micro-step, rank): resuming at step S
    continues with exactly the batches an uninterrupted run would have used."""

    def __init__(self, n: int, batch_size: int, *, seed: int, first_micro_step: int, rank: int = 0, world: int = 1, overfit: bool = False):
        self.n, self.batch_size, self.seed, self.first, self.rank, self.world, self.overfit = n, batch_size, seed, first_micro_step, rank, world, overfit
        self._perm_epoch, self._perm = -1, None

    def _index(self, q: int) -> int:
        epoch = q // self.n
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()
            self._perm_epoch = epoch
        return self._perm[q % self.n]

    def __iter__(self):
        micro = self.first
        while True:
            base = (0 if self.overfit else micro) * self.batch_size * self.world + self.rank * self.batch_size
            yield [self._index(base + k) for k in range(self.batch_size)]
            micro += 1


def collate(items: list[dict]) -> dict:
    batch = {"prompt": [item["prompt"] for item in items], "latents": torch.stack([item["latents"] for item in items])}
    if "image" in items[0]:
        batch["image"] = torch.stack([item["image"] for item in items])
    return batch


def make_loader(dataset, batch_size: int, *, seed: int, first_micro_step: int, accelerator, num_workers: int, overfit: bool):
    """An endless iterator of batches starting at `first_micro_step` (see StepSampler)."""
    sampler = StepSampler(len(dataset), batch_size, seed=seed, first_micro_step=first_micro_step,
                          rank=accelerator.process_index, world=accelerator.num_processes, overfit=overfit)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                            pin_memory=accelerator.device.type == "cuda"))


# --- run plumbing --------------------------------------------------------------------------------


def start_run(args: argparse.Namespace, grad_accum: int | None = None):
    """The opening of every stage's main(): the run folder (a finished run is not overwritten unless
    --resume says so), accelerate, quiet libraries, CPU threads, the seed. Returns (output_dir,
    accelerator, config); `grad_accum` overrides --grad_accum for scripts that accumulate by hand."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_fresh_start(output_dir, args.resume)
    accelerator = make_accelerator(output_dir, mixed_precision=args.mixed_precision, report_to=args.report_to,
                                   grad_accum=args.grad_accum if grad_accum is None else grad_accum)
    quiet_libraries()
    set_cpu_threads(args.num_threads)
    torch.manual_seed(args.seed)
    return output_dir, accelerator, run_config(args)


def make_accelerator(output_dir: Path, *, mixed_precision: str, grad_accum: int, report_to: str):
    """Device, mixed precision, gradient accumulation and (under `accelerate launch`) multi-GPU."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if report_to == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise SystemExit("--report_to tensorboard needs TensorBoard: pip install tensorboard (log.csv is always written).")
    if mixed_precision != "no" and not torch.cuda.is_available():
        raise SystemExit(f"--mixed_precision {mixed_precision} needs a GPU (bf16 on a CPU is unusably slow here); "
                         "use --mixed_precision no on a CPU.")
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "tensorboard")),
    )


def set_cpu_threads(num_threads: int) -> None:
    """Set torch's CPU intra-op threads (0 keeps torch's default)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen teacher parts run in: the autocast dtype, fp32 without mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one step's noise/timesteps: draws depend on (seed, step, rank) only, so a
    resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


def warmup_then_constant(optimizer, warmup_steps: int):
    """LR multiplier: linear warm-up over `warmup_steps`, then 1. Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_stable_decay(optimizer, warmup_steps: int, total_steps: int, decay_steps: int):
    """LR multiplier: linear warm-up over `warmup_steps`, then 1, then a linear decay towards 0 over the last
    `decay_steps` of `total_steps` (0: none, warmup_then_constant). A run can be extended before its decay begins
    and follow the same curve as one planned that long from the start. Stepped once per optimizer step."""
    def multiplier(step: int) -> float:  # step: optimizer steps taken so far (0-based index of the next one)
        decay = min(1.0, (total_steps - step) / decay_steps) if decay_steps > 0 else 1.0
        return max(0.0, min((step + 1) / max(1, warmup_steps), decay))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def make_ema(model: torch.nn.Module, decay: float) -> torch.nn.Module | None:
    """A frozen copy of `model` that ema_update keeps as the exponential moving average; None if decay is 0."""
    return copy.deepcopy(model).requires_grad_(False).eval() if decay > 0 else None


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)), the warm-up
    of diffusers' EMAModel. Without it an EMA of a model trained from scratch keeps decay**step of its
    random initial weights (0.999**2800 = 6%), and its samples stay noise for the first ~1,000 steps."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model with d = ema_decay_at(decay, step), parameter by parameter; buffers are copied."""
    d = ema_decay_at(decay, step)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# --- finite-loss guard ---------------------------------------------------------------------------


class NonFiniteLossError(SystemExit):
    """A non-finite loss or gradient norm: the run stops (exit code 1) before the bad update is applied."""


def grad_norm_and_clip(accelerator, parameters, max_grad_norm: float) -> float:
    """Clip the gradients to `max_grad_norm` (0 = no clipping) and return their total norm before clipping."""
    return float(accelerator.clip_grad_norm_(list(parameters), max_grad_norm if max_grad_norm > 0 else float("inf")))


class FiniteGuard:
    """Checked after the backward pass and before every optimizer step, so a NaN/inf loss or gradient
    never reaches the weights, the EMA or a checkpoint: `check` returns True when the step may be taken,
    False when it must be skipped (gradients zeroed, no optimizer step; at most `max_skips` times in a
    run, as AMP's grad scaler skips steps), and otherwise stops the run with one message naming the step
    and the loss term. Checkpoints are only ever written after a checked step, so the newest one on disk
    is the last good state and is never rotated out by a bad one. `lr_flag`: the flag the stop message
    suggests lowering (a script with one learning rate per phase names its own)."""

    def __init__(self, max_skips: int, output_dir: Path, lr_flag: str = "--lr"):
        self.max_skips, self.output_dir, self.skipped, self.lr_flag = max_skips, Path(output_dir), 0, lr_flag

    def check(self, step: int, terms: dict, grad_norm: float | None = None, model: str = "student", accelerator=None) -> bool:
        values = {name: float(value.detach()) if torch.is_tensor(value) else float(value) for name, value in terms.items()}
        if grad_norm is not None:
            values["gradient norm"] = float(grad_norm)
        bad = [f"{name} = {value}" for name, value in values.items() if not math.isfinite(value)]
        if accelerator is not None and accelerator.num_processes > 1:  # every process must take the same decision
            anywhere = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), "max").item() > 0
            if anywhere and not bad:
                bad = ["value on another process"]
        if not bad:
            return True
        if self.skipped < self.max_skips:
            self.skipped += 1
            print(f"warning: step {step}: non-finite {', '.join(bad)} ({model}); skipped this update "
                  f"({self.skipped} of --skip_nonfinite {self.max_skips}).", file=sys.stderr)
            return False
        done = _complete_checkpoints(self.output_dir)
        last = f"the last good checkpoint is {done[-1]} (--resume latest continues from it)" if done else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"error: step {step}: non-finite {', '.join(bad)} ({model}). Stopped before applying this update; nothing was "
            f"saved after it: {last}. Usually the learning rate is too high (lower {self.lr_flag}) or the data holds bad values; "
            f"--skip_nonfinite N skips up to N such steps (now {self.max_skips}).")


def guarded_update(accelerator, optimizer, parameters, guard: FiniteGuard, step: int, terms: dict[str, float],
                   max_grad_norm: float, model: str = "student") -> bool:
    """Every stage's optimizer step, after the last micro-step's backward pass: clip (max_grad_norm > 0), let
    the finite-loss guard see the loss terms and the gradient norm, then step the optimizer, or skip the
    update with its gradients zeroed. Returns whether the weights changed: the caller steps the LR schedule
    (and the EMA) only then."""
    grad_norm = grad_norm_and_clip(accelerator, parameters, max_grad_norm)
    # fp16's grad scaler skips an overflowing step and lowers its scale (normal in the first steps): it owns
    # the gradient norm then; a non-finite loss is still the guard's.
    scaler = accelerator.scaler
    take = guard.check(step, terms, grad_norm if scaler is None else None, model=model, accelerator=accelerator)
    if take:
        optimizer.step()
    elif scaler is not None:
        scaler.update()  # close this step's unscale_ (clipping above), or the next step's clipping fails
    optimizer.zero_grad(set_to_none=True)
    return take and not getattr(optimizer, "step_was_skipped", False)


# --- checkpoints ---------------------------------------------------------------------------------


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / "meta.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text())["step"])


def save_checkpoint(accelerator, output_dir: Path, step: int, config: dict, keep: int) -> Path:
    """Save everything needed to resume (models, optimizers, LR scheduler, EMA, RNG states: accelerate's
    save_state) plus meta.json {step, config}, into a temporary folder renamed into place: a kill leaves
    either the whole checkpoint or none. Then delete all but the newest `keep` checkpoints.

    A state with non-finite weights is never written (NonFiniteLossError, before anything on disk is
    touched), so a bad state can never rotate a good checkpoint out, even in a loop without a FiniteGuard."""
    refuse_nonfinite_weights(accelerator, output_dir, step)
    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process: each writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config,
                "versions": _versions(), "num_processes": accelerator.num_processes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def nonfinite_weights(modules: dict[str, torch.nn.Module]) -> list[str]:
    """'model.parameter' names of the floating-point parameters and buffers holding a NaN or inf."""
    bad = []
    for model_name, module in modules.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{model_name}.{name}")
    return bad


def refuse_nonfinite_weights(accelerator, output_dir: Path, step: int) -> None:
    """NonFiniteLossError when a model the accelerator saves (prepared models and registered modules such as
    the EMA) holds non-finite weights."""
    modules = {f"{type(m).__name__}#{i}": m for i, m in enumerate(accelerator._models)}  # what save_state writes
    modules.update({f"{type(m).__name__}#registered{i}": m for i, m in enumerate(accelerator._custom_objects)
                    if isinstance(m, torch.nn.Module)})
    bad = nonfinite_weights(modules)
    if bad:
        done = _complete_checkpoints(output_dir)
        raise NonFiniteLossError(
            f"error: refusing to save the checkpoint of step {step}: {len(bad)} weight tensor(s) hold NaN/inf, e.g. "
            f"{', '.join(bad[:3])}. Nothing was written or deleted; the last good checkpoint is "
            f"{done[-1] if done else 'none (none was written yet)'}. Lower --lr, or check the data.")


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: 'latest' (None when there is none yet) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        done = _complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise SystemExit(f"--resume {resume}: not a complete checkpoint (no meta.json). Use --resume latest or a "
                         f"folder from {Path(output_dir) / CHECKPOINTS}.")
    return path


def load_checkpoint(accelerator, path: Path, config: dict, *, may_change: tuple[str, ...] = ()) -> int:
    """Restore a checkpoint written by save_checkpoint; returns its step. First compares the run's settings
    (`config`, run_config(args)) with the checkpoint's and refuses changed ones (check_resume_settings:
    --allow_changed KEY,... lets named ones through, recorded in OUTPUT_DIR/resume_changes.log)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    log_dir = Path(config["output_dir"]) if config.get("output_dir") else Path(path).parent.parent
    check_resume_settings(meta["config"], config, f"checkpoint {path}", log_dir, may_change=may_change,
                          main_process=accelerator.is_main_process)
    accelerator.load_state(str(path))
    return int(meta["step"])


def resume_step(accelerator, output_dir: Path, resume: str | None, config: dict) -> int:
    """The step a stage's loop starts after: that of the checkpoint --resume names (loaded into the
    accelerator's models, optimizers and schedules), else 0; says which on the main process."""
    checkpoint = find_checkpoint(output_dir, resume)
    if checkpoint is None:
        if resume and accelerator.is_main_process:
            print(f"--resume {resume}: no checkpoint yet in {output_dir}; starting a new run.", file=sys.stderr)
        return 0
    step = load_checkpoint(accelerator, checkpoint, config)
    if accelerator.is_main_process:
        print(f"Resumed from {checkpoint} at step {step}.", file=sys.stderr)
    return step


def allowed_changes(allow_changed: str | None) -> set[str]:
    """--allow_changed "batch_size,--lr" -> {"batch_size", "lr"}."""
    return {name.strip().lstrip("-") for name in (allow_changed or "").split(",") if name.strip()}


def check_resume_settings(saved: dict, current: dict, where: str, log_dir: Path | None, *, may_change: tuple[str, ...] = (),
                          main_process: bool = True) -> dict[str, tuple]:
    """Refuse to continue a run whose settings changed: every key of `current` (this run's run_config) that
    `saved` records with another value is listed (old -> new) in a SystemExit, unless it is in
    RESUME_MAY_CHANGE or `may_change`, or `current["allow_changed"]` (--allow_changed KEY,...) names it; the
    allowed changes are printed and appended to LOG_DIR/resume_changes.log. Keys `saved` does not record
    (flags added since it was written) pass with a note. Returns the allowed changes {key: (old, new)}."""
    current = json.loads(json.dumps(current, default=str))
    allowed = allowed_changes(current.get("allow_changed"))
    unknown = sorted(allowed - set(current))
    if unknown:
        raise SystemExit(f"--allow_changed names {', '.join(unknown)}, which is not a setting of this script; settings are "
                         f"flag names without --: {', '.join(sorted(current))}.")
    free = RESUME_MAY_CHANGE | set(may_change)
    changed = {k: (saved[k], v) for k, v in current.items() if k in saved and k not in free and not _same_setting(saved[k], v)}
    refused = [k for k in changed if k not in allowed]
    if refused:
        lines = "\n".join(f"  {k}: {_shown(changed[k][0])} -> {_shown(changed[k][1])}" for k in refused)
        raise SystemExit(
            f"error: --resume: {where} was saved with other settings; continuing would mix two runs:\n{lines}\n"
            f"Resume with the saved values, pass --allow_changed {','.join(refused)} to continue with the new ones (the "
            f"change is recorded in OUTPUT_DIR/resume_changes.log), or start a new run in another --output_dir.")
    if main_process:
        unrecorded = sorted(k for k in current if k not in saved and k not in free)
        if unrecorded:
            print(f"note: {where} does not record {', '.join(unrecorded)} (settings added since); using this run's values.",
                  file=sys.stderr)
        if changed:
            line = f"resumed from {where} with changed settings (--allow_changed): " + "; ".join(
                f"{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in changed.items())
            print(line, file=sys.stderr)
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                with (Path(log_dir) / "resume_changes.log").open("a", encoding="utf-8") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    return changed


def _same_setting(old, new) -> bool:
    """Equal values, or two spellings of one existing local path (relative vs absolute, ~): a model or
    data folder given another way is the same setting."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def _shown(value) -> str:
    return json.dumps(value)


def check_fresh_start(output_dir: Path, resume: str | None) -> None:
    """Refuse to start over on top of an existing run's checkpoints (that would mix two runs)."""
    if not resume and _complete_checkpoints(output_dir):
        raise SystemExit(f"{output_dir} already holds checkpoints of a run: pass --resume latest to continue it, "
                         f"or choose a new --output_dir.")


@contextlib.contextmanager
def atomic_dir(dest: Path):
    """Yield a temporary sibling folder; on success it replaces `dest` whole."""
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".old-{dest.name}")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


# --- logging -------------------------------------------------------------------------------------


class CsvLog:
    """log.csv: one row per logged step with fixed columns. Rows past `start_step` (left by a killed
    run after its last checkpoint) are dropped when a run (re)starts, so the file stays one history."""

    def __init__(self, path: Path, columns: list[str], start_step: int, enabled: bool = True):
        self.path, self.columns, self.enabled = Path(path), ["step", *columns], enabled
        if not enabled:
            return
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, values: dict) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow({"step": step, **values})


class Progress:
    """A tqdm bar over optimizer steps whose postfix shows running (smoothed) losses."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
        self.running: dict[str, float] = {}

    def update(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.running[k] = v if k not in self.running else 0.9 * self.running[k] + 0.1 * v
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.running.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def save_image_grid(rows: list[torch.Tensor], path: Path) -> Path:
    """Save rows of images ((N, 3, H, W) in [-1, 1], same N and size) as one PNG grid."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(to_uint8(row)), dim=2) for row in rows], dim=1)  # (3, rows*H, N*W)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def log_row(accelerator, log: "CsvLog", step: int, row: dict, report_to: str) -> None:
    """One row of the CSV log (and of TensorBoard when --report_to says so)."""
    log.write(step, row)
    if report_to != "none":
        accelerator.log(row, step=step)


def process_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Running values averaged over the processes (what the log shows)."""
    return {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in values.items()}


def end_of_step(accelerator, args, step: int, output_dir: Path, config: dict, progress, sample_grid, main_process: bool) -> bool:
    """After every optimizer step: the sample grid and the checkpoint when due, then the
    --stop_after_step exit (a killed run's state). Returns True when the run must stop now."""
    if main_process and args.sample_every and step % args.sample_every == 0:
        sample_grid(step)
    if step % args.checkpoint_every == 0:
        save_checkpoint(accelerator, output_dir, step, config, args.keep_checkpoints)
    if args.stop_after_step is not None and step == args.stop_after_step:
        progress.close()
        if main_process:
            print(f"Stopped after step {step} (--stop_after_step), without a final save; continue with --resume latest.", file=sys.stderr)
        return True
    return False


def plot_loss_curve(csv_path: Path, png_path: Path) -> Path | None:
    """loss_curve.png: one panel per loss column of log.csv (raw and smoothed) against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped loss_curve.png (pip install matplotlib)", file=sys.stderr)
        return None
    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0].keys() if rows else []) if c.startswith("loss")]
    if not columns:
        return None
    fig, axes = plt.subplots(len(columns), 1, figsize=(7, 2.2 * len(columns)), sharex=True, squeeze=False)
    for ax, column in zip(axes[:, 0], columns):
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in ("", None)]
        if not points:
            continue
        steps, values = zip(*points)
        window = max(1, len(values) // 20)  # trailing mean over 5% of the run
        finite = [v if math.isfinite(v) else float("nan") for v in values]
        smooth = [sum(finite[max(0, i - window + 1) : i + 1]) / len(finite[max(0, i - window + 1) : i + 1]) for i in range(len(finite))]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1)
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.6)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


# --- output --------------------------------------------------------------------------------------


def save_sdxs_pipeline(dest: Path, base_root: Path, *, unet=None, tiny_vae=None, controlnet=None) -> Path:
    """Write a pipeline folder in the released SDXS layout (sdxs.build.save_pipeline_folder): the text
    encoder, tokenizer and (unless given) U-Net of `base_root`; vae/ the tiny decoder (given, or the
    base's own AutoencoderTiny) with the base's AutoencoderKL in vae_large/, or vae/ the AutoencoderKL
    when there is no tiny decoder; scheduler/ DEIS on the base's betas (one step lands on t=999);
    controlnet/ when one is given (stage D). An SDXL-family base also gives text_encoder_2/ and
    tokenizer_2/ (StableDiffusionXLPipeline's layout). `python -m sdxs generate --model DEST` loads it."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxs.build import save_pipeline_folder

    base_root = Path(base_root)
    kl_dir = base_root / "vae_large" if (base_root / "vae_large").is_dir() else base_root / "vae"
    base_vae_class = json.loads((base_root / "vae" / "config.json").read_text()).get("_class_name")
    if tiny_vae is None and base_vae_class == "AutoencoderTiny":
        tiny_vae = AutoencoderTiny.from_pretrained(base_root / "vae")
    kl = AutoencoderKL.from_pretrained(kl_dir) if json.loads((kl_dir / "config.json").read_text()).get("_class_name") == "AutoencoderKL" else None
    components = {
        "scheduler": one_step_scheduler(json.loads((base_root / "scheduler" / "scheduler_config.json").read_text())),
        "text_encoder": CLIPTextModel.from_pretrained(base_root / "text_encoder"),
        "unet": unet if unet is not None else UNet2DConditionModel.from_pretrained(base_root / "unet"),
    }
    if tiny_vae is not None:
        components["vae"] = tiny_vae
        if kl is not None:
            components["vae_large"] = kl
    else:
        components["vae"] = kl
    if controlnet is not None:
        components["controlnet"] = controlnet
    sdxl = (base_root / "text_encoder_2").is_dir()
    if sdxl:
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(base_root / "text_encoder_2")
    with atomic_dir(dest) as tmp:
        save_pipeline_folder(components, base_root / "tokenizer", tmp, tokenizer_2_dir=base_root / "tokenizer_2" if sdxl else None)
        if sdxl and (base_root / "model_index.json").is_file():  # the base's empty-prompt rule, as it was trained
            base_index, index = (json.loads((folder / "model_index.json").read_text()) for folder in (base_root, tmp))
            index["force_zeros_for_empty_prompt"] = base_index.get("force_zeros_for_empty_prompt", True)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(dest)


def run_config(args: argparse.Namespace) -> dict:
    """The run's settings as saved next to every checkpoint (JSON types)."""
    return json.loads(json.dumps(dict(sorted(vars(args).items())), default=str))
