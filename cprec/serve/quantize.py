"""Row-wise 8-bit item tables (FBGEMM's "fused 8-bit row-wise" scheme) for serving.

Each slice of a table along its item axis (a row of an input embedding ``[V, d]``, a column of an
output layer ``[d, V]``) gets its own affine map: ``scale = (max - min) / 255`` and
``offset = min`` over that slice (``scale = 1`` for a constant slice, which then dequantises
exactly), and is stored as **uint8** codes ``q = round((x - offset) / scale)`` in ``[0, 255]``
(unsigned: no shift). Dequantised, ``q * scale + offset`` is within ``scale / 2`` of ``x`` per
element (plus float32 rounding). ``scale`` and ``offset`` stay float32 (FBGEMM keeps them in fp16 or
fp32; fp32 keeps the bound exact), so a slice of n elements costs ``n + 8`` bytes instead of ``4n``.

Item tables (``item_table_axes``) are the tables with one slice per item: the input embedding
(``embed/embedding`` or block-wise ``embed/head`` and ``embed/tail_{j}_emb``, axis 0) and the
output layer (``head/kernel`` of a full softmax, or the tree softmax's ``head/head``, whose columns
are the head items and the cluster tokens, and ``head/tail_{j}_out``, axis 1; the list is
``cprec.model.param_groups.ITEM_TABLES``; a tied model has only the ``embed/`` ones; a rival's
tables too, TT-Rec's 3-D and 4-D cores with one slice per value of their item factor). Everything else (conv
kernels, biases, LayerNorms, the low-rank projections ``tail_{j}_proj``) stays float32.
``quantize_params`` quantises the item tables whose slices hold at least ``MIN_SLICE`` elements:
below that (CpRec's rank-1 and rank-2 tail clusters) the 8 bytes of scale and offset per slice
would make the table larger than its float32 original (an int8 artifact stores those as bfloat16).

Everything here is importable by a server: it needs jax and numpy only.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cprec.model.param_groups import item_table_axis, param_path

LEVELS = 255  # uint8 codes 0..255
MIN_SLICE = 3  # n + 8 < 4n bytes only from n = 3 elements per slice


class QuantizedTable(NamedTuple):
    """A row-wise uint8 table: ``q`` uint8 with the table's shape, ``scale`` and ``offset`` float32
    with the table's shape but 1 on every axis except ``axis`` (so they broadcast against ``q``).

    A pytree whose children are ``(q, scale, offset)``; ``axis`` is static (pytree aux data), so a
    QuantizedTable passes through ``jax.jit`` and ``dequantize`` can run inside the jitted call.
    """

    q: Any
    scale: Any
    offset: Any
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(np.asarray(x).nbytes for x in (self.q, self.scale, self.offset)))


jax.tree_util.register_pytree_node(
    QuantizedTable,
    lambda t: ((t.q, t.scale, t.offset), t.axis),
    lambda axis, children: QuantizedTable(*children, axis),
)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTable)


def quantize_rows(table: np.ndarray, axis: int) -> QuantizedTable:
    """Quantises every slice of `table` along `axis` (the item axis) to uint8 with its own scale/offset."""
    x = np.asarray(table, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize_rows needs a table of at least one axis")
    axis = axis % x.ndim
    others = tuple(a for a in range(x.ndim) if a != axis)
    lo = x.min(axis=others, keepdims=True) if others else x.copy()
    hi = x.max(axis=others, keepdims=True) if others else x.copy()
    scale = ((hi - lo) / np.float32(LEVELS)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint((x - lo) / scale), 0, LEVELS).astype(np.uint8)
    return QuantizedTable(q, scale, lo.astype(np.float32), axis)


def dequantize(qt: QuantizedTable) -> jax.Array:
    """float32 ``q * scale + offset`` (jnp: jittable)."""
    return jnp.asarray(qt.q).astype(jnp.float32) * jnp.asarray(qt.scale, jnp.float32) + jnp.asarray(qt.offset, jnp.float32)


def dequantize_tree(params: Any) -> Any:
    """`params` with every QuantizedTable replaced by its float32 table; other leaves unchanged."""
    return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, params, is_leaf=is_quantized)


def item_table_axes(params: Any) -> dict[str, int]:
    """``{name: item axis}`` of the item tables of a NextItNet parameter tree (see the module docstring)."""
    axes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        name = param_path(path)
        axis = item_table_axis(name)
        if axis is not None and len(np.shape(leaf.q if is_quantized(leaf) else leaf)) >= 2:
            axes[name] = axis
    return axes


def worth_quantizing(shape: tuple[int, ...], axis: int) -> bool:
    """Whether uint8 codes plus float32 scale and offset per slice take fewer bytes than float32."""
    return int(np.prod(shape)) // max(1, shape[axis]) >= MIN_SLICE


def quantize_params(params: Any, axes: dict[str, int] | None = None) -> Any:
    """`params` with its item tables (``item_table_axes``, or `axes`) quantised where that saves space.

    Returns the same nested-dict structure, QuantizedTable leaves in place of the quantised tables.
    """
    axes = item_table_axes(params) if axes is None else axes

    def convert(path, leaf):
        name = param_path(path)
        if name in axes and worth_quantizing(np.shape(leaf), axes[name]):
            return quantize_rows(np.asarray(leaf), axes[name])
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)


def quantization_error_bound(qt: QuantizedTable) -> np.ndarray:
    """The per-element bound ``scale / 2`` broadcast to the table's shape (float32 rounding aside)."""
    return np.broadcast_to(np.asarray(qt.scale) / 2, qt.shape)
