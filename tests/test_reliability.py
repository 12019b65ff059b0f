"""Issue 21, reliability and security: checkpoints read without running their code, training that
resumes to the uninterrupted run, and recipe typos reported first with the closest key."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twotower.cli import export

ROOT = Path(__file__).resolve().parents[1]


# ---- export never runs a checkpoint's code -------------------------------------------------------

class Payload:
    """Unpickled, it creates the file `marker` (what a crafted checkpoint could do with any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _meta(backbone_dir) -> dict:
    return {"context_source": str(backbone_dir), "block_size": 8, "mask_token_id": 3}


def _sharded_checkpoint(folder: Path) -> Path:
    """A one-tensor folder in the layout ModelParallelStrategy writes (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"denoiser.lm_head.weight": torch.zeros(2, 2)}}, checkpoint_id=folder, no_dist=True)
    return folder


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, on purpose
@pytest.mark.parametrize("where", ["ckpt", "meta.pt", ".metadata"])
def test_export_refuses_a_checkpoint_that_runs_code(backbone_dir, tmp_path, where):
    marker = tmp_path / "marker"
    if where == "ckpt":
        path = tmp_path / "run.ckpt"
        torch.save({"state_dict": {}, "twotower": _meta(backbone_dir), "x": Payload(marker)}, path)
    else:
        path = _sharded_checkpoint(tmp_path / "sharded")
        hparams = {"x": Payload(marker)} if where == "meta.pt" else {}
        torch.save({"twotower": _meta(backbone_dir), "hyper_parameters": hparams}, path / "meta.pt")
        if where == ".metadata":
            (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Exception) as refused:
        export(str(path), str(tmp_path / "out"))
    assert not marker.exists()  # the file's code did not run
    assert refused.type is ValueError and re.search(r"refused to load: it needs (io|builtins)\.open", str(refused.value))
    assert not (tmp_path / "out").exists()


def test_export_reads_plug_in_objects_a_python_built_module_stores(backbone_dir, code_corpus, tmp_path):
    """A module built in Python keeps its plug-ins as objects in hyper_parameters: they are allowed."""
    import lightning as L

    from twotower.data import TextDataModule
    from twotower.model import TwoTowerLM
    from twotower.objectives import ARDistillation, GeometricPositions
    from twotower.schedules import AntitheticTime, CosineSchedule, FullMaskMix
    from twotower.training import DenoiserFineTuning

    module = DenoiserFineTuning(str(backbone_dir), block_size=8, warmup_steps=0, shifted=True,
                                schedule=CosineSchedule(), time_sampler=FullMaskMix(0.5, AntitheticTime()),
                                objective=ARDistillation(), position_weighting=GeometricPositions(0.9))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, TextDataModule(str(code_corpus), seq_len=32, block_size=8, batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded = TwoTowerLM.from_pretrained(export(str(tmp_path / "run.ckpt"), str(tmp_path / "out")))
    for k, v in module.denoiser.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[k], v), k


# ---- a killed and resumed fit trains as one uninterrupted run --------------------------------------

class _Crash(Exception):
    pass


class _Losses:
    """Lightning callback: each step's training loss by global step; raises _Crash before step `crash_at`."""

    def __new__(cls, crash_at: int | None = None):
        import lightning as L

        class Losses(L.Callback):
            """Per-step losses, and a crash (as a killed process) once `crash_at` steps are done."""

            def __init__(self) -> None:
                self.losses: dict[int, float] = {}

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == crash_at:
                    raise _Crash

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.losses[trainer.global_step] = float(outputs["loss"])

        return Losses()


def _fit(backbone_dir, corpus, root: Path, *, crash_at: int | None = None, ckpt_path: str | None = None):
    """7 steps of a debug_denoiser-like fit (indexed rows, 3 batches an epoch, the last one short), a
    checkpoint after every step; the per-step losses."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from twotower.data import TextDataModule
    from twotower.training import DenoiserFineTuning

    L.seed_everything(0, verbose=False)  # as the recipes' seed_everything: the same initial weights every run
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=1e-2, warmup_steps=2)
    data = TextDataModule(str(corpus), seq_len=32, block_size=8, batch_size=4, max_train_sequences=10, indexed=True)
    losses = _Losses(crash_at)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=7, logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[losses, ModelCheckpoint(root / "ckpt", every_n_train_steps=1,
                                                                                   save_last=True)])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return losses.losses


@pytest.mark.parametrize("killed_after", [2, 4])  # inside the first epoch; one batch into the second
def test_killed_and_resumed_fit_has_the_uninterrupted_losses(backbone_dir, code_corpus, tmp_path, killed_after):
    import warnings

    whole = _fit(backbone_dir, code_corpus, tmp_path / "whole")
    assert sorted(whole) == list(range(1, 8))
    with pytest.raises(_Crash):
        _fit(backbone_dir, code_corpus, tmp_path / "run", crash_at=killed_after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(backbone_dir, code_corpus, tmp_path / "run", ckpt_path=str(tmp_path / "run/ckpt/last.ckpt"))
    assert sorted(resumed) == list(range(killed_after + 1, 8))
    assert resumed == {step: whole[step] for step in resumed}
    assert not [str(w.message) for w in caught if "not resumable" in str(w.message)]


# ---- a recipe typo: the error first, with the closest key ------------------------------------------

@pytest.mark.parametrize("bad, first_line", [
    (["--model.init_args.lrr", "0.1"],
     "error: 'lrr' is not an argument of twotower.training.DenoiserFineTuning; did you mean 'lr'?"),
    (["--config", "bad.yaml"], "error: unknown option 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"),
])
def test_a_bad_recipe_key_is_reported_first_with_the_closest_key(tmp_path, bad, first_line):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_stepz: 3\n")
    cmd = [sys.executable, "-m", "twotower.cli", "fit", "--config", str(ROOT / "recipes/debug_denoiser.yaml"),
           *[str(tmp_path / a) if a.endswith(".yaml") else a for a in bad]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [first_line, "tip: python -m twotower.cli fit --help lists the accepted options"]
