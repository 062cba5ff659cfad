"""Builds the model a config asks for, and counts its parameters by part."""
from __future__ import annotations

import ml_collections
import numpy as np
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.clusters import check_frequency_order, resolve_cutoffs, resolve_ranks
from cprec.model.nextitnet import NextItNet


def residual_dilations(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """One dilation per residual block: model.dilations repeated model.num_blocks times."""
    return tuple(int(r) for r in config.model.dilations) * int(config.model.num_blocks)


def model_clusters(config: ml_collections.ConfigDict, item_counts: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (cutoffs, ranks) of ``config.model`` over these frequency-ordered counts; () for an uncompressed model."""
    m = config.model
    num_items = len(item_counts)
    if not (m.embedding == "blockwise" or m.softmax == "tree"):
        return (), ()
    if len(m.cutoffs) == 0:
        raise ConfigError(
            "config.model.cutoffs is empty; the block-wise embedding and the tree softmax need cluster "
            "cutoffs, e.g. --config.model.cutoffs='(0.1, 0.4)'"
        )
    check_frequency_order(item_counts)
    cutoffs = resolve_cutoffs(tuple(m.cutoffs), num_items)
    rank_spec = tuple(int(r) for r in m.ranks) if len(m.ranks) else int(m.rank_decay)
    ranks = resolve_ranks(rank_spec, m.dim, len(cutoffs))
    if m.softmax == "tree" and len(cutoffs) < 2:
        raise ConfigError("config.model.cutoffs gives no tail cluster; the tree softmax needs at least one")
    return cutoffs, ranks


def build_model(config: ml_collections.ConfigDict, item_counts: np.ndarray,
                capacities: tuple[int, ...] | None = None) -> NextItNet:
    """NextItNet for ``config.model`` over the V = len(item_counts) frequency-ordered ids.

    ``capacities`` (the tree softmax's static tail token buffers) only matter for training's
    ``loss``; a model built for evaluation or serving needs none, and its parameters are the same.
    """
    m = config.model
    cutoffs, ranks = model_clusters(config, item_counts)
    return NextItNet(
        num_items=len(item_counts),
        dim=m.dim,
        dilations=residual_dilations(config),
        sharing=m.sharing,
        kernel_size=m.kernel_size,
        embedding=m.embedding,
        softmax=m.softmax,
        cutoffs=cutoffs,
        ranks=ranks,
        capacities=capacities if m.softmax == "tree" else None,
        dropout=m.dropout,
        tie_embeddings=bool(m.tie_embeddings),
        # A sub-option of tied CpRec; off elsewhere, so a model (and an artifact) says what it does.
        tie_projections=bool(m.tie_projections and m.tie_embeddings and m.softmax == "tree"),
        output_projection=bool(m.output_projection),
    )


def init_params(model: NextItNet, seed: int):
    """Initial parameters from `seed`; a 2-item dummy window touches every parameter."""
    return model.init(jax.random.PRNGKey(seed), jnp.ones((1, 2), jnp.int32))["params"]


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_report(model: NextItNet, baseline: NextItNet) -> dict[str, float]:
    """Parameters of each part, the total, bytes, and the ratio to the uncompressed baseline."""
    shapes = jax.eval_shape(lambda: init_params(model, 0))
    base_total = count_params(jax.eval_shape(lambda: init_params(baseline, 0)))
    # A tied table lives under "embed" only, so it is counted once (in the embedding).
    report = {f"params/{part}": count_params(shapes.get(key, {})) for part, key in
              (("embedding", "embed"), ("residual_stack", "stack"), ("output", "head"))}
    total = count_params(shapes)
    report["params/total"] = total
    report["params/bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))
    report["params/baseline_total"] = base_total
    report["params/compression_ratio"] = base_total / total
    return report


def uncompressed_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same experiment as plain NextItNet: full embedding, full softmax, no sharing.

    The tying of the item tables and the output projection stay as configured, so a tied CpRec is
    compared with a tied NextItNet (the stronger, smaller baseline); ``tie_projections`` has no
    meaning without clusters and is dropped.
    """
    base = ml_collections.ConfigDict(config.to_dict())
    base.model.embedding, base.model.softmax, base.model.sharing = "full", "full", "none"
    base.model.tie_projections = False
    return base
