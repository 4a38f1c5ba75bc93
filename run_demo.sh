#!/usr/bin/env bash
# `make demo`: the synthetic audio-visual benchmark on CPU (issue 6). Generates the benchmark
# once (cached under demo_out/), pre-trains the tiny audio trunk, trains and evaluates every
# row of the table under `torchrun --nproc_per_node 2` (gloo), and writes
# demo_out/results.json, demo_out/results.md and the |gate| figures. Arguments go to
# synthetic/demo.py, e.g. `bash run_demo.sh --quick` (reduced run) or `--help`.
set -euo pipefail
cd "$(dirname "$0")"
exec python -m synthetic.demo "$@"
