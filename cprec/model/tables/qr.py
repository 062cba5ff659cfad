"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020; DLRM's ``QREmbeddingBag``).

Item i's vector combines row ``i // m`` of ``quotient`` ``[ceil(V/m), dq]`` and row ``i mod m``
of ``remainder`` ``[m, dr]``: element-wise product (``mult``, the paper's default; dq = dr = dim),
sum (``add``) or concatenation (``concat``; dq + dr = dim). No two items share both rows, so every
item keeps a unique vector, unlike hashing, at ``(ceil(V/m) + m) * dim`` parameters (least at
m = sqrt(V)).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.tables.base import ItemTable

QR_OPS = ("mult", "add", "concat")


def qr_widths(dim: int, op: str) -> tuple[int, int]:
    """Widths (dq, dr) of the quotient and remainder tables."""
    return (dim - dim // 2, dim // 2) if op == "concat" else (dim, dim)


def qr_param_count(num_items: int, dim: int, options: dict) -> int:
    m = int(options["qr_buckets"])
    dq, dr = qr_widths(dim, options.get("qr_op", "mult"))
    return -(-num_items // m) * dq + m * dr


def qr_fit(budget: int, num_items: int, dim: int, options: dict) -> dict | None:
    """The most remainder rows m in [ceil(sqrt V), V] that fit ``budget`` (more rows: fewer items per
    quotient row); None when even m = ceil(sqrt V), the smallest table, does not fit."""
    count = lambda m: qr_param_count(num_items, dim, {**options, "qr_buckets": m})
    lo, hi = math.isqrt(num_items - 1) + 1, num_items
    if count(lo) > budget:
        return None
    while lo < hi:  # the count grows with m from sqrt(V) on
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid - 1)
    return {**options, "qr_buckets": int(lo)}


class QRTable(ItemTable):
    qr_buckets: int = 0
    qr_op: str = "mult"

    def setup(self) -> None:
        if self.qr_op not in QR_OPS:
            raise ConfigError(f"model.qr_op={self.qr_op!r} is invalid; valid choices: {', '.join(QR_OPS)}")
        if not 1 <= self.qr_buckets <= self.num_items:
            raise ConfigError(f"model.qr_buckets={self.qr_buckets} is invalid: give a remainder row count in "
                              f"[1, V={self.num_items}], or a model.budget for the solver to choose it")
        dq, dr = qr_widths(self.dim, self.qr_op)
        # Each item's vector starts with variance 1/dim, as the full table's rows.
        std = {"mult": self.dim**-0.25, "add": (2 * self.dim) ** -0.5, "concat": self.dim**-0.5}[self.qr_op]
        init = nn.initializers.normal(stddev=std)
        self.quotient = self.param("quotient", init, (-(-self.num_items // self.qr_buckets), dq))
        self.remainder = self.param("remainder", init, (self.qr_buckets, dr))

    def _parts(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        ids = jnp.asarray(ids)
        return ids // self.qr_buckets, ids % self.qr_buckets

    def __call__(self, ids: jax.Array) -> jax.Array:
        q, r = self._parts(ids)
        a, b = jnp.take(self.quotient, q, axis=0), jnp.take(self.remainder, r, axis=0)
        if self.qr_op == "mult":
            return a * b
        return a + b if self.qr_op == "add" else jnp.concatenate([a, b], axis=-1)

    def logits(self, h: jax.Array) -> jax.Array:
        if self.qr_op == "mult":  # no factorisation of h (a * b): score blocks of composed rows
            return super().logits(h)
        q, r = self._parts(jnp.arange(self.num_items))
        hq, hr = (h, h) if self.qr_op == "add" else (h[:, : self.quotient.shape[1]], h[:, self.quotient.shape[1]:])
        return jnp.take(hq @ self.quotient.T, q, axis=1) + jnp.take(hr @ self.remainder.T, r, axis=1)
