#!/usr/bin/env bash
# The GPU checks of issue 26 in one run, for a lent CUDA machine (`run` tool: bash benchmarks/gpu_session.sh):
# tests/test_cuda.py, then benchmarks/scale.py rows (8B bf16 resident and dispatched, default and ReplaceMe; 7B
# fp32; 32B bf16 streamed). Logs and JSON rows go to $OUT (default out/gpu). About 10 minutes on an H200.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
free -g | head -2
T0=$SECONDS
timeout ${TEST_S:-130} python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/test_cuda.log
echo "test_cuda: $((SECONDS - T0)) s"
row() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  local t=$SECONDS
  timeout $limit python3 benchmarks/scale.py --json $OUT/$name.json "$@" > $OUT/$name.log 2>&1
  echo "== $name: rc $? in $((SECONDS - t)) s"; grep -v "it/s\]" $OUT/$name.log | tail -22
}
row 8b-bf16-default 60 --shape llama-3-8b --dtype bfloat16 --device cuda --remove 8
row 8b-bf16-replaceme 60 --shape llama-3-8b --dtype bfloat16 --device cuda --remove 8 --method replaceme
row 32b-bf16-streamed 150 --shape qwen2.5-32b --dtype bfloat16 --device cuda --placement streamed --repeats 1
row 7b-fp32-default 70 --shape llama-2-7b --dtype float32 --device cuda --remove 7 --repeats 1
row 8b-bf16-dispatched-default 70 --shape llama-3-8b --dtype bfloat16 --device cuda --placement dispatched --remove 8 --repeats 1
row 8b-bf16-dispatched-replaceme 60 --shape llama-3-8b --dtype bfloat16 --device cuda --placement dispatched --remove 8 --repeats 1 --method replaceme
echo "total $SECONDS s"
