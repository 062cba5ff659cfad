"""NextItNet baseline (Yuan et al., WSDM 2019), RecBole's defaults: d=64, dilations [1, 4] x 5, L=50.

  python run.py --config experiments/nextitnet.py --workdir runs/demo            # synthetic, < 3 min on 2 CPU cores
  python run.py --config experiments/nextitnet.py:ml100k --workdir runs/ml100k
  python run.py --config experiments/nextitnet.py:ml1m --workdir runs/ml1m
  python run.py --config experiments/nextitnet.py:ml20m --workdir runs/ml20m

Arg: the dataset, one of synthetic (default), ml100k, ml1m, ml20m.
"""
import ml_collections

from cprec.config import base_config, parse_arg
from experiments.datasets import apply_dataset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="synthetic")
    config = base_config()
    apply_dataset(config, a.data)
    return config
