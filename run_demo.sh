#!/usr/bin/env bash
# `make demo`: synthetic audio-visual benchmark on CPU (issue 6).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f preprocess/make_synthetic_av.py ] || [ ! -f bench/demo.py ]; then
    echo "make demo: the synthetic benchmark is not built yet (preprocess/make_synthetic_av.py and" >&2
    echo "bench/demo.py are missing); run 'make test' meanwhile." >&2
    exit 2
fi
python bench/demo.py "$@"
