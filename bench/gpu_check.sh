#!/usr/bin/env bash
# One prepared GPU check (at most about 8 minutes on one GPU): the gpu test tier, then the benches that
# only mean something on a GPU, each under its own time limit. Prints one line per part at the end and
# exits non-zero if any part failed.
#
#   bench/gpu_check.sh                      # on a machine with a CUDA GPU, from the repository root
#   PYTHON=.venv/bin/python bench/gpu_check.sh
#   CHECK_DEVICE=cpu bench/gpu_check.sh     # the same commands on CPU at tiny sizes (checks the script)
#
# Parts (limit): gpu tests (170 s); dit_scaling s + b in bf16 with MFU (100 s); dit_scaling b with
# FlexAttention and compiled blocks (140 s); attention kernels at long K (40 s); cache-latents and
# sample throughput (40 s). MFU uses the GPU's dense bf16 peak from bench/dit_scaling.py's table
# (H100/H200 989, A100 312 TFLOP/s), or VLT_PEAK_TFLOPS for another GPU.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
DEVICE="${CHECK_DEVICE:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=()

part() {  # part NAME LIMIT_S COMMAND...: run one part under a time limit, record its verdict
  local name="$1" limit="$2"
  shift 2
  echo
  echo "=== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  local verdict=ok
  [ "$rc" -eq 0 ] || verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
  results+=("$(printf '%-34s %-28s %4d s' "$name" "$verdict" $((SECONDS - start)))")
}

echo "=== device"
"$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB", "bf16", torch.cuda.is_bf16_supported())
EOF

if [ "$DEVICE" = cuda ]; then
  part "gpu tests (bf16 pipeline, flex)" 170 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -x -rs
  part "dit_scaling s, b (bf16, MFU)" 100 "$PYTHON" bench/dit_scaling.py --presets s b --device cuda \
    --dtype bf16 --batch 64 --sample_batch 64 --repeats 3 --sample_steps 10
  part "dit_scaling b (flex, compiled)" 140 "$PYTHON" bench/dit_scaling.py --presets b --device cuda \
    --dtype bf16 --batch 64 --sample_batch 64 --repeats 3 --sample_steps 10 --attention flex --compile
  part "attention kernels" 40 "$PYTHON" bench/attention.py --device cuda --ks 256 1024 4096 --batch 16 \
    --width 768 --heads 12
  part "cache-latents + sample throughput" 40 "$PYTHON" bench/cache_throughput.py --device cuda \
    --batches 1 64 256
else
  part "gpu tests (skip without CUDA)" 60 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -rs
  part "dit_scaling tiny (MFU via env)" 100 env VLT_PEAK_TFLOPS=1 "$PYTHON" bench/dit_scaling.py \
    --presets tiny --dtype bf16 --batch 8 --sample_batch 8 --repeats 1 --sample_steps 2
  part "attention kernels" 60 "$PYTHON" bench/attention.py --ks 32 64 --batch 2 --width 64 --heads 2 \
    --repeats 1
  part "cache-latents + sample throughput" 150 "$PYTHON" bench/cache_throughput.py --batches 1 8 \
    --images 64
fi

echo
echo "=== summary ($DEVICE)"
failed=0
for line in "${results[@]}"; do
  echo "$line"
  [[ "$line" == *FAILED* ]] && failed=1
done
exit "$failed"
