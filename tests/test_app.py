"""The Gradio app's handlers, called directly, and its start-up error."""

import logging
import subprocess
import sys

import gradio as gr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, offline_env
from sdxs.validation import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS
from test_validation import any_value

sys.path.insert(0, str(ROOT))
import app  # noqa: E402


def test_generate_handler(tiny_engine):
    generate = app.make_generate(tiny_engine)
    images, seed, status = generate("a cat", 42, False, 2, "tiny")
    assert len(images) == 2 and seed == 42
    assert "2 image(s)" in status and "seed 42" in status and "ms" in status
    again, _, _ = generate("a cat", 42, False, 2, "tiny")
    assert images[0].tobytes() == again[0].tobytes()


def test_randomised_seed_is_returned(tiny_engine):
    generate = app.make_generate(tiny_engine)
    _, seed, status = generate("a cat", 0, True, 1, "large")
    assert 0 <= seed <= app.MAX_SEED and f"seed {seed}" in status


def test_bad_input_becomes_a_gradio_error(tiny_engine):
    generate = app.make_generate(tiny_engine)
    with pytest.raises(gr.Error, match="Unknown decoder"):
        generate("a cat", 0, False, 1, "nope")


def test_demo_builds(tiny_engine):
    demo = app.build_demo(tiny_engine)
    assert isinstance(demo, gr.Blocks)
    assert any(getattr(fn, "api_name", None) == "generate" for fn in demo.fns.values())


def test_no_network_gives_one_actionable_error(tmp_path):
    # An explicit --model never falls back to the built-in model (that is for no --model: test_builtin_model.py).
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "IDKiro/sdxs-512-dreamshaper"], env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "IDKiro/sdxs-512-dreamshaper" in proc.stderr and "--model" in proc.stderr and "built-in" not in proc.stderr


def test_style_variant_choice(tiny_engine, tiny_lora_dir):
    variant = tiny_engine.with_lora(str(tiny_lora_dir))
    engines = {"Base": tiny_engine, "Styled": variant}
    generate = app.make_generate(engines)
    base, _, _ = generate("a cat", 9, False, 1, "tiny", "Base")
    styled, _, status = generate("a cat", 9, False, 1, "tiny", "Styled")
    assert base[0].tobytes() != styled[0].tobytes() and "tiny-lora" in status
    app.build_demo(engines)


def test_load_engines_adds_a_lora_variant_and_survives_a_missing_one(tiny_model_dir, tiny_lora_dir, capsys):
    engines = app.load_engines(app.parse_args(["--model", str(tiny_model_dir), "--lora", str(tiny_lora_dir), "--device", "cpu", "--backend", "torch"]))
    assert len(engines) == 2
    engines = app.load_engines(app.parse_args(["--model", str(tiny_model_dir), "--lora", "/no/such/lora", "--device", "cpu", "--backend", "torch"]))
    assert len(engines) == 1 and "not loaded" in capsys.readouterr().err


# --- bad input: every value checked by the app's own code, with a message; the server keeps serving

class FakeEngine:
    """Records what reaches the engine; a 64 px model with only the large decoder."""

    def __init__(self, decoders=("large",), native_size=64):
        import torch

        self.decoders, self.default_decoder, self.native_size = list(decoders), decoders[0], native_size
        self.name, self.device, self.dtype, self.calls = "fake-64px", torch.device("cpu"), torch.float32, []

    def text_to_image(self, prompt, *, seed, num_images, decoder, width=None, height=None):
        from PIL import Image

        from sdxs import Generation

        self.calls.append(dict(prompt=prompt, seed=seed, num_images=num_images, decoder=decoder, width=width, height=height))
        if decoder not in self.decoders:
            raise ValueError(f"Unknown decoder '{decoder}'; this model has: {', '.join(self.decoders)}.")
        size = width or self.native_size
        timings = dict(text_encoder=0.001, unet=0.002, decoder=0.003, total=0.006)
        return Generation([Image.new("RGB", (size, size))] * num_images, [seed + i for i in range(num_images)], [prompt] * num_images, [], timings)


@pytest.mark.parametrize(
    "seed, randomize, num_images, message",
    [
        (2**64, False, 1, "Seed must be a whole number from 0 to 4294967295; got 18446744073709551616"),
        (None, False, 1, "Seed is empty"),
        ("", False, 1, "Seed is empty"),
        (1.5, False, 1, "got 1.5"),
        ("abc", False, 1, "got 'abc'"),
        (-1, False, 1, "got -1"),
        (0, True, 0, "Number of images must be a whole number from 1 to 4; got 0"),
        (0, True, 1000, "got 1000"),
        (0, True, 1.5, "got 1.5"),
        (0, True, None, "Number of images is empty"),
    ],
)
def test_bad_values_become_clear_messages(seed, randomize, num_images, message):
    engine = FakeEngine()
    generate = app.make_generate({"Fake": engine})
    with pytest.raises(gr.Error) as err:
        generate("a cat", seed, randomize, num_images, "large")
    assert message in err.value.message
    assert engine.calls == []  # refused before the engine
    images, seed, _ = generate("a cat", 3, False, 1, "large")  # and the next request is served
    assert len(images) == 1 and seed == 3


def test_empty_and_huge_prompts_are_noted_and_the_huge_one_cut_before_the_engine():
    engine = FakeEngine()
    generate = app.make_generate({"Fake": engine})
    _, _, status = generate("   \n ", 1, False, 1, "large")
    assert engine.calls[-1]["prompt"] == "" and "Note: The prompt is empty" in status
    _, _, status = generate("a cat\x00 " * 2_000_000, 1, False, 1, "large")  # 14 MB
    assert len(engine.calls[-1]["prompt"]) <= 1000 and "14,000,000 characters" in status


def test_a_broken_engine_is_a_message_not_a_dead_server():
    engine = FakeEngine()
    engine.text_to_image = lambda *a, **k: 1 / 0
    with pytest.raises(gr.Error, match="Generation failed on the server \\(ZeroDivisionError\\); the app is still running"):
        app.make_generate({"Fake": engine})("a cat", 1, False, 1, "large")


def test_a_gradio_message_from_below_passes_unchanged():
    def quota(*args, **kwargs):
        raise gr.Error("You have exceeded your GPU quota")  # what ZeroGPU's decorator raises

    engine = FakeEngine()
    engine.text_to_image = quota
    with pytest.raises(gr.Error) as err:
        app.make_generate({"Fake": engine})("a cat", 1, False, 1, "large")
    assert err.value.message == "You have exceeded your GPU quota"


@settings(max_examples=150, deadline=None)
@given(prompt=st.one_of(st.none(), st.text(max_size=50)), seed=any_value, randomize=st.booleans(), num_images=any_value, style=any_value)
def test_any_request_is_generated_valid_or_refused_with_a_message(prompt, seed, randomize, num_images, style):
    engine = FakeEngine()
    try:
        images, used_seed, status = app.make_generate({"Fake": engine})(prompt, seed, randomize, num_images, "large", style)
    except gr.Error as err:
        assert err.message and engine.calls == []
        return
    call = engine.calls[-1]
    assert 0 <= call["seed"] <= app.MAX_SEED and call["seed"] == used_seed and (randomize or used_seed == float(seed))
    assert 1 <= call["num_images"] <= app.MAX_IMAGES == 4 and len(images) == call["num_images"]
    assert isinstance(call["prompt"], str) and f"seed {used_seed}" in status


def test_defaults_follow_the_model_decoder_and_size():
    engine = FakeEngine(decoders=("large",), native_size=64)
    demo = app.build_demo({"Fake": engine})
    decoder = next(b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.label == "Image decoder")
    assert decoder.value == "large" and decoder.choices == [("Large (SD VAE, quality)", "large")]
    images, _, _ = app.make_generate({"Fake": engine})("a cat", 1, False, 1, "large")
    assert images[0].size == (64, 64) and engine.calls[-1]["width"] is None  # the engine's native size


def test_the_api_is_one_named_endpoint_with_labelled_outputs(tiny_engine):
    api = app.build_demo(tiny_engine).get_api_info()
    assert list(api["named_endpoints"]) == ["/generate"]
    endpoint = api["named_endpoints"]["/generate"]
    assert [p["label"] for p in endpoint["returns"]] == ["Images", "Seed", "Status"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == ["prompt", "seed", "randomize_seed", "num_images", "decoder", "style"]


def test_main_binds_loopback_caps_uploads_and_logs_progress(tiny_model_dir, monkeypatch, caplog):
    from PIL import Image

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, delete_cache=self.delete_cache))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # launch() lowers it; restored after
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    caplog.set_level(logging.INFO, logger="sdxs")
    assert app.main(["--model", str(tiny_model_dir), "--backend", "torch", "--port", "7999"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999 and launched["share"] is False
    assert launched["max_file_size"] == MAX_UPLOAD_BYTES and Image.MAX_IMAGE_PIXELS == MAX_UPLOAD_PIXELS
    assert launched["delete_cache"] == (3600, 3600)  # Gradio's temporary files do not pile up
    assert "Loading" in caplog.text and "this machine only" in caplog.text


def test_malloc_arenas_are_capped_unless_the_environment_says(monkeypatch):
    """The apps cap glibc's malloc arenas before loading (RSS flat under load, docs/reliability.md)."""
    from sdxs.webapp import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True  # glibc on Linux: mallopt(M_ARENA_MAX, 2) accepted
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the person's own setting wins


def _generate_event(demo):
    return next(fn for fn in demo.fns.values() if getattr(fn, "api_name", None) == "generate")


def test_one_request_at_a_time_on_a_cpu(tiny_engine):
    event = _generate_event(app.build_demo(tiny_engine))
    assert event.concurrency_limit == 1 and tiny_engine.device.type == "cpu"


def test_batched_serving_gives_each_visitor_the_images_they_would_get_alone(tiny_engine):
    """What a GPU Space runs (forced on here): the page's own event serves visitors at once, their
    requests share forwards, and each answer equals the one served alone."""
    import threading

    import numpy as np

    from sdxs.webapp import GPU_CONCURRENCY

    engine = app.SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch")
    event = _generate_event(app.build_demo(engine, batch_requests=True))
    assert event.concurrency_limit == GPU_CONCURRENCY
    runner = next(iter(event.fn.runners.values()))
    runner.window_s = 1.0  # all three arrive inside one gathering window
    requests = [("a cat", 5, 2), ("a dog", 9, 1), ("a red circle", 11, 1)]
    answers, start = [None] * 3, threading.Barrier(3)

    def visit(i, prompt, seed, n):
        start.wait()
        answers[i] = event.fn(prompt, seed, False, n, "tiny", None)

    threads = [threading.Thread(target=visit, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert runner.forwards == 1
    alone = app.make_generate(tiny_engine)
    for (prompt, seed, n), (images, used_seed, status) in zip(requests, answers):
        solo_images, _, _ = alone(prompt, seed, False, n, "tiny")
        assert used_seed == seed and len(images) == n and f"{n} image(s)" in status
        for a, b in zip(images, solo_images):
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_on_zero_gpu_the_app_compiles_ahead_of_time_for_its_batch_sizes(tiny_model_dir, monkeypatch):
    import sdxs.aot

    calls = []
    monkeypatch.setattr(sdxs.aot, "compile_ahead_of_time", lambda engine, batch_sizes: calls.append((engine.name, batch_sizes)) or [])
    args = app.parse_args(["--model", str(tiny_model_dir), "--lora", "none", "--device", "cpu", "--backend", "torch"])
    app.load_engines(args)
    assert calls == []  # not on ZeroGPU: nothing compiled ahead of time
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    app.load_engines(args)
    assert calls == [(str(tiny_model_dir), (1, 2, 3, 4))]  # the app's 1-4 images per request


def test_requests_are_batched_on_a_gpu_but_not_on_zero_gpu(monkeypatch):
    from types import SimpleNamespace

    import torch

    from sdxs.webapp import batches_requests

    gpu, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    assert batches_requests(gpu) and not batches_requests(cpu)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not batches_requests(gpu)  # each ZeroGPU request holds its own GPU slot


def test_a_compiled_gpu_server_prepares_every_batch_bucket_its_batcher_can_form(tiny_engine, monkeypatch):
    from types import SimpleNamespace

    import torch

    from sdxs.webapp import warm_up_sizes

    compiled_gpu = SimpleNamespace(device=torch.device("cuda"), backend="torch-compile", micro_batch=64)
    assert warm_up_sizes(compiled_gpu) == (1, 2, 4, 8, 16)  # 16 requests at once, one graph per bucket
    assert warm_up_sizes(SimpleNamespace(device=torch.device("cuda"), backend="torch-compile", micro_batch=4)) == (1, 2, 4)
    assert warm_up_sizes(tiny_engine) == (1,)  # a CPU serves one request at a time
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert warm_up_sizes(compiled_gpu) == (1,)
