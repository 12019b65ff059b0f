"""bfloat16 on a CPU without a oneDNN bf16 path (an AVX2-only CPU): loading and training warn, naming
the float32 fix; on a CPU with one (or in float32) they stay quiet. Both kinds are simulated on any CPU
by answering `cpu_has_bf16_path` for it; the probe itself is checked against the op it asks."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from twotower import hardware
from twotower.model import TwoTowerLM
from twotower.towers.base import ContextTowerBase
from twotower.training import DenoiserFineTuning


def _warnings(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [w for w in seen if issubclass(w.category, hardware.SlowBFloat16Warning)]


@pytest.fixture
def no_bf16_path(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16_path", lambda: False)


@pytest.fixture
def bf16_path(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16_path", lambda: True)


def test_the_probe_answers_what_onednns_bf16_reorder_does_on_this_cpu():
    hardware.onednn_can_pack.cache_clear()
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(32, 32, dtype=torch.bfloat16), 16)
        works = torch.backends.mkldnn.is_available()
    except (RuntimeError, AttributeError):
        works = False
    assert hardware.cpu_has_bf16_path() is works


def test_loading_in_bf16_without_a_bf16_path_warns_with_the_float32_fix(no_bf16_path):
    seen = _warnings(lambda: ContextTowerBase.from_pretrained("embedded-backbone", dtype=torch.bfloat16))
    assert len(seen) == 1
    text = str(seen[0].message)
    assert "loading backbone in bfloat16" in text and "--dtype float32" in text and "32-true" in text
    seen = _warnings(lambda: TwoTowerLM.from_pretrained("embedded", dtype="bfloat16"))
    assert len(seen) == 1 and "dtype=torch.float32" in str(seen[0].message)
    assert seen[0].filename == __file__  # points at the caller's line, not at twotower's
    assert not _warnings(lambda: TwoTowerLM.from_pretrained("embedded", dtype=torch.float32))
    assert not _warnings(lambda: TwoTowerLM.from_pretrained("embedded"))  # the stored float32


def test_loading_in_bf16_with_a_bf16_path_is_quiet(bf16_path):
    assert not _warnings(lambda: TwoTowerLM.from_pretrained("embedded", dtype=torch.bfloat16))


def _fit(tmp_path, precision: str):
    from twotower.data import TextDataModule

    module = DenoiserFineTuning("embedded-backbone", block_size=8, lr=1e-3, warmup_steps=0)
    data = TextDataModule("stdlib", seq_len=32, block_size=8, batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, precision=precision)
    return lambda: trainer.fit(module, data)


def test_bf16_mixed_training_without_a_bf16_path_warns_and_32_true_does_not(no_bf16_path, tmp_path):
    seen = _warnings(_fit(tmp_path, "bf16-mixed"))
    assert len(seen) == 1 and "training with precision 'bf16-mixed'" in str(seen[0].message)
    assert not _warnings(_fit(tmp_path, "32-true"))


def test_bf16_mixed_training_with_a_bf16_path_is_quiet(bf16_path, tmp_path):
    assert not _warnings(_fit(tmp_path, "bf16-mixed"))


@pytest.mark.parametrize("has_path, want", [(False, "float32"), (True, "bfloat16")])
def test_gen_dtype_auto_picks_bf16_only_where_it_has_a_fast_path(monkeypatch, has_path, want):
    from twotower.data import DistilledDataModule, FailurePointDataModule

    monkeypatch.setattr(hardware, "cpu_has_bf16_path", lambda: has_path)
    data = DistilledDataModule("embedded-backbone", gen_dtype="auto", device="cpu", cache_dir="unused")
    explicit = DistilledDataModule("embedded-backbone", gen_dtype=want, device="cpu", cache_dir="unused")
    assert data.gen_dtype == want
    assert data._cache_path("text") == explicit._cache_path("text")  # the cache of the dtype it picked
    mined = FailurePointDataModule("embedded-backbone", gen_dtype="float32", mine_dtype="auto", device="cpu",
                                   mine_rows=4, num_train=8)
    assert mined.gen_dtype == "float32" and mined.mine_dtype == want


def test_a_bad_gen_dtype_names_every_accepted_value():
    from twotower.data import DistilledDataModule

    with pytest.raises(ValueError, match=r"'float16'.*\['bfloat16', 'float32'\], or 'auto'"):
        DistilledDataModule("embedded-backbone", gen_dtype="float16")


def test_the_float32_pack_and_int8_probes_answer_what_the_ops_do():
    """onednn_can_pack(float32) and has_int8_linear against the ops they ask, on this CPU."""
    import warnings

    hardware.onednn_can_pack.cache_clear()
    hardware.has_int8_linear.cache_clear()
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(32, 32), 16)
        packs = torch.backends.mkldnn.is_available()
    except (RuntimeError, AttributeError):
        packs = False
    assert hardware.onednn_can_pack(torch.float32) is packs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = torch.quantize_per_channel(torch.randn(8, 8), torch.full((8,), 0.1, dtype=torch.float64),
                                           torch.zeros(8, dtype=torch.long), 0, torch.qint8)
            y = torch.ops.quantized.linear_dynamic(torch.randn(3, 8), torch.ops.quantized.linear_prepack(w, None), True)
        int8 = y.shape == (3, 8)
    except (RuntimeError, AttributeError, NotImplementedError):
        int8 = False
    assert hardware.has_int8_linear() is int8
    assert hardware.onednn_can_pack(torch.float64) is False  # oneDNN packs no float64 linear


def test_the_frozen_towers_eval_mode_warning_is_lightnings_own_text_and_is_silenced(tmp_path):
    """twotower.training silences Lightning's "modules in eval mode" warning (the frozen context tower is in
    eval mode by design) by its text: the pattern must match what this Lightning says, or the filter is dead."""
    import re

    from twotower import training

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, "32-true")()
    assert any(re.match(training.EVAL_MODE_WARNING, str(w.message)) for w in seen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=training.EVAL_MODE_WARNING)  # what importing training does
        _fit(tmp_path, "32-true")()
    assert not any("eval mode" in str(w.message) for w in seen)

