"""The optimizer, the train state and the jitted train step."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from cprec.model.builder import model_clusters
from cprec.model.clusters import cluster_token_capacities
from cprec.model.sequential import SequentialRecommender
from cprec.model.param_groups import decay_group, param_path
from cprec.train.micro_batch import micro_batch_rows
from cprec.train.sampling import Sampler


def learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.ScalarOrSchedule:
    """``optim.lr`` with its schedule: a constant, or a function of the 0-based update count."""
    o = config.optim
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1),
                                                  max(total_steps, o.warmup_steps + 1))
    if o.warmup_steps > 0:
        return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return o.lr


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   clip: bool = True) -> optax.GradientTransformation:
    """The config's optax optimizer; ``clip=False`` leaves out the global-norm clipping (for a caller
    that clips over more gradients than this optimizer sees)."""
    o = config.optim
    lr = learning_rate(config, total_steps)
    decay = weight_decay(o.weight_decay, o.table_weight_decay)
    if o.name == "adam":  # L2: the decay joins the gradient before Adam's scaling (PyTorch's Adam(weight_decay))
        opt = optax.chain(*decay, optax.adam(lr)) if decay else optax.adam(lr)  # the same state as before decay existed
    elif o.name == "adamw":  # decoupled (Loshchilov & Hutter): applied after the scaling, times the lr
        opt = optax.chain(optax.scale_by_adam(), *decay, optax.scale_by_learning_rate(lr))
    else:
        opt = optax.chain(*decay, optax.sgd(lr))
    if o.clip_norm > 0 and clip:
        opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
    return opt


def decay_mask(params: Any, group: str) -> Any:
    """True for the parameters of ``group`` ('dense' or 'table', see ``cprec.model.param_groups``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decay_group(param_path(path)) == group, params)


def weight_decay(dense_rate: float, table_rate: float) -> list[optax.GradientTransformation]:
    """``add_decayed_weights`` for the dense weights and the item tables at their own rates; none
    for layer-norm scales and biases. Empty when both rates are 0 (the optimizer state stays Adam's)."""
    return [optax.add_decayed_weights(rate, mask=lambda p, g=group: decay_mask(p, g))
            for group, rate in (("dense", dense_rate), ("table", table_rate)) if rate > 0]


def sampling_key(step_rng: jax.Array) -> jax.Array:
    """The sampled softmax's key of a step: folded from the step's key far from the micro-batch indices
    that the dropout keys are folded with; runs without sampling keep the dropout keys they always had."""
    return jax.random.fold_in(step_rng, 1 << 30)


def make_batch_grads(model: SequentialRecommender, micro_batches: int = 1, frozen: Callable[[str], bool] | None = None,
                     sampler: Sampler | None = None, pairs: bool = False):
    """``(params, batch, rng[, drawn]) -> (summed NLL, target count, summed gradient)`` of a [B, L+1] window batch.

    With ``micro_batches`` = n > 1 the gradient is accumulated over n micro-batches of B/n rows in
    a ``lax.scan`` (see cprec/train/micro_batch.py for why): the same sums over all the batch's targets,
    added in another order. Micro-batch i holds rows i, i+n, i+2n, ..., so every micro-batch takes
    the same share of each device's rows under data parallelism. ``frozen(name)``: parameters held
    constant (no gradient; zeros in the result); a benchmark's knob, training freezes nothing.
    ``sampler``: the sampled softmax's; its negatives are drawn once per batch from ``rng`` (or given
    as ``drawn``) and shared by every micro-batch, so the gradient does not depend on the micro-batch
    count. ``pairs``: each row of the batch is [inputs, targets] of T each, instead of a window of T + 1.
    """
    def loss_sum(params, batch, rng, drawn):
        half = batch.shape[1] // 2
        x, y = (batch[:, :half], batch[:, half:]) if pairs else (batch[:, :-1], batch[:, 1:])
        negatives = None if drawn is None else sampler.negatives(drawn, y)
        mean, count = model.apply({"params": params}, x, y, True, negatives, rngs={"dropout": rng},
                                  method="loss")
        count = count.astype(jnp.float32)
        return mean * count, count

    def grads_of(params, batch, rng, drawn):
        if frozen is None:
            (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params, batch, rng, drawn)
            return total, count, grads
        leaves, tree = jax.tree_util.tree_flatten_with_path(params)
        keep = [frozen(param_path(path)) for path, _ in leaves]
        free = [x for (_, x), k in zip(leaves, keep) if not k]

        def of_free(free):
            it = iter(free)
            full = [lax.stop_gradient(x) if k else next(it) for (_, x), k in zip(leaves, keep)]
            return loss_sum(jax.tree.unflatten(tree, full), batch, rng, drawn)

        (total, count), g_free = jax.value_and_grad(of_free, has_aux=True)(free)
        it = iter(g_free)
        grads = [jnp.zeros_like(x) if k else next(it) for (_, x), k in zip(leaves, keep)]
        return total, count, jax.tree.unflatten(tree, grads)

    def batch_grads(params, batch, rng, drawn=None):
        if sampler is not None and drawn is None:
            drawn = sampler.draw(sampling_key(rng))
        if micro_batches == 1:
            return grads_of(params, batch, rng, drawn)
        chunks = batch.reshape(-1, micro_batches, batch.shape[1]).transpose(1, 0, 2)

        def accumulate(acc, chunk_and_index):
            chunk, i = chunk_and_index
            return jax.tree.map(jnp.add, acc, grads_of(params, chunk, jax.random.fold_in(rng, i), drawn)), None

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        return lax.scan(accumulate, zero, (chunks, jnp.arange(micro_batches)))[0]

    return batch_grads


def make_train_step(model: SequentialRecommender, tx: optax.GradientTransformation, seed: int, micro_batches: int = 1,
                    sampler: Sampler | None = None, pruner: Callable | None = None):
    """One jitted step on a [B, L+1] window batch (``make_batch_grads``, then ``tx``, then ``pruner``
    (``cprec.train.pruning``) if given); the state is donated."""
    base_rng = jax.random.PRNGKey(seed)
    batch_grads = make_batch_grads(model, micro_batches, sampler=sampler)

    def step(state: dict[str, Any], batch: jax.Array):
        rng = jax.random.fold_in(base_rng, state["step"])  # the same step gets the same randomness on resume
        params = state["params"]
        total, count, grads = batch_grads(params, batch, rng)
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if pruner is not None:
            new_params = pruner(new_params, params, state["step"] + 1)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": total * scale, "tokens": count, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)


def new_train_state(params: Any, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The dict-shaped train state that the step updates and the checkpoints hold."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def loss_capacities(config: ml_collections.ConfigDict, item_counts: np.ndarray,
                    num_devices: int) -> tuple[int, ...] | None:
    """Static tail-token capacities of the tree softmax's loss, per loss call (one micro-batch of every device).

    A training concern only: the buffers size the routed tokens of one call, so they depend on the
    micro-batch and the device count; evaluation and serving build the model without them.
    """
    if config.model.softmax != "tree":
        return None
    cutoffs, _ = model_clusters(config, item_counts)
    rows = micro_batch_rows(config, num_devices, num_items=len(item_counts))
    tokens = rows * num_devices * int(config.data.max_len)
    return cluster_token_capacities(item_counts, cutoffs, tokens, config.model.capacity_margin)
