"""Family dispatch of the two-branch (tree) verify: `tree_extend` and `accept_tree` for any context tower.

The family code lives beside each family (`towers/nemotron_h/branch.py`, `towers/llama/branch.py`,
the layout and mask in `towers/branching.py`); this module picks it by the tower's class, so a
decoder needs nothing family-specific. A family without a tree forward is refused by name.
"""

from __future__ import annotations

from torch import Tensor

from ..towers.branching import TreeLayout, tree_layout
from ..towers.llama import branch as llama_branch
from ..towers.llama.context import LlamaContextTower
from ..towers.nemotron_h import branch as nemotron_branch
from ..towers.nemotron_h.context import ContextTower as NemotronContextTower

__all__ = ["TreeLayout", "tree_layout", "tree_extend", "accept_tree", "supports_tree"]

# Checked in order; Qwen2 / Mistral towers subclass the Llama one and share its tree forward.
_FAMILIES = ((NemotronContextTower, nemotron_branch), (LlamaContextTower, llama_branch))


def _family(context):
    for cls, module in _FAMILIES:
        if isinstance(context, cls):
            return module
    raise NotImplementedError(f"{type(context).__qualname__} has no two-branch (tree) verify; the families with one "
                              f"are {', '.join(c.__qualname__ for c, _ in _FAMILIES)}: use Speculative instead")


def supports_tree(context) -> bool:
    """Whether `context`'s family has a tree verify."""
    # The same dispatch the forward uses, so `check_call`'s refusal can never disagree with `tree_extend`.
    try:
        _family(context)
    except NotImplementedError:
        return False
    return True


def tree_extend(context, cache, main: Tensor, branch: Tensor, layout: TreeLayout) -> Tensor:
    """Verify main (R, n) and branch (R, m) in one provisional forward; logits (R, n + m, V) float32,
    slot order main then branch (every branch's slots in turn, `towers/branching.py`). `accept_tree`
    settles the cache."""
    # The family forwards trust layout.n and layout.m (cache slots, the mask, the Mamba tree scan): refuse a mismatch
    # here, before any of them touches the cache.
    rows = layout.forks.shape[0]
    if main.shape != (rows, layout.n) or branch.shape != (rows, layout.m):
        raise ValueError(f"main {tuple(main.shape)} / branch {tuple(branch.shape)} do not fit the layout "
                         f"(rows {rows}, n {layout.n}, m {layout.m})")
    hidden = _family(context).tree_forward(context, cache, main, branch, layout)
    # Every slot: the main ones feed Speculative's keep rule, the branch ones the branch's agreement check.
    return context.logits(hidden, "all")


def accept_tree(context, cache, layout: TreeLayout, keep: Tensor, take: Tensor) -> None:
    """Row r keeps its first keep[r] positions of the branch it takes (take (R,): bool, the one branch
    of a one-branch tree, or long, 0 the main block and b + 1 branch b) or of the main block."""
    # Must directly follow `tree_extend`: the cache holds n + m provisional slots and refuses other use until then.
    _family(context).accept_tree(context, cache, layout, keep, take)
