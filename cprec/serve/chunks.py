"""Row-wise functions over big batches, computed in cache-sized chunks inside one jitted call."""
from __future__ import annotations

from typing import Any, Callable

import jax


def in_row_chunks(fn: Callable, x: jax.Array, rows: int | None) -> Any:
    """``fn(x)`` for x [B, ...] computed as ``lax.map`` over chunks of ``rows`` rows (fn is row-wise).

    The batch buckets are powers of two, so B > rows divides by rows; any other B runs whole.
    """
    b = x.shape[0]
    if rows is None or b <= rows or b % rows:
        return fn(x)
    out = jax.lax.map(fn, x.reshape(b // rows, rows, *x.shape[1:]))
    return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), out)
