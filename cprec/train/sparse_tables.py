"""Row-sparse item-table updates for the sampled softmax (``optim.sparse_tables``): a lazy Adam.

With a sampled softmax a step touches only the rows of its inputs, targets and negatives, yet
autodiff of a table lookup gives a dense ``[V, d]`` gradient and Adam rewrites every row of every
table and both its moments: at a million items that is most of the step (docs/benchmarks.md).
Here the step gathers the touched rows of each item table into a small table, runs the model on
ids remapped into it (the same computation: a bijection of the rows the batch uses), and updates
only those rows and their moments, as TensorFlow Addons' LazyAdam does (bias correction by the
global step). A row that is touched at every step follows dense Adam exactly; an untouched row
keeps its value and moments, where dense Adam would keep moving it along its decaying momentum.
Every other parameter takes the config's optax optimizer; global-norm clipping sees all gradients.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cprec.model.sequential import SequentialRecommender
from cprec.model.param_groups import item_table_axis
from cprec.train.sampling import Sampler
from cprec.train.step import make_batch_grads, sampling_key

_B1, _B2, _EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults, which the dense tables would use

# The tables a full-embedding, sampled-softmax NextItNet has: (path, item axis).
_INPUT, _OUTPUT = ("embed", "embedding"), ("head", "kernel")


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _without(tree: dict, paths: list[tuple[str, ...]]) -> dict:
    for path in paths:
        parent = _get(tree, path[:-1])
        tree = _set(tree, path[:-1], {k: v for k, v in parent.items() if k != path[-1]})
    return tree


def table_paths(params: dict) -> list[tuple[str, ...]]:
    """The item tables of ``params`` updated row by row: the input embedding and an untied output kernel."""
    # A tied model without an output projection (SASRec's logits = h E^T) has no head module at all.
    return [p for p in (_INPUT, _OUTPUT) if p[-1] in params.get(p[0], {})]


def _unique(ids: jax.Array, size: int, num_items: int) -> tuple[jax.Array, jax.Array]:
    """(rows [size] sorted, padded with ``num_items``; each id's index in rows). Padding id 0 is always row 0,
    so the remapped batch keeps 0 as its padding id."""
    rows, index = jnp.unique(jnp.concatenate([jnp.zeros((1,), ids.dtype), ids.reshape(-1)]), size=size,
                             fill_value=num_items, return_inverse=True)
    return rows, index[1:].reshape(ids.shape)


def make_sparse_train_step(model: SequentialRecommender, config: ml_collections.ConfigDict, dense_tx: optax.GradientTransformation,
                           lr: Callable[[jax.Array], jax.Array], sampler: Sampler, micro_batches: int = 1):
    """The train step of ``cprec.train.step.make_train_step`` with lazy-Adam item tables.

    ``dense_tx``: the optimizer of every other parameter, without clipping (applied here to all
    gradients at once); ``lr(count)``: the learning rate at a 0-based update count.
    """
    clip = float(config.optim.clip_norm)
    base_rng = jax.random.PRNGKey(config.seed)
    num_items = model.num_items
    tied = model.tie_embeddings

    def step(state: dict[str, Any], batch: jax.Array):
        rng = jax.random.fold_in(base_rng, state["step"])  # as the dense step: the same dropout and negatives
        drawn_ids, drawn_log_count = sampler.draw(sampling_key(rng))
        inputs, targets = batch[:, :-1], batch[:, 1:]
        params = state["params"]
        paths = table_paths(params)
        out_ids = jnp.concatenate([targets.reshape(-1), drawn_ids])
        if tied:  # one table: every id the step uses, in one remapping
            size = 1 + inputs.size + out_ids.size
            rows, index = _unique(jnp.concatenate([inputs.reshape(-1), out_ids]), size, num_items)
            rows_of = {_INPUT: rows}
            in_index, out_index = index[:inputs.size].reshape(inputs.shape), index[inputs.size:]
        else:
            size = 1 + max(inputs.size, out_ids.size)
            in_rows, in_index = _unique(inputs, size, num_items)
            out_rows, out_index = _unique(out_ids, size, num_items)
            rows_of = {_INPUT: in_rows, _OUTPUT: out_rows}
        sub = params
        for path in paths:
            sub = _set(sub, path, jnp.take(_get(params, path), rows_of[path], axis=item_table_axis("/".join(path)),
                                           mode="fill", fill_value=0))
        # The model over the gathered rows: ids remapped into them; inputs and targets side by side,
        # since untied tables remap the same item to different rows.
        pairs = jnp.concatenate([in_index, out_index[:targets.size].reshape(targets.shape)], axis=1)
        drawn = (out_index[targets.size:], drawn_log_count)
        restricted = sampler.restricted(rows_of[_INPUT if tied else _OUTPUT])
        total, count, grads = make_batch_grads(model.clone(num_items=size), micro_batches, sampler=restricted,
                                               pairs=True)(sub, pairs, rng, drawn)
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        grad_norm = optax.tree.norm(grads)  # the dense gradient's norm: untouched rows add nothing
        if clip > 0:
            grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / jnp.maximum(grad_norm, 1e-12)), grads)
        dense_grads, dense_params = _without(grads, paths), _without(params, paths)
        updates, dense_state = dense_tx.update(dense_grads, state["opt_state"]["dense"], dense_params)
        new_params = optax.apply_updates(dense_params, updates)
        t = state["step"] + 1
        rate = lr(state["step"])
        tables = {}
        for path in paths:
            name = "/".join(path)
            axis = item_table_axis(name)
            moments = state["opt_state"]["tables"][name]
            g = _get(grads, path)
            idx = rows_of[path]
            touched = lambda x: jnp.take(x, idx, axis=axis, mode="fill", fill_value=0)
            m = _B1 * touched(moments["mu"]) + (1 - _B1) * g
            v = _B2 * touched(moments["nu"]) + (1 - _B2) * g * g
            m_hat, v_hat = m / (1 - _B1 ** t), v / (1 - _B2 ** t)
            p = _get(sub, path) - rate * m_hat / (jnp.sqrt(v_hat) + _EPS)  # the rows gathered for the forward pass
            put = (lambda x, new: x.at[idx].set(new, mode="drop")) if axis == 0 else (
                lambda x, new: x.at[:, idx].set(new, mode="drop"))
            tables[name] = {"mu": put(moments["mu"], m), "nu": put(moments["nu"], v)}
            new_params = _set(new_params, path, put(_get(params, path), p))
        new_state = {"params": new_params, "opt_state": {"dense": dense_state, "tables": tables}, "step": t}
        return new_state, {"loss": total * scale, "tokens": count, "grad_norm": grad_norm}

    return jax.jit(step, donate_argnums=0)


def new_sparse_state(params: Any, dense_tx: optax.GradientTransformation) -> dict[str, Any]:
    """The train state of ``make_sparse_train_step``: Adam moments of the tables, the dense optimizer's of the rest."""
    paths = table_paths(params)
    tables = {"/".join(p): {"mu": jnp.zeros_like(_get(params, p)), "nu": jnp.zeros_like(_get(params, p))}
              for p in paths}
    return {"params": params, "opt_state": {"dense": dense_tx.init(_without(params, paths)), "tables": tables},
            "step": jnp.zeros((), jnp.int32)}
