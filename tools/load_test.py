#!/usr/bin/env python
"""Bounded load test of the Gradio apps, on this machine only (all traffic goes to 127.0.0.1).

    python tools/load_test.py                                    # app.py, tiny random model, 200 requests from 16 clients
    python tools/load_test.py --app sketch --out load.json       # demo_sketch.py: the same, plus 20 rapid strokes
    python tools/load_test.py --requests 6 --clients 3 --backend torch   # a quick check (about 30 s on a 2-core CPU)
    python tools/load_test.py --model models/emoji-teacher       # a local folder, or a model already in the HF cache

What it does; it stops by itself (at most --requests requests, within --time-limit seconds):
1. Starts app.py (or demo_sketch.py) as a subprocess on 127.0.0.1 at a free port, offline (no hub traffic),
   with --model or a tiny random model it writes with `python -m sdxs make-tiny` to a temporary folder,
   and waits until it answers (--startup-timeout).
2. Warm-up: --warmup requests from all the clients (default 2 per client). The server's RSS "before"
   is read after it, so one-time allocations (first calls, one allocator arena per busy thread) are
   not counted as growth; the RSS at start is reported too.
3. Load: --clients gradio_client clients, each sending its next request when the previous one is
   answered, --requests in all, cycling over --distinct different inputs (prompts and seeds; sketches
   for the sketch app). An answer fails unless it is an image file of --size x --size pixels (and, for
   the text app, carries the seed that was sent); all answers to the same input must be the same image
   (nothing mixed up between clients). Per request: latency, the wait in the server's queue, the
   longest queue the server reported. "Server concurrency" is the summed processing time over the
   load's wall time: about 1 when requests are served one at a time (both apps use concurrency_limit=1).
4. Sketch app only, live strokes: one client draws --strokes strokes, one every --stroke-interval s,
   each sketch adding a stroke to the previous one. trigger_mode="always_last" is a rule the browser
   applies, not the server, so the client applies it as Gradio's front-end does: while an update runs,
   a new stroke only marks the canvas as changed; when the update ends, one update goes out with the
   canvas as it is then. Measured: how many updates were sent (and run) for the strokes, and the time
   from the last stroke to its image. Checked: the app declares trigger_mode="always_last" for the
   endpoint (what makes a browser behave like this client), and the last image is the last sketch's:
   the same pixels as a direct call for it, which differ from the previous sketch's (so it can fail).
   (Cancelling stale jobs through the API instead is no option: Gradio's /cancel also stops the
   running job of the same session, whose answer then never comes.)
5. Prints a markdown table and writes --out JSON. Exit code 1 on any failure, or RSS growth >= 10%.
The server is stopped at the end, also on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the only address this script talks to
MAX_RSS_GROWTH = 0.10
MAX_REQUESTS = 10_000
MAX_CLIENTS = 64
PROMPTS = [
    "a close-up picture of an old man standing in the rain",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "a red apple on a wooden table",
    "a cute cat wearing a tiny hat",
    "a lighthouse on a cliff at sunset, oil painting",
]
APPS = {  # --app: (script, endpoint)
    "text": ("app.py", "/generate"),
    "sketch": ("demo_sketch.py", "/sketch"),
}


class BadAnswer(Exception):
    """The server answered, but not with what was asked for."""


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_tiny_model(workdir: Path) -> Path:
    folder = workdir / "tiny-model"
    subprocess.run([sys.executable, "-m", "sdxs", "make-tiny", str(folder)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return folder


def start_server(args, model: Path | str, workdir: Path, private_ov_cache: bool) -> tuple[subprocess.Popen, str, Path]:
    script, _ = APPS[args.app]
    port = free_port()
    command = [sys.executable, str(ROOT / script), "--model", str(model), "--host", HOST, "--port", str(port), "--backend", args.backend]
    if args.device:
        command += ["--device", args.device]
    env = dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",  # nothing leaves the machine; a hub id must already be in the cache
        GRADIO_TEMP_DIR=str(workdir / "server-files"),  # the answers' image files, counted at the end
        PYTHONUNBUFFERED="1",
    )
    if private_ov_cache:  # a throw-away model's OpenVINO conversion goes with it
        env["SDXS_OPENVINO_CACHE"] = str(workdir / "openvino-cache")
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:  # the child keeps its own copy of the file handle
        # Its own session: a Ctrl-C reaches only this script, which then stops the server itself.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    return proc, f"http://{HOST}:{port}/", log_path


def wait_until_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> float:
    """Seconds until the server answered; raises RuntimeError with the log's tail if it did not."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} before answering:\n{log_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return time.monotonic() - start
        except OSError:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the app did not answer within {timeout:.0f} s (--startup-timeout):\n{log_tail(log_path)}") from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def log_tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"


def rss_mb(pid: int) -> float:
    """Resident memory of the server process and any children, in MiB."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


class RssSampler:
    """Samples the server's RSS every `period` s in a thread: the peak, and a timeline."""

    def __init__(self, pid: int, period: float = 0.25):
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except psutil.Error:
                return
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def timeline(self, points: int = 5) -> list[int]:
        """RSS at `points` evenly spaced moments from the first sample to the last: growth that keeps
        on going (a leak) versus a level reached early (buffers, caches)."""
        if not self.samples:
            return []
        return [round(self.samples[round(i * (len(self.samples) - 1) / (points - 1))]) for i in range(points)]


def folder_usage(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 2**20, 2)}


# ----------------------------------------------------------------------------- inputs and answers


def draw_figure(seed: int, n_strokes: int) -> list[list[tuple[int, int]]]:
    """A random-walk line drawing: n strokes, each a short polyline that starts where the last ended."""
    rng = random.Random(seed)
    x, y = 256, 256
    strokes = []
    for _ in range(n_strokes):
        points = [(x, y)]
        for _ in range(3):
            x = min(max(x + rng.randint(-70, 70), 24), 488)
            y = min(max(y + rng.randint(-70, 70), 24), 488)
            points.append((x, y))
        strokes.append(points)
    return strokes


def save_sketch(strokes, path: Path) -> Path:
    """Dark strokes on white paper, 512x512, as the canvas composite is sent."""
    image = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(image)
    for points in strokes:
        draw.line(points, fill="black", width=8, joint="curve")
    image.save(path)
    return path


def stroke_sequence(seed: int, n: int, folder: Path) -> list[Path]:
    """Sketch k holds the first k+1 strokes: what the canvas looks like after each stroke."""
    folder.mkdir(parents=True, exist_ok=True)
    strokes = draw_figure(seed, n)
    return [save_sketch(strokes[: k + 1], folder / f"stroke-{k:03d}.png") for k in range(n)]


def canvas_value(sketch: Path, blank: Path) -> dict:
    """The Sketchpad's API value: white background, the drawing as the composite."""
    from gradio_client import handle_file

    return {"background": handle_file(blank), "layers": [], "composite": handle_file(sketch)}


def image_digest(path, size: int) -> str:
    """A hash of the pixels of the image file at `path`; BadAnswer unless it is a size x size image."""
    if not path:
        raise BadAnswer("the answer holds no image")
    try:
        with Image.open(path) as image:
            pixels = image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BadAnswer(f"not a readable image file: {err}") from None
    if pixels.size != (size, size):
        raise BadAnswer(f"the image is {pixels.width}x{pixels.height}, expected {size}x{size}")
    return hashlib.sha1(pixels.tobytes()).hexdigest()


class TextApp:
    """app.py's /generate: (prompt, seed, randomize_seed, ...) -> (gallery, seed used, status).
    Arguments go by position, in the order of the event's inputs; the rest keep their defaults."""

    def __init__(self, distinct: int, size: int):
        self.distinct, self.size = distinct, size

    def request(self, i: int) -> tuple[int, tuple]:
        key = i % self.distinct
        return key, (PROMPTS[key % len(PROMPTS)], key, False)  # prompt, seed, randomize_seed

    def check(self, answer, request: tuple) -> str:
        gallery, seed, _status = answer
        if seed != request[1]:
            raise BadAnswer(f"seed {seed} came back for a request with seed {request[1]}")
        if len(gallery) != 1:
            raise BadAnswer(f"{len(gallery)} images came back, 1 was asked for")
        return image_digest(gallery[0]["image"], self.size)


class SketchApp:
    """demo_sketch.py's /sketch: (canvas, prompt, template, control_strength, seed) -> (image, sketch as seen, status)."""

    def __init__(self, distinct: int, size: int, workdir: Path):
        self.distinct, self.size = distinct, size
        folder = workdir / "sketches"
        folder.mkdir(parents=True, exist_ok=True)
        self.blank = save_sketch([], folder / "blank.png")
        self.sketches = [save_sketch(draw_figure(seed=k, n_strokes=2 + k % 6), folder / f"sketch-{k:03d}.png") for k in range(distinct)]

    def request(self, i: int) -> tuple[int, tuple]:
        key = i % self.distinct
        return key, self.sketch_request(self.sketches[key], PROMPTS[key % len(PROMPTS)], seed=key)

    def sketch_request(self, sketch: Path, prompt: str, seed: int) -> tuple:
        return canvas_value(sketch, self.blank), prompt, "{prompt}", 0.8, seed  # canvas, prompt, template, strength, seed

    def check(self, answer, request: tuple) -> str:
        output, seen, _status = answer
        return image_digest(output, self.size) + image_digest(seen, self.size)


# ----------------------------------------------------------------------------- requests


def connect(url: str, workdir: Path):
    from gradio_client import Client

    downloads = workdir / "client-files"
    downloads.mkdir(parents=True, exist_ok=True)
    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


def queue_record(job) -> dict:
    """When the server started the job and when its answer arrived (before the client downloads the
    image files), and the longest queue the server reported while it waited: from gradio_client's
    record of the server's queue messages (what `async for update in job` yields)."""
    from gradio_client.utils import Status, StatusUpdate

    record = {"started": None, "finished": None, "queue_size": 0}
    updates = job.communicator.updates if job is not None and job.communicator else None
    while updates is not None and not updates.empty():
        update = updates.get_nowait()
        if not isinstance(update, StatusUpdate):
            continue
        if update.code == Status.PROCESSING and record["started"] is None:
            record["started"] = update.time.timestamp()
        if update.code == Status.FINISHED:
            record["finished"] = update.time.timestamp()
        record["queue_size"] = max(record["queue_size"], update.queue_size or 0)
    return record


def send(client, endpoint: str, app, i: int, deadline: float) -> dict:
    """One request, waited for until `deadline` (time.time()); a record of what happened."""
    key, request = app.request(i)
    record = {"key": key, "sent": time.time(), "error": None, "digest": None}
    job = None
    try:
        job = client.submit(*request, api_name=endpoint)
        answer = job.result(timeout=max(deadline - record["sent"], 0.1))
        record["digest"] = app.check(answer, request)
    except concurrent.futures.TimeoutError:
        job.cancel()
        record["error"] = "no answer before the time limit"
    except BadAnswer as err:
        record["error"] = str(err)
    except Exception as err:  # noqa: BLE001 - any error the client raises is a failed request, recorded
        record["error"] = f"{type(err).__name__}: {err}"
    record["done"] = time.time()
    record.update(queue_record(job))
    return record


def run_clients(url: str, workdir: Path, endpoint: str, app, n_clients: int, first: int, count: int, deadline: float) -> list[dict]:
    """`n_clients` clients in threads take request numbers first..first+count-1 in turn, each waiting
    for its answer before it sends the next; returns one record per request sent."""
    numbers = iter(range(first, first + count))
    lock = threading.Lock()
    records: list[dict] = []

    def client_loop():
        try:
            client = connect(url, workdir)
        except Exception as err:  # noqa: BLE001
            with lock:
                records.append({"key": None, "error": f"client could not connect: {type(err).__name__}: {err}"})
            return
        while time.time() < deadline:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            record = send(client, endpoint, app, i, deadline)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


# ----------------------------------------------------------------------------- live strokes (sketch app)


def live_strokes(client, endpoint, app, strokes: list[Path], interval: float, prompt: str, seed: int, deadline: float) -> dict:
    """Strokes drawn every `interval` s, sent as the browser sends them under trigger_mode="always_last":
    a stroke while an update runs only marks the canvas as changed; when the update ends, one update
    goes out with the canvas as it is then. Returns what was sent and the last answer's pixels."""
    start = time.time()
    drawn, changed, job, request, sent, answered = 0, False, None, None, [], []
    while (drawn < len(strokes) or changed or job is not None) and time.time() < deadline:
        if drawn < len(strokes) and time.time() >= start + drawn * interval:
            drawn, changed = drawn + 1, True  # the canvas now shows strokes[drawn - 1]
        if job is not None and job.done():
            answered.append((sent[-1], app.check(job.result(), request), time.time()))
            job = None
        if job is None and changed:
            request = app.sketch_request(strokes[drawn - 1], prompt, seed)
            job, changed = client.submit(*request, api_name=endpoint), False
            sent.append(drawn - 1)
        time.sleep(0.002)
    last_stroke, last_digest, last_time = answered[-1] if answered else (None, None, None)
    return {
        "strokes": len(strokes),
        "sent": len(sent),  # = the server's executions: nothing is cancelled
        "answered": len(answered),
        "last_answered_stroke": None if last_stroke is None else last_stroke + 1,
        "last_stroke_to_image_s": None if last_time is None else round(last_time - (start + (len(strokes) - 1) * interval), 3),
        "timed_out": time.time() >= deadline,
        "final_digest": last_digest,
    }


def run_live(url, workdir, endpoint, app: SketchApp, args, deadline) -> dict:
    """The live-stroke scenario, then direct calls for the last sketch and the one before it (same
    prompt and seed): the last answer must be the last sketch's image, which must differ from the
    previous sketch's (else the check could not fail). Also reads the endpoint's trigger_mode."""
    client = connect(url, workdir)
    trigger = next((d.get("trigger_mode") for d in client.config["dependencies"] if d.get("api_name") == endpoint.lstrip("/")), None)
    strokes = stroke_sequence(seed=1000, n=args.strokes, folder=workdir / "strokes")
    prompt, seed = PROMPTS[3], 7

    def direct(sketch: Path) -> str:
        request = app.sketch_request(sketch, prompt, seed)
        return app.check(client.predict(*request, api_name=endpoint), request)

    try:
        result = live_strokes(client, endpoint, app, strokes, args.stroke_interval, prompt, seed, deadline)
        last, previous = direct(strokes[-1]), direct(strokes[-2])
    except Exception as err:  # noqa: BLE001 - a failed answer fails the scenario, recorded
        return {"trigger_mode": trigger, "stroke_interval_s": args.stroke_interval, "error": f"{type(err).__name__}: {err}"}
    result["final_is_last_sketch"] = result.pop("final_digest") == last
    result["last_differs_from_previous"] = last != previous
    return {"trigger_mode": trigger, "stroke_interval_s": args.stroke_interval, **result}


# ----------------------------------------------------------------------------- report


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3), "max": round(max(values), 3)}


def summarise_load(records: list[dict], requested: int, wall: float) -> dict:
    done = [r for r in records if "done" in r]
    ok = [r for r in done if r["error"] is None]
    processing = [r["finished"] - r["started"] for r in done if r.get("started") is not None and r.get("finished") is not None]
    waits = [r["started"] - r["sent"] for r in done if r.get("started") is not None]
    digests: dict[int, set] = {}
    for r in ok:
        digests.setdefault(r["key"], set()).add(r["digest"])
    errors = sorted({r["error"] for r in records if r["error"]})
    return {
        "requested": requested,
        "sent": len(done),
        "succeeded": len(ok),
        "failures": requested - len(ok),  # failed, or never sent (time limit, no connection)
        "errors": errors[:5],
        "inputs_with_differing_answers": sorted(k for k, d in digests.items() if len(d) > 1),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 2) if wall > 0 else None,
        "latency_s": percentiles([r["done"] - r["sent"] for r in done]),
        "queue_wait_s": percentiles(waits),
        "processing_s": percentiles(processing),  # the server's start to its answer, as the clients saw them
        "longest_queue": max((r["queue_size"] for r in done), default=0),
        "server_concurrency": round(sum(processing) / wall, 2) if wall > 0 and processing else None,
    }


def problems(report: dict, max_rss_growth: float = MAX_RSS_GROWTH) -> list[str]:
    """Why the run fails; empty when it passes."""
    found = []
    for phase in ("warmup", "load"):
        p = report[phase]
        if p["failures"]:
            found.append(f"{phase}: {p['failures']} of {p['requested']} requests failed ({'; '.join(p['errors']) or 'not sent in time'})")
        if p["inputs_with_differing_answers"]:
            found.append(f"{phase}: different images for the same input (inputs {p['inputs_with_differing_answers'][:5]})")
    growth = report["rss_mb"]["growth"]
    if growth is None or growth >= max_rss_growth:
        found.append(f"server RSS grew by {growth:.1%} (limit {max_rss_growth:.0%})" if growth is not None else "server RSS not measured")
    live = report.get("live")
    if live:
        if live["trigger_mode"] != "always_last":
            found.append(f"the endpoint's trigger_mode is {live['trigger_mode']!r}, not 'always_last'")
        if "error" in live:
            found.append(f"live strokes: {live['error']}")
        elif live["timed_out"] or not live["final_is_last_sketch"]:
            found.append("live strokes: the last image shown is not the last sketch's")
    return found


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "app.py", "demo_sketch.py", "sdxs")
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted_app_changes": bool(changed)}


def markdown_table(report: dict) -> str:
    w, load, rss = report["warmup"], report["load"], report["rss_mb"]
    lat, wait = load["latency_s"], load["queue_wait_s"]
    rows = [
        ("app", f"{report['script']} `{report['endpoint']}`, model {report['model']}, backend {report['backend']}"),
        ("code", f"commit {report['git']['commit']}" + (" + uncommitted app changes" if report["git"]["uncommitted_app_changes"] else "")),
        ("start-up", f"{report['startup_s']} s until the server answered"),
        ("warm-up", f"{w['succeeded']}/{w['requested']} ok from the same clients; latency p50 {w['latency_s']['p50']} s"),
        ("load", f"{load['requested']} requests from {report['clients']} clients, {load['sent']} sent, {load['failures']} failed"),
        ("latency (s)", f"p50 {lat['p50']}, p95 {lat['p95']}, max {lat['max']}"),
        ("queue wait (s)", f"p50 {wait['p50']}, p95 {wait['p95']}, max {wait['max']}; longest queue reported: {load['longest_queue']}"),
        ("processing (s)", f"p50 {load['processing_s']['p50']}, p95 {load['processing_s']['p95']} (server start to answer, seen by the clients)"),
        ("server concurrency", f"{load['server_concurrency']} (summed processing time / wall time; 1 = one at a time)"),
        ("throughput", f"{load['throughput_rps']} requests/s over {load['wall_s']} s"),
        ("same input, same image", "yes" if not load["inputs_with_differing_answers"] else f"no: {load['inputs_with_differing_answers'][:5]}"),
        ("server RSS (MiB)", f"start {rss['start']}, before {rss['before']}, after {rss['after']}, peak {rss['peak']}; growth {rss['growth']:+.1%}"),
        ("RSS during the load (MiB)", " → ".join(map(str, rss["load_timeline"]))),
        ("server files", f"{report['server_files']['files']} files, {report['server_files']['mb']} MiB written"),
        ("server log", f"{report['server_log_tracebacks']} tracebacks"),
    ]
    if live := report.get("live"):
        rows.append(("trigger_mode", f"{live['trigger_mode']}; strokes every {live['stroke_interval_s']} s"))
        if "error" in live:
            rows.append(("live strokes", f"failed: {live['error']}"))
        else:
            rows.append((
                "live strokes (browser rule)",
                f"{live['strokes']} strokes, {live['sent']} sent and run, {live['answered']} answered; last answered: "
                f"stroke {live['last_answered_stroke']}; its image = a direct call's for the last sketch: "
                f"{live['final_is_last_sketch']} (differs from the sketch before: {live['last_differs_from_previous']}); "
                f"last stroke to its image {live['last_stroke_to_image_s']} s",
            ))
    rows.append(("result", "PASS" if report["passed"] else "FAIL: " + "; ".join(report["problems"])))
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Bounded load test of app.py / demo_sketch.py on 127.0.0.1.")
    # what to serve
    parser.add_argument("--app", default="text", choices=list(APPS), help="text: app.py /generate; sketch: demo_sketch.py /sketch (default text)")
    parser.add_argument("--model", default=None, help="local model folder, or a hub id already in the HF cache (default: a tiny random model built now)")
    parser.add_argument("--backend", default="auto", help="passed to the app (default auto: OpenVINO on a CPU when installed)")
    parser.add_argument("--device", default=None, help="passed to the app (default: the app's choice)")
    # how much load, bounded
    parser.add_argument("--requests", type=int, default=200, help=f"requests under load, 1..{MAX_REQUESTS} (default 200)")
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients, 1..{MAX_CLIENTS} (default 16)")
    parser.add_argument("--warmup", type=int, default=None, help="requests from all clients before the load and the RSS 'before' (default 2 per client)")
    parser.add_argument("--distinct", type=int, default=20, help="different inputs cycled through (default 20)")
    parser.add_argument("--strokes", type=int, default=20, help="sketch app: strokes in the live scenario, >= 2 (default 20)")
    parser.add_argument("--stroke-interval", type=float, default=0.05, help="sketch app: seconds between strokes (default 0.05)")
    parser.add_argument("--size", type=int, default=512, help="expected image side in pixels (default 512)")
    parser.add_argument("--max-rss-growth", type=float, default=MAX_RSS_GROWTH, help=f"fail at this relative RSS growth or more (default {MAX_RSS_GROWTH})")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for warm-up, load and live strokes together (default 900)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the app to answer (default 600)")
    # output
    parser.add_argument("--out", default=None, help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be between 1 and {MAX_REQUESTS}, got {args.requests}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be between 1 and {MAX_CLIENTS}, got {args.clients}")
    args.warmup = 2 * args.clients if args.warmup is None else args.warmup
    if args.warmup < 1 or args.distinct < 1 or args.strokes < 2 or args.stroke_interval < 0 or args.time_limit <= 0:
        parser.error("--warmup and --distinct must be >= 1, --strokes >= 2, --stroke-interval >= 0, --time-limit > 0")
    return args


def run(args, workdir: Path) -> dict:
    model = args.model or make_tiny_model(workdir)
    model_label = args.model or "tiny random (python -m sdxs make-tiny)"
    script, endpoint = APPS[args.app]
    app = TextApp(args.distinct, args.size) if args.app == "text" else SketchApp(args.distinct, args.size, workdir)
    proc, url, log_path = start_server(args, model, workdir, private_ov_cache=args.model is None)
    try:
        report = {
            "app": args.app, "script": script, "endpoint": endpoint, "model": model_label, "backend": args.backend,
            "clients": args.clients, "server_pid": proc.pid, "git": git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()},
        }
        report["startup_s"] = round(wait_until_ready(proc, url, log_path, args.startup_timeout), 1)
        deadline = time.time() + args.time_limit
        rss_start = rss_mb(proc.pid)
        start = time.time()
        report["warmup"] = summarise_load(run_clients(url, workdir, endpoint, app, args.clients, 0, args.warmup, deadline), args.warmup, time.time() - start)
        rss_before = rss_mb(proc.pid)
        start = time.time()
        with RssSampler(proc.pid) as sampler:
            records = run_clients(url, workdir, endpoint, app, args.clients, args.warmup, args.requests, deadline)
        report["load"] = summarise_load(records, args.requests, time.time() - start)
        if args.app == "sketch":
            report["live"] = run_live(url, workdir, endpoint, app, args, deadline)
        rss_after = rss_mb(proc.pid)
        report["rss_mb"] = {
            "start": round(rss_start), "before": round(rss_before), "after": round(rss_after),
            "peak": round(max([*sampler.samples, rss_after])), "load_timeline": sampler.timeline(),
            "growth": round((rss_after - rss_before) / rss_before, 4),
        }
        report["server_files"] = folder_usage(workdir / "server-files")
        report["server_log_tracebacks"] = log_tail(log_path, chars=10**9).count("Traceback")
    finally:
        stop_server(proc)
    report["problems"] = problems(report, args.max_rss_growth)
    report["passed"] = not report["problems"]
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdxs-load-", ignore_cleanup_errors=True) as tmp:
        try:
            report = run(args, Path(tmp))
        except RuntimeError as err:  # the app did not start: its log says why
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(markdown_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` stops the server too, as Ctrl-C does
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the server was stopped", file=sys.stderr)
        sys.exit(130)
