#!/usr/bin/env bash
# CUDA check of the training stages (what no CPU test can show): each stage's smoke preset on a GPU in
# fp32, bf16 and fp16, stage C with every feature-matching encoder (U-Net, VGG-16, DINOv2 with random
# weights, built here), then the one-step result generated on the GPU by `sdxs`. Prints one summary line
# per run into $OUT/summary.txt (default OUT=/tmp/gpu-check), the logs as $OUT/logs.tar.gz. Usage, on a
# machine with a CUDA GPU and the project's requirements installed:
#     bash tools/gpu_check.sh            # ONLY=REGEX bash tools/gpu_check.sh: the runs whose name matches
# Missing packages may wait in .whl/ as wheels or .tar.xz archives of the package folder (put into
# /tmp/site first); .whl/ may also hold bpe_simple_vocab_16e6.txt.gz for machines without network.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
RUNS=/tmp/gpu-check-runs
LOGS=/tmp/gpu-check-logs
mkdir -p "$OUT" "$RUNS" "$LOGS"
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
for archive in .whl/*.tar.xz; do [ -f "$archive" ] && tar -C /tmp/site -xJf "$archive"; done  # packages as plain archives
export PYTHONPATH=/tmp/site:$PWD
[ -f .whl/bpe_simple_vocab_16e6.txt.gz ] && export SDXS_CLIP_BPE=$PWD/.whl/bpe_simple_vocab_16e6.txt.gz
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/summary.txt"

run() {  # run NAME ARGS...: one command, its log in $LOGS/NAME.log, one summary line
  local name=$1; shift
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return  # ONLY=REGEX runs a subset, e.g. ONLY=C-vgg16
  local start=$SECONDS
  timeout 300 python3 "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s; last line: $(tail -n 1 "$LOGS/$name.log" | cut -c1-200)" | tee -a "$OUT/summary.txt"
}

# Random-weight VGG-16 state dict and a tiny DINOv2 folder for stage C's image encoders.
python3 - "$RUNS" <<'PY'
import sys, torch, torchvision
from transformers import Dinov2Config, Dinov2Model
root = sys.argv[1]
torch.save(torchvision.models.vgg16().state_dict(), f"{root}/vgg16.pth")
Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
                         image_size=224)).save_pretrained(f"{root}/dinov2")
PY

for precision in no bf16 fp16; do
  run "A-$precision" train/distill_decoder.py --preset smoke --mixed_precision "$precision" --output_dir "$RUNS/a-$precision"
  run "B-$precision" train/distill_unet.py --preset smoke --mixed_precision "$precision" --output_dir "$RUNS/b-$precision"
  run "C-$precision" train/distill_one_step.py --preset smoke --mixed_precision "$precision" --output_dir "$RUNS/c-$precision"
done
run C-vgg16-bf16 train/distill_one_step.py --preset smoke --mixed_precision bf16 --fm_encoder vgg16 \
    --fm_encoder_path "$RUNS/vgg16.pth" --fm_layers 0,1 --fm_weights 1,1 --output_dir "$RUNS/c-vgg16"
run C-vgg16-fp16 train/distill_one_step.py --preset smoke --mixed_precision fp16 --fm_encoder vgg16 \
    --fm_encoder_path "$RUNS/vgg16.pth" --fm_layers 0,1 --fm_weights 1,1 --output_dir "$RUNS/c-vgg16-fp16"
run C-dinov2-bf16 train/distill_one_step.py --preset smoke --mixed_precision bf16 --fm_encoder dinov2 \
    --fm_encoder_path "$RUNS/dinov2" --fm_layers 1,2 --fm_weights 1,1 --output_dir "$RUNS/c-dinov2"
run C-lr1e6 train/distill_one_step.py --preset smoke --mixed_precision bf16 --lr 1e6 --online_lr 1e6 --output_dir "$RUNS/c-lr"
run generate-cuda -m sdxs generate --model "$RUNS/c-bf16/final" --decoder large --device cuda --prompt "a red apple" \
    --out "$OUT/c-bf16.png"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
echo done | tee -a "$OUT/summary.txt"
