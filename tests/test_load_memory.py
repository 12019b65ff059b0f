"""Peak memory of loading: each load runs in a child process that reports its peak RSS above the
RSS it had right before the load, on a generated sharded bf16 checkpoint (tens of MB).

The bound, 1.3x the weight bytes the load keeps, does not depend on machine speed: a loader that
reads a full state dict before building the model, keeps a float32 copy, or copies the denoiser
from a second full state dict needs 2x or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks.memory import PEAK_RSS_PRELUDE  # noqa: E402

CHILD = r"""
import gc, json, os, resource, sys
import torch
from twotower.model import TwoTowerLM
from twotower.towers.base import ContextTowerBase
from twotower.towers.loading import read_config
kind, path = sys.argv[1], sys.argv[2]
# First-use costs (lazy imports, meta-device kernels) do not grow with the weights: pay them before
# the baseline by building the same model on the meta device once.
config, raw = read_config(path)
with torch.device("meta"):
    TwoTowerLM(config, time=raw.get("time_conditioning"))
""" + PEAK_RSS_PRELUDE + r"""if kind == "context":
    model = ContextTowerBase.from_pretrained(path, dtype=torch.bfloat16)
elif kind == "from_backbone":
    model = TwoTowerLM.from_backbone(path, dtype=torch.bfloat16)
else:
    model = TwoTowerLM.from_pretrained(path, dtype=torch.bfloat16)
peak = peak_rss() - before
weights = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t
              for t in [*model.parameters(), *model.buffers()]}.values())
print(json.dumps({"peak": peak, "weights": weights}))
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm (Linux)")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A ~40 MB bf16 AR checkpoint in 8 MB shards, per-expert layout (as transformers writes it),
    and its two-tower conversion (sharded too)."""
    from twotower.model import TwoTowerLM
    from twotower.towers.nemotron_h.context import ContextTower
    from twotower.towers.saving import save_backbone_hf

    root = tmp_path_factory.mktemp("memory")
    cfg = tiny_config("MEM*E", vocab_size=8192, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, mamba_num_heads=16, mamba_head_dim=32, ssm_state_size=32, n_groups=1,
                      n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                      moe_shared_expert_intermediate_size=512)
    torch.manual_seed(0)
    with torch.no_grad():
        ctx = ContextTower(cfg).to(torch.bfloat16)
        ctx.keep_router_fp32()
    ar = root / "ar"
    save_backbone_hf({k.removeprefix("backbone."): v for k, v in ctx.state_dict().items()}, ar, config=cfg,
                     max_shard_size=8 * 2**20, expert_layout="per_expert")
    tt = root / "twotower"
    TwoTowerLM.from_backbone(ar).save_pretrained(tt, max_shard_size=8 * 2**20)
    assert len(list(ar.glob("model-*.safetensors"))) > 2 and len(list(tt.glob("model-*.safetensors"))) > 2
    return ar, tt


@pytest.mark.parametrize("kind", ["context", "from_backbone", "from_pretrained"])
def test_peak_memory_of_a_load_is_at_most_1_3x_the_weights(checkpoints, kind):
    ar, tt = checkpoints
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(tt if kind == "from_pretrained" else ar)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["weights"] > 30 * 2**20, res  # both towers for the two-tower loads
    assert res["peak"] <= 1.3 * res["weights"], f"{kind}: peak {res['peak'] / 2**20:.1f} MiB for " \
                                                f"{res['weights'] / 2**20:.1f} MiB of weights"
