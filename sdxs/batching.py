"""Cross-request batching: concurrent visitors' requests share one forward on a GPU.

On a GPU one forward of 16 images costs little more than one of 1 (issue 16: 5x the throughput),
but a web app serves each visitor's request on its own. `RequestBatcher` sits between the two: every
request thread calls `text_to_image` / `sketch_to_image` as it would on the engine and blocks; one
worker thread takes the first waiting request, gathers the ones that arrive within `window_s` (up to
`max_batch` images), runs each group of compatible requests as one engine call and hands every
request back exactly its own images: its prompts and seeds, so its images are the ones it would get
alone (up to the batch's matmul rounding, as for images of one batched call). Requests are checked
in the caller's thread, so a bad one fails alone with its own message.

The apps use it on a (non-ZeroGPU) GPU only: on a CPU batching gains ~5% and costs memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from sdxs.engine import Generation, SDXSEngine, check_seed, image_seeds

log = logging.getLogger(__name__)
WINDOW_S = 0.005  # how long the worker waits for more requests after the first: ~1/4 of a GPU call


@dataclass
class _Request:
    prompts: list[str]  # one per image
    seeds: list[int]
    decoder: str
    width: int
    height: int
    control: torch.Tensor | None = None  # (1, 3, H, W), sketch mode
    control_strength: float = 0.0
    sketch: object = None  # the control image as the ControlNet saw it (Generation.sketch)
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None

    @property
    def group(self) -> tuple:
        """Requests with equal keys can share a forward."""
        return (self.decoder, self.width, self.height, self.control is None, self.control_strength)


class RequestBatcher:
    """Gathers concurrent requests to one engine into shared forwards (see the module docstring)."""

    def __init__(self, engine: SDXSEngine, *, window_s: float = WINDOW_S, max_batch: int | None = None):
        self.engine = engine
        self.window_s = window_s
        self.max_batch = max_batch or engine.micro_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="sdxs-batcher", daemon=True)
        self._worker.start()
        self.forwards = 0  # engine calls made (for tests and the benchmark)

    # --- the engine's calls, batched -------------------------------------------------------------

    def text_to_image(self, prompt, *, seed: int = 0, num_images: int = 1, decoder: str | None = None, width: int | None = None,
                      height: int | None = None, num_inference_steps: int = 1, guidance_scale: float = 0.0) -> Generation:
        """As SDXSEngine.text_to_image; blocks until this request's images are made."""
        request = self.engine.prepare_text_request(prompt, seed, num_images, decoder, width, height, num_inference_steps, guidance_scale)
        return self._submit(_Request(*request))

    def sketch_to_image(self, sketch, prompt, *, seed: int = 0, num_images: int = 1, control_strength: float = 0.8,
                        decoder: str | None = None, num_inference_steps: int = 1, guidance_scale: float = 0.0) -> Generation:
        """As SDXSEngine.sketch_to_image; blocks until this request's images are made."""
        engine = self.engine
        prompts, control, control_image = engine.prepare_sketch_request(sketch, prompt, num_images, control_strength, decoder,
                                                                        num_inference_steps, guidance_scale)
        check_seed(seed)
        decoder, size = engine.default_decoder if decoder is None else decoder, engine.native_size
        request = _Request(prompts, image_seeds(seed, len(prompts)), decoder, size, size, control, float(control_strength), control_image)
        return self._submit(request)

    def close(self) -> None:
        """Stop the worker after the requests already waiting."""
        self._queue.put(None)
        self._worker.join()

    # --- the worker --------------------------------------------------------------------------------

    def _submit(self, request: _Request) -> Generation:
        if not self._worker.is_alive():
            raise RuntimeError("This RequestBatcher is closed.")
        self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _serve(self) -> None:
        carried = None  # a request that did not fit the last gathering: the first of the next
        while True:
            first = carried if carried is not None else self._queue.get()
            if first is None:
                return
            batch, carried, stop = self._gather(first)
            groups: dict[tuple, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.group, []).append(request)
            for group in groups.values():
                self._run(group)
            if stop:
                if carried is not None:
                    self._run([carried])
                return

    def _gather(self, first: _Request) -> tuple[list[_Request], _Request | None, bool]:
        """The first request and those that arrive within the window, up to max_batch images (a
        request that would go past it is carried over to the next gathering, so a forward never
        exceeds the batch sizes a compiled server prepared); then whether close() was called."""
        batch, images = [first], len(first.prompts)
        deadline = time.perf_counter() + self.window_s
        while images < self.max_batch:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if request is None:
                return batch, None, True
            if images + len(request.prompts) > self.max_batch:
                return batch, request, False
            batch.append(request)
            images += len(request.prompts)
        return batch, None, False

    def _run(self, group: list[_Request]) -> None:
        """One engine call for a group of compatible requests; each gets its slice of the images.
        Any failure reaches every request of the group that has no answer yet; the worker lives on."""
        try:
            self._answer(group)
        except BaseException as err:  # noqa: BLE001
            log.exception("batched generation failed")
            for request in group:
                if not request.done.is_set():
                    request.error = err
                    request.done.set()

    def _answer(self, group: list[_Request]) -> None:
        first = group[0]
        prompts = [p for request in group for p in request.prompts]
        seeds = [s for request in group for s in request.seeds]
        control = None
        if first.control is not None:
            control = torch.cat([request.control.expand(len(request.prompts), -1, -1, -1) for request in group])
        with torch.inference_mode():
            result = self.engine._generate(prompts, seeds, first.decoder, first.width, first.height, control, first.control_strength)
        self.forwards += 1
        start = 0
        for request in group:
            count = len(request.prompts)
            warnings = self.engine.request_warnings(request.prompts, request.width, request.height)
            request.result = Generation(result.images[start : start + count], request.seeds, request.prompts, warnings,
                                        dict(result.timings), sketch=request.sketch)
            start += count
            request.done.set()
