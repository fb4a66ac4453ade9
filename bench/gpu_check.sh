#!/usr/bin/env bash
# The GPU figures of issue 12 ("Goals on an H200") in one run on a machine with one GPU, bare
# or not, in under 8 minutes on an H200:
#
#     bash bench/gpu_check.sh [OUT_DIR]        # default: $OUT when set, else runs/gpu_check
#
# First it finds a Python whose torch sees the GPU (PYTHON, else .venv/bin/python, else
# python3) and checks every import megatrain needs, naming what is missing; if something is,
# and WHEELS (default .whl/) holds wheels, it installs them into a folder of their own on
# PYTHONPATH and checks again. Then the parts below run in this order, each with a time
# limit of its own, all within BUDGET_S seconds (a part left with too little time is skipped
# and says so). A part's output goes to OUT_DIR/PART.out (the bench's JSON lines, each written
# the moment it is measured, so a part cut short keeps what it measured) and its stderr to
# PART.log; a pretrain part's metrics lines to PART.jsonl. OUT_DIR/summary.txt ends with each
# part's outcome, its main figures and the goals they meet (bench/gpu_summary.py).
#
#   bench-text       megatrain.bench, text-1b (bf16, micro 6 x 8 per step): step time,
#                    bytes/s, MFU against the measured matmul peak and the datasheet's, peak
#                    memory; the loader's bytes/s on the shards
#   pretrain-text    text-1b through launch/pretrain.py: 1 GPU, NCCL, the deepspeed launcher
#                    (LAUNCHER=env: RANK/WORLD_SIZE/... set here, as torchrun would), metrics
#   bench-long       megabyte-1m (1,048,576 bytes) with activation checkpointing
#   generation       8,192 bytes at text-1b scale, cached MEGABYTE against a plain
#                    transformer with as many block parameters, PLAIN_DIM wide
#   pretrain-long    megabyte-1m through launch/pretrain.py, 2 steps of one sequence
#   local-attention  bench/local_attention.py (SDPA against matmul + masked softmax) if present
#   bench-long-half  megabyte-1m recomputing only HALF_BLOCKS (4) of its blocks, the local
#                    model's: faster than bench-long where memory allows (train.checkpoint_blocks)
#   pretrain-long-fit  megabyte-1m through launch/pretrain.py with train.checkpoint_blocks: auto, the
#                    fewest recomputed blocks that fit in 90% of the GPU's memory (or FIT_MEMORY_GIB) by
#                    the estimate; the summary sets each pretrain-long run's peak memory beside its
#                    estimate (`bench --figures stages`)
#   bench-text-mb12  text-1b at micro-batch 12 (x 4 per step)
#   bench-text-nodrop  text-1b without dropout
#   bench-long-nockpt  megabyte-1m without activation checkpointing (out of memory is a figure)
#
# Settings (environment): DEVICE (cuda; cpu for the tests), PARTS (a subset, in the order
# above), TEXT_CONFIG, LONG_CONFIG, STEPS (timed bench steps, 3), PRETRAIN_STEPS (6),
# GEN_BYTES (8192), PLAIN_DIM (2048), HALF_BLOCKS (4), FIT_MEMORY_GIB, BUDGET_S (450), PYTHON, WHEELS,
# LAUNCHER.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
start_s=$(date +%s)
deadline=$(( start_s + ${BUDGET_S:-450} ))
DEVICE=${DEVICE:-cuda}
ALL_PARTS="bench-text pretrain-text bench-long generation pretrain-long local-attention bench-long-half pretrain-long-fit
    bench-text-mb12 bench-text-nodrop bench-long-nockpt"
PARTS=" $(echo ${PARTS:-$ALL_PARTS}) "  # one space between names, and around them
TEXT_CONFIG=${TEXT_CONFIG:-configs/megabyte-text-1b.yaml}
LONG_CONFIG=${LONG_CONFIG:-configs/megabyte-1m.yaml}
STEPS=${STEPS:-3}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # megatrain without an install, for every process
[ "$DEVICE" = cuda ] && export DS_ACCELERATOR=cuda  # DeepSpeed must not fall back to the CPU

say() { echo "$*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"

# --- which Python, and does it have everything ---------------------------------------------
torch_sees() {  # PYTHON: prints its torch's version and whether it sees a GPU
    "$1" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>/dev/null
}
py=
for candidate in ${PYTHON:-.venv/bin/python python3}; do
    command -v "$candidate" > /dev/null || continue
    seen=$(torch_sees "$candidate") || { say "python: $candidate has no torch"; continue; }
    say "python: $candidate: torch $seen"
    if [ "$DEVICE" = cpu ] || [[ ! $seen =~ gpus\ 0$ ]]; then py=$candidate; break; fi
done
if [ -z "$py" ]; then
    say "FAILED: no Python here has a torch that sees a CUDA GPU (tried: ${PYTHON:-.venv/bin/python python3})"
    say "  (nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 2 | tr '\n' ' '))"
    exit 2
fi

check_imports() {  # prints what is missing, one "module (package): reason" a line; fails if any
    "$py" - <<'EOF'
import contextlib, importlib, sys
# module -> the package that provides it (for pip); megatrain's needs and DeepSpeed's
NEEDED = {"torch": "torch", "numpy": "numpy", "pyarrow": "pyarrow", "yaml": "pyyaml", "safetensors": "safetensors",
          "zstandard": "zstandard", "tqdm": "tqdm", "deepspeed": "deepspeed", "pydantic": "pydantic",
          "hjson": "hjson", "msgpack": "msgpack", "psutil": "psutil", "einops": "einops", "packaging": "packaging"}
missing = []
with contextlib.redirect_stdout(sys.stderr):  # what the imports print (DeepSpeed logs to stdout)
    for module, package in NEEDED.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install that fails as it loads
            missing.append(f"{module} ({package}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not missing:  # everything there: then megatrain itself, and the launcher
        for module in ("megatrain.train", "megatrain.bench", "deepspeed.launcher.runner"):
            try:
                importlib.import_module(module)
            except Exception as e:
                missing.append(f"{module}: {type(e).__name__}: {e}")
print("\n".join(missing))
sys.exit(1 if missing else 0)
EOF
}
install_wheels() {  # the wheels of $WHEELS into a folder of their own, put first on PYTHONPATH
    local site="$work/site"
    if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        say "no wheels in $WHEELS/ to install from"; return 1
    fi
    say "installing the wheels of $WHEELS/ into $site (first on PYTHONPATH)"
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --target "$site" "$WHEELS"/*.whl >> "$out/preflight.log" 2>&1; then
        say "pip install from $WHEELS/ failed (see preflight.log)"; return 1
    fi
    export PYTHONPATH="$site:$PYTHONPATH" PATH="$site/bin:$PATH"
}
if ! missing=$(check_imports 2>> "$out/preflight.log"); then
    say "missing imports:"; say "$missing"
    installed=0
    if install_wheels; then
        if missing=$(check_imports 2>> "$out/preflight.log"); then installed=1
        else say "still missing after the install:"; say "$missing"; fi
    fi
    if (( ! installed )); then
        say "FAILED: install what is missing, or put its wheels (for Python $("$py" -c 'import sys; print(sys.version.split()[0])')) in $WHEELS/:"
        say "  bash /work/shared/tools/offline-wheels.sh fetches deepspeed, zstandard, pydantic and their dependencies;"
        say "  for others: python3 -m pip download --only-binary=:all: --no-deps -d $WHEELS PACKAGE"
        exit 1
    fi
fi
say "imports: all present ($py)"
{ nvidia-smi || echo "no nvidia-smi"; "$py" -c 'import torch, deepspeed, sys; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)'; } > "$out/machine.txt" 2>&1

# --- the parts --------------------------------------------------------------------------------
failures=0
run_part() {  # NAME LIMIT_S COMMAND...: its stdout to NAME.out (and here), its stderr to NAME.log
    local name=$1 limit=$2 left began status
    shift 2
    part_rc=0 part_s=0
    [[ $PARTS == *" $name "* ]] || return 0
    left=$(( deadline - $(date +%s) ))
    if (( left < 20 )); then
        say "$(printf '%-18s skipped: %ss of the budget left' "$name" "$left")"; failures=$((failures + 1)); return 0
    fi
    (( limit > left )) && limit=$left
    echo "== $name (up to ${limit}s): $*"
    began=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2> "$out/$name.log" | tee "$out/$name.out"
    part_rc=${PIPESTATUS[0]} part_s=$(( $(date +%s) - began ))
    case $part_rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $part_rc)"; tail -n 15 "$out/$name.log" ;;
    esac
    (( part_rc == 0 )) || failures=$((failures + 1))
    say "$(printf '%-18s %s in %ss' "$name" "$status" "$part_s")"
}
bench=("$py" -m megatrain.bench --json --device "$DEVICE" --steps "$STEPS" --warmup 1)
launcher=${LAUNCHER:-deepspeed}
pretrain() {  # CONFIG METRICS STEPS [OPTIONS]: the trainer's command line under $launcher, into cmd
    local port args=(launch/pretrain.py --config "$1" --data "$work/shards" --metrics "$2" --train-steps "$3"
                     --set train.eval_interval=0 --set train.log_interval=1 "${@:4}")
    port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if [ "$launcher" = env ]; then  # what torchrun would set
        cmd=(env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port"
             "$py" "${args[@]}")
    else
        cmd=("$py" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" "${args[@]}")
    fi
}

# the standard library's modules as shards: the loader's and the trainer's data
if [[ $PARTS == *" bench-text "* || $PARTS == *" pretrain-"* ]]; then
    stdlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    if ! "$py" -m data_prep.build_shards "$stdlib"/*.py --output "$work/shards" --val-fraction 0.01 > "$out/shards.log" 2>&1; then
        say "FAILED: building the shards (see shards.log)"; exit 1
    fi
fi

run_part bench-text 150 "${bench[@]}" --config "$TEXT_CONFIG" --figures train,loader --data "$work/shards"
pretrain "$TEXT_CONFIG" "$out/pretrain-text.jsonl" "${PRETRAIN_STEPS:-6}"
run_part pretrain-text 240 "${cmd[@]}"
if (( part_rc != 0 && part_s < 60 )) && [ "$launcher" = deepspeed ] && [ ! -s "$out/pretrain-text.jsonl" ]; then
    say "pretrain-text failed early under the deepspeed launcher: again with torchrun's variables"
    launcher=env
    pretrain "$TEXT_CONFIG" "$out/pretrain-text.jsonl" "${PRETRAIN_STEPS:-6}"
    PARTS="$PARTS pretrain-text-env " run_part pretrain-text-env 240 "${cmd[@]}"
fi
long=(--config "$LONG_CONFIG" --figures train --steps 2 --set train.grad_accum_steps=2)
run_part bench-long 100 "${bench[@]}" "${long[@]}" --set train.activation_checkpointing=true
run_part generation 150 "${bench[@]}" --config "$TEXT_CONFIG" --figures generation --generators cached,plain \
    --gen-bytes "${GEN_BYTES:-8192}" --plain-dim "${PLAIN_DIM:-2048}"
long_pretrain=(2 --set train.grad_accum_steps=1 --set train.activation_checkpointing=true)
pretrain "$LONG_CONFIG" "$out/pretrain-long.jsonl" "${long_pretrain[@]}"
run_part pretrain-long 120 "${cmd[@]}"
if [ -f bench/local_attention.py ]; then
    run_part local-attention 60 "$py" bench/local_attention.py --rounds 2
elif [[ $PARTS == *" local-attention "* ]]; then
    say "local-attention    skipped: no bench/local_attention.py in this checkout"
fi
run_part bench-long-half 90 "${bench[@]}" "${long[@]}" --set train.activation_checkpointing=true \
    --set train.checkpoint_blocks="${HALF_BLOCKS:-4}"
if [[ $PARTS == *" pretrain-long-fit "* ]]; then
    # train.checkpoint_blocks: auto: the trainer recomputes the fewest blocks that fit in 90% of its GPU's
    # memory (or in FIT_MEMORY_GIB) by the estimate; the stages figure (seconds, on the CPU) gives the
    # same estimate of both pretrain-long runs for the summary
    fit=(--set train.checkpoint_blocks=auto ${FIT_MEMORY_GIB:+--set train.checkpoint_memory_gib=$FIT_MEMORY_GIB})
    budget=()
    [ "$DEVICE" = cuda ] && budget=(--memory-gib "$("$py" -c 'import torch
print(torch.cuda.get_device_properties(0).total_memory / 2**30)')")
    plan=("$py" -m megatrain.bench --json --device cpu --figures stages --layouts 1 --config "$LONG_CONFIG"
          --set train.grad_accum_steps=1 --set train.activation_checkpointing=true)
    "${plan[@]}" > "$out/plan-long.out" 2> "$out/plan-long.log"
    "${plan[@]}" "${fit[@]}" "${budget[@]}" > "$out/plan-long-fit.out" 2>> "$out/plan-long.log"
    pretrain "$LONG_CONFIG" "$out/pretrain-long-fit.jsonl" "${long_pretrain[@]}" "${fit[@]}"
    run_part pretrain-long-fit 120 "${cmd[@]}"
fi
run_part bench-text-mb12 90 "${bench[@]}" --config "$TEXT_CONFIG" --figures train --set train.micro_batch_size=12
run_part bench-text-nodrop 90 "${bench[@]}" --config "$TEXT_CONFIG" --figures train --set model.dropout=0.0
run_part bench-long-nockpt 90 "${bench[@]}" "${long[@]}" --set train.activation_checkpointing=false

# --- what it measured, against the goals -----------------------------------------------------
"$py" bench/gpu_summary.py "$out" | tee -a "$out/summary.txt"
say "gpu_check: $failures part(s) not ok, $(( $(date +%s) - start_s ))s in all; outputs in $out"
exit $(( failures > 0 ))
