#!/usr/bin/env python
"""Apply deliberate bugs to the training code, one at a time, and report which ones the tests catch.

    python tools/mutation_check.py                  # every mutation; prints a markdown table
    python tools/mutation_check.py --only swap_score_difference_args
    python tools/mutation_check.py --list

Each mutation replaces one exact piece of source text (it must occur exactly once) in a temporary copy
of the repository's tracked files, then runs the test files named for it there. A mutation is "caught"
when those tests fail. One that survives means a plausible wiring bug would ship unnoticed: add a test.
The latest output is kept in train/README.md ("Tests that catch mis-wired losses").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # path relative to the repository root
    old: str  # exact source text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (files or node ids) that must go red
    why: str  # the bug it stands for, in a few words


STAGE_A = ("tests/test_distill_decoder.py",)
STAGE_B = ("tests/test_distill_unet.py",)
STAGE_C = ("tests/test_distill_one_step.py",)
COMMON = ("tests/test_train_common.py",)
TEACHER = ("tests/test_train_teacher.py",)

MUTATIONS: list[Mutation] = [
    # --- shared base (train/common.py) ---------------------------------------------------------------
    # --- stage A (train/distill_decoder.py) ---------------------------------------------------------
    # --- stage B (train/distill_unet.py) -------------------------------------------------------------
    # --- stage C (train/distill_one_step.py) ---------------------------------------------------------
    # --- teacher (train/train_teacher.py) ------------------------------------------------------------
]


def copy_repo(dest: Path) -> None:
    """The tracked files of the repository, as they are in the working tree (uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its text occurs {count} times in {mutation.file} (must be once); "
                         f"update the mutation to match the code:\n{mutation.old}")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, float]:
    """(caught, seconds): caught when pytest fails (or times out) on the mutated copy."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                                env=env, capture_output=True, timeout=timeout)
        caught = result.returncode != 0
    except subprocess.TimeoutExpired:
        caught = True
    return caught, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation's test run (default 900)")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file}: {m.why}")
        return 0

    rows, survived = [], []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="sdxs-mutant-") as tmp:
            root = Path(tmp)
            copy_repo(root)
            apply(m, root)
            caught, seconds = run_tests(root, m.tests, args.timeout)
        rows.append(f"| `{m.name}` | {m.file} | {m.why} | {'caught' if caught else '**SURVIVED**'} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
        if not caught:
            survived.append(m.name)
    print("\n| mutation | file | bug | result | test time |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutations caught." + (f" Survived: {', '.join(survived)}." if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
