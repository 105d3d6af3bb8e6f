"""Cross-request batching: concurrent requests share forwards, and each gets the images it would get alone."""

import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdxs import SDXSEngine
from sdxs.batching import RequestBatcher

SIZE = 128  # small images: fast, and each request's image is its own to the pixel (at 512, batch rounding gives 1/255)


def pixels(image):
    return np.asarray(image).astype(np.int16)


@pytest.fixture()
def engine(tiny_engine):
    """A fresh engine over the shared modules (own prompt cache, micro-batch 8)."""
    return SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch", micro_batch=8)


def concurrently(calls):
    """Run the calls in threads started together; their results (or exceptions) in order."""
    results = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i, call):
        start.wait()
        try:
            results[i] = call()
        except Exception as err:  # noqa: BLE001 - the test looks at it
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


REQUESTS = [("a red circle", 1, 1), ("a blue square", 40, 2), ("a cat", 7, 1), ("a red circle", 99, 3)]


def test_concurrent_requests_share_forwards_and_each_gets_its_own_images(engine, tiny_engine):
    batcher = RequestBatcher(engine, window_s=1.0)  # a long window: all four arrive inside it
    try:
        results = concurrently([
            lambda p=prompt, s=seed, n=n: batcher.text_to_image(p, seed=s, num_images=n, width=SIZE, height=SIZE)
            for prompt, seed, n in REQUESTS
        ])
    finally:
        batcher.close()
    assert batcher.forwards == 1  # 7 images of four visitors in one engine call
    for (prompt, seed, n), result in zip(REQUESTS, results):
        assert not isinstance(result, Exception), result
        assert result.seeds == list(range(seed, seed + n)) and result.prompts == [prompt] * n and len(result.images) == n
        for s, image in zip(result.seeds, result.images):
            alone = tiny_engine.text_to_image(prompt, seed=s, width=SIZE, height=SIZE).images[0]
            assert np.abs(pixels(image) - pixels(alone)).max() <= 1
        assert any("trained at 512x512" in w for w in result.warnings)


def test_requests_that_cannot_share_a_forward_run_in_their_own(engine, tiny_engine):
    batcher = RequestBatcher(engine, window_s=1.0)
    try:
        results = concurrently([
            lambda: batcher.text_to_image("a cat", seed=3, width=SIZE, height=SIZE, decoder="tiny"),
            lambda: batcher.text_to_image("a cat", seed=3, width=SIZE, height=SIZE, decoder="large"),
            lambda: batcher.text_to_image("a cat", seed=3, width=SIZE, height=2 * SIZE, decoder="tiny"),
        ])
    finally:
        batcher.close()
    assert batcher.forwards == 3
    for result, (decoder, height) in zip(results, [("tiny", SIZE), ("large", SIZE), ("tiny", 2 * SIZE)]):
        alone = tiny_engine.text_to_image("a cat", seed=3, width=SIZE, height=height, decoder=decoder).images[0]
        assert result.images[0].size == (SIZE, height) and np.abs(pixels(result.images[0]) - pixels(alone)).max() <= 1


def test_a_bad_request_fails_alone_and_the_worker_keeps_serving(engine):
    batcher = RequestBatcher(engine, window_s=0.5, max_batch=4)
    try:
        bad_seed, good, bad_decoder = concurrently([
            lambda: batcher.text_to_image("a cat", seed=-1, width=SIZE, height=SIZE),
            lambda: batcher.text_to_image("a cat", seed=2, width=SIZE, height=SIZE),
            lambda: batcher.text_to_image("a cat", decoder="medium", width=SIZE, height=SIZE),
        ])
        assert isinstance(bad_seed, ValueError) and "seed" in str(bad_seed)
        assert isinstance(bad_decoder, ValueError) and "Unknown decoder" in str(bad_decoder)
        assert len(good.images) == 1

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")

        engine._generate, working = broken, engine._generate
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.text_to_image("a cat", width=SIZE, height=SIZE)
        engine._generate = working
        assert len(batcher.text_to_image("a cat", width=SIZE, height=SIZE).images) == 1  # the worker lives on
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.text_to_image("a cat")


def test_gathering_stops_at_max_batch_images(engine):
    """A forward never holds more than max_batch images (a compiled server prepared those sizes): a
    request that would go past it waits for the next gathering."""
    forwards, generate = [], engine._generate
    engine._generate = lambda prompts, *args: forwards.append(len(prompts)) or generate(prompts, *args)
    batcher = RequestBatcher(engine, window_s=1.0, max_batch=3)
    try:
        results = concurrently([lambda s=s: batcher.text_to_image("a cat", seed=s, num_images=2, width=SIZE, height=SIZE) for s in range(3)])
    finally:
        batcher.close()
    assert all(len(r.images) == 2 for r in results) and sorted(r.seeds[0] for r in results) == [0, 1, 2]
    assert forwards == [2, 2, 2]  # 2 + 2 would be 4 > 3


def sketch(points):
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).line(points, fill=0, width=3)
    return image


def test_sketch_requests_batch_with_their_own_sketches(engine, tiny_engine):
    """Each visitor's strokes steer only that visitor's image (the tiny ControlNet is trained-free but
    not zero: see sdxs.build)."""
    a, b = sketch([(8, 8), (56, 56)]), sketch([(8, 56), (56, 8), (8, 8)])
    batcher = RequestBatcher(engine, window_s=1.0)
    try:
        ra, rb = concurrently([
            lambda: batcher.sketch_to_image(a, "a cat", seed=5, control_strength=1.0),
            lambda: batcher.sketch_to_image(b, "a cat", seed=5, control_strength=1.0),
        ])
    finally:
        batcher.close()
    assert batcher.forwards == 1
    for result, drawing in ((ra, a), (rb, b)):
        alone = tiny_engine.sketch_to_image(drawing, "a cat", seed=5, control_strength=1.0)
        assert np.abs(pixels(result.images[0]) - pixels(alone.images[0])).max() <= 1
        assert np.array_equal(pixels(result.sketch), pixels(alone.sketch))
    assert not np.array_equal(pixels(ra.images[0]), pixels(rb.images[0]))
