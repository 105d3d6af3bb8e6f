"""tools/load_test.py: a tiny run against each app through main(), and the checks that decide its verdict."""

import json
import sys

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import load_test  # noqa: E402


def run_main(tmp_path, *flags) -> tuple[int, dict]:
    out = tmp_path / "load.json"
    # RSS after a handful of requests is noise, not a leak: the 10% limit is checked in test_verdict.
    rc = load_test.main([*flags, "--backend", "torch", "--device", "cpu", "--max-rss-growth", "10", "--out", str(out)])
    return rc, json.loads(out.read_text())


def assert_served(report, requested, warmup):
    load = report["load"]
    assert load["requested"] == load["sent"] == load["succeeded"] == requested and load["failures"] == 0
    assert report["warmup"]["succeeded"] == warmup
    assert load["inputs_with_differing_answers"] == []
    latency = load["latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    assert load["throughput_rps"] > 0 and load["server_concurrency"] > 0
    rss = report["rss_mb"]
    assert 0 < rss["start"] and 0 < rss["before"] <= rss["peak"] and rss["after"] <= rss["peak"]
    assert rss["growth"] == pytest.approx((rss["after"] - rss["before"]) / rss["before"], abs=0.01)  # MiB rounded in the report
    assert report["server_files"]["files"] > 0  # the server's answers went to the run's own folder
    assert not psutil.pid_exists(report["server_pid"])  # the server was stopped


def test_text_app_small_load(tmp_path, capsys):
    """The default model: a tiny one the script builds with make-tiny; inputs repeat (3 distinct)."""
    rc, report = run_main(tmp_path, "--requests", "6", "--clients", "3", "--warmup", "1", "--distinct", "3")
    assert rc == 0 and report["passed"], report["problems"]
    assert (report["script"], report["endpoint"], report["clients"]) == ("app.py", "/generate", 3)
    assert_served(report, requested=6, warmup=1)
    assert "| result | PASS |" in capsys.readouterr().out


def test_sketch_app_small_load_and_live_strokes(tmp_path, tiny_model_dir):
    rc, report = run_main(tmp_path, "--app", "sketch", "--model", str(tiny_model_dir), "--requests", "3", "--clients", "2",
                          "--warmup", "1", "--distinct", "2", "--strokes", "4")
    assert rc == 0 and report["passed"], report["problems"]
    assert (report["script"], report["endpoint"]) == ("demo_sketch.py", "/sketch")
    assert_served(report, requested=3, warmup=1)
    live = report["live"]
    assert live["trigger_mode"] == "always_last"
    assert live["strokes"] == 4 and 1 <= live["sent"] <= 4 and live["answered"] == live["sent"]
    assert live["last_answered_stroke"] == 4 and live["final_is_last_sketch"] and live["last_differs_from_previous"]


# --------------------------------------------------------------------------- the checks, without a server


def save_png(path, size, colour="white"):
    Image.new("RGB", size, colour).save(path)
    return path


def test_image_digest_accepts_only_images_of_the_expected_size(tmp_path):
    good = save_png(tmp_path / "good.png", (512, 512))
    assert load_test.image_digest(good, 512) == load_test.image_digest(good, 512)
    assert load_test.image_digest(good, 512) != load_test.image_digest(save_png(tmp_path / "red.png", (512, 512), "red"), 512)
    with pytest.raises(load_test.BadAnswer, match="256x512, expected 512x512"):
        load_test.image_digest(save_png(tmp_path / "small.png", (256, 512)), 512)
    text = tmp_path / "not-an-image.png"
    text.write_text("error page")
    with pytest.raises(load_test.BadAnswer, match="not a readable image"):
        load_test.image_digest(text, 512)
    with pytest.raises(load_test.BadAnswer, match="no image"):
        load_test.image_digest(None, 512)


def test_text_answer_must_carry_the_seed_sent_and_one_image(tmp_path):
    app = load_test.TextApp(distinct=4, size=512)
    key, request = app.request(6)
    assert key == 2 and request[1] == 2 and request[2] is False  # seed = input number, not randomised
    image = {"image": str(save_png(tmp_path / "a.png", (512, 512)))}
    assert app.check(([image], 2, "ok"), request)
    with pytest.raises(load_test.BadAnswer, match="seed 3 came back"):
        app.check(([image], 3, "ok"), request)
    with pytest.raises(load_test.BadAnswer, match="2 images"):
        app.check(([image, image], 2, "ok"), request)


def test_strokes_accumulate(tmp_path):
    sketches = load_test.stroke_sequence(seed=5, n=4, folder=tmp_path)
    ink = [np.asarray(Image.open(p).convert("L")) < 128 for p in sketches]
    for before, after in zip(ink, ink[1:]):
        assert (after >= before).all() and after.sum() > before.sum()  # each sketch adds a stroke, keeps the rest


def record(key, error=None, digest="a", sent=0.0, started=0.5, done=1.0, queue_size=0):
    """A request as send() records it; the answer arrives 0.1 s before the client is done with it."""
    return {"key": key, "error": error, "digest": digest, "sent": sent, "started": started, "finished": done - 0.1, "done": done, "queue_size": queue_size}


def test_summary_counts_failures_unsent_requests_and_mixed_answers():
    records = [record(0, sent=0, started=0.0, done=1), record(1, sent=0, started=1, done=2, queue_size=3),
               record(0, digest="b", sent=1, started=2, done=3), record(2, error="boom", sent=2, started=3, done=4)]
    summary = load_test.summarise_load(records, requested=5, wall=4.0)
    assert summary["sent"] == 4 and summary["succeeded"] == 3 and summary["failures"] == 2  # one failed, one never sent
    assert summary["errors"] == ["boom"] and summary["inputs_with_differing_answers"] == [0]
    assert summary["latency_s"]["max"] == 2 and summary["queue_wait_s"]["max"] == 1 and summary["longest_queue"] == 3
    assert summary["processing_s"]["p50"] == 0.9 and summary["server_concurrency"] == 0.9 and summary["throughput_rps"] == 0.75


def passing_report(**changes):
    phase = {"requested": 3, "failures": 0, "errors": [], "inputs_with_differing_answers": []}
    report = {"warmup": dict(phase), "load": dict(phase), "rss_mb": {"growth": 0.02},
              "live": {"trigger_mode": "always_last", "timed_out": False, "final_is_last_sketch": True}}
    for key, value in changes.items():
        section, field = key.split("__")
        report[section][field] = value
    return report


def test_verdict():
    assert load_test.problems(passing_report()) == []
    assert load_test.problems(passing_report(rss_mb__growth=0.099)) == []
    assert "RSS grew by 10.0%" in load_test.problems(passing_report(rss_mb__growth=0.10))[0]
    assert load_test.problems(passing_report(rss_mb__growth=0.5), max_rss_growth=0.6) == []
    assert "2 of 3 requests failed" in load_test.problems(passing_report(load__failures=2, load__errors=["boom"]))[0]
    assert "different images" in load_test.problems(passing_report(warmup__inputs_with_differing_answers=[1]))[0]
    assert "not the last sketch" in load_test.problems(passing_report(live__final_is_last_sketch=False))[0]
    assert "not the last sketch" in load_test.problems(passing_report(live__timed_out=True))[0]
    assert "trigger_mode" in load_test.problems(passing_report(live__trigger_mode="once"))[0]


@pytest.mark.parametrize("flags", [["--requests", "0"], ["--requests", "100000"], ["--clients", "65"], ["--strokes", "1"]])
def test_load_is_bounded(flags, capsys):
    with pytest.raises(SystemExit):
        load_test.parse_args(flags)
    assert "must be" in capsys.readouterr().err


def test_rss_timeline_spans_the_run():
    sampler = load_test.RssSampler(pid=0)
    sampler.samples = [100.0, 110.0, 120.0, 130.0, 140.0, 150.0, 160.0, 170.0, 180.0]
    assert sampler.timeline(points=5) == [100, 120, 140, 160, 180]


def test_warmup_defaults_to_two_requests_per_client():
    assert load_test.parse_args(["--clients", "5"]).warmup == 10
    assert load_test.parse_args(["--clients", "5", "--warmup", "1"]).warmup == 1
