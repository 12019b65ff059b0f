"""Commit policies for block diffusion: which masked positions to commit at each step.

Pick one in a recipe by ``class_path`` (``twotower.samplers.ConfidenceThreshold``) or
pass an instance. Write your own by subclassing :class:`Sampler` and implementing
``select``; the base class guarantees that every block still finishes in time.
"""

from twotower.samplers.base import Sampler, commit_top_n
from twotower.samplers.confidence import ConfidenceThreshold
from twotower.samplers.entropy import EntropyBounded
from twotower.samplers.frontier import FrontierRun
from twotower.samplers.margin import MarginThreshold
from twotower.samplers.mock_ar import MockAR
from twotower.samplers.topk import TopKCommit

__all__ = [
    "Sampler",
    "commit_top_n",
    "ConfidenceThreshold",
    "TopKCommit",
    "MockAR",
    "MarginThreshold",
    "EntropyBounded",
    "FrontierRun",
]
