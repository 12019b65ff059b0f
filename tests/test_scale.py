"""Scale: data-parallel equivalence (DDP), FSDP2 on CPU (both context options) and export of its sharded
checkpoint, precision / activation checkpointing / accumulation, the NemotronH recipe on a tiny
checkpoint, and distillation on demand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from twotower.data import DistilledDataModule, TextDataModule
from twotower.training import DenoiserFineTuning

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _drive(tmp_path, name, backbone, corpus, *flags):
    out = tmp_path / f"{name}.pt"
    _run(str(ROOT / "tests" / "scale_driver.py"), str(out), str(backbone), str(corpus), *flags)
    return torch.load(out, weights_only=False)


def test_ddp_two_processes_equal_one_process(backbone_dir, code_corpus, tmp_path):
    one = _drive(tmp_path, "one", backbone_dir, code_corpus, "--batch", "4")
    two = _drive(tmp_path, "two", backbone_dir, code_corpus, "--strategy", "ddp", "--devices", "2", "--batch", "2")
    assert two["world"] == 2 and len(one["losses"]) == len(two["losses"]) == 3
    assert one["losses"] == pytest.approx(two["losses"], abs=1e-5)
    assert one["nelbo"] == pytest.approx(two["nelbo"], abs=1e-5)
    for k, v in one["denoiser"].items():
        # gloo sums the two halves' gradients in another order than one process does, the frozen
        # context tower's grouped MoE GEMM (past layers.DENSE_MAX_TOKENS tokens) rounds by how the
        # batch's tokens fall into expert groups, and Adam's first steps (update ~ lr g / |g|) amplify
        # that rounding for gradients near its eps, in proportion to lr. At the recipes' lr (2e-3) the
        # largest difference measured was 1.01e-5 (5.3e-6 with the experts run dense); a wrong
        # gradient average would move weights by the order of a step, lr = 2e-3, 70x this bound.
        torch.testing.assert_close(two["denoiser"][k], v, atol=3e-5, rtol=0, msg=k)
    assert any(not torch.equal(v, DenoiserFineTuning(str(backbone_dir), block_size=8).denoiser.state_dict()[k])
               for k, v in one["denoiser"].items())  # the 3 steps did train


@pytest.mark.parametrize("context_sharding", ["replicate", "shard"])
def test_fsdp2_on_cpu_then_export_the_sharded_checkpoint(backbone_dir, code_corpus, tmp_path, context_sharding):
    from twotower.model import TwoTowerLM

    ckpt = tmp_path / "sharded"
    run = _drive(tmp_path, "fsdp", backbone_dir, code_corpus, "--strategy", "fsdp", "--devices", "2", "--batch", "2",
                 "--context-sharding", context_sharding, "--ckpt", str(ckpt))
    full = DenoiserFineTuning(str(backbone_dir), block_size=8)
    ctx_bytes = sum(t.numel() * t.element_size() for t in list(full.context.parameters()) + list(full.context.buffers()))
    den_bytes = sum(t.numel() * t.element_size() for t in list(full.denoiser.parameters()) + list(full.denoiser.buffers()))
    for rank in run["bytes"]:  # the denoiser is split in two; the context per the option
        assert rank["denoiser"] < 0.55 * den_bytes
        assert (rank["context"] == ctx_bytes) == (context_sharding == "replicate")
        assert rank["context"] <= ctx_bytes
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    out = tmp_path / "exported"
    _run("-m", "twotower.cli", "export", str(ckpt), str(out))
    loaded = TwoTowerLM.from_pretrained(out)
    for k, v in run["denoiser"].items():
        assert torch.equal(loaded.denoiser.state_dict()[k], v), k


def _fit(tmp_path, module, data, steps=2, **kw):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0, **kw)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("option", [{"precision": "bf16-mixed"}, {"precision": "bf16-true"},
                                    {"accumulate_grad_batches": 2}, "activation_checkpointing"])
def test_training_options_run_two_steps(backbone_dir, code_corpus, tmp_path, option):
    ac = option == "activation_checkpointing"
    trainer_kw = {} if ac else option
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=1e-2, warmup_steps=0, activation_checkpointing=ac)
    before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    data = TextDataModule(str(code_corpus), seq_len=32, block_size=8, batch_size=4, indexed=True)
    trainer = _fit(tmp_path, module, data, **trainer_kw)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(v.float(), before[k].float()) for k, v in module.denoiser.state_dict().items())


def test_activation_checkpointing_keeps_the_gradients(backbone_dir):
    """Recomputing each block's activations in backward gives the plain run's gradients. Both runs
    start from the same weights: the time embedder is freshly initialised, so the seed is fixed."""
    x = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(123)
        m = DenoiserFineTuning(str(backbone_dir), block_size=8, activation_checkpointing=checkpointing)
        m.configure_model()
        m.forward_loss(x, sample_seeds=[1, 2])["loss"].backward()
        grads.append({k: p.grad for k, p in m.denoiser.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k, g in grads[1].items():
        torch.testing.assert_close(grads[0][k], g, atol=1e-6, rtol=1e-5, msg=k)


def _save_byte_hf_tokenizer(directory: Path) -> Path:
    """A transformers tokenizer with the byte tokenizer's layout: ids 0-3 specials, 4 + byte after."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "[MASK]"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(specials)} | {c: 4 + i for i, c in enumerate(sorted(alphabet))}
    raw = RawTokenizer(models.BPE(vocab, [], unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            mask_token="[MASK]").save_pretrained(str(directory))
    return directory


def test_nemotron_h_recipe_runs_on_a_tiny_checkpoint(backbone_dir, code_corpus, tmp_path):
    _save_byte_hf_tokenizer(backbone_dir)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join('{"text": %r}\n'.replace("%r", '"' + p.read_text().replace("\n", "\\n") + '"')
                             for p in sorted(code_corpus.iterdir())))
    run = tmp_path / "run"
    _run("-m", "twotower.cli", "fit", "--config", "recipes/nemotron_h_denoiser.yaml",
         "--model.init_args.backbone", str(backbone_dir), "--data.init_args.tokenizer.init_args.path", str(backbone_dir),
         "--data.init_args.source", str(jsonl), "--data.init_args.seq_len", "32", "--data.init_args.val_fraction", "0.3",
         "--data.init_args.cache_dir", str(tmp_path / "cache"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
         "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
         "--trainer.val_check_interval", "2",
         "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
         "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"))
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["activation_checkpointing"]


def test_distillation_on_demand_distils_only_what_the_steps_consume(backbone_dir, code_corpus, tmp_path):
    kw = dict(source=str(code_corpus), seq_len=32, block_size=8, batch_size=4, num_train=64, num_val=16,
              min_prompt=8, max_prompt=16, val_fraction=0.2, shard_rows=8, cache_dir=str(tmp_path / "cache"))

    def fast_dev_run():
        dm = DistilledDataModule(str(backbone_dir), **kw)
        module = DenoiserFineTuning(str(backbone_dir), block_size=8, warmup_steps=0)
        L.Trainer(accelerator="cpu", devices=1, fast_dev_run=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(module, dm)
        return dm

    first = fast_dev_run()  # 2 steps of 4 rows: one shard of 8 train rows; 2 val batches: one val shard
    assert (first.train_set.distilled_rows, first.val_set.distilled_rows) == (8, 8)
    assert len(list((tmp_path / "cache").glob("distilled-*/*.pt"))) == 2
    again = fast_dev_run()  # the same shards, from the cache
    assert (again.train_set.distilled_rows, again.val_set.distilled_rows) == (0, 0)
    assert torch.equal(again.train_set.shard(0), first.train_set.shard(0))


def test_a_finished_one_file_cache_from_before_is_still_used(backbone_dir, code_corpus, tmp_path):
    from twotower.data.cache import save_cache

    kw = dict(source=str(code_corpus), seq_len=32, block_size=8, batch_size=4, num_train=8, num_val=4,
              min_prompt=8, max_prompt=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm = DistilledDataModule(str(backbone_dir), **kw)
    dm.setup()
    rows = {"train": dm.train_set.rows, "train_prompt": dm.train_set.prompt_len,
            "val": dm.val_set.rows, "val_prompt": dm.val_set.prompt_len}
    old = dm._cache_path(str(dm.text._cache_path()))  # the earlier format: one file, same key
    save_cache(old, rows)
    for f in (tmp_path / "cache").glob("distilled-*/*.pt"):
        f.unlink()
    again = DistilledDataModule(str(backbone_dir), **kw)
    again.setup()
    assert torch.equal(again.train_set.rows, rows["train"]) and again.train_set.distilled_rows == 0
