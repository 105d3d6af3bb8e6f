"""tools/precision_check.py: each variant's images against the fp32 eager engine's, same prompts and seeds."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import precision_check  # noqa: E402


def test_variants_are_compared_with_the_fp32_images_of_the_same_prompts(tiny_model_dir, tmp_path):
    out = tmp_path / "precision.json"
    code = precision_check.main(["--model", str(tiny_model_dir), "--variants", "fp32:torch,bf16:torch,fp16:torch", "--prompts", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["images"] == 2 and report["reference"] == "fp32:torch"
    same, bf16, fp16 = (report["variants"][v] for v in ("fp32:torch", "bf16:torch", "fp16:torch"))
    assert same["max_abs_diff"] == 0 and same["psnr_db_min"] == float("inf")  # the same engine: identical, image by image
    assert 0 < bf16["max_abs_diff"] < 255 and bf16["psnr_db_median"] >= bf16["psnr_db_min"] > 10
    assert "not supported on the CPU" in fp16["error"]  # said, and the other variants still ran
