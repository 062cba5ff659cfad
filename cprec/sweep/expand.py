"""Sweeps: a config file's `sweep(arg)` expanded into trials, each with its own workdir.

A config file may define `sweep(arg)` next to `get_config(arg)`; it returns a list of
trials, each a dict of dotted overrides such as `{"model.sharing": "cross_block", "seed": 1}`.
`product`, `zip_` and `seeds` build such lists:

    def sweep(arg):
        return product({"model.embedding": ["full", "blockwise"]}, seeds(3))

`arg` is the whole text after ':'. A `sweep=<variant>` part of it is for `sweep` alone (it lets
one file hold several sweeps); `get_config` and the trials' own runs never see it.

Trial i of the sweep runs in `runs/<sweep_name>/<i>_<slug>`, where sweep_name comes from the
file and arg (`experiments/cprec.py:ml100k` -> `cprec-ml100k`) and the slug from the overrides.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from cprec.config import check_override_keys, validate_config
from cprec.errors import ConfigError

Overrides = dict[str, Any]
Factor = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]

SWEEP_KEY = "sweep"
MAX_SLUG = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


def product(*factors: Factor) -> list[Overrides]:
    """Cartesian product; a factor is a list of override dicts or `{key: [values, ...]}`.

    The last factor varies fastest, as in nested for-loops written in the same order.
    """
    lists = [_as_list(f) for f in factors]
    return [_merge(combo) for combo in itertools.product(*lists)]


def zip_(*factors: Factor) -> list[Overrides]:
    """Element-wise merge of equally long factors (a list of dicts or `{key: [values]}` each)."""
    lists = [_as_list(f, zipped=True) for f in factors]
    lengths = {len(x) for x in lists}
    if len(lengths) > 1:
        raise ConfigError(f"sweep zip_ needs equally long lists, got lengths {[len(x) for x in lists]}")
    return [_merge(combo) for combo in zip(*lists)]


def seeds(n: int, start: int = 0, key: str = "seed") -> list[Overrides]:
    """`n` trials differing only in `key`: [{"seed": start}, ..., {"seed": start + n - 1}]."""
    return [{key: s} for s in range(start, start + n)]


def _as_list(factor: Factor, zipped: bool = False) -> list[Overrides]:
    if isinstance(factor, Mapping):
        keys = list(factor)
        columns = [list(factor[k]) for k in keys]
        rows = zip(*columns) if zipped else itertools.product(*columns)
        if zipped and len({len(c) for c in columns}) > 1:
            raise ConfigError(f"sweep zip_ needs equally long value lists for {keys}")
        return [dict(zip(keys, row)) for row in rows]
    return [dict(d) for d in factor]


def _merge(parts: Sequence[Mapping[str, Any]]) -> Overrides:
    out: Overrides = {}
    for part in parts:
        for key, value in part.items():
            if key in out:
                raise ConfigError(f"sweep sets {key!r} twice in one trial; each key belongs to one factor")
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of a sweep: `python run.py --config <config> --workdir <workdir> --config.k=v ...`."""

    index: int
    overrides: Overrides  # what this trial sets, from the sweep
    slug: str
    workdir: pathlib.Path
    config: str  # 'file.py[:arg]' for run.py, without the 'sweep=' part
    shared: Overrides = dataclasses.field(default_factory=dict)  # command-line overrides for every trial

    @property
    def name(self) -> str:
        return self.workdir.name

    def args(self) -> list[str]:
        """run.py's arguments for this trial (the sweep's overrides come last)."""
        pairs = {**self.shared, **self.overrides}
        return [f"--config={self.config}", f"--workdir={self.workdir}",
                *(f"--config.{k}={format_value(v)}" for k, v in pairs.items())]

    def record(self) -> dict[str, Any]:
        """JSON-able description, stored in the sweep directory and read by summarize."""
        return {"index": self.index, "name": self.name, "slug": self.slug, "overrides": self.overrides,
                "config": self.config, "shared": self.shared, "args": self.args()}


def format_value(value: Any) -> str:
    """An override value as ml_collections' config_flags parses it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value) if isinstance(value, str) else repr(value)


def split_spec(spec: str) -> tuple[str, str, str]:
    """'file.py:a,sweep=b' -> (file, full arg, arg without the sweep= part)."""
    path, _, arg = spec.partition(":")
    config_arg = ",".join(p for p in arg.split(",") if p.partition("=")[0] != SWEEP_KEY)
    return path, arg, config_arg


def sweep_name(spec: str) -> str:
    """'experiments/cprec.py:ml100k,sweep=clusters' -> 'cprec-ml100k-clusters'."""
    path, arg, _ = split_spec(spec)
    parts = [pathlib.Path(path).stem]
    for part in filter(None, arg.split(",")):
        key, sep, value = part.partition("=")
        parts.append(value if sep and key == SWEEP_KEY else part)
    return _safe("-".join(parts))


def slug(overrides: Mapping[str, Any]) -> str:
    """Short filesystem-safe name: 'embedding=blockwise,seed=1' (leaf keys unless ambiguous)."""
    if not overrides:
        return "base"
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    names = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, overrides)]
    text = ",".join(f"{n}={_slug_value(v)}" for n, v in zip(names, overrides.values()))
    text = _safe(text)
    if len(text) > MAX_SLUG:  # keep names short and still distinct
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[:MAX_SLUG - 9]}-{digest}"
    return text


def _slug_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(_slug_value(v) for v in value) or "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, int) and value and value % 1000 == 0:
        return f"{value // 1000}k"  # 20000 -> 20k keeps cutoff lists readable
    if isinstance(value, str):
        return _UNSAFE.sub("-", value).strip("-") or "empty"  # '/data/x.csv' -> 'data-x.csv'
    return str(value)


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-.") or "sweep"


def load_sweep(spec: str) -> tuple[ml_collections.ConfigDict, list[Overrides]]:
    """Loads the config file of `spec` once; returns (get_config(arg), sweep(arg))."""
    path, arg, config_arg = split_spec(spec)
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"config file {path} not found; pass --config experiments/<name>.py[:arg]")
    module_spec = importlib.util.spec_from_file_location("_cprec_sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "sweep", None)):
        raise ConfigError(f"{path} defines no sweep(arg); add one returning a list of override dicts")
    config = module.get_config(config_arg) if config_arg else module.get_config()
    trials = module.sweep(arg or None)
    if not isinstance(trials, (list, tuple)) or not all(isinstance(t, Mapping) for t in trials):
        raise ConfigError(f"{path}: sweep({arg!r}) must return a list of dicts of dotted overrides")
    if not trials:
        raise ConfigError(f"{path}: sweep({arg!r}) returned no trials")
    return config, [dict(t) for t in trials]


def expand(
    config_spec: str,
    sweep_dir: str | pathlib.Path | None = None,
    shared: Mapping[str, Any] | None = None,
    runs_root: str | pathlib.Path = "runs",
) -> list[Trial]:
    """The trials of `config_spec`'s sweep, validated against its config.

    `shared` holds command-line overrides applied to every trial; a key the sweep also sets
    is refused, since it would make the trials differ in name only.
    """
    shared = dict(shared or {})
    base, rows = load_sweep(config_spec)
    path, _, config_arg = split_spec(config_spec)
    run_spec = f"{path}:{config_arg}" if config_arg else path
    root = pathlib.Path(sweep_dir) if sweep_dir else pathlib.Path(runs_root) / sweep_name(config_spec)
    check_override_keys(base, list(shared))
    apply_overrides(base, shared, "command line")
    width = len(str(len(rows) - 1))
    seen: dict[str, int] = {}
    trials = []
    for i, row in enumerate(rows):
        check_override_keys(base, list(row))
        clash = sorted(set(row) & set(shared))
        if clash:
            raise ConfigError(f"--config.{clash[0]} is set by the sweep itself (trial {i}); drop it from the command line")
        config = base.copy_and_resolve_references()
        apply_overrides(config, row, f"sweep trial {i}")
        try:
            validate_config(config)
        except ConfigError as exc:
            raise ConfigError(f"sweep trial {i} ({slug(row)}): {exc}") from None
        key = repr(sorted((k, format_value(v)) for k, v in row.items()))
        if key in seen:
            raise ConfigError(f"sweep trials {seen[key]} and {i} are identical ({slug(row)})")
        seen[key] = i
        name = f"{i:0{width}d}_{slug(row)}"
        trials.append(Trial(i, row, slug(row), root / name, run_spec, shared))
    return trials


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = "config") -> None:
    """Sets dotted keys (``{"optim.lr": 3e-3}``), so a value of the wrong type fails here (naming
    ``where``) rather than inside a job. Also what config files use for their tuned presets."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        try:
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except (TypeError, ValueError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{where}: config.{key}={value!r} has the wrong type ({detail})") from None


def shared_overrides(config: ml_collections.ConfigDict, keys: Sequence[str]) -> Overrides:
    """The values of command-line override `keys` as parsed into `config` (to pass on to every trial)."""
    out: Overrides = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def sweep_root(trials: Sequence[Trial]) -> pathlib.Path:
    """The directory holding every trial's workdir."""
    return trials[0].workdir.parent


def describe(trials: Sequence[Trial]) -> str:
    """One line per trial: index, workdir and overrides."""
    lines = [f"sweep of {len(trials)} trials in {sweep_root(trials)}/"]
    for t in trials:
        sets = " ".join(f"{k}={format_value(v)}" for k, v in t.overrides.items())
        lines.append(f"  {t.index:>3}  {t.workdir}  {sets}")
    return "\n".join(lines)
