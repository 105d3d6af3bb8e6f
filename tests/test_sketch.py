"""Sketch mode: preprocessing edge cases, the ControlNet's residuals, safe loading of its .bin."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxs import ModelNotFoundError, SDXSEngine
from sdxs.loading import load_controlnet
from sdxs.sketch import blank_sketch, is_blank, prepare_sketch, sketch_to_tensor


def stroke_canvas(size=(300, 200), mode="RGBA", ground=(0, 0, 0, 0), ink=(0, 0, 0, 255)):
    image = Image.new(mode, size, ground)
    ImageDraw.Draw(image).line([(20, 20), (size[0] - 20, size[1] - 20)], fill=ink, width=6)
    return image


def assert_dark_on_white(sketch):
    array = np.asarray(sketch)
    assert sketch.mode == "RGB" and sketch.size == (512, 512)
    assert array.min() < 80 and np.median(array) == 255  # some ink, mostly paper


# --- preprocessing -----------------------------------------------------------------------------

@pytest.mark.parametrize("empty", [None, {"background": None, "layers": [], "composite": None}, blank_sketch(),
                                   Image.new("RGBA", (512, 512), (0, 0, 0, 0)), Image.new("L", (64, 64), 255)])
def test_empty_inputs_give_none(empty):
    assert prepare_sketch(empty) is None


def test_all_black_is_read_as_an_inverted_empty_page():
    # Mostly-dark pictures are light strokes on a dark ground; all black has no strokes at all.
    assert prepare_sketch(Image.new("RGB", (100, 100), 0)) is None


def test_transparent_canvas_layer_with_black_strokes():
    assert_dark_on_white(prepare_sketch(stroke_canvas()))


def test_gradio_editor_value_composite_and_layers():
    layer = stroke_canvas((512, 512))
    assert_dark_on_white(prepare_sketch({"background": None, "layers": [layer], "composite": layer}))
    # Without a composite, the layers are flattened over the background.
    background = Image.new("RGBA", (512, 512), (255, 255, 255, 255))
    assert_dark_on_white(prepare_sketch({"background": background, "layers": [layer], "composite": None}))


def test_colour_strokes_become_grey_ink():
    sketch = prepare_sketch(stroke_canvas(ink=(200, 0, 0, 255)))
    array = np.asarray(sketch)
    assert array.min() < 120 and (array[..., 0] == array[..., 1]).all()


def test_white_lines_on_black_are_inverted():
    assert_dark_on_white(prepare_sketch(stroke_canvas(mode="RGB", ground=(0, 0, 0), ink=(255, 255, 255))))


def test_non_square_is_padded_not_stretched():
    image = Image.new("L", (400, 100), 255)
    ImageDraw.Draw(image).rectangle([0, 0, 399, 99], outline=0, width=4)  # a frame round the whole picture
    array = np.asarray(prepare_sketch(image))[..., 0]
    ink_rows = np.where(array.min(axis=1) < 128)[0]
    # 400x100 padded to 400x400 then scaled to 512: the frame spans ~128 rows in the middle.
    assert 180 <= ink_rows.min() <= 200 and 312 <= ink_rows.max() <= 330


def test_huge_greyscale_and_numpy_inputs():
    huge = Image.new("L", (6000, 4000), 255)
    ImageDraw.Draw(huge).line([(0, 0), (6000, 4000)], fill=0, width=40)
    assert_dark_on_white(prepare_sketch(huge))
    array = np.full((64, 64), 1.0, dtype=np.float32)
    array[30:34, :] = 0.0
    assert_dark_on_white(prepare_sketch(array))
    assert_dark_on_white(prepare_sketch(np.asarray(stroke_canvas())))  # RGBA uint8 array


def test_tensor_is_rgb_in_unit_range():
    tensor = sketch_to_tensor(prepare_sketch(stroke_canvas()))
    assert tensor.shape == (1, 3, 512, 512) and tensor.min() >= 0 and tensor.max() <= 1
    assert is_blank(blank_sketch()) and not is_blank(prepare_sketch(stroke_canvas()))


def test_unreadable_input_is_a_clear_error():
    with pytest.raises(ValueError, match="Cannot read a sketch"):
        prepare_sketch(3.5)


# --- sketch mode in the engine -----------------------------------------------------------------

def pixels(image):
    return np.asarray(image).astype(np.int16)


def test_seed_determinism_and_strength(tiny_engine):
    sketch = stroke_canvas((512, 512))
    a = tiny_engine.sketch_to_image(sketch, "a cat", seed=3, control_strength=1.0)
    b = tiny_engine.sketch_to_image(sketch, "a cat", seed=3, control_strength=1.0)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert a.sketch.size == (512, 512)
    zero = tiny_engine.sketch_to_image(sketch, "a cat", seed=3, control_strength=0.0).images[0]
    assert not np.array_equal(pixels(a.images[0]), pixels(zero))
    # Strength 0 adds zero residuals: exactly the text-to-image result for the same seed.
    plain = tiny_engine.text_to_image("a cat", seed=3).images[0]
    assert np.abs(pixels(zero) - pixels(plain)).max() <= 1


def test_sketch_changes_the_image(tiny_engine):
    one = tiny_engine.sketch_to_image(stroke_canvas((512, 512)), "a cat", seed=0, control_strength=1.0).images[0]
    other = prepare_sketch(Image.new("L", (512, 512), 255))
    assert other is None
    circle = Image.new("L", (512, 512), 255)
    ImageDraw.Draw(circle).ellipse([100, 100, 400, 400], outline=0, width=8)
    two = tiny_engine.sketch_to_image(circle, "a cat", seed=0, control_strength=1.0).images[0]
    assert not np.array_equal(pixels(one), pixels(two))


def test_batch_and_validation(tiny_engine):
    result = tiny_engine.sketch_to_image(stroke_canvas(), "a cat", seed=5, num_images=2)
    assert result.seeds == [5, 6] and len(result.images) == 2
    with pytest.raises(ValueError, match="sketch is empty"):
        tiny_engine.sketch_to_image(None, "a cat")
    with pytest.raises(ValueError, match="between 0 and 1"):
        tiny_engine.sketch_to_image(stroke_canvas(), "a cat", control_strength=1.5)
    with pytest.raises(ValueError, match="exactly one step"):
        tiny_engine.sketch_to_image(stroke_canvas(), "a cat", num_inference_steps=2)


def test_seven_residuals_land_in_the_unet_without_mid_block(tiny_engine):
    """6 down residuals + 1 mid residual; the mid one is added where the (absent) mid block sits."""
    unet, controlnet = tiny_engine.components.unet, tiny_engine.components.controlnet
    assert unet.mid_block is None
    sample, t = torch.randn(1, 4, 64, 64), torch.tensor(999)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    down, mid = controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=torch.rand(1, 3, 512, 512), return_dict=False)
    assert len(down) == 6 and mid.shape == (1, unet.config.block_out_channels[-1], 16, 16)

    captured = {}
    hook = unet.up_blocks[0].register_forward_pre_hook(lambda module, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        zeros = [torch.zeros_like(d) for d in down]
        unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=zeros, mid_block_additional_residual=torch.zeros_like(mid))
        base = captured["x"].clone()
        unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=zeros, mid_block_additional_residual=mid)
        assert torch.allclose(captured["x"] - base, mid, atol=1e-5)  # mid residual added to the up path input
    finally:
        hook.remove()
    # Each down residual matches the shape of the U-Net skip connection it is added to.
    skips = [unet.conv_in(sample)]
    assert down[0].shape == skips[0].shape


def test_text_only_model_refuses_sketches(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "no-controlnet", ignore=shutil.ignore_patterns("controlnet"))
    engine = SDXSEngine.from_pretrained(str(tmp_path / "no-controlnet"), device="cpu", backend="torch")
    with pytest.raises(ValueError, match="has no ControlNet"):
        engine.sketch_to_image(stroke_canvas(), "a cat")


# --- loading the released layout (a bare ControlNet repo with a pickle .bin) --------------------

def test_bare_controlnet_bin_attaches_to_its_base(tiny_model_dir, tmp_path, tiny_engine):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(tiny_model_dir / "controlnet")
    controlnet.save_pretrained(tmp_path / "sketch", safe_serialization=False)
    assert (tmp_path / "sketch" / "diffusion_pytorch_model.bin").is_file()
    engine = SDXSEngine.from_pretrained(str(tmp_path / "sketch"), device="cpu", base=str(tiny_model_dir), backend="torch")
    a = engine.sketch_to_image(stroke_canvas(), "a cat", seed=1).images[0]
    b = tiny_engine.sketch_to_image(stroke_canvas(), "a cat", seed=1).images[0]
    assert np.array_equal(pixels(a), pixels(b))


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_model_dir / "controlnet" / "config.json").read_bytes())
    with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Exploit()}, f)
    with pytest.raises(ModelNotFoundError, match="not a plain tensor file"):
        load_controlnet(folder, torch.float32)
    assert "pickled code ran" not in capsys.readouterr().out
