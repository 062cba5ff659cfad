"""cprec: CpRec compression of NextItNet sequential recommenders in JAX/Flax.

Packages, each importing only those listed before it: ``model`` (NextItNet, CpRec's layers),
``data`` (datasets), ``runtime`` (devices, checkpoints, allocator), ``eval`` (metrics,
full-ranking evaluation, trained runs), ``train`` (the loop), ``sweep`` (sweeps and launchers).
"""
from cprec.model import BlockwiseEmbedding, BlockwiseSoftmax, FullSoftmax, NextItNet

__all__ = ["BlockwiseEmbedding", "BlockwiseSoftmax", "FullSoftmax", "NextItNet"]
