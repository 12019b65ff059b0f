"""Denoiser fine-tuning: frozen context tower, loss falls, CLI fit + resume, recipes, convert/export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from twotower.towers.nemotron_h.context import ContextTower
from twotower.objectives import HardLabelCE
from twotower.training import ARPretraining, DenoiserFineTuning

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, **kw)


def test_context_tower_frozen_and_bit_identical_after_fit(backbone_dir, code_corpus, tmp_path):
    from twotower.data import TextDataModule

    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=1e-2, warmup_steps=0)
    before = {k: v.clone() for k, v in module.context.state_dict().items()}
    den_before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    data = TextDataModule(str(code_corpus), seq_len=32, block_size=8, batch_size=4)
    _trainer(tmp_path, 5, limit_val_batches=0).fit(module, data)
    assert all(not p.requires_grad and p.grad is None for p in module.context.parameters())
    assert not module.context.training
    for k, v in module.context.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in module.denoiser.state_dict().items() if not torch.equal(v, den_before[k])]
    assert any(k.startswith("time.") for k in changed) and any(k.startswith("backbone.") for k in changed)


def test_training_builds_its_towers_as_twotowerlm_does(backbone_dir, monkeypatch):
    """The trained pair comes from `TwoTowerLM.from_backbone`, so the family's precision matching
    runs on it (NemotronH: the MoE routers re-copied at the context's precision), as for inference."""
    from twotower.towers.nemotron_h.denoiser import DenoiserTower
    from twotower.towers.nemotron_h.layers import MOE

    seen = []
    match = DenoiserTower.match_precision
    monkeypatch.setattr(DenoiserTower, "match_precision", lambda self, context: (seen.append(context), match(self, context)))
    module = DenoiserFineTuning(str(backbone_dir), block_size=8)
    den, ctx = module.denoiser, module.context
    assert len(seen) == 1 and seen[0] is ctx
    routers = [(d.mixer.gate, c.mixer.gate) for d, c in zip(den.backbone.layers, ctx.backbone.layers) if d.block_type == MOE]
    assert routers  # the tiny config has MoE blocks
    for mine, theirs in routers:
        for (k, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), k
    assert not ctx.training and not any(p.requires_grad for p in ctx.parameters())
    assert all(p.requires_grad for p in den.parameters())


def test_loss_is_nelbo_weighted_and_metrics_consistent(backbone_dir):
    module = DenoiserFineTuning(str(backbone_dir), block_size=8)
    x = torch.randint(4, 260, (2, 32))
    out = module.forward_loss(x, generator=torch.Generator().manual_seed(0))
    # NELBO weight 1/t >= 1, so the weighted loss per token is at least the masked CE over all tokens.
    assert out["loss"] >= out["ce_sum"] / x.numel() - 1e-6
    assert torch.isclose(out["loss"], out["nelbo_sum"] / x.numel())
    assert 0 < out["masked"] <= x.numel() and out["correct"] <= out["masked"]
    unweighted = DenoiserFineTuning(str(backbone_dir), block_size=8, loss_weighting="none")
    out2 = unweighted.forward_loss(x, generator=torch.Generator().manual_seed(0))
    assert torch.isclose(out2["loss"], out2["ce_sum"] / out2["masked"])


def _memorise(module, x, steps: int) -> list[float]:
    """Adam (lr 3e-3) on the denoiser for `steps` steps on the same batch and the same masks every step,
    a pure memorisation problem the model must solve; the loss of each step."""
    opt = torch.optim.Adam(list(module.denoiser.parameters()), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = module.forward_loss(x, generator=torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_tiny_model_overfits_tiny_corpus(backbone_dir):
    torch.manual_seed(0)
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=3e-3, warmup_steps=0)
    x = torch.randint(4, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = _memorise(module, x, 60)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.3 * start, (start, end)


def test_ar_pretraining_learns_and_saves_transformers_checkpoint(tmp_path):
    from transformers import NemotronHForCausalLM

    module = ARPretraining(pattern="M*E-", hidden_size=32, head_dim=8, intermediate_size=48, mamba_num_heads=4,
                           mamba_head_dim=8, ssm_state_size=8, moe_intermediate_size=24,
                           moe_shared_expert_intermediate_size=16, lr=1e-2, warmup_steps=0,
                           save_dir=str(tmp_path / "bb"))
    x = torch.randint(4, 40, (4, 24), generator=torch.Generator().manual_seed(0))
    first = float(module._loss(x)[0])
    data = torch.utils.data.DataLoader([x[i] for i in range(4)], batch_size=4)
    _trainer(tmp_path, 40, limit_val_batches=0).fit(module, data)
    assert float(module._loss(x)[0]) < 0.5 * first
    ref = NemotronHForCausalLM.from_pretrained(tmp_path / "bb").eval()
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, module.tower.eval()(x), atol=1e-4)


def _run_cli(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, "-m", "twotower.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _print_config_in_process(capsys, monkeypatch, *args) -> str:
    """`python -m twotower.cli ARGS --print_config`, run in this process: the subcommand parses the recipe,
    prints the resolved config and exits without building anything. In-process because a fresh interpreter
    per recipe (importing torch, Lightning, transformers) cost about 9 s each, over 5 min for all of them;
    the subprocess path is `test_fit_from_debug_recipe_then_resume`'s."""
    from twotower.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # else LightningCLI sees pytest's own arguments too
    capsys.readouterr()
    try:
        code = main([*args, "--print_config"])
    except SystemExit as e:  # LightningCLI exits after printing
        code = e.code
    out = capsys.readouterr()
    assert code in (0, None), out.out[-3000:] + out.err[-3000:]
    return out.out


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_prints_config(recipe, capsys, monkeypatch):
    if recipe.endswith("serve.yaml"):  # the server's settings, not a LightningCLI recipe
        assert "max_batch" in _print_config_in_process(capsys, monkeypatch, "serve", "--config", f"recipes/{recipe}")
        return
    sub = "predict" if "generate" in recipe else "fit"
    assert "class_path" in _print_config_in_process(capsys, monkeypatch, sub, "--config", f"recipes/{recipe}")


def test_fit_from_debug_recipe_then_resume(backbone_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--config", "recipes/debug_denoiser.yaml", "--model.init_args.backbone", str(backbone_dir),
              "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
              "--trainer.callbacks.init_args.dirpath", str(run / "ckpt")]
    _run_cli("fit", *common)
    last = run / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert not any(k.startswith("context.") for k in ckpt["state_dict"])
    assert ckpt["twotower"]["context_source"] == str(backbone_dir.resolve())
    _run_cli("fit", *common, "--trainer.max_steps", "6", "--ckpt_path", str(last))
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 6
    metrics = (run / "lightning_logs").rglob("metrics.csv")
    assert any("val/masked_acc" in p.read_text() for p in metrics)


def test_bad_recipe_values_raise_clear_errors(backbone_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone checkpoint not found"):
        DenoiserFineTuning(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="loss_weighting"):
        DenoiserFineTuning(str(backbone_dir), loss_weighting="mse")
    with pytest.raises(ValueError, match="mask_token_id"):
        DenoiserFineTuning(str(backbone_dir), mask_token_id=5000)
    module = DenoiserFineTuning(str(backbone_dir), block_size=8)
    with pytest.raises(ValueError, match="multiple of block_size"):
        module.forward_loss(torch.randint(4, 260, (1, 12)))


def test_convert_then_export_round_trip(backbone_dir, code_corpus, tmp_path):
    from twotower.cli import convert, export
    from twotower.model import TwoTowerLM

    conv = convert(str(backbone_dir), str(tmp_path / "tt"), block_size=8, max_shard_size=20_000,
                   expert_layout="per_expert")
    model = TwoTowerLM.from_pretrained(conv)
    ctx = ContextTower.from_pretrained(backbone_dir)
    for k, v in ctx.state_dict().items():
        assert torch.equal(model.context.state_dict()[k], v)
        assert torch.equal(model.denoiser.state_dict()[k], v)  # identity init copies the AR weights
    # A trained denoiser: fine-tune a few steps, checkpoint, export, reload.
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=1e-2, warmup_steps=0)
    trainer = _trainer(tmp_path, 3, limit_val_batches=0)
    from twotower.data import TextDataModule

    trainer.fit(module, TextDataModule(str(code_corpus), seq_len=32, block_size=8, batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = export(str(tmp_path / "run.ckpt"), str(tmp_path / "exported"))
    loaded = TwoTowerLM.from_pretrained(out)
    for k, v in module.denoiser.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[k], v), k
    for k, v in module.context.state_dict().items():
        assert torch.equal(loaded.context.state_dict()[k], v), k
    assert loaded.block_size == 8


def test_shifted_flag_travels_through_convert_and_export(backbone_dir, code_corpus, tmp_path):
    from twotower.cli import _tool_main, export
    from twotower.model import TwoTowerLM

    assert _tool_main(["convert", str(backbone_dir), str(tmp_path / "conv"), "--block-size", "8", "--shifted"]) == 0
    assert TwoTowerLM.from_pretrained(tmp_path / "conv").shifted
    from twotower.data import TextDataModule

    corpus = str(code_corpus)
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=1e-2, warmup_steps=0, shifted=True)
    trainer = _trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(module, TextDataModule(corpus, seq_len=32, block_size=8, batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded = TwoTowerLM.from_pretrained(export(str(tmp_path / "run.ckpt"), str(tmp_path / "exported")))
    assert loaded.shifted and loaded.block_size == 8
    unshifted = DenoiserFineTuning(str(backbone_dir), block_size=8)
    trainer = _trainer(tmp_path, 1, limit_val_batches=0)
    trainer.fit(unshifted, TextDataModule(corpus, seq_len=32, block_size=8, batch_size=4))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert not TwoTowerLM.from_pretrained(export(str(tmp_path / "plain.ckpt"), str(tmp_path / "plain"))).shifted


def test_full_mask_mix_masks_every_maskable_position_of_a_shifted_block(backbone_dir):
    from twotower.schedules import FullMaskMix

    module = DenoiserFineTuning(str(backbone_dir), block_size=8, shifted=True, time_sampler=FullMaskMix(p_full=1.0),
                                loss_weighting="none")
    x = torch.randint(4, 64, (3, 32))
    out = module.forward_loss(x, generator=torch.Generator().manual_seed(0))
    assert int(out["masked"]) == 3 * 4 * 7  # every position but each block's first (the context tower's)
    assert torch.isfinite(out["loss"])


# ---- draft-quality objectives (twotower.objectives) ----------------------------------------------

class _Recording(HardLabelCE):
    """HardLabelCE through the plug-in path, keeping what it was given."""

    needs_teacher = True

    def loss(self, logits, target, teacher=None):
        self.seen = (logits.detach(), target, teacher)
        return super().loss(logits, target, teacher)


def test_ar_distillation_targets_are_the_context_towers_full_forward_at_the_previous_position(backbone_dir):
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, shifted=True, objective=_Recording())
    x = torch.randint(4, 260, (3, 32), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.arange(32)[None] >= torch.tensor([[8], [16], [8]])
    out = module.forward_loss(x, loss_mask=loss_mask, generator=torch.Generator().manual_seed(0))
    logits, target, teacher = module.objective.seen
    # The same draws again give the masked positions; the reference is a separate full causal forward.
    _, _, masked, _ = module._noise(x, torch.Generator().manual_seed(0))
    masked &= loss_mask
    rows, cols = masked.nonzero(as_tuple=True)
    assert bool((cols % 8 != 0).all()) and int(out["masked"]) == rows.numel() > 0
    with torch.no_grad():
        full = module.context(x)  # (B, L, V): logits at p predict the token at p + 1
    torch.testing.assert_close(teacher, full[rows, cols - 1], rtol=1e-5, atol=1e-5)
    assert torch.equal(target, x[rows, cols])
    assert logits.shape == teacher.shape


def test_ar_distillation_loss_values():
    from twotower.objectives import ARDistillation

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    target = torch.randint(0, 11, (5,), generator=g)
    # Zero exactly where the denoiser's distribution is the AR model's (a constant shift of the logits too).
    assert ARDistillation(temperature=1.7).loss(teacher + 2.0, target, teacher).abs().max() < 1e-5
    for T in (1.0, 2.0):
        ref = torch.tensor([sum(float(torch.softmax(teacher[i] / T, -1)[v]) * (float(torch.log_softmax(teacher[i] / T, -1)[v])
                                                                            - float(torch.log_softmax(student[i] / T, -1)[v]))
                                for v in range(11)) * T * T for i in range(5)])
        got = ARDistillation(temperature=T).loss(student, target, teacher)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert bool((got > 0).all())
        ce = torch.nn.functional.cross_entropy(student, target, reduction="none")
        torch.testing.assert_close(ARDistillation(T, hard_weight=0.25).loss(student, target, teacher), 0.75 * ref + 0.25 * ce,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ARDistillation(T, hard_weight=1.0).loss(student, target, teacher), ce)
    with pytest.raises(ValueError, match="needs the AR model's logits"):
        ARDistillation().loss(student, target, None)
    for bad in (dict(temperature=0.0), dict(hard_weight=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ARDistillation(**bad)


def test_position_weights_exact_values():
    from twotower.objectives import GeometricPositions, UniformPositions

    w = GeometricPositions(gamma=0.5).weights(5, shifted=True)
    raw = torch.tensor([1.0, 0.5, 0.25, 0.125])
    torch.testing.assert_close(w, torch.cat([torch.zeros(1), raw * 4 / raw.sum()]))
    w = GeometricPositions(gamma=0.5).weights(4, shifted=False)
    torch.testing.assert_close(w, raw * 4 / raw.sum())
    assert torch.equal(UniformPositions().weights(4, shifted=True), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.equal(GeometricPositions(gamma=1.0).weights(4, shifted=False), torch.ones(4))
    with pytest.raises(ValueError, match="gamma"):
        GeometricPositions(gamma=0.0)


@pytest.mark.parametrize("weighting", ["none", "nelbo"])
def test_uniform_positions_and_hard_labels_leave_the_loss_unchanged_and_geometric_weights_it(backbone_dir, weighting):
    from twotower.objectives import GeometricPositions, UniformPositions

    kw = dict(block_size=8, shifted=True, loss_weighting=weighting)
    x = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(2))

    def run(**more):
        torch.manual_seed(0)  # the same denoiser weights (its time modules are drawn at construction)
        module = DenoiserFineTuning(str(backbone_dir), **kw, **more)
        return module, module.forward_loss(x, generator=torch.Generator().manual_seed(3))

    _, old = run()
    _, same = run(objective=HardLabelCE(), position_weighting=UniformPositions())
    assert torch.equal(old["loss"], same["loss"]) and torch.equal(old["ce_sum"], same["ce_sum"])
    module, geo = run(objective=_Recording(), position_weighting=GeometricPositions(gamma=0.6))
    ce = torch.nn.functional.cross_entropy(*module.objective.seen[:2], reduction="none")
    t, _, masked, t_act = module._noise(x, torch.Generator().manual_seed(3))
    pos = masked.nonzero(as_tuple=True)[1] % 8
    w = torch.tensor([0.6 ** (k - 1) for k in range(1, 8)])
    w = torch.cat([torch.zeros(1), w * 7 / w.sum()])[pos]
    if weighting == "none":
        expected = (w * ce).sum() / masked.sum()
    else:
        expected = (w * ce / t_act.repeat_interleave(8, dim=1)[masked]).sum() / x.numel()
    torch.testing.assert_close(geo["loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(geo["ce_sum"], old["ce_sum"])  # the reported CE stays the unweighted one
    assert not torch.isclose(geo["loss"], old["loss"])


def test_distillation_needs_shifted_and_plug_ins_are_checked(backbone_dir):
    from twotower.objectives import ARDistillation

    with pytest.raises(ValueError, match="shifted: true"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, objective=ARDistillation())
    with pytest.raises(TypeError, match="TokenObjective"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, objective="kl")
    with pytest.raises(TypeError, match="PositionWeighting"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, position_weighting=0.9)


def test_ar_distillation_trains_towards_the_ar_distribution(backbone_dir):
    from twotower.objectives import ARDistillation

    torch.manual_seed(0)
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, shifted=True, objective=ARDistillation(temperature=2.0))
    x = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = _memorise(module, x, 40)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
