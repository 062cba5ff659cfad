"""Sparse storage of a pruned item table in an artifact: a row-wise compressed layout (CSR).

A table whose zeros make it smaller this way (a magnitude-pruned one, ``model.embedding='prune'``)
is stored as its non-zeros along each item slice: ``<name>.indices`` (the position of each non-zero
in its slice: uint8 up to 256 columns, else uint16 or int32), ``<name>.indptr`` (int32, where each
slice's non-zeros start), and the values: ``<name>.values`` (float32, or bfloat16 for a bfloat16
artifact), or for int8 ``<name>.values_q`` (uint8) with a ``values_scale`` and ``values_offset``
(float32) per slice, so the non-zeros are quantised as a dense table's rows are and the zeros stay
exactly zero. A server densifies the table once at load (``densify``: the same jnp code inside the
StableHLO program), so serving memory is the dense table's; the artifact's bytes are the sparse ones.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cprec.serve.quantize import LEVELS

PARTS = ("indices", "indptr", "values", "values_q", "values_scale", "values_offset")


def _index_dtype(width: int) -> type:
    return np.uint8 if width <= 256 else np.uint16 if width <= 65536 else np.int32


def _rows(table: np.ndarray, axis: int) -> np.ndarray:
    """The table with its item axis first ([items, width])."""
    return np.asarray(table, np.float32) if axis == 0 else np.asarray(table, np.float32).T


def encode(table: np.ndarray, axis: int, dtype: str) -> dict[str, np.ndarray]:
    """The CSR parts of a 2-D table along its item ``axis``, values as ``dtype`` stores them."""
    rows = _rows(table, axis)
    nz_row, nz_col = np.nonzero(rows)
    values = rows[nz_row, nz_col]
    indptr = np.zeros(rows.shape[0] + 1, np.int32 if len(values) < 2**31 else np.int64)
    np.cumsum(np.bincount(nz_row, minlength=rows.shape[0]), out=indptr[1:])
    parts = {"indices": nz_col.astype(_index_dtype(rows.shape[1])), "indptr": indptr}
    if dtype != "int8":
        parts["values"] = values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        return parts
    lo = np.full(rows.shape[0], np.inf, np.float32)
    hi = np.full(rows.shape[0], -np.inf, np.float32)
    np.minimum.at(lo, nz_row, values)
    np.maximum.at(hi, nz_row, values)
    empty = ~np.isfinite(lo)
    lo[empty], hi[empty] = 0.0, 0.0
    scale = np.where(hi > lo, (hi - lo) / np.float32(LEVELS), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint((values - lo[nz_row]) / scale[nz_row]), 0, LEVELS).astype(np.uint8)
    return {**parts, "values_q": q, "values_scale": scale, "values_offset": lo}


def stored_bytes(parts: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(p).nbytes for p in parts.values()))


def worth_storing_sparse(table: np.ndarray, axis: int, dense_bytes: int, dtype: str) -> bool:
    """Whether the CSR parts take fewer bytes than the table stored densely (``dense_bytes``)."""
    if np.ndim(table) != 2 or np.count_nonzero(table) * 2 > np.size(table):  # at least half zeros
        return False
    return stored_bytes(encode(table, axis, dtype)) < dense_bytes


def densify(parts: Mapping[str, Any], shape: tuple[int, ...], axis: int) -> Any:
    """The float32 table of ``shape`` from its CSR parts (jnp: also inside a traced program)."""
    items, width = (shape[0], shape[1]) if axis == 0 else (shape[1], shape[0])
    indices, indptr = jnp.asarray(parts["indices"]).astype(jnp.int32), jnp.asarray(parts["indptr"])
    nnz = indices.shape[0]
    row_of = jnp.searchsorted(indptr[1:], jnp.arange(nnz), side="right")  # the slice of each non-zero
    if "values_q" in parts:
        values = (jnp.asarray(parts["values_q"]).astype(jnp.float32) * jnp.asarray(parts["values_scale"])[row_of]
                  + jnp.asarray(parts["values_offset"])[row_of])
    else:
        values = jnp.asarray(parts["values"]).astype(jnp.float32)
    dense = jnp.zeros((items, width), jnp.float32).at[row_of, indices].set(values)
    return dense if axis == 0 else dense.T
