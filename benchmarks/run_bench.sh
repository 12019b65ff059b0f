#!/usr/bin/env bash
# The full benchmark in one command: the default modes at batch 1 and 8 on seeds 0,1,2, results in
# benchmarks/results/, and the README's Results section refreshed. Extra options pass through, e.g.
#   benchmarks/run_bench.sh --device cuda --threads 8
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/bench.py --out benchmarks/results --update-readme "$@"
