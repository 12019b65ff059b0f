#!/usr/bin/env bash
# The GPU checks as one prepared script, for a machine with CUDA (and, for the kernel parity
# tests, mamba-ssm installed): GPU-marked tests, then a short benchmark on the GPU.
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_checks}}"
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)" || echo "mamba-ssm not installed: kernel parity tests will skip"
python -m pytest -m gpu -q -rs 2>&1 | tee "$out/gpu_tests.log"
python benchmarks/bench.py --device cuda --prompts 8 --repeats 2 --modes ar,hf_generate,mock_ar,diff_t0.8_b16,diff_t0.5_b16,spec_b16 \
    --no-training --out "$out/bench" 2>&1 | tee "$out/bench.log"
