#!/usr/bin/env python
"""The SDXS recipe end to end on the bundled emoji teacher, on a CPU: the mini reproduction (issue 14).

    python train/emoji_data.py --out data/emoji128 --image_size 128 \
        --styles noto,twemoji,fluent-color,fluent-flat,fluent-high-contrast   # the data, once
    python train/reproduce_mini.py --output_dir outputs/mini             # stages A-D, ablation, tables
    python train/reproduce_mini.py --output_dir outputs/mini-smoke --smoke   # every step on tiny settings (CI)

Each stage is the same script a researcher runs at paper scale, with `--preset mini`:

1. stage A, `train/distill_decoder.py`: a tiny decoder for the teacher's VAE (f=8 for v2, 4 for v1; Eq. 5);
2. stage B, `train/distill_unet.py`: the block-removed student U-Net (no mid block, no last stage),
   output + feature KD from the teacher (Eqs. 6-8), with stage A's decoder as its vae/;
3. stage C, `train/distill_one_step.py`: the one-step generator from stage B's student, feature-matching
   warm-up then segmented score distillation (Eqs. 10-12); psi = 10 DPM-Solver++ steps of the teacher
   with its CFG 4 (see train/README.md for why);
4. stage C through its warm-up only (OUTPUT_DIR/one-step-warmup: the table's "FM warm-up only" row);
5. stage D, `train/distill_controlnet.py`, the sketch chain: a sketch ControlNet for the teacher (mode
   teacher, sketches extracted from the emoji images), distilled into the student's ControlNet (mode
   distill, against stage B's U-Net), then trained with the one-step U-Net (mode one_step);
6. the ablation: stage C again without the FM warm-up (`--fm_warmup_steps 0`), same steps and pairs;
7. the tables: `train/evaluate_stages.py` scores every stage on the val split, `train/evaluate_controlnet.py`
   the sketch models (FD, retrieval, latency, control fidelity).

Resumable stage by stage: a stage whose `final/` exists is skipped, a killed stage continues from its last
checkpoint (`--resume latest`), the caches are shared (OUTPUT_DIR/cache). The final mini SDXS is
OUTPUT_DIR/one-step/final (`python -m sdxs generate --model OUTPUT_DIR/one-step/final ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import common  # noqa: E402
from train.distill_one_step import PRESETS as PRESETS_ONE_STEP  # noqa: E402
from train.emoji_data import CLDR_NAMES, build_command  # noqa: E402
TEACHER = ROOT / "models" / "emoji-teacher"

# What --smoke changes in each stage's --preset mini: tiny data and steps, same code path.
SMOKE_DATA = ["--num_samples", "8", "--batch_size", "4", "--log_every", "1", "--sample_every", "0", "--checkpoint_every", "1"]
SMOKE = {
    "decoder": SMOKE_DATA + ["--max_steps", "3", "--gan_start_step", "1", "--lr_warmup_steps", "0"],
    "unet": SMOKE_DATA + ["--max_steps", "2", "--sample_steps", "2", "--lr_warmup_steps", "0"],
    "one-step": SMOKE_DATA + ["--max_steps", "3", "--fm_warmup_steps", "1", "--schedule_steps", "2", "--sampler_steps", "2",
                              "--lr_warmup_steps", "0"],
    "controlnet-teacher": SMOKE_DATA + ["--max_steps", "2", "--sample_steps", "2", "--lr_warmup_steps", "0"],
    "controlnet-distill": SMOKE_DATA + ["--max_steps", "2", "--sample_steps", "2", "--lr_warmup_steps", "0"],
    "controlnet-one-step": SMOKE_DATA + ["--max_steps", "2", "--fm_warmup_steps", "1", "--schedule_steps", "1", "--sampler_steps", "2",
                                         "--lr_warmup_steps", "0"],
}
SMOKE_EVAL = ["--num_images", "8", "--teacher_steps", "2", "--latency_runs", "2"]


def geometry_flags(teacher: Path) -> tuple[list[str], list[str]]:
    """What the mini presets (made for the bundled teacher v2: 128 px, an f=8 VAE) need changed for another
    teacher, e.g. teacher v1 (64 px, f=4): (flags of every stage, flags of stage A). Every stage runs at the
    teacher's image side; stage A's decoder gets TAESD's pattern with one stage per 2x of the teacher's
    VAE (f=8: 3,3,3,1, the released SDXS decoder's shape; f=4: 3,3,1). Nothing changes for teacher v2."""
    from train.common import teacher_native_size, teacher_vae_factor
    from train.distill_decoder import PRESETS as PRESETS_DECODER

    every, decoder = [], []
    if not all((teacher / sub / "config.json").is_file() for sub in ("unet", "vae")):
        return every, decoder  # not a complete pipeline folder: the first stage's teacher check says what is missing
    resolution, stages = teacher_native_size(teacher), teacher_vae_factor(teacher).bit_length()
    if resolution != PRESETS_DECODER["mini"]["resolution"]:
        every = ["--resolution", str(resolution)]
    decoder_blocks, encoder_blocks = (3,) * (stages - 1) + (1,), (1,) + (3,) * (stages - 1)
    if (decoder_blocks, encoder_blocks) != (PRESETS_DECODER["mini"]["decoder_blocks"], PRESETS_DECODER["mini"]["encoder_blocks"]):
        decoder = ["--decoder_blocks", ",".join(map(str, decoder_blocks)), "--encoder_blocks", ",".join(map(str, encoder_blocks))]
    return every, decoder


def stage_commands(out: Path, data: Path, teacher: Path, *, smoke: bool, ablation: bool, controlnet: bool = True) -> list[tuple[str, list[str]]]:
    """(name, argv) of every training run, in order; each writes OUTPUT_DIR/<name>/final."""
    every, decoder = geometry_flags(teacher)
    shared = ["--preset", "mini", "--teacher", str(teacher), "--image_folder", str(data / "train"),
              "--cache_dir", str(out / "cache"), "--resume", "latest", *every]
    tiny = str(out / "decoder" / "final" / "vae")

    def run(script: str, name: str, *extra: str) -> tuple[str, list[str]]:
        key = "one-step" if name.startswith("one-step") else name
        # the stage's own flags last: they win over --smoke's (the ablation's --fm_warmup_steps 0)
        return name, [f"train/{script}", *shared, "--output_dir", str(out / name), *(SMOKE[key] if smoke else []), *extra]

    commands = [
        run("distill_decoder.py", "decoder", *decoder),
        run("distill_unet.py", "unet", "--tiny_decoder", tiny),
        run("distill_one_step.py", "one-step", "--student", str(out / "unet" / "final"), "--tiny_decoder", tiny),
    ]
    # the "FM warm-up only" row: stage C run just through its warm-up (the main run's checkpoints of that
    # step are rotated out); same settings and pairs, so the same student as the main run at that step
    warmup = "1" if smoke else str(PRESETS_ONE_STEP["mini"]["fm_warmup_steps"])
    commands.append(run("distill_one_step.py", "one-step-warmup", "--student", str(out / "unet" / "final"),
                        "--tiny_decoder", tiny, "--max_steps", warmup))
    if controlnet:  # stage D, the sketch chain: teacher ControlNet, distilled to the student, trained with one step
        teacher_cn = str(out / "controlnet-teacher" / "final")
        commands += [
            run("distill_controlnet.py", "controlnet-teacher", "--mode", "teacher"),
            run("distill_controlnet.py", "controlnet-distill", "--mode", "distill", "--teacher_controlnet", teacher_cn,
                "--student", str(out / "unet" / "final")),
            run("distill_controlnet.py", "controlnet-one-step", "--mode", "one_step", "--teacher_controlnet", teacher_cn,
                "--student", str(out / "one-step" / "final"), "--student_controlnet", str(out / "controlnet-distill" / "final")),
        ]
    if ablation:
        commands.append(run("distill_one_step.py", "one-step-no-warmup", "--student", str(out / "unet" / "final"),
                            "--tiny_decoder", tiny, "--fm_warmup_steps", "0"))
    return commands


def run_stage(name: str, argv: list[str], out: Path) -> float:
    """Run one stage (skipped when its final/ exists); returns its wall time in seconds (0 when skipped)."""
    if is_final(out, name):
        print(f"[reproduce_mini] {name}: done before ({out / name / 'final'}), skipped", file=sys.stderr, flush=True)
        return 0.0
    print(f"[reproduce_mini] {name}: python {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=ROOT)
    if result.returncode != 0:
        raise stage_failed(name, result.returncode, "above", out)
    return time.perf_counter() - started


def stage_failed(name: str, code: int, output: str, out: Path) -> SystemExit:
    """The error that stops a run at a failed stage: where its output is and how to resume."""
    return SystemExit(f"[reproduce_mini] {name} stopped with exit code {code}; its output is {output}. "
                      f"Fix the cause and run the same command again: finished stages are skipped and this one resumes "
                      f"from its last checkpoint in {out / name / 'checkpoints'}.")


def is_final(out: Path, name: str) -> bool:
    return (out / name / "final" / "model_index.json").is_file()


def stage_inputs(commands: list[tuple[str, list[str]]], out: Path) -> dict[str, list[str]]:
    """The stages each stage reads: those whose OUTPUT_DIR/<name>/final (or a folder in it) its argv names."""
    finals = {name: str(out / name / "final") for name, _ in commands}
    return {name: [other for other, final in finals.items()
                   if other != name and any(arg == final or arg.startswith(final + os.sep) for arg in argv)]
            for name, argv in commands}


def run_stages(commands: list[tuple[str, list[str]]], out: Path, jobs: int = 1) -> None:
    """Run every stage: one after the other, or with `jobs` > 1 up to that many at once, each as soon as the
    stages it reads are final (the mini stages leave a GPU mostly idle: three at once ran stages A-C, with
    two of stage D's modes beside them, in about 10 minutes on one H200). With `jobs` > 1 each stage writes its output to OUTPUT_DIR/<name>.log;
    a failed stage starts nothing new, lets the running ones finish, then stops the run."""
    if jobs <= 1:
        for name, argv in commands:
            seconds = run_stage(name, argv, out)
            if seconds:
                print(f"[reproduce_mini] {name}: {seconds / 60:.1f} min", file=sys.stderr, flush=True)
        return
    inputs, pending = stage_inputs(commands, out), dict(commands)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[tuple[str, int]] = []
    while pending or running:
        for name in list(pending):
            if failed or len(running) >= jobs:
                break
            if is_final(out, name):
                run_stage(name, pending.pop(name), out)  # says "skipped"
            elif all(is_final(out, other) for other in inputs[name]):
                argv = pending.pop(name)
                (out / name).mkdir(parents=True, exist_ok=True)
                print(f"[reproduce_mini] {name}: python {' '.join(argv)} (output: {out / f'{name}.log'})", file=sys.stderr, flush=True)
                with open(out / f"{name}.log", "a") as log:
                    running[name] = (subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                                     time.perf_counter())
        for name, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode:
                    failed.append((name, process.returncode))
                else:
                    print(f"[reproduce_mini] {name}: {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr, flush=True)
        if failed and not running:
            name, code = failed[0]
            raise stage_failed(name, code, f"in {out / f'{name}.log'}", out)
        if pending and not running and not failed:
            waiting = {name: [other for other in inputs[name] if not is_final(out, other)] for name in pending}
            raise SystemExit(f"[reproduce_mini] stages wait for inputs no stage will write: {waiting}")
        time.sleep(0.2)


def evaluate(script: str, out: Path, data: Path, teacher: Path, dest: Path, *, smoke: bool) -> None:
    """Run one of the table scripts (train/evaluate_stages.py, train/evaluate_controlnet.py) on the run."""
    argv = [f"train/{script}", "--run", str(out), "--data", str(data), "--teacher", str(teacher), "--out", str(dest),
            *(SMOKE_EVAL if smoke else [])]
    print(f"[reproduce_mini] evaluation: python {' '.join(argv)}", file=sys.stderr, flush=True)
    if subprocess.run([sys.executable, *argv], cwd=ROOT).returncode != 0:
        raise SystemExit(f"[reproduce_mini] {script} failed; its output is above. The trained stages are kept.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/reproduce_mini.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="run folder: decoder/, unet/, one-step/, ..., eval/")
    parser.add_argument("--data", default="data/emoji128", help="the emoji imagefolder with train/ and val/ (default data/emoji128, "
                        "the 128 px set of the bundled teacher v2)")
    parser.add_argument("--teacher", default=str(TEACHER), help="the multi-step teacher pipeline (default models/emoji-teacher)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: every stage and the evaluation in about a minute")
    parser.add_argument("--no_ablation", action="store_true", help="skip the one-step run without the FM warm-up")
    parser.add_argument("--no_controlnet", action="store_true", help="skip stage D (the sketch ControlNet chain)")
    parser.add_argument("--no_eval", action="store_true", help="train only; run train/evaluate_stages.py later")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to N stages at once, each as soon as the stages it reads are final, their output in "
                             "OUTPUT_DIR/<stage>.log (default 1: one after the other, output here). For a GPU, where the mini "
                             "stages leave it mostly idle (3 there); on a 2-core CPU stages only slow each other down")
    parser.add_argument("--export", default=None,
                        help="after the evaluation, copy the mini SDXS folder here (e.g. models/mini-sdxs; its README.md card is "
                             "kept) with the stage table in training/, and the figures to --figures")
    parser.add_argument("--figures", default="docs/mini", help="where --export puts the grid, plot and loss curves (default docs/mini)")
    return parser


TABLE_START, TABLE_END = "<!-- stage table: written by reproduce_mini.py --export -->", "<!-- end of stage table -->"
CONTROLNET_TABLE_START = "<!-- sketch table: written by reproduce_mini.py --export -->"
CONTROLNET_TABLE_END = "<!-- end of sketch table -->"


def with_stage_table(card: str, table: str, markers: tuple[str, str] | None = None) -> str:
    """`card` with the text between the markers (default TABLE_START, TABLE_END) replaced by `table`
    (unchanged without them)."""
    start, end = markers or (TABLE_START, TABLE_END)
    if start not in card or end not in card:
        return card
    head, rest = card.split(start, 1)
    return f"{head}{start}\n{table.strip()}\n{end}{rest.split(end, 1)[1]}"


def copy_model_files(src: Path, dest: Path) -> None:
    """Copy a model folder's files, with diffusers' `_name_or_path` (where it was loaded from) made
    relative: no machine paths in a bundled folder."""
    import shutil

    from train.evaluate_stages import shown_path

    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            if path.name == "config.json":
                config = json.loads(target.read_text())
                if "_name_or_path" in config:
                    config["_name_or_path"] = shown_path(config["_name_or_path"])
                    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


CAPTION_STYLES = ("google", "noto")  # the style captions.json is written in: the first the data has (v1: google, v2: noto)


def caption_table(data: Path, style: str | None = None) -> dict[str, str]:
    """{emoji name or short name (lower case): its training caption} over the data's train and val
    metadata, one style (default: the first of CAPTION_STYLES the data has), skin-tone variants left out,
    plus the CLDR names of DATA/cldr_names.json where the data has one ("red heart"; emoji_data.write_cldr_names);
    a name wins over another emoji's short name, a short name over another emoji's CLDR name. The built-in
    model's apps read it (sdxs.registry, captions.json) to turn "red apple" into the caption the model was
    trained on."""
    rows = [json.loads(line) for split in ("train", "val")
            for line in (data / split / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    if style is None:
        present = {row.get("style") for row in rows}
        style = next((s for s in CAPTION_STYLES if s in present), None)
        if style is None:
            raise SystemExit(f"{data}: none of the caption styles {', '.join(CAPTION_STYLES)} in its metadata; styles there: "
                             f"{', '.join(sorted(str(s) for s in present))}.")
    cldr_path = data / CLDR_NAMES
    cldr_names = json.loads(cldr_path.read_text(encoding="utf-8")) if cldr_path.is_file() else {}
    names, short, cldr = {}, {}, {}
    for row in rows:
        if row.get("style") != style or row.get("skin_tone") or not row.get("name"):
            continue
        text, name = row["text"], row["name"].lower()
        names.setdefault(name, text)
        if row.get("unified") in cldr_names:
            cldr.setdefault(" ".join(str(cldr_names[row["unified"]]).lower().split()), text)
        head = f"an emoji of {name}"
        if text.startswith(head) and ", category " in text:  # "..., SHORT NAMES, category ..."
            for alias in text[len(head):text.index(", category ")].split(", "):
                if alias.strip():
                    short.setdefault(alias.strip(), text)
    return {**cldr, **short, **names}


def export(out: Path, dest: Path, figures: Path, data: Path | None = None) -> None:
    """The final folder's model files to DEST, replacing the model there whole (its README.md card and
    training/ stay), the stage table to DEST/training/, and the sample grid, quality/latency plot and each
    stage's loss curve to FIGURES. DEST is built beside itself and swapped in at the end: a failed export
    leaves the former model as it was."""
    import shutil

    from train.common import atomic_dir

    final, sketch_final = out / "one-step" / "final", out / "controlnet-one-step" / "final"
    needed = [out / "eval" / "stages.json"]
    if (sketch_final / "controlnet").is_dir():  # stage D: the sketch ControlNet of the same one-step U-Net
        needed.append(out / "eval-controlnet" / "controlnet.json")
    for path in needed:
        if not path.is_file():
            raise SystemExit(f"--export needs the evaluation ({path}): run without --no_eval first.")
    with atomic_dir(dest) as tmp:
        if (dest / "README.md").is_file():
            shutil.copy2(dest / "README.md", tmp / "README.md")
        if (dest / "training").is_dir():
            shutil.copytree(dest / "training", tmp / "training")
        copy_model_files(final, tmp)  # a former model's parts are not carried over: none of its files may outlive it
        if (sketch_final / "controlnet").is_dir():
            copy_model_files(sketch_final / "controlnet", tmp / "controlnet")
        if data is not None:
            table = caption_table(data)
            (tmp / "captions.json").write_text(json.dumps(dict(sorted(table.items())), indent=0, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        (tmp / "training").mkdir(exist_ok=True)
        for name in ("stages.md", "stages.json"):
            shutil.copy2(out / "eval" / name, tmp / "training" / name)
        card = tmp / "README.md"
        if card.is_file():  # the card's table between the markers becomes this run's
            card.write_text(with_stage_table(card.read_text(), (out / "eval" / "stages.md").read_text()))
        if (tmp / "controlnet").is_dir():
            for name in ("controlnet.md", "controlnet.json"):
                shutil.copy2(out / "eval-controlnet" / name, tmp / "training" / name)
            if card.is_file():
                card.write_text(with_stage_table(card.read_text(), (out / "eval-controlnet" / "controlnet.md").read_text(),
                                                 markers=(CONTROLNET_TABLE_START, CONTROLNET_TABLE_END)))
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "eval" / "grid.png", figures / "stages-grid.png")
    shutil.copy2(out / "eval" / "stages.png", figures / "stages-quality-latency.png")
    for stage in ("decoder", "unet", "one-step", "controlnet-teacher", "controlnet-distill", "controlnet-one-step"):
        if (out / stage / "loss_curve.png").is_file():
            shutil.copy2(out / stage / "loss_curve.png", figures / f"loss-{stage}.png")
    if (out / "eval-controlnet" / "grid.png").is_file():
        shutil.copy2(out / "eval-controlnet" / "grid.png", figures / "controlnet-grid.png")
    print(f"[reproduce_mini] exported {final} to {dest}, figures to {figures}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    out, data, teacher = Path(args.output_dir).resolve(), Path(args.data).resolve(), Path(args.teacher).resolve()
    if not (teacher / "model_index.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: not a pipeline folder (no model_index.json).")
    for split in ("train", "val"):
        if not (data / split / "metadata.jsonl").is_file():
            raise SystemExit(f"--data {args.data}: no {split}/metadata.jsonl. Build the emoji data first, at the "
                             f"teacher's side: {build_command(args.data, common.data_side(teacher))}")
    out.mkdir(parents=True, exist_ok=True)
    run_stages(stage_commands(out, data, teacher, smoke=args.smoke, ablation=not args.no_ablation,
                              controlnet=not args.no_controlnet), out, args.jobs)
    if not args.no_eval:
        evaluate("evaluate_stages.py", out, data, teacher, out / "eval", smoke=args.smoke)
        if not args.no_controlnet:
            evaluate("evaluate_controlnet.py", out, data, teacher, out / "eval-controlnet", smoke=args.smoke)
    if args.export:
        export(out, Path(args.export), Path(args.figures), data)
    print(f"[reproduce_mini] done: the mini SDXS is {out / 'one-step' / 'final'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
