"""Gradual magnitude pruning of the item table (``model.embedding='prune'``, ``cprec.model.tables.pruned``).

Zhu and Gupta's schedule ("To prune, or not to prune", 2017): the sparsity s_t rises from 0 at step
t0 to the target s_f at step t1 as ``s_f (1 - (1 - (t - t0) / (t1 - t0))^3)``, fast at first while
the table has redundant entries and slowly near the target; t0 and t1 are ``model.prune_begin`` and
``model.prune_end`` shares of the run. Every ``model.prune_every`` steps in that window (and at t1)
the smallest-magnitude entries of the table are zeroed until ``round(s_t * size)`` are zero; after
every update, entries that were zero before it are set back to zero, so a pruned entry never
returns (its gradient is computed, as through a mask, but never applied).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from cprec.model.param_groups import param_path

PRUNED = "embed/embedding"  # the table the budget sizes (an untied output kernel stays dense)


def sparsity_at(step: jax.Array, total_steps: int, target: float, begin: float, end: float) -> jax.Array:
    """The schedule's sparsity after ``step`` updates (0 before t0, ``target`` from t1 on)."""
    t0, t1 = round(begin * total_steps), max(round(end * total_steps), round(begin * total_steps) + 1)
    progress = jnp.clip((step - t0) / (t1 - t0), 0.0, 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def prune_smallest(table: jax.Array, sparsity: jax.Array) -> jax.Array:
    """``table`` with its ``round(sparsity * size)`` smallest-magnitude entries zeroed (ties at the
    threshold too; entries already zero count among the smallest)."""
    k = jnp.round(sparsity * table.size).astype(jnp.int32)
    magnitudes = jnp.sort(jnp.abs(table).reshape(-1))
    threshold = jnp.where(k > 0, magnitudes[jnp.maximum(k - 1, 0)], -1.0)
    return jnp.where(jnp.abs(table) > threshold, table, 0.0)


def make_pruner(config: ml_collections.ConfigDict, total_steps: int,
                sparsity: float | None = None) -> Callable[[Any, Any, jax.Array], Any] | None:
    """``(new params, params before the update, step after it) -> new params``, pruned; None unless
    ``model.embedding='prune'``. ``sparsity``: the target (the solver's, when the budget chose it)."""
    m = config.model
    if m.embedding != "prune":
        return None
    target = float(m.prune_sparsity if sparsity is None else sparsity)
    every, t1 = int(m.prune_every), max(round(m.prune_end * total_steps), round(m.prune_begin * total_steps) + 1)
    t0 = round(m.prune_begin * total_steps)

    def prune(new: Any, old: Any, step: jax.Array) -> Any:
        s = sparsity_at(step, total_steps, target, m.prune_begin, m.prune_end)
        due = (step >= t0) & (step <= t1) & ((step % every == 0) | (step == t1))

        def one(path, w_new, w_old):
            if param_path(path) != PRUNED:
                return w_new
            kept = jnp.where(w_old == 0, 0.0, w_new)
            return jax.lax.cond(due, prune_smallest, lambda w, _: w, kept, s)

        return jax.tree_util.tree_map_with_path(one, new, old)

    return prune
