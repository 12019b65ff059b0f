"""Training loaders whose place in the data survives a checkpoint.

Lightning saves a train loader's `state_dict()` with the fit loop's state in every checkpoint and,
when a fit resumes from one (`--ckpt_path`), hands it back through `load_state_dict()` before the
first batch (a loader without the two methods restarts its epoch from the beginning, with a
warning that it is not resumable). `ResumableLoader` records how far the current epoch of its
`EpochShuffle` order has got and, restored, starts there: a killed and resumed run trains on the
batches of one uninterrupted run. With `indexed` rows (each sample's noise seeded by its index, see
`DenoiserFineTuning`) the losses are then the same too.

Lightning 2.6 drops the saved loader state when `trainer.estimated_stepping_batches` builds the
loader before the checkpoint is restored, which it does only for runs bounded by `max_epochs`
(Lightning issue 20550); runs bounded by `max_steps`, every recipe here, are not affected.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from twotower.distributed import EpochShuffle


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochShuffle` order with Lightning's `state_dict` / `load_state_dict`.

    The state is the epoch and the position in its order reached by the batches handed out (all
    ranks together; Lightning saves rank 0's, and every rank has handed out as many). Keyword
    arguments beyond `sampler` are DataLoader's.
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochShuffle, **kwargs) -> None:
        if not isinstance(sampler, EpochShuffle):
            raise TypeError(f"ResumableLoader needs a twotower.distributed.EpochShuffle sampler, got "
                            f"{type(sampler).__name__}")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch, self._position = 0, 0

    def __iter__(self):
        return self._counted(super().__iter__())

    def _counted(self, batches):
        # Read at the first batch, not when the iterator is made: Lightning makes it before set_epoch.
        self._epoch, self._position = self.sampler.epoch, self.sampler.start()
        step = self.sampler.samples_per_batch(self.batch_size)
        for batch in batches:
            # Counted as each batch reaches the caller: DataLoader workers' read-ahead is not counted.
            self._position += step
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.start_at(int(state["epoch"]), int(state["position"]))
