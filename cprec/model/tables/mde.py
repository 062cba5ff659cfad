"""Mixed-dimension embeddings (Ginart et al., arXiv 1909.11810; DLRM's ``--md-flag``) as a block-wise table.

Items are split into ``model.mde_blocks`` blocks of frequency-ordered ids, log-spaced (block j
holds ids ``[V^(j/k), V^((j+1)/k))``, so each block spans the same factor of popularity ranks on a
power law), and block j gets ``d_j = dim * (f_j / f_0) ** alpha`` dimensions (f = the mean
training count of the block's items: Ginart's popularity power rule, the most popular block at
the full ``dim``), projected to ``dim``. With a ``model.budget`` alpha is the smallest that fits
(``cprec.model.budget``, the same rule and rounding as CpRec's solver, on these fixed blocks).

The table is ``BlockwiseEmbedding`` (``cprec.model.tables.blockwise``) with these blocks; the
method differs from CpRec in its fixed blocks and in its output layer: the full or sampled
softmax over the tied table (``logits = h' E^T``), no tree softmax.
"""
from __future__ import annotations

from cprec.errors import ConfigError


def mde_cutoffs(num_items: int, blocks: int) -> tuple[int, ...]:
    """Log-spaced block boundaries ending with V: ``round(V ** (j / blocks))``, j = 1..blocks, made distinct."""
    if blocks < 2:
        raise ConfigError(f"model.mde_blocks={blocks} is invalid: mixed dimensions need at least 2 blocks")
    cuts: list[int] = []
    for j in range(1, blocks + 1):
        c = max(int(round(num_items ** (j / blocks))), cuts[-1] + 1 if cuts else 2)
        if c >= num_items:
            break
        cuts.append(c)
    if not cuts:
        raise ConfigError(f"model.mde_blocks: V={num_items} ids are too few for two blocks")
    return tuple(cuts) + (num_items,)
