#!/usr/bin/env python
"""The mini chain's sketch table (issue 15): the sketch teacher (many steps + CFG) against the one-step student.

    python train/evaluate_controlnet.py --run outputs/mini --data data/emoji --out outputs/mini/eval-controlnet

One row per stage D folder of `train/distill_controlnet.py` under the mini run (missing ones are named, not run):

| row | folders | sampling |
|---|---|---|
| sketch teacher | --teacher + RUN/controlnet-teacher/final/controlnet | --teacher_steps DPM-Solver++ steps, CFG --guidance |
| + distilled student ControlNet | RUN/controlnet-distill/final (block-removed U-Net, controlnet/, tiny vae/) | same |
| one-step sketch SDXS (mini) | RUN/controlnet-one-step/final, through sdxs.SDXSEngine.sketch_to_image (what demo_sketch.py runs) | 1 step, no CFG |

Each val image of --data (its caption as the prompt) gives a control, `train.controls.extract(--control, [image])`;
every row draws image i from control i, caption i and seed --seed + i (the same initial noise in every row).
Columns, with the evaluation network of train/evaluate.py (TEACHER/eval_tower): FD to the real val images,
top-1 caption retrieval, end-to-end latency per image (batch 1, prompt + control to PIL image, median of
--latency_runs calls, diffusers + torch fp32 on this CPU; the one-step row through the engine's torch path),
and control fidelity, which SDXS and its peers do not report: the sketch extracted from each output against
the input sketch (the real image's sketch for other control kinds) — edge F1 at 1 px tolerance (higher is
better) and Chamfer distance in pixels (lower is better). Reference lines: the real val images (FD floor:
real train vs val) and the teacher VAE's reconstructions of them (the fidelity a 64 px decoder can keep).

Writes OUT/controlnet.json, OUT/controlnet.md (the table) and OUT/grid.png (real images, controls, then each
row's outputs), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from train import common, controls
from train import evaluate as ev
from train import evaluate_stages as stages

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_BATCH = 64


@dataclass(frozen=True)
class ControlRow:
    stage: stages.Row  # the pipeline this row samples with (U-Net folder, decoder, steps, guidance)
    controlnet: Path  # a diffusers ControlNetModel folder
    engine: bool = False  # True: sample and time through sdxs.SDXSEngine (the one-step demo's path)

    @property
    def key(self) -> str:
        return self.stage.key

    @property
    def label(self) -> str:
        return self.stage.label


def student_decoder(folder: Path, run: Path) -> Path | None:
    """The tiny decoder a student row decodes with: the folder's vae/ when it is an AutoencoderTiny, else stage
    A's (RUN/decoder/final/vae) when there is one, else None (the teacher's AutoencoderKL)."""
    config = folder / "vae" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderTiny":
        return folder / "vae"
    stage_a = run / "decoder" / "final" / "vae"
    return stage_a if stage_a.is_dir() else None


def controlnet_rows(run: Path, teacher: Path, *, teacher_steps: int = 25, guidance: float = 4.0, control: str = "sketch"
                    ) -> tuple[list[ControlRow], list[str]]:
    """The rows whose ControlNet folders exist, and the labels (with folders) of those that do not. The
    one-step row runs through the engine for sketches (what demo_sketch.py does; the engine reads sketches
    only), through diffusers with the folder's one-step scheduler for other control kinds."""
    distill, one_step = run / "controlnet-distill" / "final", run / "controlnet-one-step" / "final"
    candidates = [
        ControlRow(stages.Row(f"{control}_teacher", f"{control} teacher ({teacher_steps} steps + CFG)", teacher, None, teacher_steps, guidance),
                   run / "controlnet-teacher" / "final" / "controlnet"),
        ControlRow(stages.Row(f"{control}_student_multi_step",
                              f"+ distilled student ControlNet (block-removed U-Net, {teacher_steps} steps + CFG)",
                              distill, student_decoder(distill, run), teacher_steps, guidance), distill / "controlnet"),
        ControlRow(stages.Row(f"{control}_sdxs", f"one-step {control} SDXS (mini)", one_step, student_decoder(one_step, run), 1, 0.0),
                   one_step / "controlnet", engine=control == "sketch"),
    ]
    # Ablations, shown when their folders exist: what mode one_step adds to the distilled ControlNet, and
    # what its --noise_reinit does (a run of mode one_step with --noise_reinit 0 in controlnet-one-step-no-reinit/).
    plain, no_reinit = run / "one-step" / "final", run / "controlnet-one-step-no-reinit" / "final"
    ablations = [
        ControlRow(stages.Row(f"{control}_sdxs_distilled_only", "ablation: the distilled ControlNet on the one-step U-Net, "
                              "no one-step training", plain, student_decoder(plain, run), 1, 0.0),
                   distill / "controlnet", engine=control == "sketch"),
        ControlRow(stages.Row(f"{control}_sdxs_no_noise_reinit", "ablation: one-step training without --noise_reinit",
                              no_reinit, student_decoder(no_reinit, run), 1, 0.0), no_reinit / "controlnet", engine=control == "sketch"),
    ]
    candidates += [row for row in ablations if row.stage.unet.is_dir() and row.controlnet.is_dir()]
    rows = [row for row in candidates if row.controlnet.is_dir()]
    missing = [f"{row.label} ({stages.shown_path(run)}/{row.controlnet.relative_to(run).as_posix()})" for row in candidates
               if not row.controlnet.is_dir()]
    return rows, missing


# --- generation ----------------------------------------------------------------------------------


def build_controlnet_pipeline(row: ControlRow, teacher: Path):
    """evaluate_stages' pipeline for the row (U-Net, text encoder, decoder, scheduler) with its ControlNet:
    a diffusers StableDiffusionControlNetPipeline, fp32 on the CPU."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = stages.build_pipeline(row.stage, teacher)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=ControlNetModel.from_pretrained(row.controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_engine(row: ControlRow):
    """The one-step folder as the sketch demo runs it: sdxs.SDXSEngine, torch backend, fp32 on the CPU."""
    from sdxs import SDXSEngine

    if row.controlnet == row.stage.unet / "controlnet":
        return SDXSEngine.from_pretrained(str(row.stage.unet), device="cpu", dtype=torch.float32, backend="torch")
    # a ControlNet of another folder (an ablation row): the bare ControlNet on this folder's pipeline
    return SDXSEngine.from_pretrained(str(row.controlnet), base=str(row.stage.unet), device="cpu", dtype=torch.float32, backend="torch")


def engine_sample(engine, control_images: list, captions: list[str], *, seed: int, control_scale: float) -> torch.Tensor:
    """The engine's images (N, 3, H, W) in [-1, 1]: image i from sketch i and caption i with seed + i, the
    same initial noise as ev.sample's generator seed + i."""
    images = [engine.sketch_to_image(control, caption, seed=seed + i, control_strength=control_scale).images[0]
              for i, (control, caption) in enumerate(zip(control_images, captions))]
    return controls.control_tensor(images) * 2 - 1


def generate(row: ControlRow, model, control_images: list, captions: list[str], *, seed: int, control_scale: float) -> torch.Tensor:
    """A row's images (N, 3, H, W) in [-1, 1]: image i from control i, caption i and seed + i."""
    if row.engine:
        return engine_sample(model, control_images, captions, seed=seed, control_scale=control_scale)
    return ev.sample(model, captions, steps=row.stage.steps, guidance=row.stage.guidance, seed=seed, batch_size=SAMPLING_BATCH,
                     control=controls.control_tensor(control_images), control_scale=control_scale)


def latency(row: ControlRow, model, control_image, caption: str, *, control_scale: float, runs: int) -> dict[str, float]:
    """End-to-end milliseconds of one image (prompt + control -> PIL image, ControlNet included), batch 1."""
    if row.engine:
        return stages.time_calls(lambda: model.sketch_to_image(control_image, caption, seed=0, control_strength=control_scale), runs)
    return stages.time_calls(lambda: model(caption, image=control_image, num_inference_steps=row.stage.steps, guidance_scale=row.stage.guidance,
                                           controlnet_conditioning_scale=control_scale, generator=torch.Generator().manual_seed(0)), runs)


def parameter_counts(row: ControlRow, model) -> dict[str, int]:
    """Parameters of the U-Net and the ControlNet that each denoising step runs."""
    parts = model.components if row.engine else model
    count = lambda module: sum(p.numel() for p in module.parameters())
    return {"unet": count(parts.unet), "controlnet": count(parts.controlnet)}


# --- control fidelity ----------------------------------------------------------------------------


def fidelity(references: list, images: list) -> dict:
    """How well images follow their controls: image i's extracted sketch against reference sketch i (its
    OWN control), edge F1 (1 px tolerance) and Chamfer distance (pixels), averaged over the images. Chamfer
    is undefined when exactly one side of a pair has no ink: such pairs are counted, not averaged."""
    if len(references) != len(images) or not images:
        raise ValueError(f"fidelity needs one reference sketch per image; got {len(references)} references and {len(images)} images.")
    drawn = controls.extract("sketch", images)
    f1 = [controls.edge_f1(reference, sketch) for reference, sketch in zip(references, drawn)]
    chamfer = [controls.chamfer_distance(reference, sketch) for reference, sketch in zip(references, drawn)]
    finite = [d for d in chamfer if math.isfinite(d)]
    return {"edge_f1": round(statistics.mean(f1), 4), "chamfer_px": round(statistics.mean(finite), 3) if finite else None,
            "chamfer_undefined": len(chamfer) - len(finite)}


def is_empty_control(kind: str, control) -> bool:
    """A control with nothing to follow: a sketch without strokes (the engine refuses those), or a uniform image."""
    from sdxs.sketch import is_blank

    if kind == "sketch":
        return is_blank(control)
    low, high = control.convert("L").getextrema()
    return low == high


# --- the report ----------------------------------------------------------------------------------


def _chamfer_text(entry: dict) -> str:
    text = "n/a" if entry["chamfer_px"] is None else f"{entry['chamfer_px']:.2f}"
    return text + (f" ({entry['chamfer_undefined']} blank)" if entry["chamfer_undefined"] else "")


def markdown_table(report: dict) -> str:
    lines = ["| row | steps | FD (lower is better) | top-1 | edge F1 (higher is better) | Chamfer, px (lower is better) | U-Net | ControlNet | "
             "latency, median (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        p = r["parameters"]
        steps = f"{r['steps']}" + (f" + CFG {r['guidance']:g}" if r["guidance"] > 1 else "")
        lines.append(f"| {r['label']} | {steps} | {r['fd']:.2f} | {r['top1']:.3f} | {r['edge_f1']:.3f} | {_chamfer_text(r)} | "
                     f"{p['unet'] / 1e6:.2f} M | {p['controlnet'] / 1e6:.2f} M | {r['latency']['median_ms']:.1f} |")
    ref = report["reference"]
    real, recon = ref["real"], ref["vae_reconstruction"]
    lines.append(f"| real val images (reference) | | {real['fd_floor']:.2f} (train vs val floor) | {real['top1']:.3f} | {real['edge_f1']:.3f} | "
                 f"{_chamfer_text(real)} | | | |")
    lines.append(f"| teacher VAE reconstruction of them (reference) | | {recon['fd']:.2f} | {recon['top1']:.3f} | {recon['edge_f1']:.3f} | "
                 f"{_chamfer_text(recon)} | | | |")
    text = "\n".join(lines) + "\n"
    if report["missing"]:
        text += "\nNot evaluated (folder missing): " + "; ".join(report["missing"]) + "\n"
    meta = report["settings"]
    against = "the input sketch" if meta["control"] == "sketch" else f"the real image's sketch (the input control is {meta['control']})"
    text += (f"\n{meta['n_val']} val images with their captions ({meta['skipped_empty_controls']} left out: empty control), seed {meta['seed']} + "
             f"index, {meta['control']} controls at scale {meta['control_scale']:g}. Fidelity: the sketch of each output against {against}, "
             f"edge F1 at 1 px tolerance and Chamfer distance. Latency: batch 1, prompt + control to PIL image, median of "
             f"{meta['latency_runs']} runs after one warm-up, torch {meta['torch']} fp32 on {meta['threads']} CPU threads.\n")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/evaluate_controlnet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the mini run's folder holding controlnet-teacher/, controlnet-distill/, controlnet-one-step/")
    parser.add_argument("--teacher", default=str(ROOT / "models" / "emoji-teacher"), help="the teacher pipeline (default models/emoji-teacher)")
    parser.add_argument("--data", default="data/emoji128", help="the emoji imagefolder with train/ and val/ (default data/emoji128, "
                        "the 128 px set of the bundled teacher v2)")
    parser.add_argument("--eval_tower", help="the evaluation network (default TEACHER/eval_tower)")
    parser.add_argument("--out", help="output folder (default RUN/eval-controlnet)")
    parser.add_argument("--control", default="sketch", choices=controls.CONTROL_KINDS, help="control kind of the ControlNets (default sketch)")
    parser.add_argument("--depth_estimator", help="a local transformers depth-estimation folder (needed for --control depth)")
    parser.add_argument("--control_scale", type=float, default=1.0, help="ControlNet conditioning scale, 0..1, every row (default 1)")
    parser.add_argument("--num_images", type=int, default=0, help="first N val images only, 0 = all (default)")
    parser.add_argument("--teacher_steps", type=int, default=25, help="sampling steps of the multi-step rows (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the multi-step rows (default 4, the teacher's)")
    parser.add_argument("--latency_runs", type=int, default=20, help="timed calls per row (default 20)")
    parser.add_argument("--grid", type=int, default=8, help="images in grid.png (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    return parser


def check_args(args, data: Path, tower_dir: Path) -> None:
    stages.check_inputs(args, data, tower_dir)
    if not 0 <= args.control_scale <= 1:
        raise SystemExit(f"--control_scale must be between 0 and 1; got {args.control_scale}.")
    if args.control == "depth" and not args.depth_estimator:
        raise SystemExit("--control depth needs --depth_estimator PATH (a local transformers depth-estimation model folder).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, teacher, data = Path(args.run), Path(args.teacher), Path(args.data)
    out = Path(args.out) if args.out else run / "eval-controlnet"
    tower_dir = Path(args.eval_tower) if args.eval_tower else teacher / "eval_tower"
    check_args(args, data, tower_dir)
    rows, missing = controlnet_rows(run, teacher, teacher_steps=args.teacher_steps, guidance=args.guidance, control=args.control)
    if not rows:
        raise SystemExit(f"{run} holds none of controlnet-teacher/, controlnet-distill/, controlnet-one-step/ (each final/controlnet): "
                         f"run train/distill_controlnet.py --mode teacher|distill|one_step first.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    tower = CLIPModel.from_pretrained(tower_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tower_dir if (tower_dir / "tokenizer_config.json").is_file() else teacher / "tokenizer")
    resolution = common.teacher_native_size(teacher)  # the models' image side: their ControlNets read controls that size
    val, captions, _ = ev.load_split(data / "val", "text", resolution, limit=args.num_images)
    estimator = controls.load_depth_estimator(args.depth_estimator) if args.control == "depth" else None
    control_images = controls.extract(args.control, controls.to_pil_images(val), depth_estimator=estimator)
    keep = [i for i, control in enumerate(control_images) if not is_empty_control(args.control, control)]
    if not keep:
        raise SystemExit(f"Every val image of {data} gave an empty {args.control} control: nothing to evaluate.")
    skipped = len(val) - len(keep)
    val, captions, control_images = val[keep], [captions[i] for i in keep], [control_images[i] for i in keep]
    real_images = controls.to_pil_images(val)
    # fidelity compares sketches: the input sketch itself, or the real image's sketch for other control kinds
    references = control_images if args.control == "sketch" else controls.extract("sketch", real_images)

    train_images, _, _ = ev.load_split(data / "train", "text", resolution, limit=len(val), pick_seed=args.seed)
    text = ev.text_embeddings(tower, tokenizer, captions)
    real = ev.image_embeddings(tower, val)
    recon = ev.reconstruct(AutoencoderKL.from_pretrained(teacher / "vae").eval(), val)
    reference = {
        "real": {"fd_floor": round(ev.frechet_distance(ev.image_embeddings(tower, train_images), real), 3),
                 "top1": round(ev.retrieval_accuracy(real, text, captions, 1), 4), **fidelity(references, real_images)},
        "vae_reconstruction": {"fd": round(ev.frechet_distance(ev.image_embeddings(tower, recon), real), 3),
                               "top1": round(ev.retrieval_accuracy(ev.image_embeddings(tower, recon), text, captions, 1), 4),
                               **fidelity(references, controls.to_pil_images(recon))},
    }
    shown = torch.linspace(0, len(val) - 1, min(args.grid, len(val))).round().long().tolist()

    results, grid_rows, labels = [], {"control": controls.control_tensor([control_images[i] for i in shown]) * 2 - 1}, {}
    labels["control"] = f"{args.control} control (input)"
    for row in rows:
        print(f"[evaluate_controlnet] {row.label}: {len(captions)} samples, latency", file=sys.stderr, flush=True)
        model = build_engine(row) if row.engine else build_controlnet_pipeline(row, teacher)
        images = generate(row, model, control_images, captions, seed=args.seed, control_scale=args.control_scale)
        emb = ev.image_embeddings(tower, images)
        results.append({"key": row.key, "label": row.label, "folder": stages.shown_path(row.stage.unet), "controlnet": stages.shown_path(row.controlnet),
                        "decoder": stages.shown_path(row.stage.decoder or teacher / "vae"), "backend": "sdxs engine" if row.engine else "diffusers",
                        "steps": row.stage.steps, "guidance": row.stage.guidance,
                        "fd": round(ev.frechet_distance(emb, real), 3), "top1": round(ev.retrieval_accuracy(emb, text, captions, 1), 4),
                        "top5": round(ev.retrieval_accuracy(emb, text, captions, 5), 4),
                        **fidelity(references, controls.to_pil_images(images)), "parameters": parameter_counts(row, model),
                        "latency": latency(row, model, control_images[0], captions[0], control_scale=args.control_scale, runs=args.latency_runs)})
        grid_rows[row.key], labels[row.key] = images[shown], row.label
        del model

    report = {"rows": results, "reference": reference, "missing": missing,
              "settings": {"run": stages.shown_path(run), "teacher": stages.shown_path(teacher), "data": stages.shown_path(data),
                           "eval_tower": stages.shown_path(tower_dir), "control": args.control, "control_scale": args.control_scale,
                           "n_val": len(val), "skipped_empty_controls": skipped, "seed": args.seed, "latency_runs": args.latency_runs,
                           "threads": torch.get_num_threads(), "torch": torch.__version__}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "controlnet.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "controlnet.md").write_text(markdown_table(report))
    stages.save_grid(val[shown], grid_rows, labels, out / "grid.png")
    print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
