"""What the denoiser is trained to predict at a masked position, and how much each block position counts.

Two plug-ins of `twotower.training.DenoiserFineTuning`, chosen by ``class_path`` in a recipe:

- a :class:`TokenObjective` turns the denoiser's logits at the masked positions (N, V), their clean
  tokens (N,) and, when it asks for them, the frozen AR model's logits for the same tokens (N, V)
  into one loss per position (N,). :class:`HardLabelCE` (the default) is the cross-entropy against
  the clean token; :class:`ARDistillation` distils the AR model's whole next-token distribution,
  KL(p_AR || p_denoiser), optionally mixed with the hard-label CE.
- a :class:`PositionWeighting` gives each position of a block a weight, normalised to mean 1 over
  the positions training can mask. :class:`UniformPositions` (the default: every weight exactly 1,
  the loss of earlier recipes unchanged) or :class:`GeometricPositions`, gamma^(k - 1) for the k-th
  maskable position: a speculative draft gains only from the prefix the AR model accepts, so an
  early position is worth more than a late one.

The AR model's distribution for the token at p is the context tower's softmax at p - 1 over the clean
prefix; with ``shifted=True`` that is also where the denoiser reads the token at p from
(docs/design.md, section 3).
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check_float, check_positive

__all__ = ["TokenObjective", "HardLabelCE", "ARDistillation", "PositionWeighting", "UniformPositions",
           "GeometricPositions"]


class TokenObjective(abc.ABC):
    """Per-position training loss of the denoiser at its masked positions."""

    #: whether `loss` needs the AR model's logits (the training step only computes them if so)
    needs_teacher: bool = False

    @abc.abstractmethod
    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None) -> Tensor:
        """logits (N, V) float32, target (N,) clean token ids, teacher (N, V) the AR model's logits for
        the same tokens (None unless `needs_teacher`) -> (N,) loss per position."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HardLabelCE(TokenObjective):
    """Cross-entropy against the clean token (the objective of every recipe before stage 4)."""

    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, target, reduction="none")


class ARDistillation(TokenObjective):
    """Distil the AR model's next-token distribution: ``(1 - hard_weight) * T^2 * KL(p_AR^T || p_den^T)
    + hard_weight * CE(p_den, clean token)``, where ``p^T = softmax(logits / T)``.

    The KL term is zero exactly where the denoiser's tempered distribution equals the AR model's; the
    T^2 factor keeps its gradient scale independent of T (Hinton et al., 2015, "Distilling the
    knowledge in a neural network"). On self-distilled rows (`twotower.data.DistilledDataModule`) the
    clean token is the AR model's argmax, so both terms agree on the mode; the KL term adds how sure
    the AR model is, which moves the denoiser's errors to where the AR model itself hesitates.

    Args:
        temperature: T > 0, applied to both distributions.
        hard_weight: weight of the hard-label CE in [0, 1]; 0 is pure distillation.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 1.0, hard_weight: float = 0.0) -> None:
        self.temperature = check_positive("temperature", temperature)
        self.hard_weight = check_float("hard_weight", hard_weight, low=0.0, high=1.0)

    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None) -> Tensor:
        if teacher is None or teacher.shape != logits.shape:
            raise ValueError(f"ARDistillation needs the AR model's logits of the same shape as the denoiser's "
                             f"{tuple(logits.shape)}, got {None if teacher is None else tuple(teacher.shape)}")
        T = self.temperature
        # The teacher may come in the backbone's dtype (bf16): its log-probabilities are taken in float32,
        # as the student's are, so the KL of two near-equal distributions does not drown in rounding.
        log_p = F.log_softmax(teacher.float() / T, dim=-1)
        log_q = F.log_softmax(logits / T, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1) * (T * T)
        if self.hard_weight == 0:  # skips a second (N, V) softmax when there is nothing to mix in
            return kl
        return (1 - self.hard_weight) * kl + self.hard_weight * F.cross_entropy(logits, target, reduction="none")

    def __repr__(self) -> str:
        return f"ARDistillation(temperature={self.temperature}, hard_weight={self.hard_weight})"


class PositionWeighting(abc.ABC):
    """Loss weight of each position of a block, normalised to mean 1 over the maskable positions."""

    @abc.abstractmethod
    def raw(self, n: int) -> Tensor:
        """(n,) positive weights of the maskable positions 1 .. n, in order (unnormalised)."""

    def weights(self, block_size: int, *, shifted: bool) -> Tensor:
        """(block_size,) float32 weights; with `shifted` position 0 (never masked) gets 0 and the weights
        of positions 1 .. S-1 average 1, otherwise positions 0 .. S-1 do."""
        n = block_size - 1 if shifted else block_size
        w = self.raw(n).to(torch.float32)
        if w.shape != (n,) or not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"{self!r} gave weights {w.tolist()} for {n} positions; they must be {n} finite values > 0")
        w = w * (n / w.sum())  # mean 1: the loss scale, and so the learning rate, does not depend on it
        return torch.cat([w.new_zeros(1), w]) if shifted else w

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformPositions(PositionWeighting):
    """Every position weighs exactly 1: the loss is the unweighted one."""

    def raw(self, n: int) -> Tensor:
        return torch.ones(n)


class GeometricPositions(PositionWeighting):
    """gamma^(k - 1) for the k-th maskable position (k = 1 .. n), normalised to mean 1.

    With a per-position acceptance rate a, position k of a speculative draft counts only if the k - 1
    before it were accepted (probability about a^(k-1)): gamma near a weights each position by how
    often it matters. gamma = 1 is uniform.
    """

    def __init__(self, gamma: float = 0.9) -> None:
        self.gamma = check_float("gamma", gamma, low=0.0, high=1.0, low_open=True)

    def raw(self, n: int) -> Tensor:
        return torch.tensor(self.gamma, dtype=torch.float64) ** torch.arange(n, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"GeometricPositions(gamma={self.gamma})"
