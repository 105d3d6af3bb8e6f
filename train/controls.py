"""Control images for stage D (ControlNet) and the control-fidelity score, as plain functions.

Extractors (a PIL image in, an RGB PIL image of the same size out):
- `canny`: white edges (255) on black (0), the ControlNet canny convention (lllyasviel/sd-controlnet-canny);
- `sketch`: dark strokes (0) on white (255) like a hand drawing, the released sketch model's convention
  (see sdxs/sketch.py): thin (1 px) outlines of the shapes, white when there is nothing to draw;
- `depth`: a grey depth map from a user-provided transformers depth-estimation model, near = bright
  (the ControlNet depth convention: MiDaS' inverse depth), stretched over 0..255.
`extract(kind, images)` runs one of them on a list; `control_tensor` turns controls into a ControlNet's
`controlnet_cond`; `to_pil_images` turns decoded images (in [-1, 1]) back into PIL images.

Control fidelity (SDXS reports none; peers neither): `edge_f1` and `chamfer_distance` compare two sketches,
e.g. the input sketch and the sketch extracted from the image generated for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2  # opencv-python-headless
import numpy as np
import torch
from PIL import Image

CONTROL_KINDS = ("canny", "sketch", "depth")

# canny: with no thresholds given, they follow the median grey m: (0.67 m, 1.33 m), the usual "auto Canny"
# rule; never below CANNY_MIN_THRESHOLD, so the faint noise of a dark picture (m near 0) is not an edge.
CANNY_SIGMA = 0.33
CANNY_MIN_THRESHOLD = 25

# sketch: a light blur first, so a 64 px picture's pixel steps and a generated image's noise do not draw
# strokes; fixed thresholds (on the L2 gradient of the blurred colours), so a faint picture draws fewer
# strokes rather than its noise. Chosen by eye on the emoji training images at 64 px.
SKETCH_BLUR_SIGMA = 1.0
SKETCH_LOW, SKETCH_HIGH = 60, 180

INK_LEVEL = 128  # edge_f1 / chamfer_distance: a pixel of a sketch whose grey is below this is ink


# --- input ---------------------------------------------------------------------------------------

def _rgb_on_white(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB; transparent pixels are composited over white paper (as the emoji data is)."""
    rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(paper, rgba).convert("RGB"))


def _grey_image(edges: np.ndarray) -> Image.Image:
    """An (H, W) uint8 map as an RGB PIL image (the three channels equal)."""
    return Image.fromarray(edges).convert("RGB")


# --- canny ---------------------------------------------------------------------------------------

def auto_canny_thresholds(rgb: np.ndarray) -> tuple[int, int]:
    """(low, high) Canny thresholds from the median grey of an (H, W, 3) uint8 picture."""
    median = float(np.median(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)))
    low = max(CANNY_MIN_THRESHOLD, int((1.0 - CANNY_SIGMA) * median))
    high = max(CANNY_MIN_THRESHOLD, int(min(255.0, (1.0 + CANNY_SIGMA) * median)))
    return low, high


def canny(image: Image.Image, low: int | None = None, high: int | None = None) -> Image.Image:
    """Canny edges: RGB, same size, white edges (255) on black (0). OpenCV's Canny on the RGB picture
    (the largest gradient of the three channels, as the ControlNet canny annotator did), no blur;
    thresholds from the median grey unless both are given."""
    rgb = _rgb_on_white(image)
    if low is None or high is None:
        auto_low, auto_high = auto_canny_thresholds(rgb)
        low = auto_low if low is None else low
        high = auto_high if high is None else high
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high; got low={low}, high={high}.")
    return _grey_image(cv2.Canny(rgb, low, high))


# --- sketch --------------------------------------------------------------------------------------

def sketch_strokes(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: where a hand drawing of an (H, W, 3) uint8 picture has ink. Outlines are Canny
    edges of the lightly blurred colours (1 px wide); colours matter, not only grey (a yellow face on
    white paper differs in blue, hardly in grey)."""
    blurred = cv2.GaussianBlur(rgb, (5, 5), SKETCH_BLUR_SIGMA)
    return cv2.Canny(blurred, SKETCH_LOW, SKETCH_HIGH, L2gradient=True) > 0


def sketch(image: Image.Image) -> Image.Image:
    """A hand-drawing-like sketch: RGB, same size, dark strokes (0) on white (255), thin outlines of
    the shapes; plain white when there is nothing to draw. Deterministic."""
    strokes = sketch_strokes(_rgb_on_white(image))
    return _grey_image(np.where(strokes, 0, 255).astype(np.uint8))


# --- depth ---------------------------------------------------------------------------------------

# Depth models whose output is a distance (larger = farther): their maps are flipped so near = bright.
# The others (DPT/MiDaS, Depth Anything "relative") predict relative inverse depth: larger = nearer.
METRIC_DEPTH_MODEL_TYPES = ("glpn", "zoedepth", "depth_pro", "prompt_depth_anything")


@dataclass
class DepthEstimator:
    """A transformers depth-estimation model with its image processor. `larger_is_nearer`: whether the
    model's predicted value grows towards the camera (inverse depth) or away from it (distance)."""

    processor: object
    model: torch.nn.Module
    larger_is_nearer: bool


def predicts_inverse_depth(config) -> bool:
    """True when a depth model's output grows towards the camera (relative inverse depth)."""
    metric = config.model_type in METRIC_DEPTH_MODEL_TYPES or getattr(config, "depth_estimation_type", None) == "metric"
    return not metric


def load_depth_estimator(path: str, *, larger_is_nearer: bool | None = None) -> DepthEstimator:
    """A depth estimator from a local transformers folder (config.json, weights, preprocessor_config.json),
    e.g. a saved Intel/dpt-hybrid-midas or Depth Anything; never downloads. `larger_is_nearer` overrides
    the orientation read from the model type (`predicts_inverse_depth`)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Depth estimator folder not found: {path}. Give a local folder of a transformers depth-estimation "
            f"model (config.json, weights, preprocessor_config.json); hub ids are not downloaded here."
        )
    try:
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{path} is not a transformers depth-estimation model folder with its image processor "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Expected config.json of a depth "
            f"model (e.g. dpt, depth_anything, glpn, zoedepth), its weights and preprocessor_config.json."
        ) from None
    if larger_is_nearer is None:
        larger_is_nearer = predicts_inverse_depth(model.config)
    return DepthEstimator(processor=processor, model=model.eval(), larger_is_nearer=larger_is_nearer)


def depth_to_image(predicted: torch.Tensor, size: tuple[int, int], larger_is_nearer: bool) -> Image.Image:
    """A predicted (h, w) depth as an RGB grey map of `size` (width, height): resized bicubically,
    stretched so its nearest point is 255 and its farthest 0 (a flat prediction gives black)."""
    width, height = size
    resized = torch.nn.functional.interpolate(
        predicted.detach().float().cpu().reshape(1, 1, *predicted.shape[-2:]), size=(height, width),
        mode="bicubic", align_corners=False,
    )[0, 0]
    values = torch.nan_to_num(resized).numpy()
    if not larger_is_nearer:
        values = -values
    span = float(values.max() - values.min())
    if span <= 0:
        return _grey_image(np.zeros((height, width), dtype=np.uint8))
    scaled = (values - values.min()) / span * 255.0
    return _grey_image(np.round(scaled).astype(np.uint8))


@torch.no_grad()
def depth(image: Image.Image, estimator: DepthEstimator) -> Image.Image:
    """A depth map: RGB grey, same size as `image`, near = bright, spanning 0..255."""
    rgb = Image.fromarray(_rgb_on_white(image))
    inputs = estimator.processor(images=rgb, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=estimator.model.device, dtype=estimator.model.dtype)
    predicted = estimator.model(pixel_values=pixel_values).predicted_depth
    return depth_to_image(predicted[0], image.size, estimator.larger_is_nearer)


# --- batches -------------------------------------------------------------------------------------

def extract(kind: str, images: list[Image.Image], *, depth_estimator: DepthEstimator | None = None) -> list[Image.Image]:
    """The control images of one kind ("canny", "sketch" or "depth") for a list of images."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"Unknown control kind {kind!r}; choose one of {', '.join(CONTROL_KINDS)}.")
    if kind == "canny":
        return [canny(image) for image in images]
    if kind == "sketch":
        return [sketch(image) for image in images]
    if depth_estimator is None:
        raise ValueError("Depth controls need a depth estimator: pass depth_estimator=load_depth_estimator(PATH) "
                         "(in the training script: --depth_estimator PATH, a local transformers depth model folder).")
    return [depth(image, depth_estimator) for image in images]


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) images in [-1, 1] (decoded latents) -> N RGB PIL images (-1 -> 0, 1 -> 255)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape (N, 3, H, W); got {tuple(images.shape)}.")
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(array) for array in scaled.permute(0, 2, 3, 1).numpy()]


def control_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float32 in [0, 1], RGB: a ControlNet's `controlnet_cond` (as sdxs.sketch.sketch_to_tensor
    makes for one sketch). All images must have the same size."""
    if not images:
        raise ValueError("control_tensor needs at least one image.")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"Control images must all have the same size; got {sorted(sizes)}.")
    arrays = np.stack([_rgb_on_white(image) for image in images]).astype(np.float32) / 255.0
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


# --- control fidelity ----------------------------------------------------------------------------

def ink_mask(sketch_image: Image.Image) -> np.ndarray:
    """(H, W) bool: a sketch's ink (grey below INK_LEVEL, transparency counted as paper)."""
    return cv2.cvtColor(_rgb_on_white(sketch_image), cv2.COLOR_RGB2GRAY) < INK_LEVEL


def _ink_pair(reference: Image.Image, candidate: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    if reference.size != candidate.size:
        raise ValueError(f"Sketches to compare must have the same size; got {reference.size} and {candidate.size}. "
                         f"Resize one first.")
    return ink_mask(reference), ink_mask(candidate)


def _check_tolerance(tolerance: int) -> None:
    if not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
        raise ValueError(f"tolerance must be a whole number of pixels >= 0; got {tolerance!r}.")


def _share_near(ink: np.ndarray, other: np.ndarray, tolerance: int) -> float:
    """Share of `ink` pixels within `tolerance` px (Chebyshev: a square window) of an `other` ink pixel."""
    window = np.ones((2 * tolerance + 1, 2 * tolerance + 1), dtype=np.uint8)
    near_other = cv2.dilate(other.astype(np.uint8), window) > 0
    return float((ink & near_other).sum() / ink.sum())


def edge_precision(reference: Image.Image, candidate: Image.Image, tolerance: int = 1) -> float:
    """Share of the candidate's ink within `tolerance` px of the reference's ink (1.0 when the candidate has none)."""
    _check_tolerance(tolerance)
    reference_ink, candidate_ink = _ink_pair(reference, candidate)
    return _share_near(candidate_ink, reference_ink, tolerance) if candidate_ink.any() else 1.0


def edge_recall(reference: Image.Image, candidate: Image.Image, tolerance: int = 1) -> float:
    """Share of the reference's ink within `tolerance` px of the candidate's ink (1.0 when the reference has none)."""
    return edge_precision(candidate, reference, tolerance)


def edge_f1(reference: Image.Image, candidate: Image.Image, tolerance: int = 1) -> float:
    """F1 of edge precision and recall with a `tolerance` px (Chebyshev) match: 1.0 for the same strokes;
    both without ink -> 1.0; exactly one without ink -> 0.0."""
    _check_tolerance(tolerance)
    reference_ink, candidate_ink = _ink_pair(reference, candidate)
    if not reference_ink.any() or not candidate_ink.any():
        return 1.0 if reference_ink.any() == candidate_ink.any() else 0.0
    precision = _share_near(candidate_ink, reference_ink, tolerance)
    recall = _share_near(reference_ink, candidate_ink, tolerance)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _mean_distance_to(ink: np.ndarray, other: np.ndarray) -> float:
    """Mean Euclidean distance in pixels from each `ink` pixel to the nearest `other` ink pixel."""
    # distanceTransform measures the distance to the nearest zero pixel: make `other`'s ink the zeros.
    distance = cv2.distanceTransform(np.where(other, 0, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float(distance[ink].mean())


def chamfer_distance(reference: Image.Image, candidate: Image.Image) -> float:
    """Symmetric Chamfer distance between two sketches' ink, in pixels: the mean of the two directed mean
    nearest-ink distances (Euclidean). 0 when neither has ink, inf when exactly one has."""
    reference_ink, candidate_ink = _ink_pair(reference, candidate)
    if not reference_ink.any() or not candidate_ink.any():
        return 0.0 if reference_ink.any() == candidate_ink.any() else float("inf")
    return 0.5 * (_mean_distance_to(reference_ink, candidate_ink) + _mean_distance_to(candidate_ink, reference_ink))
