"""Compression methods under one protocol: CpRec against its rivals at equal parameter budgets.

  python run.py --config experiments/rivals.py:synthetic30k,method=lowrank,budget=20x --workdir runs/r30k-lowrank-20x
  python run.py --config experiments/rivals.py:synthetic30k,method=nextitnet --workdir runs/r30k-nextitnet
  python run.py --config experiments/rivals.py:synthetic30k --sweep --launcher local --sweep_dir runs/rivals-synthetic30k
  python -m cprec.report add runs/rivals-synthetic30k --table rivals-synthetic30k

Arg: comma-separated; a bare word picks the dataset (synthetic, ml100k, synthetic30k, synthetic1m),
method=cprec|mde|lowrank|hash|qr|tt|jpq|prune|nextitnet (default cprec), budget=20x (default; or a parameter count),
backbone=nextitnet|sasrec (the encoder every method shares; SASRec with RecBole's settings,
experiments/sasrec.py; method=nextitnet is then the uncompressed SASRec).

The protocol (docs/rivals.md): every compressed method has the same residual stack (CpRec's
cross-block sharing), the same tied output (``logits = (W h + b) E^T`` over the method's own item
table; CpRec's tree softmax over its tied tables and projections), the same data, schedule,
evaluation and seeds, and budgets are ratios of one reference, the plain NextItNet (untied, no
sharing: ``model.budget_baseline=untied``), which is also the uncompressed baseline
(``method=nextitnet``). At 1M items every method with a full output table trains with the
sampled softmax (the baseline with lazy Adam); CpRec keeps its tree softmax.

Sweeps (`--sweep`, with `--launcher local|slurm`):
- `sweep=grid` (the default): every method x the dataset's budgets (BUDGETS) x the learning rates
  (LRS, the same grid for every method: equal tuning effort), seed 0; the baseline x LRS.
- the same protocol in three steps, for a machine without a cluster (half the runs of `grid`):
  `sweep=tune`: every method and the baseline at SEED_BUDGET x LRS, seed 0; then, with the
  learning rates it chose on validation NDCG@10 written into CHOSEN_LR,
  `sweep=budgets`: every method at the other budgets at its chosen rate, seed 0; and
- `sweep=seeds`: every method at SEED_BUDGET (ml-100k: at every budget, SEEDED_BUDGETS) with its
  chosen learning rate (CHOSEN_LR), seeds 1-2 (seed 0 is the grid's).
- `sweep=chosen`: every method and the baseline at each of the dataset's budgets with its chosen
  rate, seed 0: the synthetic1m rows (`experiments/rivals.py:synthetic1m,sweep=chosen`), where the
  rates come from synthetic30k.
`python -m cprec.report rivals` records every finished trial in results/trials/ and picks each
(method, budget)'s rate on validation, so trials of all these sweeps, run on any machine, add up.
"""
import ml_collections

from cprec.config import base_config, parse_arg
from cprec.errors import ConfigError
from cprec.sweep import apply_overrides, product, seeds
from experiments.cprec import TUNED as CPREC_TUNED
from experiments.datasets import apply_dataset
from experiments.nextitnet import SAMPLED_BY_DEFAULT  # where full output tables train sampled

METHODS = ("cprec", "mde", "lowrank", "hash", "qr")
# Added later (rivals part 2); their trials come after the first ones so earlier trial names stay.
LATER_METHODS = ("tt", "jpq", "prune")
BASELINE = "nextitnet"
BUDGETS = {"synthetic": ("5x", "10x"), "ml100k": ("5x", "10x"), "synthetic30k": ("5x", "10x", "20x", "40x"),
           "synthetic1m": ("20x",)}
SEED_BUDGET = {"synthetic": "10x", "ml100k": "10x", "synthetic30k": "20x"}  # where sweep=tune tunes
# Where sweep=seeds adds seeds 1-2 (default: SEED_BUDGET): every budget where runs are short.
SEEDED_BUDGETS = {"ml100k": ("5x", "10x")}
LRS = (1e-3, 3e-3)
# Learning rates chosen on validation NDCG@10 by sweep=grid at SEED_BUDGET (never on test), or per
# budget ({budget: lr}) where the grid chose differently; a method missing here trains at the
# dataset's default.
# synthetic30k (docs/rivals.md): every method and the baseline chose 3e-3, the grid's upper end.
# ml100k: every method 3e-3 at 5x and 10x (RecJPQ cannot reach 10x there) but MDE at 10x (1e-3).
CHOSEN_LR: dict[str, dict[str, float | dict[str, float]]] = {
    "synthetic30k": {m: 3e-3 for m in (*METHODS, *LATER_METHODS, BASELINE)},
    "ml100k": {**{m: 3e-3 for m in (*METHODS, *LATER_METHODS, BASELINE)}, "mde": {"5x": 3e-3, "10x": 1e-3}},
}
# At 1M items a run takes a core for most of an hour, so the rates are not tuned there again: each
# method gets the one synthetic30k chose for it (the same generator, 33x the items; equal effort).
CHOSEN_LR["synthetic1m"] = dict(CHOSEN_LR["synthetic30k"])


def chosen_lr(data: str, method: str, budget: str | None) -> float | None:
    """The rate CHOSEN_LR gives ``method`` at ``budget`` on ``data``; None where it gives none."""
    lr = CHOSEN_LR.get(data, {}).get(method)
    return lr.get(budget) if isinstance(lr, dict) else lr


# What every compressed method shares (the baseline undoes it).
COMMON = {"model.sharing": "cross_block", "model.tie_embeddings": True, "model.tie_projections": True,
          "model.output_projection": True, "model.budget_baseline": "untied"}
# Training settings per dataset for every method: ml-100k's are CpRec's tuned preset's (they are
# the settings of the smaller model; the baseline's own tuned preset is in experiments/nextitnet.py).
TRAINING = {"ml100k": {k: v for k, v in CPREC_TUNED["ml100k"].items() if k.split(".")[0] in ("optim", "train", "eval")
                       or k == "model.dropout"}}


def method_overrides(method: str, data: str) -> dict:
    """The config keys that make ``method`` on top of the protocol's common settings."""
    full = "sampled" if data in SAMPLED_BY_DEFAULT else "full"
    if method == BASELINE:
        out = {"model.embedding": "full", "model.softmax": full, "model.sharing": "none",
               "model.tie_embeddings": False, "model.output_projection": False, "model.budget": ""}
        return {**out, "optim.sparse_tables": True} if full == "sampled" else out
    if method == "cprec":
        return {"model.embedding": "blockwise", "model.softmax": "tree"}
    if method in METHODS + LATER_METHODS:
        return {"model.embedding": method, "model.softmax": full}
    raise ConfigError(f"method={method!r} is unknown in experiments/rivals.py; valid: "
                      f"{', '.join(METHODS + LATER_METHODS + (BASELINE,))}")


# The SASRec encoder (experiments/sasrec.py's RecBole settings), for backbone=sasrec.
SASREC = {"model.backbone": "sasrec", "model.num_blocks": 2, "model.num_heads": 2, "model.inner_dim": 256,
          "model.dropout": 0.5, "model.attn_dropout": 0.5}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="synthetic30k", method="cprec", budget="20x", backbone="nextitnet")
    config = base_config()
    apply_dataset(config, a.data)
    if a.backbone not in ("nextitnet", "sasrec"):
        raise ConfigError(f"backbone={a.backbone!r} is unknown in experiments/rivals.py; valid: nextitnet, sasrec")
    if a.backbone == "sasrec":
        apply_overrides(config, SASREC)
    apply_overrides(config, {**TRAINING.get(a.data, {}), **COMMON, "model.budget": a.budget})
    apply_overrides(config, method_overrides(a.method, a.data))
    lr = chosen_lr(a.data, a.method, a.budget)
    if lr is not None:
        config.optim.lr = lr
    return config


def sweep(arg: str | None = None) -> list[dict]:
    a = parse_arg(arg, data="synthetic30k", method="cprec", budget="20x", backbone="nextitnet", sweep="grid")
    if a.data not in BUDGETS:
        raise ConfigError(f"experiments/rivals.py has no budgets for {a.data!r}; valid: {', '.join(BUDGETS)}")
    if a.sweep == "grid":
        budgets = {"model.budget": list(BUDGETS[a.data])}
        compressed = product([method_overrides(m, a.data) for m in METHODS], budgets)
        later = product([method_overrides(m, a.data) for m in LATER_METHODS], budgets, {"optim.lr": list(LRS)})
        return product(compressed + [method_overrides(BASELINE, a.data)], {"optim.lr": list(LRS)}) + later
    def at(m: str, budget: str | None = None) -> dict:  # a method at a budget (the baseline: at none), at its rate
        lr = chosen_lr(a.data, m, budget)
        return {**method_overrides(m, a.data), **({"model.budget": budget} if budget else {}),
                **({"optim.lr": lr} if lr is not None else {})}

    methods = METHODS + LATER_METHODS
    if a.sweep == "chosen":
        return [at(m, b) for b in BUDGETS[a.data] for m in methods] + [at(BASELINE)]
    if a.sweep in ("tune", "budgets", "seeds") and a.data not in SEED_BUDGET:
        raise ConfigError(f"sweep={a.sweep} has no budget for {a.data!r}; valid: {', '.join(SEED_BUDGET)}")
    if a.sweep == "tune":
        tuned = product([method_overrides(m, a.data) for m in methods], {"model.budget": [SEED_BUDGET[a.data]]})
        return product(tuned + [method_overrides(BASELINE, a.data)], {"optim.lr": list(LRS)})
    if a.sweep == "budgets":
        others = [b for b in BUDGETS[a.data] if b != SEED_BUDGET[a.data]]
        return [at(m, b) for m in methods for b in others]
    if a.sweep == "seeds":
        seeded = SEEDED_BUDGETS.get(a.data, (SEED_BUDGET[a.data],))
        runs = [at(m, b) for b in seeded for m in methods]
        return product(runs + [at(BASELINE)], seeds(2, start=1))
    raise ConfigError(f"sweep={a.sweep!r} is unknown in experiments/rivals.py; valid: grid, tune, budgets, seeds, chosen")
