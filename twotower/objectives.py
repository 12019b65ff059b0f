"""What the denoiser is trained to predict at a masked position, and how much each block position counts.

Two plug-ins of `twotower.training.DenoiserFineTuning`, chosen by ``class_path`` in a recipe:

- a :class:`TokenObjective` turns the denoiser's logits at the masked positions (N, V), their clean
  tokens (N,) and, when it asks for them, the frozen AR model's logits for the same tokens (N, V)
  into one loss per position (N,). :class:`HardLabelCE` (the default) is the cross-entropy against
  the clean token; :class:`ARDistillation` distils the AR model's whole next-token distribution,
  KL(p_AR || p_denoiser), optionally mixed with the hard-label CE. Objectives that score a block as a
  speculative draft (issue 23) also ask for the block each position belongs to (`needs_blocks`):
  :class:`FirstErrorFocal` up-weights the first drafted token that breaks the accepted prefix,
  :class:`ExpectedAcceptedLength` maximises the expected accepted length sum_k prod_{i<=k} p_i of a
  one-forward draft, :class:`AcceptanceLK` maximises the acceptance probability
  sum_v min(p_denoiser(v), p_AR(v)) against the AR model's distribution (an LK loss), and
  :class:`ObjectiveSum` adds weighted objectives together.
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

__all__ = ["TokenObjective", "HardLabelCE", "ARDistillation", "FirstErrorFocal", "ExpectedAcceptedLength",
           "AcceptanceLK", "ObjectiveSum", "PositionWeighting", "UniformPositions", "GeometricPositions",
           "block_ranks", "prefix_products"]


class TokenObjective(abc.ABC):
    """Per-position training loss of the denoiser at its masked positions."""

    #: whether `loss` needs the AR model's logits (the training step only computes them if so)
    needs_teacher: bool = False
    #: whether `loss` needs each position's block (it is then called with ``blocks=``)
    needs_blocks: bool = False

    @abc.abstractmethod
    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None) -> Tensor:
        """logits (N, V) float32, target (N,) clean token ids, teacher (N, V) the AR model's logits for
        the same tokens (None unless `needs_teacher`) -> (N,) loss per position.

        With `needs_blocks` the call also passes ``blocks=`` (N,) long: the id of the block each position
        lies in, non-decreasing, the positions of one block contiguous and in their order in the block
        (row-major order of the masked positions, which the training step gives)."""

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


# ---- objectives that score a block as a speculative draft (issue 23) ------------------------------

def block_ranks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(segment, rank) for positions grouped by `blocks` (N,), non-decreasing: segment (N,) numbers the
    blocks 0, 1, ... in order and rank (N,) is a position's index among its block's positions."""
    if blocks.ndim != 1 or (blocks.numel() > 1 and bool((blocks[1:] < blocks[:-1]).any())):
        raise ValueError(f"blocks must be a non-decreasing (N,) tensor of block ids (a block's positions "
                         f"contiguous, in order), got shape {tuple(blocks.shape)}")
    starts = torch.ones_like(blocks, dtype=torch.bool)
    starts[1:] = blocks[1:] != blocks[:-1]
    segment = starts.long().cumsum(0) - 1
    first = starts.nonzero().squeeze(1)  # index of each block's first position
    rank = torch.arange(blocks.numel(), device=blocks.device) - first[segment]
    return segment, rank


def _dense(values: Tensor, segment: Tensor, rank: Tensor, fill: float) -> Tensor:
    """(blocks, longest) layout of per-position values, `fill` where a block has no position."""
    n_seg = int(segment[-1]) + 1 if segment.numel() else 0
    width = int(rank.max()) + 1 if rank.numel() else 0
    out = values.new_full((n_seg, width), fill)
    out[segment, rank] = values
    return out


def prefix_products(log_p: Tensor, blocks: Tensor) -> Tensor:
    """(N,) prod_{i <= k} p_i within each block, from log p (N,): the probability that a draft keeps
    every position of its block up to and including k.

    The running sum runs in a (blocks, positions) layout, block by block, not over all N positions
    at once: a cumulative sum across a whole batch would lose the small late terms in float32."""
    segment, rank = block_ranks(blocks)
    dense = _dense(log_p, segment, rank, 0.0).cumsum(1)
    return dense[segment, rank].exp()


def _first_errors(wrong: Tensor, blocks: Tensor) -> Tensor:
    """(N,) bool: the first position of each block where `wrong` (N,) bool holds."""
    segment, rank = block_ranks(blocks)
    dense = _dense(wrong.long(), segment, rank, 0).cumsum(1)
    return wrong & (dense[segment, rank] == 1)


def _check_blocks(name: str, blocks: Tensor | None, logits: Tensor) -> Tensor:
    if blocks is None or blocks.shape != logits.shape[:1]:
        raise ValueError(f"{name} needs blocks= (N,) block ids for the {logits.shape[0]} positions, got "
                         f"{None if blocks is None else tuple(blocks.shape)} (the training step passes them "
                         f"when the objective sets needs_blocks = True)")
    return blocks


class FirstErrorFocal(TokenObjective):
    """Cross-entropy with extra weight on the first position of each block the denoiser gets wrong:
    ``CE_k * (1 + focal_weight * [k is the first masked position of its block whose argmax != target])``.

    A one-forward speculative draft keeps the positions before its first wrong token; that token alone
    decides where the accepted prefix breaks, and the next iteration starts right after it. Later
    errors of the same block cost nothing at inference, so the focal term points the gradient at the
    one that does. Positions already right keep plain CE (so the model does not drift off them).

    Args:
        focal_weight: >= 0, the extra weight of each block's first error; 0 is plain CE.
    """

    needs_blocks = True

    def __init__(self, focal_weight: float = 2.0) -> None:
        self.focal_weight = check_float("focal_weight", focal_weight, low=0.0)

    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None, *,
             blocks: Tensor | None = None) -> Tensor:
        blocks = _check_blocks("FirstErrorFocal", blocks, logits)
        ce = F.cross_entropy(logits, target, reduction="none")
        with torch.no_grad():  # which position is the first error is a choice, not a function to differentiate
            first = _first_errors(logits.argmax(-1) != target, blocks)
        return ce * (1 + self.focal_weight * first.to(ce.dtype))

    def __repr__(self) -> str:
        return f"FirstErrorFocal(focal_weight={self.focal_weight})"


class ExpectedAcceptedLength(TokenObjective):
    """Maximise the expected accepted length of a one-forward draft: position k's loss is
    ``1 - prod_{i <= k} p_i``, with p_i the denoiser's probability of the clean token at the i-th masked
    position of the block, plus ``ce_weight * CE_k``.

    Summed over a block, the first term is (masked positions) - sum_k prod_{i <= k} p_i: if each drafted
    token were drawn from the denoiser's softmax and kept while it matched the target, the sum of
    prefix products is the expected number kept. Its gradient on position i's log-probability is
    sum_{k >= i} prod_{j <= k} p_j, the expected tokens still to gain from i on: early positions, and
    positions behind a likely prefix, count most; positions behind an unlikely prefix barely count.
    Positions a partly masked block shows clean are given (they are not part of the product).

    The CE term keeps a gradient where the products are near 0 (a block whose first positions the
    denoiser gets badly wrong: the chain alone would leave them).

    Args:
        ce_weight: >= 0, weight of the hard-label CE added to the chain term.
    """

    needs_blocks = True

    def __init__(self, ce_weight: float = 1.0) -> None:
        self.ce_weight = check_float("ce_weight", ce_weight, low=0.0)

    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None, *,
             blocks: Tensor | None = None) -> Tensor:
        blocks = _check_blocks("ExpectedAcceptedLength", blocks, logits)
        ce = F.cross_entropy(logits, target, reduction="none")  # = -log p_k(target_k)
        chain = 1 - prefix_products(-ce, blocks)
        return chain if self.ce_weight == 0 else chain + self.ce_weight * ce

    def __repr__(self) -> str:
        return f"ExpectedAcceptedLength(ce_weight={self.ce_weight})"


class AcceptanceLK(TokenObjective):
    """An LK loss (arXiv 2602.23881: train the drafter on acceptance, not on KL): ``(1 - hard_weight) *
    (1 - alpha) + hard_weight * CE``, with alpha the probability that the verifier accepts a draft token.

    - ``greedy=False``: alpha = sum_v min(p_den(v), p_AR(v)) = 1 - TV(p_den, p_AR), the acceptance rate
      of a token drawn from the denoiser under speculative sampling against the AR model's softmax.
    - ``greedy=True``: alpha = p_den(argmax p_AR), the probability that a token drawn from the denoiser
      is the AR model's greedy choice, which is what greedy verification keeps.

    Unlike KL, 1 - alpha only cares about mass the two distributions share: the denoiser gains nothing by
    copying the AR model's tail, only by putting its mass where the AR model's is.

    Args:
        hard_weight: weight of the hard-label CE in [0, 1] (1 - alpha alone gives no gradient where the
            denoiser puts all its mass elsewhere, i.e. tiny p_den on the AR model's tokens).
        greedy: score against the AR model's argmax instead of its whole softmax.
    """

    needs_teacher = True

    def __init__(self, hard_weight: float = 0.5, greedy: bool = False) -> None:
        self.hard_weight = check_float("hard_weight", hard_weight, low=0.0, high=1.0)
        self.greedy = bool(greedy)

    def acceptance(self, logits: Tensor, teacher: Tensor) -> Tensor:
        """(N,) alpha, the probability that the AR model accepts a token drawn from the denoiser."""
        p = F.softmax(logits, dim=-1)
        if self.greedy:
            return p.gather(1, teacher.argmax(-1, keepdim=True)).squeeze(1)
        # float32 softmax of the teacher, as ARDistillation: near-equal distributions share almost all mass
        return torch.minimum(p, F.softmax(teacher.float(), dim=-1)).sum(-1)

    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None) -> Tensor:
        if teacher is None or teacher.shape != logits.shape:
            raise ValueError(f"AcceptanceLK needs the AR model's logits of the same shape as the denoiser's "
                             f"{tuple(logits.shape)}, got {None if teacher is None else tuple(teacher.shape)}")
        lk = 1 - self.acceptance(logits, teacher)
        if self.hard_weight == 0:
            return lk
        return (1 - self.hard_weight) * lk + self.hard_weight * F.cross_entropy(logits, target, reduction="none")

    def __repr__(self) -> str:
        return f"AcceptanceLK(hard_weight={self.hard_weight}, greedy={self.greedy})"


class ObjectiveSum(TokenObjective):
    """sum_j weights[j] * terms[j].loss(...): several objectives at once, e.g. `FirstErrorFocal` plus
    `ExpectedAcceptedLength(ce_weight=0)`. Asks for the AR logits / blocks when any term does.

    Args:
        terms: the objectives (`TokenObjective`s, by class_path in a recipe).
        weights: one weight >= 0 per term (None: all 1).
    """

    def __init__(self, terms: list[TokenObjective], weights: list[float] | None = None) -> None:
        if not terms or not all(isinstance(t, TokenObjective) for t in terms):
            raise TypeError(f"ObjectiveSum needs a non-empty list of TokenObjectives, got {terms!r}")
        weights = [1.0] * len(terms) if weights is None else list(weights)
        if len(weights) != len(terms):
            raise ValueError(f"ObjectiveSum has {len(terms)} terms but {len(weights)} weights {weights}; give one each")
        self.terms = list(terms)
        self.weights = [check_float(f"weights[{i}]", w, low=0.0) for i, w in enumerate(weights)]
        self.needs_teacher = any(t.needs_teacher for t in terms)
        self.needs_blocks = any(t.needs_blocks for t in terms)

    def loss(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None, *,
             blocks: Tensor | None = None) -> Tensor:
        total = 0
        for w, term in zip(self.weights, self.terms):
            if w == 0:
                continue
            kw = {"blocks": blocks} if term.needs_blocks else {}
            total = total + w * term.loss(logits, target, teacher if term.needs_teacher else None, **kw)
        return total if isinstance(total, Tensor) else logits.new_zeros(logits.shape[0])

    def __repr__(self) -> str:
        return f"ObjectiveSum(terms={self.terms!r}, weights={self.weights})"


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
