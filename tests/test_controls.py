"""train/controls.py: control extractors (canny, sketch, depth), ControlNet tensors and the control-fidelity scores."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxs.sketch import prepare_sketch, sketch_to_tensor
from train.controls import (
    CONTROL_KINDS, DepthEstimator, auto_canny_thresholds, canny, chamfer_distance, control_tensor, depth, depth_to_image,
    edge_f1, edge_precision, edge_recall, extract, ink_mask, load_depth_estimator, sketch, to_pil_images,
)

SIZE = 64


def square_on_black(size=SIZE, box=(16, 16, 47, 47), fill=255):
    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).rectangle(box, fill=(fill, fill, fill))
    return image


def disc(ground=(255, 255, 255, 255), fill=(40, 40, 40, 255), centre=(32, 32), radius=20, mode="RGB", size=SIZE):
    image = Image.new(mode, (size, size), ground if mode == "RGBA" else ground[:3])
    x, y = centre
    ImageDraw.Draw(image).ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill if mode == "RGBA" else fill[:3])
    return image


def face(size=SIZE):
    """An emoji-like picture: a yellow face with dark eyes and mouth on white, as in the emoji data."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse([6, 6, 57, 57], fill=(255, 204, 77))
    draw.ellipse([20, 20, 26, 30], fill=(102, 69, 0))
    draw.ellipse([38, 20, 44, 30], fill=(102, 69, 0))
    draw.arc([18, 26, 46, 48], 20, 160, fill=(102, 69, 0), width=3)
    return image


def line_sketch(xs=(20,), size=SIZE, rows=(8, 56)):
    """A sketch: dark vertical strokes (1 px) at the given columns, on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    for x in xs:
        ImageDraw.Draw(image).line([(x, rows[0]), (x, rows[1])], fill=(0, 0, 0))
    return image


def dot_sketch(points, size=SIZE):
    """A sketch of single ink pixels."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    for point in points:
        image.putpixel(point, (0, 0, 0))
    return image


def white(size=SIZE):
    return Image.new("RGB", (size, size), (255, 255, 255))


def edge_mask(control, on):
    """(H, W) bool of a control image's marks, checking it is RGB grey with only two levels."""
    array = np.asarray(control)
    assert control.mode == "RGB"
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert set(np.unique(array)) <= {0, 255}
    return array[..., 0] == on


def shifted(image, dx=0, dy=0):
    """The picture moved by (dx, dy) pixels, white paper coming in."""
    moved = Image.new("RGB", image.size, (255, 255, 255))
    moved.paste(image, (dx, dy))
    return moved


# --- canny ---------------------------------------------------------------------------------------

def test_canny_of_a_white_square_on_black_marks_exactly_its_border():
    left, top, right, bottom = 16, 16, 47, 47
    edges = edge_mask(canny(square_on_black(box=(left, top, right, bottom))), on=255)
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[top:bottom + 1, left:right + 1] = True
    # The border: the square's outermost pixels and the black ones just outside them (Canny puts a step
    # edge on either side of it). Nowhere else: not inside the square, not further out.
    near_border = np.zeros_like(inside)
    near_border[top - 1:bottom + 2, left - 1:right + 2] = True
    near_border[top + 1:bottom, left + 1:right] = False
    assert edges.any() and not (edges & ~near_border).any()
    # Every side is drawn along its length (the corners may be rounded off).
    side = right - left + 1
    assert edges[top - 1:top + 1, left:right + 1].any(axis=0).sum() >= side - 2
    assert edges[bottom:bottom + 2, left:right + 1].any(axis=0).sum() >= side - 2
    assert edges[top:bottom + 1, left - 1:left + 1].any(axis=1).sum() >= side - 2
    assert edges[top:bottom + 1, right:right + 2].any(axis=1).sum() >= side - 2


def test_canny_output_format_and_a_plain_picture_has_no_edges():
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    edges = canny(image)
    assert edges.size == (40, 24) and not edge_mask(edges, on=255).any()


def test_canny_thresholds_follow_the_median_grey_unless_given():
    assert auto_canny_thresholds(np.full((8, 8, 3), 128, np.uint8)) == (85, 170)
    assert auto_canny_thresholds(np.full((8, 8, 3), 255, np.uint8)) == (170, 255)
    assert auto_canny_thresholds(np.zeros((8, 8, 3), np.uint8)) == (25, 25)  # the floor: noise of a dark picture
    # A faint square (grey 235 on white): below the automatic thresholds of a white picture, found with low ones.
    faint = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    ImageDraw.Draw(faint).rectangle((16, 16, 47, 47), fill=(235, 235, 235))
    assert not edge_mask(canny(faint), on=255).any()
    assert edge_mask(canny(faint, low=10, high=30), on=255).sum() > 100
    assert edge_mask(canny(faint, low=10), on=255).sum() == 0  # high from the median (255) keeps it out
    # Only `low` given: the faint square's edges join where they touch a strong (black) one, by hysteresis.
    ImageDraw.Draw(faint).rectangle((4, 4, 16, 16), fill=(0, 0, 0))
    strong_only = edge_mask(canny(faint), on=255).sum()
    assert edge_mask(canny(faint, low=10), on=255).sum() > strong_only + 50
    with pytest.raises(ValueError, match="low <= high"):
        canny(faint, low=200, high=100)


# --- sketch --------------------------------------------------------------------------------------

def assert_ring(ink, centre=(32, 32), radius=20):
    ys, xs = np.nonzero(ink)
    distance = np.hypot(xs - centre[0], ys - centre[1])
    assert ink.any() and np.abs(distance - radius).max() <= 2  # ink only near the circle
    angles = np.degrees(np.arctan2(ys - centre[1], xs - centre[0])) % 360
    assert len(np.unique((angles // 5).astype(int))) == 72  # all the way round
    assert ink.sum() < 1.5 * 2 * math.pi * radius  # thin: about 1 px (a 2 px ring would be twice the circumference)


def test_sketch_of_a_dark_disc_on_white_is_a_thin_dark_ring_on_white():
    result = sketch(disc())
    assert result.size == (SIZE, SIZE)
    ink = edge_mask(result, on=0)
    assert_ring(ink)
    assert np.asarray(result)[32, 32, 0] == 255 and np.asarray(result)[0, 0, 0] == 255


def test_sketch_composites_transparency_on_white():
    # A dark disc on transparent black: on white paper it is a ring; read as black it would be nothing.
    transparent = disc(ground=(0, 0, 0, 0), fill=(40, 40, 40, 255), mode="RGBA")
    assert_ring(edge_mask(sketch(transparent), on=0))


def test_sketch_draws_colour_boundaries_of_equal_grey():
    # Red (grey 76) on grey 76: no grey step, yet a person would draw the disc.
    red_on_grey = disc(ground=(76, 76, 76, 255), fill=(255, 0, 0, 255))
    assert np.ptp(np.asarray(red_on_grey.convert("L"))) <= 1
    assert_ring(edge_mask(sketch(red_on_grey), on=0))


@pytest.mark.parametrize("plain", [white(), Image.new("RGB", (30, 20), (200, 40, 90)),
                                   Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))])
def test_sketch_of_nothing_is_white_paper(plain):
    result = sketch(plain)
    assert result.size == plain.size and result.mode == "RGB"
    assert (np.asarray(result) == 255).all()


def test_sketch_ignores_light_noise():
    # A generated image's grain is not a shape: the light blur keeps it from drawing strokes.
    rng = np.random.default_rng(0)
    grainy = np.clip(200 + rng.integers(-30, 31, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    assert (np.asarray(sketch(Image.fromarray(grainy))) == 255).all()


def test_sketch_of_an_emoji_like_face_draws_its_parts_and_reads_as_a_sketch():
    result = sketch(face())
    ink = edge_mask(result, on=0)
    assert ink[:, :20].any() and ink[:, 44:].any()  # the face's outline on both sides
    assert ink[18:32, 18:28].any() and ink[18:32, 36:46].any()  # both eyes
    assert ink[40:50, 24:40].any()  # the mouth
    assert ink.mean() < 0.15 and not ink[0].any()  # mostly paper
    assert prepare_sketch(result, SIZE) is not None  # what the sketch mode accepts: not called blank
    assert np.array_equal(np.asarray(sketch(face())), np.asarray(result))  # deterministic


# --- extract, tensors ----------------------------------------------------------------------------

def test_extract_runs_the_named_extractor_on_each_image_in_order():
    images = [face(), disc(), square_on_black()]
    for kind, extractor in [("canny", canny), ("sketch", sketch)]:
        results = extract(kind, images)
        assert len(results) == 3
        for image, result in zip(images, results):
            assert np.array_equal(np.asarray(result), np.asarray(extractor(image)))
    assert CONTROL_KINDS == ("canny", "sketch", "depth")


def test_extract_refuses_unknown_kinds_and_depth_without_an_estimator():
    with pytest.raises(ValueError, match="canny, sketch, depth"):
        extract("normals", [face()])
    with pytest.raises(ValueError, match="depth_estimator"):
        extract("depth", [face()])


def test_control_tensor_is_rgb_in_unit_range_per_image():
    red = Image.new("RGB", (5, 3), (255, 0, 0))
    blue = Image.new("RGB", (5, 3), (0, 0, 255))
    tensor = control_tensor([red, blue])
    assert tensor.shape == (2, 3, 3, 5) and tensor.dtype == torch.float32
    assert tensor.min() >= 0 and tensor.max() <= 1
    assert torch.equal(tensor[0, :, 1, 2], torch.tensor([1.0, 0.0, 0.0]))  # red stays in channel 0
    assert torch.equal(tensor[1, :, 1, 2], torch.tensor([0.0, 0.0, 1.0]))  # the second image is the second sample
    drawn = sketch(face())
    assert torch.equal(control_tensor([drawn]), sketch_to_tensor(drawn))  # what sketch mode feeds the ControlNet


def test_control_tensor_refuses_mixed_sizes_and_nothing():
    with pytest.raises(ValueError, match="same size"):
        control_tensor([white(64), white(32)])
    with pytest.raises(ValueError, match="at least one"):
        control_tensor([])


def test_to_pil_images_maps_minus_one_to_0_and_one_to_255():
    images = torch.full((2, 3, 4, 6), -1.0)
    images[0, 0] = 1.0  # sample 0: red
    images[1, :, 0, 0] = torch.tensor([0.0, 2.0, -3.0])  # sample 1: mid grey red, clamped green and blue
    first, second = to_pil_images(images)
    assert first.mode == "RGB" and first.size == (6, 4)
    assert np.asarray(first)[2, 3].tolist() == [255, 0, 0]
    assert np.asarray(second)[0, 0].tolist() == [128, 255, 0] and np.asarray(second)[1, 1].tolist() == [0, 0, 0]
    # Back through control_tensor: (x + 1) / 2 within one grey level.
    decoded = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(control_tensor(to_pil_images(decoded)), (decoded + 1) / 2, atol=1 / 255)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        to_pil_images(torch.zeros(3, 8, 8))


# --- control fidelity ----------------------------------------------------------------------------

def test_ink_is_grey_below_128():
    image = Image.new("L", (2, 1))
    image.putpixel((0, 0), 127)
    image.putpixel((1, 0), 128)
    assert ink_mask(image).tolist() == [[True, False]]


def test_edge_f1_of_a_sketch_with_itself_a_shifted_copy_and_a_blank():
    drawn = sketch(face())
    assert edge_f1(drawn, drawn) == 1.0
    moved = shifted(drawn, dx=1)
    assert edge_f1(drawn, moved, tolerance=1) == 1.0
    assert edge_f1(drawn, moved, tolerance=0) < 1.0
    assert edge_f1(drawn, white()) == 0.0 and edge_f1(white(), drawn) == 0.0
    assert edge_f1(white(), white()) == 1.0


def test_edge_f1_tolerance_is_chebyshev_pixels():
    line = line_sketch((20,))
    assert edge_f1(line, line_sketch((22,)), tolerance=1) == 0.0
    assert edge_f1(line, line_sketch((22,)), tolerance=2) == 1.0
    dots = dot_sketch([(10, 10), (30, 40), (50, 20)])
    diagonal = dot_sketch([(11, 11), (31, 41), (51, 21)])  # each dot 1.41 px away in Euclidean terms, 1 px in Chebyshev
    assert edge_f1(dots, diagonal, tolerance=1) == 1.0
    assert edge_f1(dots, diagonal, tolerance=0) == 0.0


def test_precision_and_recall_swap_with_the_arguments_f1_does_not():
    reference = line_sketch((10, 30))  # two strokes
    candidate = line_sketch((10,))  # one of them
    assert edge_precision(reference, candidate) == 1.0  # all the candidate's ink is right
    assert edge_recall(reference, candidate) == 0.5  # it misses half of the reference
    assert edge_precision(candidate, reference) == 0.5 and edge_recall(candidate, reference) == 1.0
    assert edge_f1(reference, candidate) == pytest.approx(2 / 3)
    assert edge_f1(candidate, reference) == pytest.approx(2 / 3)


def test_fidelity_scores_refuse_different_sizes_and_bad_tolerance():
    with pytest.raises(ValueError, match="same size"):
        edge_f1(white(64), white(32))
    with pytest.raises(ValueError, match="same size"):
        chamfer_distance(white(64), white(32))
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(white(), white(), tolerance=-1)


def test_chamfer_distance_is_zero_for_identical_sketches_and_grows_with_the_shift():
    line = line_sketch((20,))
    assert chamfer_distance(line, line) == 0.0
    assert chamfer_distance(line, line_sketch((21,))) == pytest.approx(1.0)
    assert chamfer_distance(line, line_sketch((23,))) == pytest.approx(3.0)
    assert chamfer_distance(dot_sketch([(10, 10)]), dot_sketch([(13, 14)])) == pytest.approx(5.0)  # Euclidean pixels
    drawn = sketch(face())
    distances = [chamfer_distance(drawn, shifted(drawn, dx=shift)) for shift in (0, 1, 2, 4)]
    assert distances[0] == 0.0 and distances == sorted(distances) and distances[-1] > distances[1]


def test_chamfer_distance_averages_both_directions_and_handles_blanks():
    two = line_sketch((10, 30))
    one = line_sketch((10,))
    # one -> two: 0 everywhere; two -> one: half the ink 0, half 20 px -> 10; the mean of both: 5.
    assert chamfer_distance(two, one) == pytest.approx(5.0)
    assert chamfer_distance(one, two) == pytest.approx(5.0)
    assert chamfer_distance(white(), white()) == 0.0
    assert chamfer_distance(one, white()) == math.inf and chamfer_distance(white(), one) == math.inf


# --- depth ---------------------------------------------------------------------------------------

def ramp(width=16, height=8):
    """A fake predicted depth that grows from left to right."""
    return torch.linspace(0.0, 3.0, width).repeat(height, 1)


def test_depth_to_image_stretches_to_the_full_range_with_near_bright():
    larger_is_nearer = np.asarray(depth_to_image(ramp(), (32, 24), larger_is_nearer=True))
    assert larger_is_nearer.shape == (24, 32, 3)  # the given (width, height), RGB
    assert (larger_is_nearer[..., 0] == larger_is_nearer[..., 2]).all()
    assert larger_is_nearer.min() == 0 and larger_is_nearer.max() == 255
    assert larger_is_nearer[:, 0].max() < 20 and larger_is_nearer[:, -1].min() > 235  # right is nearer: bright
    distance = np.asarray(depth_to_image(ramp(), (32, 24), larger_is_nearer=False))
    assert distance[:, 0].min() > 235 and distance[:, -1].max() < 20  # a distance: left is nearer
    assert (np.asarray(depth_to_image(torch.full((4, 4), 2.0), (8, 8), True)) == 0).all()  # flat: no depth to show


class BrightnessDepth(torch.nn.Module):
    """A stand-in depth model with a known answer: the predicted value is the pixel's brightness. It keeps
    what it was given and whether gradients were being recorded."""

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, pixel_values):
        self.seen, self.grad_enabled = pixel_values, torch.is_grad_enabled()
        return type("Output", (), {"predicted_depth": pixel_values.mean(dim=1)})


@pytest.mark.parametrize("larger_is_nearer", [True, False])
def test_depth_feeds_the_image_through_the_processor_and_orients_the_map(larger_is_nearer):
    from transformers import DPTImageProcessorPil

    processor = DPTImageProcessorPil(size={"height": 32, "width": 32})
    estimator = DepthEstimator(processor, BrightnessDepth(), larger_is_nearer)
    picture = Image.new("RGB", (48, 40), (0, 0, 0))
    ImageDraw.Draw(picture).rectangle((0, 0, 23, 39), fill=(255, 255, 255))  # bright left half
    result = np.asarray(depth(picture, estimator))
    assert torch.equal(estimator.model.seen, processor(images=picture, return_tensors="pt")["pixel_values"])
    assert estimator.model.grad_enabled is False  # inference only: no autograd graph kept
    assert result.shape == (40, 48, 3) and result.min() == 0 and result.max() == 255
    left, right = result[:, :16, 0].mean(), result[:, 32:, 0].mean()
    assert (left > right + 200) if larger_is_nearer else (right > left + 200)
    mirrored = np.asarray(depth(picture.transpose(Image.FLIP_LEFT_RIGHT), estimator))
    assert np.array_equal(mirrored, result[:, ::-1])  # the map follows the picture it was given


@pytest.fixture(scope="module")
def tiny_depth_models(tmp_path_factory):
    """Two tiny random depth models saved with their image processors: DPT (inverse depth) and GLPN (metric)."""
    from transformers import (
        DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil, GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessorPil,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("depth-models")
    dpt = DPTForDepthEstimation(DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8,
        use_auxiliary_head=False,
    ))
    dpt.save_pretrained(root / "dpt")
    DPTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "dpt")
    glpn = GLPNForDepthEstimation(GLPNConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 8, 8, 8],
        num_attention_heads=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=8,
    ))
    glpn.save_pretrained(root / "glpn")
    GLPNImageProcessorPil().save_pretrained(root / "glpn")
    return root


def test_load_depth_estimator_reads_the_orientation_from_the_model(tiny_depth_models):
    assert load_depth_estimator(str(tiny_depth_models / "dpt")).larger_is_nearer is True  # DPT/MiDaS: inverse depth
    assert load_depth_estimator(str(tiny_depth_models / "glpn")).larger_is_nearer is False  # GLPN: a distance
    assert load_depth_estimator(str(tiny_depth_models / "glpn"), larger_is_nearer=True).larger_is_nearer is True
    assert load_depth_estimator(str(tiny_depth_models / "glpn")).model.training is False  # no dropout at inference


def test_depth_of_a_real_tiny_model_is_a_full_range_grey_map_of_the_input_size(tiny_depth_models):
    estimator = load_depth_estimator(str(tiny_depth_models / "glpn"))
    first, second = face(), Image.new("RGB", (96, 40), (30, 120, 200))
    maps = extract("depth", [first, second], depth_estimator=estimator)
    assert [m.size for m in maps] == [(64, 64), (96, 40)]
    for image, result in zip([first, second], maps):
        array = np.asarray(result)
        assert result.mode == "RGB" and (array[..., 0] == array[..., 1]).all()
        assert array.min() == 0 and array.max() == 255
        assert np.array_equal(array, np.asarray(depth(image, estimator)))  # each image's own map
    assert depth(disc(), load_depth_estimator(str(tiny_depth_models / "dpt"))).size == (SIZE, SIZE)


def test_load_depth_estimator_names_the_path_when_it_is_not_a_depth_model(tmp_path, tiny_depth_models):
    from transformers import BertConfig

    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_depth_estimator(str(missing))
    with pytest.raises(FileNotFoundError, match="Intel/dpt-large"):  # a hub id: never downloaded
        load_depth_estimator("Intel/dpt-large")
    text_model = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(text_model)
    with pytest.raises(ValueError, match="bert.*not a transformers depth-estimation model"):
        load_depth_estimator(str(text_model))
    without_processor = tmp_path / "glpn-without-processor"
    without_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (without_processor / name).write_bytes((tiny_depth_models / "glpn" / name).read_bytes())
    with pytest.raises(ValueError, match="glpn-without-processor.*preprocessor_config.json"):
        load_depth_estimator(str(without_processor))

