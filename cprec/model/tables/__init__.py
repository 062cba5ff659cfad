"""Item tables: every representation of the V item vectors, behind one interface (``base.ItemTable``).

``model.embedding`` picks one: ``full`` (uncompressed), ``blockwise`` (CpRec), ``mde``
(mixed-dimension, Ginart et al.), ``lowrank`` (ALBERT), ``hash`` (the hashing trick), ``qr``
(quotient-remainder, Shi et al.), ``tt`` (tensor-train, TT-Rec), ``jpq`` (RecJPQ's sub-item codes), ``prune`` (the full table, magnitude-pruned). Tied (``model.tie_embeddings``), the same table is the output
layer of the full or sampled softmax; CpRec's tree softmax ties to ``blockwise`` only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from cprec.model.tables.base import ItemTable
from cprec.model.tables.blockwise import BlockwiseEmbedding, blockwise_param_count
from cprec.model.tables.full import FullTable, full_param_count
from cprec.model.tables.jpq import JPQ_ASSIGN, JPQTable, jpq_fit, jpq_param_count
from cprec.model.tables.hashing import HashTable, hash_fit, hash_param_count
from cprec.model.tables.lowrank import LowRankTable, lowrank_fit, lowrank_param_count
from cprec.model.tables.mde import mde_cutoffs
from cprec.model.tables.pruned import PrunedTable, prune_fit, prune_param_count
from cprec.model.tables.qr import QR_OPS, QRTable, qr_fit, qr_param_count
from cprec.model.tables.tt import TTTable, tt_fit, tt_param_count


class Sized(NamedTuple):
    """A table sized by its own options (``model.rank``, ``model.hash_rows``, ``model.qr_buckets``)."""

    module: type
    keys: tuple[str, ...]  # its option keys (config.model.<key>), the size first
    param_count: Callable[[int, int, dict], int]  # (V, dim, options) -> parameters
    fit: Callable[[int, int, int, dict], dict | None]  # (budget, V, dim, options) -> the largest options that fit
    smallest: Callable[[int], int]  # V -> the size option of the smallest table


SIZED = {
    "lowrank": Sized(LowRankTable, ("rank",), lowrank_param_count, lowrank_fit, lambda v: 1),
    "hash": Sized(HashTable, ("hash_rows",), hash_param_count, hash_fit, lambda v: 1),
    "qr": Sized(QRTable, ("qr_buckets", "qr_op"), qr_param_count, qr_fit, lambda v: math.isqrt(v - 1) + 1),
    "tt": Sized(TTTable, ("tt_rank",), tt_param_count, tt_fit, lambda v: 1),
    "jpq": Sized(JPQTable, ("jpq_splits", "jpq_centroids", "jpq_assign"), jpq_param_count, jpq_fit, lambda v: 1),
    "prune": Sized(PrunedTable, ("prune_sparsity",), prune_param_count, prune_fit, lambda v: 1 - 1 / v),
}
CLUSTERED = ("blockwise", "mde")  # sized by cutoffs and ranks (cprec.model.budget)
TABLES = ("full",) + CLUSTERED + tuple(SIZED)


def make_table(kind: str, num_items: int, dim: int, cutoffs: tuple[int, ...] = (), ranks: tuple[int, ...] = (),
               options: tuple[tuple[str, Any], ...] = ()) -> ItemTable:
    """The ``kind`` table over V = ``num_items`` ids (clusters for blockwise/mde, ``options`` for the sized)."""
    if kind == "full":
        return FullTable(num_items, dim)
    if kind in CLUSTERED:
        return BlockwiseEmbedding(num_items, dim, cutoffs, ranks)
    return SIZED[kind].module(num_items, dim, **dict(options))


__all__ = ["BlockwiseEmbedding", "CLUSTERED", "FullTable", "HashTable", "ItemTable", "JPQ_ASSIGN", "JPQTable", "LowRankTable", "PrunedTable", "QRTable",
           "QR_OPS", "SIZED", "TTTable", "TABLES", "blockwise_param_count", "full_param_count", "make_table", "mde_cutoffs"]
