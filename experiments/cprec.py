"""CpRec (Sun, Yuan et al., SIGIR 2020) on NextItNet: block-wise embedding, tree softmax, layer-wise sharing.

  python run.py --config experiments/cprec.py --workdir runs/cprec-demo
  python run.py --config experiments/cprec.py:ml100k --workdir runs/cprec-ml100k
  python run.py --config experiments/cprec.py:ml100k,share=adjacent_layer --workdir runs/cprec-ml100k-al
  python run.py --config experiments/cprec.py:ml1m,emb=full,softmax=tree --workdir runs/cprec-ml1m-tree
  python run.py --config experiments/cprec.py:synthetic30k --workdir runs/cprec-synthetic30k
  python run.py --config experiments/cprec.py:synthetic1m --workdir runs/cprec-1m

Arg: comma-separated; a bare word picks the dataset (synthetic, ml100k, ml1m, ml20m, synthetic30k, synthetic1m);
emb=full|blockwise, softmax=full|tree, share=none|cross_layer|cross_block|adjacent_layer|adjacent_block;
tie=true|false (the tree softmax shares the block-wise embedding's item tables, where the two layers
allow it); tuned=false drops a dataset's tuned settings (TUNED, found on validation by sweep=tuning);
budget=20x (or a parameter count such as budget=5000000) replaces the dataset's cutoffs and rank decay
by the budget solver's choice (model.budget; cprec/model/budget.py).
Defaults: synthetic, blockwise, tree, cross_block, tie=false, tuned=true, no budget; ml100k's tuned preset ties.

  python run.py --config experiments/cprec.py:synthetic30k,budget=20x --workdir runs/cprec-30k-20x

Sweeps (`--sweep`; add `--launcher local|slurm` to run them, see cprec/sweep/):

  python run.py --config experiments/cprec.py:ml100k --sweep                  # ablation, 60 trials
  python run.py --config experiments/cprec.py:ml100k,sweep=clusters --sweep   # clusters and ranks, 24 trials
  python run.py --config experiments/cprec.py:ml100k,sweep=tuning --sweep     # tying x dropout, 10 trials

- `sweep=ablation` (the default): model.embedding {full, blockwise} x model.softmax {full, tree}
  x model.sharing {none, cross_layer, cross_block, adjacent_layer, adjacent_block} x seeds 0-2;
  full/full/none is the uncompressed NextItNet. Trials go to runs/cprec-<arg>/.
- `sweep=clusters`: the arg's embedding, softmax and sharing (default blockwise, tree, cross_block)
  with model.cutoffs from CUTOFF_SWEEP[dataset] x model.rank_decay {2, 4, 8} x seeds 0-1.
- `sweep=tuning`: TYING (untied; tied item tables; + tied projections; each with and without the
  output projection h' = W h + b) x model.dropout {0.2, 0.4}, seed 0.
- `sweep=decay`: decoupled weight decay (AdamW) 0.05 and 0.2 on everything but LN scales and biases.
- `sweep=seeds`: the config itself, seeds 0-2.
- `sweep=batch`: train.batch_size {64, 128, 256} at 10, 12 and 18 epochs (about the same wall
  time) x seeds 0-2, as for NextItNet.
- `sweep=length`: model.dropout {0.2, 0.4} x train.num_epochs {10, 20} x seeds 0-1.
- `sweep=budget`: model.budget {5x, 10x, 20x, 40x}, the solver choosing cutoffs and ranks, seed 0.

The ablation ties nothing: its full/tree and blockwise/full rows cannot, and a tie in some rows
only would confound the comparison; `python run.py --config experiments/cprec.py:ml100k,tuned=false --sweep`
reproduces the ablation rows of docs/results.md.
"""
import ml_collections

from cprec.config import base_config, parse_arg
from cprec.errors import ConfigError
from cprec.model.sharing import SHARING_SCHEMES
from cprec.sweep import apply_overrides, product, seeds
from experiments.datasets import apply_dataset
from experiments.nextitnet import BATCH_256, BATCH_SIZES, DECOUPLED_DECAY, PLAIN_ADAM

# Cluster cutoffs per dataset (fractions of V, or absolute counts at 1M items): the head keeps the
# items that carry most of the traffic; more, smaller tail clusters pay off at large V.
CUTOFFS = {
    "synthetic": (0.1, 0.35),
    "ml100k": (0.2, 0.5),
    "ml1m": (0.2, 0.5),
    "ml20m": (0.05, 0.2, 0.5),
    "synthetic30k": (0.05, 0.2, 0.5),
    "synthetic1m": (20_000, 60_000, 150_000, 350_000, 600_000),
}

# Cutoff variants for sweep=clusters: fewer/more tail clusters and a smaller/larger head.
CUTOFF_SWEEP = {
    "synthetic": [(0.1,), (0.1, 0.35), (0.2, 0.5), (0.05, 0.2, 0.5)],
    "ml100k": [(0.2,), (0.1, 0.4), (0.2, 0.5), (0.1, 0.3, 0.6)],
    "ml1m": [(0.2,), (0.1, 0.4), (0.2, 0.5), (0.1, 0.3, 0.6)],
    "ml20m": [(0.05, 0.2), (0.05, 0.2, 0.5), (0.02, 0.1, 0.3, 0.6)],
    "synthetic30k": [(0.05, 0.2), (0.05, 0.2, 0.5), (0.02, 0.1, 0.3, 0.6)],
    "synthetic1m": [(20_000, 200_000), (20_000, 60_000, 150_000, 350_000, 600_000),
                    (10_000, 40_000, 100_000, 200_000, 350_000, 550_000, 800_000)],
}


# Settings chosen on validation NDCG@10 (never on test) by sweep=tuning, then sweep=decay, then
# sweep=batch and sweep=length (means over seeds); docs/results.md, "A strong baseline". The
# smaller model wants more updates than the baseline: 20 epochs of batch 64 (760 updates).
TUNED = {
    "ml100k": {"model.tie_embeddings": True, "model.tie_projections": True, "model.output_projection": True,
               "model.dropout": 0.4, "optim.lr": 3e-3, "optim.name": "adamw", "optim.weight_decay": 0.05,
               "optim.table_weight_decay": 0.05,
               "train.batch_size": 64, "train.num_epochs": 20, "train.eval_every": 50, "train.checkpoint_every": 100,
               "eval.topk_batches": ()},
}

TYING = [{"model.tie_embeddings": False, "model.tie_projections": False, "model.output_projection": False}] + [
    {"model.tie_embeddings": True, "model.tie_projections": tp, "model.output_projection": op}
    for tp in (False, True) for op in (False, True)]
UNTIED = {"model.tie_embeddings": False, "model.tie_projections": False}
BUDGETS = ("5x", "10x", "20x", "40x")  # sweep=budget

_ARGS = dict(data="synthetic", emb="blockwise", softmax="tree", share="cross_block", tie=False, tuned=True, budget="")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, **_ARGS)
    config = base_config()
    apply_dataset(config, a.data)
    m = config.model
    m.embedding, m.softmax, m.sharing = a.emb, a.softmax, a.share
    m.cutoffs = CUTOFFS[a.data]
    m.rank_decay = 4
    if a.tuned:
        apply_overrides(config, TUNED.get(a.data, {}))
    if a.tie:
        m.tie_embeddings = True
    if a.budget:  # the solver picks what the dataset's hand-set cutoffs and rank decay would
        m.budget, m.cutoffs, m.ranks = a.budget, (), ()
    if (m.embedding, m.softmax) != ("blockwise", "tree"):  # only these two layers have tables to share
        apply_overrides(config, UNTIED)
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """The CpRec ablation (default); `sweep=clusters`, `sweep=tuning` or `sweep=seeds` in the arg pick the others."""
    a = parse_arg(arg, **_ARGS, sweep="ablation")
    if a.sweep == "ablation":
        layers = {"model.embedding": ["full", "blockwise"], "model.softmax": ["full", "tree"]}
        return product(layers, {"model.sharing": list(SHARING_SCHEMES)}, [{"model.tie_embeddings": False}], seeds(3))
    if a.sweep == "clusters":
        return product({"model.cutoffs": CUTOFF_SWEEP[a.data], "model.rank_decay": [2, 4, 8]}, seeds(2))
    if a.sweep == "tuning":  # as run before the batch-64 preset (see BATCH_256)
        return product([{**BATCH_256, "train.num_epochs": 20, **PLAIN_ADAM}], TYING, {"model.dropout": [0.2, 0.4]})
    if a.sweep == "decay":
        return product([{**BATCH_256, "train.num_epochs": 18, "model.dropout": 0.4}], DECOUPLED_DECAY)
    if a.sweep == "seeds":
        return seeds(3)
    if a.sweep == "batch":
        return product(BATCH_SIZES, seeds(3))
    if a.sweep == "length":  # does the smaller model want less regularisation or more updates?
        return product({"model.dropout": [0.2, 0.4], "train.num_epochs": [10, 20]}, seeds(2))
    if a.sweep == "budget":  # the solver's choice at each size, instead of the dataset's hand-set clusters
        return product({"model.budget": list(BUDGETS)}, [{"model.cutoffs": (), "model.ranks": ()}])
    raise ConfigError(f"sweep={a.sweep!r} is unknown in experiments/cprec.py; valid: ablation, clusters, tuning, "
                      f"decay, seeds, batch, length, budget")
