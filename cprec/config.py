"""The base experiment config, its validation, and config-file arguments.

Experiment files in `experiments/` start from `base_config()` and change what
they need; `run.py` locks the config, so an override of an unknown key fails.
"""
from __future__ import annotations

import difflib
import importlib.util
import pathlib
from collections.abc import Sequence

import ml_collections

from cprec.data.dataset import default_data_config
from cprec.errors import ConfigError
from cprec.model.budget import check_budget
from cprec.model.sequential import check_tying
from cprec.model.sharing import SHARING_SCHEMES
from cprec.model.sampled_softmax import SAMPLERS
from cprec.model.sasrec import block_sharing_index
from cprec.model.tables import JPQ_ASSIGN, QR_OPS, TABLES

EMBEDDINGS = TABLES
BACKBONES = ("nextitnet", "sasrec")
SOFTMAXES = ("full", "sampled", "tree")


def base_config() -> ml_collections.ConfigDict:
    """NextItNet defaults (RecBole's: d=64, dilations [1, 4] x 5, L=50) on the synthetic data."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = default_data_config()

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "nextitnet"  # the encoder: 'nextitnet' (dilated convs) | 'sasrec' (causal self-attention)
    c.model.dim = 64
    c.model.dilations = (1, 4)  # one residual block per entry, repeated num_blocks times
    c.model.num_blocks = 5  # NextItNet: times the dilations repeat; SASRec: attention blocks
    # SASRec (model.backbone='sasrec'): heads per attention block, the feed-forward width, and the
    # dropout on the attention probabilities (model.dropout is its hidden dropout).
    c.model.num_heads = 2
    c.model.inner_dim = 256
    c.model.attn_dropout = 0.0
    c.model.kernel_size = 3
    c.model.sharing = "none"  # see cprec.model.sharing.SHARING_SCHEMES
    # The item table (cprec/model/tables/): 'full' | 'blockwise' (CpRec) | 'mde' (mixed dimensions) |
    # 'lowrank' | 'hash' | 'qr' (quotient-remainder) | 'tt' (tensor train) | 'jpq' (RecJPQ) |
    # 'prune' (the full table, magnitude-pruned); the output layer shares it when tied.
    c.model.embedding = "full"
    c.model.softmax = "full"  # 'full' | 'sampled' (full table, sampled-softmax training) | 'tree'
    # Cluster cutoffs: absolute item counts, or fractions of V; V itself is appended.
    c.model.cutoffs = ()
    c.model.ranks = ()  # explicit per-cluster ranks; empty = derive from rank_decay
    c.model.rank_decay = 4  # d_j = max(1, dim // rank_decay**j), CpRec's default
    # A parameter budget ('20x' = 20 times fewer than the uncompressed model, or a count such as
    # '5000000'): the solver picks cutoffs and ranks (cprec/model/budget.py); explicit ones still win.
    c.model.budget = ""
    # What a ratio budget divides: the uncompressed NextItNet with this config's tying and output
    # projection ('same_tying'), or the plain one, untied and without it ('untied'; the rivals' grid).
    c.model.budget_baseline = "same_tying"
    # The rival tables' sizes (0 = chosen by model.budget): low-rank rank r (E = A B, A [V, r]),
    # hashed rows m, quotient-remainder remainder rows m (quotient rows ceil(V/m)) and how the two
    # rows combine; mixed-dimension blocks (log-spaced over the frequency ranks).
    c.model.rank = 0
    c.model.hash_rows = 0
    c.model.qr_buckets = 0
    c.model.qr_op = "mult"  # 'mult' | 'add' | 'concat'
    c.model.mde_blocks = 8
    c.model.tt_rank = 0  # 'tt': the tensor-train rank of the three cores (0 = chosen by model.budget)
    # 'jpq' (RecJPQ): sub-spaces m (codes per item; 0 = chosen by model.budget), centroids c per
    # sub-space, and how codes are fixed before training: 'svd' (of the training user-item matrix) | 'random'.
    c.model.jpq_splits = 0
    c.model.jpq_centroids = 256
    c.model.jpq_assign = "svd"
    # 'prune': the full table magnitude-pruned to prune_sparsity (0 = chosen by model.budget, which
    # counts non-zeros), the sparsity rising cubically from step prune_begin to prune_end (shares of
    # the run), the smallest entries zeroed every prune_every steps (cprec/train/pruning.py).
    c.model.prune_sparsity = 0.0
    c.model.prune_begin = 0.1
    c.model.prune_end = 0.6
    c.model.prune_every = 50
    c.model.capacity_margin = 1.5  # static tail token capacity = expected share * margin
    c.model.dropout = 0.0  # on the input embedding (NextItNet uses none)
    # Output layer shares the input embedding's item tables (full/full: logits = h' E^T; CpRec
    # blockwise/tree: each cluster's table, Baevski & Auli's adaptive tying). Off by default so the
    # results of untied runs stay reproducible.
    c.model.tie_embeddings = False
    c.model.tie_projections = False  # tied CpRec: the tail clusters' projections too (no effect untied)
    c.model.output_projection = False  # h' = W h + b (d x d, with bias) before the output layer
    # Sampled softmax (model.softmax='sampled', cprec/model/sampled_softmax.py): negatives per step,
    # shared by every token, from 'uniform' or 'unigram' (training counts ** sampler_alpha), each
    # candidate's logit corrected by log(S Q); in_batch_negatives adds the batch's other targets.
    c.model.num_negatives = 1024
    c.model.sampler = "unigram"
    c.model.sampler_alpha = 0.75
    c.model.sampler_smoothing = 0.0  # unigram: k added to every count first (k > 0 draws never-trained items)
    c.model.in_batch_negatives = False

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # windows of L+1 items per step
    # Rows per device per gradient-accumulation chunk; 0 = automatic (cache-sized on CPU, the whole
    # batch on accelerators). Same gradient either way; see cprec/train/micro_batch.py.
    c.train.micro_batch_size = 0
    c.train.num_epochs = 10
    c.train.num_steps = -1  # > 0 overrides num_epochs
    c.train.log_every = 50
    c.train.eval_every = 500  # validation every this many steps, and at the end
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.select_metric = "ndcg@10"  # test uses the parameters with the best validation value of this

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # 'adam' | 'adamw' | 'sgd'
    c.optim.lr = 1e-3
    # L2 (adam, sgd: added to the gradient) or decoupled (adamw) weight decay: weight_decay for the
    # conv kernels and projections, table_weight_decay for the item tables; never layer-norm
    # scales or biases (cprec.model.param_groups).
    c.optim.weight_decay = 0.0
    c.optim.table_weight_decay = 0.0
    c.optim.clip_norm = 1.0  # global-norm clipping; <= 0 disables
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # 'constant' | 'cosine'
    # Lazy Adam for the item tables of a sampled-softmax model: only the rows a step touches (its
    # inputs, targets and negatives) are updated (cprec/train/sparse_tables.py). Needs
    # model.softmax='sampled', model.embedding='full', optim.name='adam', no table weight decay.
    c.optim.sparse_tables = False

    c.eval = ml_collections.ConfigDict()
    c.eval.ks = (5, 10, 20)
    c.eval.batch_size = 256
    # 0 = every user; n > 0 = the same n users (a fixed random subset, whatever the seed) for the
    # validation and test splits, for catalogues where full ranking of every user takes too long.
    c.eval.num_users = 0
    c.eval.topk_n = 20  # top-n recommendation latency measured after training
    c.eval.topk_batches = (1, 256)
    return c


def with_defaults(stored: dict) -> dict:
    """A stored config (a run's config.json) with the keys added to ``base_config`` since, at their
    defaults; every new key's default reproduces the behaviour from before it existed."""
    def fill(into: dict, defaults: dict) -> dict:
        out = dict(into)
        for key, value in defaults.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, dict) and isinstance(out[key], dict):
                out[key] = fill(out[key], value)
        return out
    return fill(stored, base_config().to_dict())


def _fail(key: str, value, requirement: str) -> None:
    raise ConfigError(f"config.{key}={value!r} is invalid: {requirement}")


def _choice(key: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(key, value, f"valid choices: {', '.join(choices)}")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible value."""
    m, t, o, e = c.model, c.train, c.optim, c.eval
    if m.dim <= 0:
        _fail("model.dim", m.dim, "must be > 0")
    if len(m.dilations) == 0:
        _fail("model.dilations", m.dilations, "must not be empty, e.g. '(1, 4)'")
    if any(int(r) < 1 for r in m.dilations):
        _fail("model.dilations", m.dilations, "every dilation must be >= 1")
    if m.num_blocks < 1:
        _fail("model.num_blocks", m.num_blocks, "must be >= 1")
    if m.kernel_size < 2:
        _fail("model.kernel_size", m.kernel_size, "must be >= 2")
    _choice("model.backbone", m.backbone, BACKBONES)
    _choice("model.sharing", m.sharing, SHARING_SCHEMES)
    if m.backbone == "sasrec":
        block_sharing_index(m.sharing, int(m.num_blocks))  # the schemes SASRec has, and an even count for pairs
        if m.num_heads < 1 or m.dim % m.num_heads:
            _fail("model.num_heads", m.num_heads, f"must be >= 1 and divide model.dim={m.dim}")
        if m.inner_dim < 1:
            _fail("model.inner_dim", m.inner_dim, "must be >= 1")
        if not 0.0 <= m.attn_dropout < 1.0:
            _fail("model.attn_dropout", m.attn_dropout, "must be in [0, 1)")
    _choice("model.embedding", m.embedding, EMBEDDINGS)
    _choice("model.softmax", m.softmax, SOFTMAXES)
    if m.rank_decay < 1:
        _fail("model.rank_decay", m.rank_decay, "must be >= 1")
    if not 0.0 <= m.dropout < 1.0:
        _fail("model.dropout", m.dropout, "must be in [0, 1)")
    check_tying(m.embedding, m.softmax, m.tie_embeddings)
    if m.softmax == "sampled":
        if m.num_negatives < 1:
            _fail("model.num_negatives", m.num_negatives, "must be >= 1 with the sampled softmax")
        _choice("model.sampler", m.sampler, SAMPLERS)
        if m.sampler_alpha < 0:
            _fail("model.sampler_alpha", m.sampler_alpha, "must be >= 0 (0 = uniform over trained items)")
        if m.sampler_smoothing < 0:
            _fail("model.sampler_smoothing", m.sampler_smoothing, "must be >= 0 (the count added to every item's; "
                  "0 = never-trained items are never drawn)")
    if m.embedding == "mde" and m.softmax == "tree":
        _fail("model.embedding", m.embedding, "mixed dimensions use the full or sampled softmax; CpRec (the tree "
              "softmax over block-wise tables) is model.embedding=blockwise")
    _choice("model.qr_op", m.qr_op, QR_OPS)
    _choice("model.budget_baseline", m.budget_baseline, ("same_tying", "untied"))
    _choice("model.jpq_assign", m.jpq_assign, JPQ_ASSIGN)
    if m.jpq_centroids < 2:
        _fail("model.jpq_centroids", m.jpq_centroids, "must be >= 2 (RecJPQ uses 256)")
    if not 0.0 <= m.prune_sparsity < 1.0:
        _fail("model.prune_sparsity", m.prune_sparsity, "must be in [0, 1): the share of the table pruned (0 = "
              "chosen by model.budget)")
    if not 0.0 <= m.prune_begin < m.prune_end <= 1.0:
        _fail("model.prune_begin", m.prune_begin, f"and model.prune_end={m.prune_end} must satisfy 0 <= begin < "
              "end <= 1 (shares of the run)")
    if m.prune_every < 1:
        _fail("model.prune_every", m.prune_every, "must be >= 1 (steps between pruning rounds)")
    for key in ("rank", "hash_rows", "qr_buckets", "tt_rank", "jpq_splits"):
        if m[key] < 0:
            _fail(f"model.{key}", m[key], "must be >= 0 (0 = chosen by model.budget)")
    if m.mde_blocks < 2:
        _fail("model.mde_blocks", m.mde_blocks, "must be >= 2")
    if str(m.budget):
        check_budget(m.budget)
        if m.embedding == "full" and m.softmax != "tree":
            _fail("model.budget", m.budget, "needs a compressed layer to size: a model.embedding other than full "
                  "and/or model.softmax=tree")
    if m.capacity_margin < 1.0:
        _fail("model.capacity_margin", m.capacity_margin, "must be >= 1.0")
    if c.data.max_len < 2:
        _fail("data.max_len", c.data.max_len, "L must be >= 2")
    if t.batch_size < 1:
        _fail("train.batch_size", t.batch_size, "must be >= 1")
    if t.micro_batch_size < 0:
        _fail("train.micro_batch_size", t.micro_batch_size, "must be >= 0 (0 = automatic)")
    if t.num_steps <= 0 and t.num_epochs <= 0:
        _fail("train.num_epochs", t.num_epochs, "must be > 0 (or set train.num_steps > 0)")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if t[key] < 1:
            _fail(f"train.{key}", t[key], "must be >= 1")
    if len(e.ks) == 0 or any(int(k) < 1 for k in e.ks):
        _fail("eval.ks", e.ks, "must be a non-empty tuple of positive cut-offs, e.g. '(5, 10, 20)'")
    metrics = [f"{m}@{k}" for k in e.ks for m in ("hr", "ndcg", "mrr")]  # after eval.ks: they name the metrics
    _choice("train.select_metric", t.select_metric, metrics)
    _choice("optim.name", o.name, ("adam", "adamw", "sgd"))
    _choice("optim.schedule", o.schedule, ("constant", "cosine"))
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    for key in ("weight_decay", "table_weight_decay"):
        if o[key] < 0:
            _fail(f"optim.{key}", o[key], "must be >= 0")
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", o.warmup_steps, "must be >= 0")
    if o.sparse_tables and (m.softmax != "sampled" or m.embedding != "full"):
        _fail("optim.sparse_tables", o.sparse_tables, f"needs model.softmax=sampled and model.embedding=full (got "
              f"{m.softmax} / {m.embedding}): only then does a step touch few rows of every item table")
    if o.sparse_tables and (o.name != "adam" or o.table_weight_decay > 0):
        _fail("optim.sparse_tables", o.sparse_tables, f"is a lazy Adam: needs optim.name=adam and "
              f"optim.table_weight_decay=0 (got {o.name}, {o.table_weight_decay})")
    if e.topk_n < 1 or any(int(b) < 1 for b in e.topk_batches):
        _fail("eval.topk_n", e.topk_n, "top-n size and eval.topk_batches must be >= 1")
    if e.batch_size < 1:
        _fail("eval.batch_size", e.batch_size, "must be >= 1")
    if e.num_users < 0:
        _fail("eval.num_users", e.num_users, "must be >= 0 (0 = every user)")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config-file argument such as 'ml100k' or 'ml100k,softmax=tree,share=none'.

    A bare word sets the first default's key (the dataset); `key=value` sets
    another default. Unknown keys raise ConfigError listing the valid ones.
    """
    out = ml_collections.ConfigDict(defaults)
    first = next(iter(defaults))
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            key, value = first, part
        if key not in defaults:
            raise ConfigError(f"config argument {key!r} is unknown; valid keys: {', '.join(defaults)}")
        out[key] = convert_value(key, value, defaults[key])
    return out


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def convert_value(key: str, value: str, default):
    """``value`` as the type of ``default``; bool('False') would be True, so booleans are parsed strictly."""
    if isinstance(default, bool):
        if value.lower() not in _BOOLEANS:
            raise ConfigError(f"config argument {key}={value!r} is not a boolean; use true or false")
        return _BOOLEANS[value.lower()]
    if not isinstance(default, (int, float, str)):  # tuple("1,2") would be its characters
        raise ConfigError(f"config argument {key}={value!r} cannot be set from text (its value is {default!r}); "
                          f"only numbers, strings and booleans can")
    try:
        return type(default)(value)
    except ValueError:
        raise ConfigError(f"config argument {key}={value!r} is not a valid {type(default).__name__}") from None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads 'path/to/config.py[:arg]' the way ml_collections' config_flags does."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"config file {path} not found; pass --config experiments/<name>.py[:arg]")
    spec_ = importlib.util.spec_from_file_location("_cprec_config", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_override_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Raises ConfigError for the first dotted override key that the config lacks."""
    for key in keys:
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, valid, n=1)
                hint = f" (did you mean {'.'.join(parts[:i] + close)!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}; see the config file for valid keys")
            node = node[part]
