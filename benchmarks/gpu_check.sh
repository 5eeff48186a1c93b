#!/usr/bin/env bash
# The GPU rows of benchmarks/bench_engine.py, on a CUDA machine, in a few minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; PYTHON=... to pick python
#   bash benchmarks/gpu_check.sh --dtype bfloat16    # extra options go to bench_engine.py
#
# Needs an environment with torch (CUDA build), transformer-lens 4.3, transformers, psutil and
# patchspec's dependencies. Prints the card's name, the tables and the goals check: the medium
# GPT-2 shape at seq 16, 32, 64 and 128, batch 1 and 8, every case (the dest x src pattern grid
# only where it has at most 12,288 cells, i.e. seq 16), then the GPT-2-small shape at seq 32
# and 128, batch 8 and 1, four cases. TransformerLens runs 48 random cells per row,
# extrapolated per cell. --budget-s (140 s, then 60 s) stops starting new rows so that the
# script takes about 4-5 minutes on an H100/H200-class card; rows not started are printed as
# skipped. Not yet run on a GPU (none was lent when it was written). Exits at once, with status
# 2, when there is no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, or torch is missing" >&2
    echo "for $PY); nothing was run. Run it on a machine with an NVIDIA GPU and a CUDA torch." >&2
    exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"# GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
"$PY" benchmarks/bench_engine.py --device cuda --models medium --seqs 16 32 64 128 --batches 1 8 \
    --repeats 3 --no-warmup --tl-max-cells 48 --max-cells 12288 --budget-s 140 "$@"
first=$?
"$PY" benchmarks/bench_engine.py --device cuda --models gpt2-small --seqs 32 128 --batches 8 1 \
    --cases resid_pre head_by_pos head_all_pos neurons \
    --repeats 3 --no-warmup --tl-max-cells 48 --max-cells 12288 --budget-s 60 "$@"
second=$?
exit $(( first > second ? first : second ))
