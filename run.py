"""Trains and evaluates one experiment.

  python run.py --config experiments/nextitnet.py --workdir runs/demo
  python run.py --config experiments/nextitnet.py:ml100k --workdir runs/ml100k --config.model.dim=128

Sweeps (the config file's `sweep(arg)`; see cprec/sweep/), listed, launched, summarized:

  python run.py --config experiments/cprec.py:ml100k --sweep
  python run.py --config experiments/cprec.py:ml100k --sweep --launcher local --parallel 2
  python run.py --config experiments/cprec.py:ml100k --sweep --launcher slurm --slurm_gpus 1 --wait
  python run.py --summarize runs/cprec-ml100k

Every problem a user can fix (bad config, bad data, wrong workdir) ends with a
one-line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally with ':arg'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_SWEEP = flags.DEFINE_bool("sweep", False, "List the trials of the config file's sweep(arg); launch them with --launcher.")
_LAUNCHER = flags.DEFINE_enum("launcher", None, ["local", "slurm"], "Run the sweep's trials here or as a SLURM job array.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local launcher: trials running at once.")
_WAIT = flags.DEFINE_bool("wait", False, "slurm launcher: block until every trial ends and report each.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's trials (default runs/<file>-<arg>).")
_SLURM = {
    "partition": flags.DEFINE_string("slurm_partition", None, "SLURM partition (default: the cluster's)."),
    "gpus": flags.DEFINE_integer("slurm_gpus", None, "GPUs per trial."),
    "cpus": flags.DEFINE_integer("slurm_cpus", None, "CPUs per trial."),
    "mem_gb": flags.DEFINE_float("slurm_mem_gb", None, "Memory per trial in GB."),
    "time_min": flags.DEFINE_integer("slurm_time_min", None, "Time limit per job in minutes (then requeued; default 240)."),
    "array_parallelism": flags.DEFINE_integer("slurm_array_parallelism", None, "Trials running at once."),
}
_SUMMARIZE = flags.DEFINE_string("summarize", None, "Print a sweep directory's table of trials, write its summary.csv.")


def _override_keys(argv: list[str]) -> list[str]:
    return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _config_spec(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _set_config_spec(argv: list[str], spec: str) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = f"--config={spec}"
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = spec
    return out


def main(argv: list[str]) -> int:
    from cprec.config import check_override_keys, load_config_file
    from cprec.errors import CprecError, exit_on_user_error
    from cprec.sweep.expand import split_spec

    with exit_on_user_error():
        spec = _config_spec(argv)
        if spec is None and not any(a.split("=")[0] == "--summarize" for a in argv):
            raise CprecError("--config is required, e.g. --config experiments/nextitnet.py")
        if spec is not None:
            path, arg, config_arg = split_spec(spec)
            if arg != config_arg:  # a 'sweep=<variant>' part is for sweep(arg) only; get_config never sees it
                argv = _set_config_spec(argv, f"{path}:{config_arg}" if config_arg else path)
            # config_flags answers an unknown key with a traceback; check the keys first for a one-line error.
            check_override_keys(load_config_file(_config_spec(argv)), _override_keys(argv))
        try:
            flags.FLAGS(argv)
        except flags.Error as exc:
            raise CprecError(str(exc).splitlines()[0]) from None
        if _SUMMARIZE.value:
            from cprec.sweep.summarize import summarize

            summarize(_SUMMARIZE.value)
            return 0
        if _SWEEP.value or _LAUNCHER.value:
            return _sweep(spec, argv)
        if spec != _config_spec(argv):
            raise CprecError(f"--config={spec} names a sweep variant; add --sweep to list or launch it")
        if not _WORKDIR.value:
            raise CprecError("--workdir is required, e.g. --workdir runs/demo")
        from cprec.train import train_and_evaluate

        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    return 0


def _sweep(spec: str, argv: list[str]) -> int:
    from cprec.sweep import expand as sweep, launch
    from cprec.errors import CprecError

    if not _SWEEP.value:
        raise CprecError(f"--launcher={_LAUNCHER.value} launches a sweep; add --sweep")
    if _WORKDIR.value:
        raise CprecError("--workdir is for a single run; a sweep's trials go under --sweep_dir (default runs/<name>)")
    keys = list(dict.fromkeys(_override_keys(argv)))
    trials = sweep.expand(spec, _SWEEP_DIR.value, sweep.shared_overrides(_CONFIG.value, keys))
    print(sweep.describe(trials), flush=True)
    if _LAUNCHER.value == "local":
        return 1 if launch.launch_local(trials, spec, _PARALLEL.value) else 0
    if _LAUNCHER.value == "slurm":
        options = launch.SlurmOptions.merge(_CONFIG.value.get("slurm"), **{k: f.value for k, f in _SLURM.items()})
        return 1 if launch.launch_slurm(trials, spec, options, wait=_WAIT.value) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
