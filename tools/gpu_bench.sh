#!/usr/bin/env bash
# CUDA check of the serving path (issue 16), what no CPU test can show: the benchmark's GPU rows
# (upstream pipeline, eager engine, compiled engine; fp16; batch 1, batch 64, 16 concurrent clients
# through the request batcher) and each precision's agreement with fp32 on the built-in model's
# trained weights. Usage, on a machine with a CUDA GPU and the project's requirements installed:
#     bash tools/gpu_bench.sh           # results in $OUT (default /tmp/gpu-bench): *.json, *-table.md, summary.txt
# Budget: about 8 minutes on an H100/H200, most of it compiling (one CUDA graph per batch bucket),
# plus up to 4 for the SDXS-1024 rows.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/summary.txt"

step() {  # step NAME SECONDS ARGS...: one command with a time limit, its log, one summary line
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python3 "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $?, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

step precision 180 tools/precision_check.py --device cuda --out "$OUT/precision.json"
step bench-fp16 420 -m sdxs.bench --device cuda --clients 16 --runs 20 --out "$OUT/benchmarks-gpu"
# SDXS-1024 at 1024x1024 (issue 17; paper: ~32 ms per image): random weights, fp16
step bench-1024 240 -m sdxs.bench --model sdxs-1024 --device cuda --rows upstream,torch,torch-compile --batch 8 --runs 10 --out "$OUT/benchmarks-1024-gpu"
cat "$OUT/benchmarks-gpu-table.md" "$OUT/benchmarks-1024-gpu-table.md" "$OUT/precision.json" >>"$OUT/summary.txt" 2>/dev/null
tail -n 40 "$OUT/summary.txt"
