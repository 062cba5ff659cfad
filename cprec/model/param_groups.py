"""Which parameters of a NextItNet are item tables, and which take weight decay.

Names are "/"-joined parameter paths (``embed/embedding``, ``head/tail_2_out``). Item tables have
one slice per item along their item axis; serving quantises them row-wise (``cprec.serve.quantize``)
and training may decay them at their own rate (``optim.table_weight_decay``). A tied model keeps
each table once, under ``embed/``.
"""
from __future__ import annotations

import re

import jax

# (path regex, item axis) of the item tables.
ITEM_TABLES = (
    (re.compile(r"embed/embedding"), 0),  # nn.Embed [V, d] (also the output of a tied full softmax)
    (re.compile(r"embed/head"), 0),  # block-wise head [k1, d]
    (re.compile(r"embed/tail_\d+_emb"), 0),  # block-wise tail cluster [k_j, d_j]
    (re.compile(r"embed/factors"), 0),  # low-rank A [V, r]
    (re.compile(r"embed/rows"), 0),  # hashed rows [m, d] (a row per bucket of items)
    (re.compile(r"embed/(quotient|remainder)"), 0),  # quotient-remainder [ceil(V/m), d] and [m, d]
    (re.compile(r"embed/core_\d"), 0),  # tensor-train cores, item factor first
    (re.compile(r"embed/centroids"), 0),  # RecJPQ's centroids [c, d] (a slice per centroid)
    (re.compile(r"head/kernel"), 1),  # full softmax [d, V]
    (re.compile(r"head/head"), 1),  # tree softmax head [d, k1 + n - 1]: head items and cluster tokens
    (re.compile(r"head/tokens"), 1),  # tied tree softmax: the cluster tokens' own columns [d, n - 1]
    (re.compile(r"head/tail_\d+_out"), 1),  # tree softmax tail cluster [d_j, k_j]
)

# Parameters that are constants of the model, never trained or decayed: RecJPQ's item codes, kept
# in the parameter tree so checkpoints and exports carry them (cprec/model/tables/jpq.py).
FROZEN = re.compile(r"embed/codes")

# Layer-norm scales and biases are never decayed (the usual practice: decay pulls a scale toward
# 0, not toward the identity, and a bias has nothing to overfit with).
_NO_DECAY = re.compile(r"(^|.*/)(scale|bias|biases)")


def param_path(path) -> str:
    """A parameter's "/"-joined name, e.g. ``stack/kernels``, from a jax key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def item_table_axis(name: str) -> int | None:
    """The item axis of the table called ``name``, or None if it is not an item table."""
    for pattern, axis in ITEM_TABLES:
        if pattern.fullmatch(name):
            return axis
    return None


def decay_group(name: str) -> str:
    """``'table'`` (item tables), ``'none'`` (layer-norm scales, biases) or ``'dense'`` (the rest)."""
    if item_table_axis(name) is not None:
        return "table"
    return "none" if _NO_DECAY.fullmatch(name) or FROZEN.fullmatch(name) else "dense"
