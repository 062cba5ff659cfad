"""NextItNet baseline (Yuan et al., WSDM 2019), RecBole's defaults: d=64, dilations [1, 4] x 5, L=50.

  python run.py --config experiments/nextitnet.py --workdir runs/demo            # synthetic, < 3 min on 2 CPU cores
  python run.py --config experiments/nextitnet.py:ml100k --workdir runs/ml100k
  python run.py --config experiments/nextitnet.py:ml1m --workdir runs/ml1m
  python run.py --config experiments/nextitnet.py:ml20m --workdir runs/ml20m
  python run.py --config experiments/nextitnet.py:synthetic30k --workdir runs/synthetic30k

Arg: the dataset, one of synthetic (default), ml100k, ml1m, ml20m, synthetic30k, synthetic1m.

Sweep: optim.lr {3e-4, 1e-3, 3e-3} x model.dim {32, 64, 128}, 9 trials in runs/nextitnet-<arg>/:

  python run.py --config experiments/nextitnet.py:ml100k --sweep --launcher local
"""
import ml_collections

from cprec.config import base_config, parse_arg
from cprec.sweep import product
from experiments.datasets import apply_dataset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="synthetic")
    config = base_config()
    apply_dataset(config, a.data)
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """A small learning-rate x width grid around RecBole's defaults."""
    return product({"optim.lr": [3e-4, 1e-3, 3e-3], "model.dim": [32, 64, 128]})
