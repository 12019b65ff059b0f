"""A training run for tests/test_scale.py, in its own process (Lightning's DDP and FSDP2 launchers
re-run this script once per extra rank).

    python tests/scale_driver.py OUT.pt BACKBONE CORPUS --strategy ddp|fsdp|single --devices N --batch B
        [--steps 3] [--context-sharding replicate|shard] [--ckpt DIR_OR_FILE]

Rank 0 writes OUT.pt: the per-step synced train/loss, the epoch train/nelbo, the full denoiser
weights after training, and each rank's bytes of context / denoiser weights (DTensor local shards).
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch

from twotower.data import TextDataModule
from twotower.distributed import local_bytes
from twotower.training import DenoiserFineTuning


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("backbone")
    p.add_argument("corpus")
    p.add_argument("--strategy", default="single")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--context-sharding", default="replicate")
    p.add_argument("--ckpt", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if a.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=a.devices, tensor_parallel_size=1)
    else:
        strategy = {"single": "auto", "ddp": "ddp"}[a.strategy]
    module = DenoiserFineTuning(a.backbone, block_size=8, lr=2e-3, warmup_steps=0, loss_weighting="none",
                                context_sharding=a.context_sharding)
    data = TextDataModule(a.corpus, seq_len=32, block_size=8, batch_size=a.batch, indexed=True, val_fraction=0.2)
    losses = _Losses()
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=strategy, max_steps=a.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[losses])
    trainer.fit(module, data)
    mem = {"context": local_bytes(module.context), "denoiser": local_bytes(module.denoiser)}
    mems = [None] * trainer.world_size
    if trainer.world_size > 1:
        torch.distributed.all_gather_object(mems, mem)
    else:
        mems = [mem]
    from torch.distributed.tensor import DTensor

    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.denoiser.state_dict().items()}
    if a.ckpt:
        trainer.save_checkpoint(a.ckpt)
    if trainer.is_global_zero:
        torch.save({"losses": losses.losses, "nelbo": float(trainer.callback_metrics["train/nelbo"]),
                    "denoiser": full, "bytes": mems, "world": trainer.world_size}, a.out)
        print(json.dumps({"losses": losses.losses, "bytes": mems}))


if __name__ == "__main__":
    main()
