"""Masked-diffusion noise schedules, loss weights and training-time noise sampling.

A recipe picks a schedule and a time sampler by ``class_path``
(``twotower.schedules.LinearSchedule``, ``twotower.schedules.StratifiedTime``);
:func:`mask_blocks` applies them to a batch of clean blocks.
"""

from twotower.schedules.base import NoiseSchedule
from twotower.schedules.cosine import CosineSchedule
from twotower.schedules.linear import LinearSchedule
from twotower.schedules.loglinear import LogLinearSchedule
from twotower.schedules.sampling import (
    AntitheticTime,
    FullMaskMix,
    StratifiedTime,
    TimeSampler,
    UniformTime,
    mask_blocks,
)

__all__ = [
    "NoiseSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "LogLinearSchedule",
    "TimeSampler",
    "UniformTime",
    "StratifiedTime",
    "AntitheticTime",
    "FullMaskMix",
    "mask_blocks",
]
