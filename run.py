"""Trains and evaluates one experiment.

  python run.py --config experiments/nextitnet.py --workdir runs/demo
  python run.py --config experiments/nextitnet.py:ml100k --workdir runs/ml100k --config.model.dim=128

Every problem a user can fix (bad config, bad data, wrong workdir) ends with a
one-line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally with ':arg'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")


def _override_keys(argv: list[str]) -> list[str]:
    return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _config_spec(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: list[str]) -> int:
    from cprec.config import check_override_keys, load_config_file
    from cprec.errors import CprecError

    try:
        spec = _config_spec(argv)
        if spec is None:
            raise CprecError("--config is required, e.g. --config experiments/nextitnet.py")
        # config_flags answers an unknown key with a traceback; check the keys first for a one-line error.
        check_override_keys(load_config_file(spec), _override_keys(argv))
        try:
            flags.FLAGS(argv)
        except flags.Error as exc:
            raise CprecError(str(exc).splitlines()[0]) from None
        if not _WORKDIR.value:
            raise CprecError("--workdir is required, e.g. --workdir runs/demo")
        from cprec.train import train_and_evaluate

        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except CprecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
