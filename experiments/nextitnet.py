"""NextItNet baseline (Yuan et al., WSDM 2019), RecBole's defaults: d=64, dilations [1, 4] x 5, L=50.

  python run.py --config experiments/nextitnet.py --workdir runs/demo            # synthetic, no download
  python run.py --config experiments/nextitnet.py:ml100k --workdir runs/ml100k
  python run.py --config experiments/nextitnet.py:ml1m --workdir runs/ml1m
  python run.py --config experiments/nextitnet.py:ml20m --workdir runs/ml20m
  python run.py --config experiments/nextitnet.py:synthetic30k --workdir runs/synthetic30k

Arg: comma-separated; a bare word picks the dataset, one of synthetic (default), ml100k, ml1m, ml20m,
synthetic30k, synthetic1m. `tuned=false` drops a dataset's tuned settings (TUNED) for the plain,
untied NextItNet on the dataset's default schedule (the untied rows of docs/results.md).

Sweeps (`--sweep`; add `--launcher local|slurm` to run them, see cprec/sweep/), in runs/nextitnet-<arg>/:

  python run.py --config experiments/nextitnet.py:ml100k --sweep --launcher local              # sweep=tuning, 18
  python run.py --config experiments/nextitnet.py:ml100k,sweep=decay --sweep --launcher local  # 6
  python run.py --config experiments/nextitnet.py:ml100k,sweep=seeds --sweep --launcher local  # 3

- `sweep=tuning` (the default): tying of the output layer {untied, tied, tied + output projection}
  x model.dropout {0, 0.2, 0.4} x optim.lr {1e-3, 3e-3}, seed 0.
- `sweep=decay`: the tuned preset x weight decay: L2 (Adam) on the dense weights and/or the item
  tables at 1e-4, and decoupled (AdamW) at 0.05 and 0.2.
- `sweep=schedule`: the tuned preset with a cosine learning-rate decay (20 warm-up steps) at lr
  3e-3 and 5e-3.
- `sweep=seeds`: the preset, seeds 0-2 (mean and spread with `--summarize`).
- `sweep=width`: optim.lr {3e-4, 1e-3, 3e-3} x model.dim {32, 64, 128}.
- `sweep=batch`: train.batch_size {64, 128, 256} at the epochs that take about the same wall
  time (10, 12, 18) x seeds 0-2, the rest as the preset.
"""
import ml_collections

from cprec.config import base_config, parse_arg
from cprec.errors import ConfigError
from cprec.sweep import apply_overrides, product, seeds, zip_
from experiments.datasets import apply_dataset

# Settings chosen on validation NDCG@10 (never on test) by sweep=tuning, then sweep=decay, then
# sweep=batch (mean of 3 seeds); docs/results.md, "A strong baseline", has the trials. Logits =
# (W h + b) E^T, as in RecBole's NextItNet. Batches of 64 windows (10 epochs, 380 updates) beat 256
# (18 epochs, 180 updates) in about the same wall time; the preset stops at 8 epochs, where two of
# the three seeds' best validation steps lie, so that a run stays short on a CPU. It also
# skips the serving latency timing (eval.topk_batches = ()): at 1,350 items it says nothing.
TUNED = {
    "ml100k": {"model.tie_embeddings": True, "model.output_projection": True, "model.dropout": 0.2,
               "optim.lr": 3e-3, "optim.name": "adamw", "optim.weight_decay": 0.2, "optim.table_weight_decay": 0.2,
               "train.batch_size": 64, "train.num_epochs": 8, "train.eval_every": 50, "train.checkpoint_every": 100,
               "eval.topk_batches": ()},
}

# sweep=batch: batch sizes at the epochs that take about the same wall time here, 3 seeds each.
BATCH_SIZES = zip_({"train.batch_size": [64, 128, 256], "train.num_epochs": [10, 12, 18],
                    "train.eval_every": [50, 25, 25]})

# What the earlier ml100k sweeps (tuning, decay, schedule) ran with, pinned so that their tables
# in docs/results.md stay reproducible as the preset moves on: batches of 256, and Adam without
# decay for the tuning grids, which came before weight decay was chosen.
BATCH_256 = {"train.batch_size": 256, "train.eval_every": 25}
PLAIN_ADAM = {"optim.name": "adam", "optim.weight_decay": 0.0, "optim.table_weight_decay": 0.0}

# sweep=sampled: numbers of shared negatives per step, a few per cent to a fifth of the catalogue.
NEGATIVES = {"ml100k": (64, 256), "synthetic30k": (256, 1024, 4096)}

# AdamW at two rates, the same for the dense weights and the item tables.
DECOUPLED_DECAY = [{"optim.name": "adamw", "optim.weight_decay": wd, "optim.table_weight_decay": wd} for wd in (0.05, 0.2)]

TYING = [
    {"model.tie_embeddings": False, "model.output_projection": False},
    {"model.tie_embeddings": True, "model.output_projection": False},
    {"model.tie_embeddings": True, "model.output_projection": True},
]


# At a million items a full softmax costs 384 MFLOP per target token (hours per epoch on a CPU):
# the baseline there trains with the sampled softmax (cprec/model/sampled_softmax.py), and evaluates,
# exports and serves as the full-softmax model it is. `softmax=full` asks for the real thing.
SAMPLED_BY_DEFAULT = ("synthetic1m",)
# Negatives per step of `softmax=sampled`, chosen on validation NDCG@10 by sweep=sampled (3 seeds,
# docs/results.md#the-sampled-softmax-against-the-full-softmax); unigram won at every count. Elsewhere
# (1M items: untuned) the config's default, 1,024 unigram negatives.
SAMPLED_NEGATIVES = {"ml100k": 256, "synthetic30k": 4096}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="synthetic", tuned=True, softmax="")
    config = base_config()
    apply_dataset(config, a.data)
    if a.tuned:
        apply_overrides(config, TUNED.get(a.data, {}))
    softmax = a.softmax or ("sampled" if a.data in SAMPLED_BY_DEFAULT else "full")
    if softmax not in ("full", "sampled"):
        raise ConfigError(f"config argument softmax={softmax!r} is invalid in experiments/nextitnet.py; "
                          "valid: full, sampled")
    config.model.softmax = softmax
    if softmax == "sampled":
        config.model.num_negatives = SAMPLED_NEGATIVES.get(a.data, config.model.num_negatives)
        if a.data in SAMPLED_BY_DEFAULT:
            # Lazy Adam for the 1M-row tables: 1.7x faster steps, measured by python -m cprec.bench.optimizer.
            config.optim.sparse_tables = True
    return config


def sweep(arg: str | None = None) -> list[dict]:
    a = parse_arg(arg, data="synthetic", tuned=True, softmax="", sweep="tuning")
    if a.sweep == "tuning":
        return product([{**BATCH_256, "train.num_epochs": 20, **PLAIN_ADAM}], TYING,
                       {"model.dropout": [0.0, 0.2, 0.4], "optim.lr": [1e-3, 3e-3]})
    if a.sweep == "decay":
        l2 = product({"optim.name": ["adam"], "optim.weight_decay": [0.0, 1e-4], "optim.table_weight_decay": [0.0, 1e-4]})
        return product([{**BATCH_256, "train.num_epochs": 20}], l2 + DECOUPLED_DECAY)
    if a.sweep == "schedule":
        return product([{**BATCH_256, "train.num_epochs": 18}],
                       {"optim.schedule": ["cosine"], "optim.warmup_steps": [20], "optim.lr": [3e-3, 5e-3]})
    if a.sweep == "seeds":
        return seeds(3)
    if a.sweep == "batch":
        return product(BATCH_SIZES, seeds(3))
    if a.sweep == "sampled":  # the sampled softmax's settings against the full softmax (the preset, sweep=seeds)
        return product({"model.softmax": ["sampled"], "model.sampler": ["uniform", "unigram"],
                        "model.num_negatives": list(NEGATIVES.get(a.data, (256, 1024)))}, seeds(3))
    if a.sweep == "width":
        return product({"optim.lr": [3e-4, 1e-3, 3e-3], "model.dim": [32, 64, 128]})
    raise ConfigError(f"sweep={a.sweep!r} is unknown in experiments/nextitnet.py; valid: tuning, decay, schedule, "
                      "seeds, sampled, width, batch")
