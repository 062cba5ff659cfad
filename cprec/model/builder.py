"""Builds the model a config asks for, and counts its parameters by part."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import ml_collections
import numpy as np
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model import budget as budget_solver
from cprec.model.clusters import check_frequency_order, resolve_cutoffs, resolve_ranks
from cprec.model.nextitnet import NextItNet
from cprec.model.sasrec import SASRec
from cprec.model.sequential import SequentialRecommender
from cprec.model.tables import CLUSTERED, SIZED, mde_cutoffs
from cprec.model.tables.jpq import assign_codes, svd_codes
from cprec.model.tables.pruned import pruned_count


def residual_dilations(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """One dilation per residual block: model.dilations repeated model.num_blocks times."""
    return tuple(int(r) for r in config.model.dilations) * int(config.model.num_blocks)


def model_clusters(config: ml_collections.ConfigDict, item_counts: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (cutoffs, ranks) of ``config.model`` over these frequency-ordered counts; () for a model without clusters.

    With ``model.budget`` the solver picks them (``budget_choice``); explicit ``model.cutoffs`` and
    ``model.ranks`` still win. Mixed dimensions (``mde``) default to their log-spaced blocks.
    """
    m = config.model
    num_items = len(item_counts)
    if not clustered(config):
        return (), ()
    if uses_budget(config):
        choice = budget_choice(config, item_counts)
        return choice.cutoffs, choice.ranks
    check_frequency_order(item_counts)
    if m.embedding == "mde" and not len(m.cutoffs):
        cutoffs = mde_cutoffs(num_items, int(m.mde_blocks))
    elif len(m.cutoffs) == 0:
        raise ConfigError(
            "config.model.cutoffs is empty; the block-wise embedding and the tree softmax need cluster "
            "cutoffs, e.g. --config.model.cutoffs='(0.1, 0.4)', or a budget, e.g. --config.model.budget=20x"
        )
    else:
        cutoffs = resolve_cutoffs(tuple(m.cutoffs), num_items)
    rank_spec = tuple(int(r) for r in m.ranks) if len(m.ranks) else int(m.rank_decay)
    ranks = resolve_ranks(rank_spec, m.dim, len(cutoffs))
    if m.softmax == "tree" and len(cutoffs) < 2:
        raise ConfigError("config.model.cutoffs gives no tail cluster; the tree softmax needs at least one")
    return cutoffs, ranks


def clustered(config: ml_collections.ConfigDict) -> bool:
    """Whether the model has clusters (a block-wise or mixed-dimension embedding, or a tree softmax)."""
    return config.model.embedding in CLUSTERED or config.model.softmax == "tree"


def sized(config: ml_collections.ConfigDict) -> bool:
    """Whether the input table is one of the rivals sized by its own options (low-rank, hashed, QR)."""
    return config.model.embedding in SIZED


def uses_budget(config: ml_collections.ConfigDict) -> bool:
    """Whether a solver sizes the model: a budget, and the sizes it would choose not all given
    (cutoffs and ranks of clusters, or a sized table's size option)."""
    m = config.model
    if not str(m.budget):
        return False
    if sized(config):
        return float(m[SIZED[m.embedding].keys[0]]) == 0
    return clustered(config) and not (len(m.cutoffs) and len(m.ranks))


def table_options(config: ml_collections.ConfigDict, item_counts: np.ndarray) -> tuple[tuple[str, Any], ...]:
    """The sized table's options as NextItNet's ``table_options`` (the solver's under a budget); () otherwise."""
    if not sized(config):
        return ()
    if uses_budget(config):
        return tuple(sorted(budget_choice(config, item_counts).options.items()))
    kind = SIZED[config.model.embedding]
    return tuple(sorted((key, config.model[key]) for key in kind.keys))


@dataclasses.dataclass(frozen=True)
class TableChoice:
    """The budget solver's size for a rival table (``table_options``), with the same report as ``BudgetChoice``."""

    embedding: str
    options: dict
    params: int  # the whole model's
    target: int
    baseline: int
    cutoffs: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "cutoffs": [], "ranks": [], "ratio": self.baseline / self.params}

    def summary(self) -> str:
        sizes = ", ".join(f"{k} {v}" for k, v in sorted(self.options.items()))
        return (f"budget {self.target:,} params ({self.baseline / self.target:.1f}x): {self.embedding} table with "
                f"{sizes} -> {self.params:,} params ({self.baseline / self.params:.2f}x, "
                f"{self.params / self.target:.1%} of the budget)")


# Solving needs two abstract model inits (~1 s at 1M items); a run builds its model several times.
_BUDGET_CHOICES: dict[tuple[str, str], Any] = {}


def budget_choice(config: ml_collections.ConfigDict, item_counts: np.ndarray) -> budget_solver.BudgetChoice | TableChoice:
    """The solver's sizes for ``model.budget``, cached per model config and counts: cutoffs and ranks
    (``cprec.model.budget``) for clustered layers, a rival table's size option (``TableChoice``) otherwise."""
    counts = np.ascontiguousarray(item_counts)
    key = (config.model.to_json(), hashlib.sha1(counts.tobytes()).hexdigest() + str(counts.dtype))
    if key not in _BUDGET_CHOICES:
        _BUDGET_CHOICES[key] = _solve_table(config, counts) if sized(config) else _solve_budget(config, counts)
    return _BUDGET_CHOICES[key]


def _fixed_and_target(config: ml_collections.ConfigDict, probe: SequentialRecommender, probe_table: int,
                      num_items: int) -> tuple[int, int, int]:
    """(parameters outside the sized layers, the budget in parameters, the baseline it is a ratio of)."""
    fixed = _abstract_count(probe) - probe_table
    baseline = _abstract_count(_model(uncompressed_config(config), num_items, (), ()))
    return fixed, budget_solver.parse_budget(config.model.budget, baseline), baseline


def _solve_table(config: ml_collections.ConfigDict, counts: np.ndarray) -> TableChoice:
    m = config.model
    if m.softmax == "tree":
        raise ConfigError(f"model.budget with model.embedding={m.embedding} and the tree softmax sizes two compressed "
                          f"layers; give the table's size (model.{SIZED[m.embedding].keys[0]}) or use the full or "
                          f"sampled softmax")
    kind, num_items, d = SIZED[m.embedding], len(counts), int(m.dim)
    options = {key: m[key] for key in kind.keys[1:]}
    smallest = {**options, kind.keys[0]: kind.smallest(num_items)}
    probe = _model(config, num_items, (), (), options=tuple(sorted(smallest.items())))
    # The table as built (all of ``embed/``: a pruned table's zeros too) is what the rest is not.
    built_table = count_params(jax.eval_shape(lambda: init_params(probe, 0))["embed"])
    fixed, target, baseline = _fixed_and_target(config, probe, built_table, num_items)
    fit = kind.fit(target - fixed, num_items, d, options)
    if fit is None:
        reach = fixed + kind.param_count(num_items, d, smallest)
        raise ConfigError(f"model.budget={target:,} params ({baseline / target:.1f}x) cannot be reached by the "
                          f"{m.embedding} table: its smallest model has {reach:,} ({baseline / reach:.1f}x; "
                          f"{fixed:,} outside the item table), so give a budget of at least {reach:,}")
    return TableChoice(m.embedding, fit, fixed + kind.param_count(num_items, d, fit), target, baseline)


def _solve_budget(config: ml_collections.ConfigDict, counts: np.ndarray) -> budget_solver.BudgetChoice:
    m = config.model
    check_frequency_order(counts)
    num_items, d = len(counts), int(m.dim)
    if len(m.ranks) and not len(m.cutoffs):
        raise ConfigError("model.ranks needs model.cutoffs when model.budget is set (or leave both empty and let "
                          "the budget choose them)")
    if num_items < 3:
        raise ConfigError(f"model.budget needs at least 3 item ids to cluster, got {num_items}")
    embedding = "blockwise" if m.embedding in CLUSTERED else m.embedding
    layers = budget_solver.Layers(num_items, d, embedding, m.softmax, bool(m.tie_embeddings),
                                  bool(m.tie_projections and m.tie_embeddings and m.softmax == "tree"),
                                  integer_ranks=m.embedding == "mde")
    # Everything outside the clustered layers, from one probe model: its total minus its clustered part.
    probe_cutoffs, probe_ranks = (num_items // 2, num_items), (d, 1)
    fixed, target, baseline = _fixed_and_target(config, _model(config, num_items, probe_cutoffs, probe_ranks),
                                                budget_solver.cluster_params(layers, probe_cutoffs, probe_ranks),
                                                num_items)
    if len(m.cutoffs):
        cutoffs = resolve_cutoffs(tuple(m.cutoffs), num_items, require_tail=m.softmax == "tree")
    else:
        cutoffs = mde_cutoffs(num_items, int(m.mde_blocks)) if m.embedding == "mde" else None
    return budget_solver.solve(layers, counts, target, fixed, baseline, cutoffs)


def _abstract_count(model: SequentialRecommender) -> int:
    return count_params(jax.eval_shape(lambda: init_params(model, 0)))


def build_model(config: ml_collections.ConfigDict, item_counts: np.ndarray,
                capacities: tuple[int, ...] | None = None) -> SequentialRecommender:
    """The ``model.backbone`` (NextItNet or SASRec) of ``config.model`` over the V = len(item_counts)
    frequency-ordered ids.

    ``capacities`` (the tree softmax's static tail token buffers) only matter for training's
    ``loss``; a model built for evaluation or serving needs none, and its parameters are the same.
    """
    cutoffs, ranks = model_clusters(config, item_counts)
    return _model(config, len(item_counts), cutoffs, ranks, capacities, table_options(config, item_counts))


def _model(config: ml_collections.ConfigDict, num_items: int, cutoffs: tuple[int, ...], ranks: tuple[int, ...],
           capacities: tuple[int, ...] | None = None,
           options: tuple[tuple[str, Any], ...] = ()) -> SequentialRecommender:
    m = config.model
    items = dict(
        num_items=num_items,
        dim=m.dim,
        sharing=m.sharing,
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
        table_options=options,
    )
    if m.get("backbone", "nextitnet") == "sasrec":
        return SASRec(**items, max_len=int(config.data.max_len), num_blocks=int(m.num_blocks),
                      num_heads=int(m.num_heads), inner_dim=int(m.inner_dim), attn_dropout=float(m.attn_dropout))
    return NextItNet(**items, dilations=residual_dilations(config), kernel_size=m.kernel_size)


def init_params(model: SequentialRecommender, seed: int):
    """Initial parameters from `seed`; a 2-item dummy window touches every parameter."""
    return model.init(jax.random.PRNGKey(seed), jnp.ones((1, 2), jnp.int32))["params"]


def init_from_data(config: ml_collections.ConfigDict, model: SequentialRecommender, params: Any,
                   windows: np.ndarray) -> Any:
    """``params`` with what the training data fixes before training: RecJPQ's SVD codes
    (``model.jpq_assign='svd'``, from the training windows); the other tables start from ``params``."""
    m = config.model
    if m.embedding != "jpq" or m.jpq_assign != "svd":
        return params
    options = dict(model.table_options)
    print(f"assigning RecJPQ codes: truncated SVD of the {len(windows):,} training windows' item matrix, "
          f"{options['jpq_splits']} components", flush=True)
    codes = svd_codes(windows, model.num_items, options["jpq_splits"], options["jpq_centroids"], config.seed)
    return assign_codes(params, codes, options["jpq_centroids"])


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_report(model: SequentialRecommender, baseline: SequentialRecommender) -> dict[str, float]:
    """Parameters of each part, the total, bytes, and the ratio to the uncompressed baseline."""
    shapes = jax.eval_shape(lambda: init_params(model, 0))
    base_total = count_params(jax.eval_shape(lambda: init_params(baseline, 0)))
    # A tied table lives under "embed" only, so it is counted once (in the embedding). The encoder
    # is everything else (NextItNet's residual stack; SASRec's positions and attention blocks).
    total = count_params(shapes)
    report = {f"params/{part}": count_params(shapes.get(key, {})) for part, key in
              (("embedding", "embed"), ("output", "head"))}
    report["params/residual_stack"] = total - report["params/embedding"] - report["params/output"]
    if model.embedding == "prune":  # a pruned table counts its non-zeros
        pruned = pruned_count(model.num_items, model.dim, dict(model.table_options)["prune_sparsity"])
        report["params/embedding"] -= pruned
        total -= pruned
        report["params/pruned"] = pruned
    report["params/total"] = total
    report["params/bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))
    report["params/baseline_total"] = base_total
    report["params/compression_ratio"] = base_total / total
    return report


def uncompressed_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same experiment uncompressed (the plain backbone): full embedding, full softmax, no sharing.

    The tying of the item tables and the output projection stay as configured, so a tied CpRec is
    compared with a tied NextItNet (the stronger, smaller baseline), unless
    ``model.budget_baseline='untied'`` asks for the plain NextItNet (untied, no output projection);
    ``tie_projections`` has no meaning without clusters and is dropped.
    """
    base = ml_collections.ConfigDict(config.to_dict())
    base.model.embedding, base.model.softmax, base.model.sharing = "full", "full", "none"
    base.model.tie_projections = False
    base.model.budget = ""
    if base.model.get("budget_baseline", "same_tying") == "untied":
        base.model.tie_embeddings, base.model.output_projection = False, False
    return base
