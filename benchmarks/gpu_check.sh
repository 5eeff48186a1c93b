#!/usr/bin/env bash
# The GPU rows of benchmarks/bench_engine.py, on a CUDA machine, in a few minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; PYTHON=... to pick python
#   bash benchmarks/gpu_check.sh --dtype bfloat16    # extra options go to bench_engine.py
#
# Needs an environment with torch (CUDA build), transformer-lens 4.3, transformers, psutil and
# patchspec's dependencies. Prints the card's name and the table (medium GPT-2 shape at seq 16,
# 32, 64 and 128, GPT-2-small shape at 32 and 128, batch 1 and 8, every case; the dest x src
# pattern grid only up to 12,288 cells), then the goals check. --budget-s keeps it under about
# 4 minutes of rows (rows left are printed as skipped); on an H100/H200-class card the whole run
# is meant to take under 5 minutes. Exits at once, with status 2, when there is no CUDA device.
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
    --repeats 3 --tl-max-cells 64 --max-cells 12288 --budget-s 150 "$@"
first=$?
"$PY" benchmarks/bench_engine.py --device cuda --models gpt2-small --seqs 32 128 --batches 1 8 \
    --repeats 3 --tl-max-cells 64 --max-cells 12288 --budget-s 80 "$@"
second=$?
exit $(( first > second ? first : second ))
