"""Layer-wise parameter sharing schemes of CpRec for the residual conv stack.

The stack stores a stacked kernel tensor [n_unique, k, C, C]; conv layer l uses
kernel `index[l]`. Layers are ordered block 0 conv 1, block 0 conv 2, block 1
conv 1, ... Gradients from every use of a shared kernel add up automatically.
"""
from __future__ import annotations

from cprec.errors import ConfigError

SHARING_SCHEMES = ("none", "cross_layer", "cross_block", "adjacent_layer", "adjacent_block")


def conv_sharing_index(scheme: str, num_blocks: int) -> tuple[int, tuple[int, ...]]:
    """Returns (number of unique conv kernels, layer -> unique kernel index).

    none: every conv its own kernel; cross_layer: one kernel for all convs;
    cross_block: all first convs share one kernel, all second convs another;
    adjacent_layer: the two convs of a block share; adjacent_block: blocks
    (0, 1), (2, 3), ... share both convs (needs an even number of blocks).
    """
    if scheme not in SHARING_SCHEMES:
        raise ConfigError(f"model.sharing={scheme!r} is unknown; valid choices: {', '.join(SHARING_SCHEMES)}")
    if num_blocks < 1:
        raise ConfigError(f"the residual stack has {num_blocks} blocks; it needs at least 1")
    layers = [(b, c) for b in range(num_blocks) for c in range(2)]
    if scheme == "none":
        index = [2 * b + c for b, c in layers]
    elif scheme == "cross_layer":
        index = [0 for _ in layers]
    elif scheme == "cross_block":
        index = [c for _, c in layers]
    elif scheme == "adjacent_layer":
        index = [b for b, _ in layers]
    else:
        if num_blocks % 2:
            raise ConfigError(
                f"model.sharing='adjacent_block' needs an even number of residual blocks, got {num_blocks} "
                "(len(model.dilations) * model.num_blocks); change model.num_blocks or model.sharing"
            )
        index = [(b // 2) * 2 + c for b, c in layers]
    return max(index) + 1, tuple(index)
