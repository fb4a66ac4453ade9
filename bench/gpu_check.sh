#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md in one run, for a machine with one GPU
# (about 10 minutes on an H200, most of it the uncached generation baseline):
#
#     bash bench/gpu_check.sh OUT_DIR
#
# 1. `python -m megatrain.bench` on megabyte-text-1b (bf16, SDPA attention, fused AdamW):
#    training bytes/s, MFU against the matmul peak measured in the same run, peak memory,
#    and generating 8,192 bytes cached / uncached / with a same-size plain transformer
#    -> OUT_DIR/bench.json
# 2. the 1,048,576-byte config trains on one GPU with activation checkpointing: a few
#    steps of launch/pretrain.py -> OUT_DIR/1m.jsonl (bytes_per_s, mfu, peak_memory_gib)
#
# Each result is written as soon as it exists, so a run cut short keeps what it measured.
# BENCH_CONFIG, LONG_CONFIG, GEN_BYTES and STEPS override the defaults (the tests run
# this script on CPU with configs/tiny.yaml).
set -euo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
bin=.venv/bin
mkdir -p "$out"
{ nvidia-smi || echo "no nvidia-smi"; "$bin/python" -c "import torch; print('torch', torch.__version__)"; } > "$out/machine.txt" 2>&1

stdlib=$("$bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
"$bin/python" -m data_prep.build_shards "$stdlib"/*.py --output "$out/shards" --val-fraction 0.01 > "$out/shards.log" 2>&1

"$bin/python" -m megatrain.bench --json --config "${BENCH_CONFIG:-configs/megabyte-text-1b.yaml}" \
    --gen-bytes "${GEN_BYTES:-8192}" > "$out/bench.json" 2> "$out/bench.log"
echo "bench: $(cat "$out/bench.json")"

port=$("$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/deepspeed" --num_gpus 1 --master_port "$port" launch/pretrain.py --config "${LONG_CONFIG:-configs/megabyte-1m.yaml}" \
    --data "$out/shards" --train-steps "${STEPS:-3}" --set train.grad_accum_steps=1 --set train.eval_interval=0 \
    --metrics "$out/1m.jsonl" > "$out/1m.log" 2>&1
echo "long context: $(tail -n 1 "$out/1m.jsonl")"
