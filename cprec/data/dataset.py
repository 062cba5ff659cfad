"""`SequenceDataset` and `load_dataset(config.data)`: raw file or generator -> cached arrays."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import shlex
import time

import ml_collections
import numpy as np

from cprec.data import preprocess, readers, store
from cprec.data.synthetic import generate_synthetic
from cprec.errors import ConfigError, DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMES = ("synthetic", "ml-100k", "ml-1m", "ml-20m", "ml-latest", "recbole", "csv")
SYNTHETIC_FIELDS = ("num_users", "num_items", "mean_len", "num_topics", "zipf_a", "follow_prob", "seed")

# Default raw files per dataset, repo-root relative, tried in order.
DEFAULT_PATHS = {
    "ml-100k": ("data/raw/ml-100k/u.data",),
    "ml-1m": ("data/raw/ml-1m/ratings.dat",),
    "ml-20m": ("data/raw/ml-20m/ratings.csv",),
    "ml-latest": ("data/raw/ml-latest/ratings.csv",),
}
_NAME_FORMAT = {"ml-1m": "movielens-dat", "ml-20m": "movielens-csv", "ml-latest": "movielens-csv"}


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for `config.data`; `name` picks the dataset, `path`/`format` override its file."""
    c = ml_collections.ConfigDict()
    c.name = "synthetic"  # synthetic | ml-100k | ml-1m | ml-20m | ml-latest | recbole | csv
    c.path = ""  # '' = the name's default file (see cprec/data/dataset.py DEFAULT_PATHS)
    c.format = ""  # '' = infer | movielens-100k | movielens-dat | movielens-csv | recbole | csv
    c.sep = ","  # csv only
    c.user_col = "user_id"  # csv/recbole column names
    c.item_col = "item_id"
    c.time_col = "timestamp"  # '' = file order
    c.max_len = 50  # L: training windows hold L+1 items
    # 'leave_one_out' (each user's last event is test, the one before validation) or 'temporal':
    # global time cut-offs, the latest valid_fraction + test_fraction of the events held out (see
    # cprec/data/preprocess.py); the fractions apply to the temporal split only.
    c.split = "leave_one_out"
    c.valid_fraction = 0.1
    c.test_fraction = 0.1
    c.min_user_count = 5  # k-core thresholds, iterated until stable; 0 disables
    c.min_item_count = 5
    c.cache_dir = ""  # '' = <repo>/data/prepared
    # Synthetic generator (cprec/data/synthetic.py).
    c.num_users = 2000
    c.num_items = 3000  # catalog size excluding padding; all ids stay in V when min_item_count=0
    c.mean_len = 40
    c.num_topics = 50
    c.zipf_a = 1.1
    c.follow_prob = 0.6
    c.seed = 0
    return c


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
    """Prepared next-item data; arrays are memory-mapped from the cache, item ids by frequency.

    Training windows are left-padded: a model reads `train[:, :-1]` and predicts
    `train[:, 1:]`; a position counts only where its input is not padding, so each item
    except a user's first is a target exactly once.
    """

    train: np.ndarray  # [N, L+1] int32
    val_inputs: np.ndarray  # [U_val, L] int32 (U_val = U_test = every user under leave-one-out)
    val_targets: np.ndarray  # [U_val] int32
    test_inputs: np.ndarray  # [U_test, L] int32 (history includes the validation item)
    test_targets: np.ndarray  # [U_test] int32
    item_counts: np.ndarray  # [V] int64 training counts, id 0 = padding, non-increasing from id 1
    meta: dict

    @property
    def num_items(self) -> int:
        """V, including the padding id 0."""
        return int(self.item_counts.shape[0])

    @property
    def max_len(self) -> int:
        """L, the length of an input sequence."""
        return int(self.val_inputs.shape[1])


def load_dataset(
    data_cfg: ml_collections.ConfigDict,
    cache_root: str | pathlib.Path | None = None,
    verbose: bool = True,
) -> SequenceDataset:
    """Prepares `data_cfg`'s dataset into the cache if needed, then memory-maps it."""
    directory = prepare(data_cfg, cache_root, verbose)
    arrays, meta = store.load(directory)
    meta["cache_dir"] = str(directory)
    return SequenceDataset(
        train=arrays["train"],
        val_inputs=arrays["val_inputs"],
        val_targets=arrays["val_targets"],
        test_inputs=arrays["test_inputs"],
        test_targets=arrays["test_targets"],
        item_counts=arrays["item_counts"],
        meta=meta,
    )


def load_sequences(dataset: SequenceDataset) -> tuple[np.ndarray, np.ndarray]:
    """(items [E] int32, offsets [U+1] int64): every user's full re-indexed sequence, CSR."""
    arrays, _ = store.load(pathlib.Path(dataset.meta["cache_dir"]))
    return arrays["seq_items"], arrays["seq_offsets"]


def split_histories(dataset: SequenceDataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) per row of ``split`` ('val' or 'test'): its history is ``seq_items[start:end]`` of
    ``load_sequences`` and its target ``seq_items[end]``, whatever the split rule."""
    arrays, _ = store.load(pathlib.Path(dataset.meta["cache_dir"]))
    offsets = np.asarray(arrays["seq_offsets"])
    key = f"{split}_positions"
    if key in arrays:
        ends = np.asarray(arrays[key])
    else:  # a leave-one-out cache prepared before the positions were kept: targets are the last events
        ends = offsets[1:] - (1 if split == "test" else 2)
    return offsets[np.searchsorted(offsets, ends, side="right") - 1], ends


def _cache_fields(data_cfg: ml_collections.ConfigDict, cache_root) -> tuple[pathlib.Path, dict, dict]:
    """(cache directory, source identity, key fields) of `data_cfg`; needs its raw file, not the cache."""
    _validate(data_cfg)
    source = resolve_source(data_cfg)
    fields = {
        "source": source,
        "max_len": int(data_cfg.max_len),
        "min_user_count": int(data_cfg.min_user_count),
        "min_item_count": int(data_cfg.min_item_count),
    }
    if data_cfg.split != "leave_one_out":  # leave-one-out caches keep the keys they had before splits existed
        fields.update(split=data_cfg.split, valid_fraction=float(data_cfg.valid_fraction),
                      test_fraction=float(data_cfg.test_fraction))
    root = pathlib.Path(cache_root or data_cfg.cache_dir or REPO_ROOT / "data" / "prepared")
    return store.cache_path(root, data_cfg.name, store.cache_key(fields)), source, fields


def cache_directory(data_cfg: ml_collections.ConfigDict, cache_root: str | pathlib.Path | None = None) -> pathlib.Path:
    """Where `data_cfg`'s prepared arrays are, or would be, cached; prepares nothing.

    `store.is_complete` of it says whether `load_dataset` would reuse the cache or prepare anew.
    A missing raw file is a DataError (the cache key depends on the file's identity).
    """
    return _cache_fields(data_cfg, cache_root)[0]


def prepare_command(data_cfg: ml_collections.ConfigDict) -> str:
    """The `python data/prepare.py ...` command that prepares `data_cfg`'s cache (non-default options only)."""
    words = ["python", "data/prepare.py", data_cfg.name]
    for key, default in default_data_config().items():
        if key != "name" and key in data_cfg and data_cfg[key] != default:
            words += ["--" + key.replace("_", "-"), shlex.quote(str(data_cfg[key]))]
    return " ".join(words)


def item_raw_ids(dataset: SequenceDataset) -> list:
    """The item id of the data file for every internal id: index 0 (padding) is None.

    Integer ids (MovieLens, synthetic data, token columns that are all plain integers) are ints;
    other tokens are the file's strings. A cache prepared before the tokens were kept is a
    DataError that says how to prepare it again.
    """
    directory = pathlib.Path(dataset.meta["cache_dir"])
    kind = dataset.meta.get("item_ids")
    if kind not in ("integers", "tokens"):
        raise DataError(
            f"data cache {directory} was prepared by an older cprec and lacks the item ids of the data file; "
            f"delete that directory and prepare it again ({_prepare_hint(dataset.meta, directory)})"
        )
    arrays, _ = store.load(directory)
    raw = np.asarray(arrays["raw_item_ids"])[1:].tolist()
    if kind == "integers":
        return [None] + raw
    try:
        tokens = preprocess.decode_tokens(arrays["item_token_data"], arrays["item_token_offsets"])
        return [None] + [tokens[code] for code in raw]
    except (KeyError, IndexError, UnicodeDecodeError) as e:
        raise DataError(
            f"data cache {directory} has damaged item tokens ({type(e).__name__}); delete that directory and "
            f"prepare it again ({_prepare_hint(dataset.meta, directory)})"
        ) from None


def _prepare_hint(meta: dict, directory: pathlib.Path) -> str:
    """`python data/prepare.py ...` for the dataset of a cache's meta, or a generic hint."""
    try:
        cfg = default_data_config()
        cfg.name = meta["name"]
        source, config = meta["config"]["source"], meta["config"]
        if cfg.name == "synthetic":
            for key in SYNTHETIC_FIELDS:
                cfg[key] = source[key]
        else:
            cfg.path, cfg.format = source["path"], source["format"]
            for key in ("user_col", "item_col", "time_col", "sep"):
                if key in source:
                    cfg[key] = source[key]
        for key in ("max_len", "min_user_count", "min_item_count", "split", "valid_fraction", "test_fraction"):
            if key in config:  # the split's keys: temporal caches only
                cfg[key] = config[key]
        if directory.parent.resolve() != (REPO_ROOT / "data" / "prepared").resolve():
            cfg.cache_dir = str(directory.parent)
        return f"`{prepare_command(cfg)}`, or rerun the run's command"
    except (KeyError, TypeError, ValueError, AttributeError):
        return "`python data/prepare.py` with the run's data options, or rerun the run's command"


def prepare(
    data_cfg: ml_collections.ConfigDict,
    cache_root: str | pathlib.Path | None = None,
    verbose: bool = True,
) -> pathlib.Path:
    """Returns the cache directory of `data_cfg`, building it unless it already exists."""
    log = _logger(verbose)
    directory, source, fields = _cache_fields(data_cfg, cache_root)
    if store.is_complete(directory):
        log(f"reusing cache {directory}")
        return directory
    start = time.perf_counter()
    log(f"preparing {data_cfg.name} into {directory}")
    arrays, stats = _build(data_cfg, source, log)
    meta = {
        "item_ids": "tokens" if "item_token_offsets" in arrays else "integers",  # see item_raw_ids
        "name": data_cfg.name,
        "source": source.get("path", "synthetic"),
        "format": source.get("format", "synthetic"),
        "config": fields,
        "max_len": int(data_cfg.max_len),
        "min_user_count": int(data_cfg.min_user_count),
        "min_item_count": int(data_cfg.min_item_count),
        "valid_fraction": float(data_cfg.valid_fraction),
        "test_fraction": float(data_cfg.test_fraction),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **stats,
    }
    store.save(directory, arrays, meta)
    log(f"prepared {directory} in {time.perf_counter() - start:.1f}s")
    return directory


def resolve_source(data_cfg: ml_collections.ConfigDict) -> dict:
    """The json-able identity of the raw data: file (path, size, mtime, format) or generator params."""
    if data_cfg.name == "synthetic":
        return {"generator": "synthetic", **{k: data_cfg[k] for k in SYNTHETIC_FIELDS}}
    path = find_raw_file(data_cfg)
    fmt = data_cfg.format or infer_format(data_cfg.name, path)
    source = {**store.file_identity(path), "format": fmt}
    if fmt in ("csv", "recbole"):
        source.update(user_col=data_cfg.user_col, item_col=data_cfg.item_col, time_col=data_cfg.time_col)
    if fmt == "csv":
        source["sep"] = data_cfg.sep
    return source


def find_raw_file(data_cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """The configured path (cwd-relative), else the name's first existing default file."""
    if data_cfg.path:
        path = pathlib.Path(data_cfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"data file {path} not found; check data.path")
        return path
    candidates = [REPO_ROOT / p for p in DEFAULT_PATHS[data_cfg.name]] + data_path_files(data_cfg.name)
    for path in candidates:
        if path.is_file():
            return path
    also = "".join(f" (nor {_show(p)})" for p in candidates[1:])
    raise DataError(
        f"data file {_show(candidates[0])} not found{also}; "
        f"run `python data/prepare.py {data_cfg.name}` to download it"
    )


# Folders of datasets shared between projects (os.pathsep-separated), searched after data/raw/:
# <folder>/<name>/<name>.inter, a RecBole atomic file, e.g. CPREC_DATA_PATH=/datasets.
DATA_PATH_VAR = "CPREC_DATA_PATH"


def data_path_files(name: str) -> list[pathlib.Path]:
    """The RecBole files of dataset ``name`` in the folders of $CPREC_DATA_PATH, in order."""
    folders = [f for f in os.environ.get(DATA_PATH_VAR, "").split(os.pathsep) if f]
    return [pathlib.Path(f).expanduser() / name / f"{name}.inter" for f in folders]


def _show(path: pathlib.Path) -> str:
    """`path` relative to the cwd when under it (short messages), else absolute."""
    try:
        return str(path.resolve().relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def infer_format(name: str, path: pathlib.Path) -> str:
    """Format from the file's RecBole suffix, else the dataset name, else the file name."""
    if name == "recbole" or path.suffix == ".inter":
        return "recbole"
    if name in _NAME_FORMAT:
        return _NAME_FORMAT[name]
    if path.name == "u.data":
        return "movielens-100k"
    if path.suffix == ".dat":
        return "movielens-dat"
    return "csv"


def _build(data_cfg: ml_collections.ConfigDict, source: dict, log) -> tuple[dict[str, np.ndarray], dict]:
    tokens = None
    if data_cfg.name == "synthetic":
        params = {k: data_cfg[k] for k in SYNTHETIC_FIELDS}
        with preprocess.stage(log, f"generated synthetic data {params}"):
            users, items, times = generate_synthetic(**params)
        catalog = int(data_cfg.num_items)
    else:
        with preprocess.stage(log, f"read {source['path']} ({source['format']})"):
            (users, items, times), tokens = readers.read_events_with_tokens(
                source["path"],
                source["format"],
                sep=data_cfg.sep,
                user_col=data_cfg.user_col,
                item_col=data_cfg.item_col,
                time_col=data_cfg.time_col,
            )
        catalog = None
        if users.size == 0:
            raise DataError(f"{source['path']} holds no interactions; check the file and data.format")
    return preprocess.prepare_events(
        users,
        items,
        times,
        max_len=int(data_cfg.max_len),
        min_user_count=int(data_cfg.min_user_count),
        min_item_count=int(data_cfg.min_item_count),
        catalog_size=catalog,
        item_tokens=tokens,
        split=data_cfg.split,
        valid_fraction=float(data_cfg.valid_fraction),
        test_fraction=float(data_cfg.test_fraction),
        log=log,
    )


def _validate(c: ml_collections.ConfigDict) -> None:
    if c.name not in NAMES:
        raise ConfigError(f"config.data.name={c.name!r} is invalid: valid choices: {', '.join(NAMES)}")
    if c.name in ("recbole", "csv") and not c.path:
        raise ConfigError(f"config.data.name={c.name!r} needs a file: set config.data.path")
    if c.format and c.format not in readers.FORMATS:
        raise ConfigError(f"config.data.format={c.format!r} is invalid: valid choices: {', '.join(readers.FORMATS)}")
    if int(c.max_len) < 1:
        raise ConfigError(f"config.data.max_len={c.max_len!r} is invalid: must be >= 1")
    for key in ("min_user_count", "min_item_count"):
        if int(c[key]) < 0:
            raise ConfigError(f"config.data.{key}={c[key]!r} is invalid: must be >= 0 (0 disables)")
    if c.split not in preprocess.SPLITS:
        raise ConfigError(f"config.data.split={c.split!r} is invalid: valid choices: {', '.join(preprocess.SPLITS)}")
    for key in ("valid_fraction", "test_fraction"):
        if not 0.0 < float(c[key]) < 1.0:
            raise ConfigError(f"config.data.{key}={c[key]!r} is invalid: must be in (0, 1)")
    if float(c.valid_fraction) + float(c.test_fraction) >= 1.0:
        held_out = float(c.valid_fraction) + float(c.test_fraction)
        raise ConfigError(f"config.data.valid_fraction + test_fraction = {held_out} is invalid: must be < 1 "
                          "(some events must be left to train on)")


def _logger(verbose: bool):
    return (lambda msg: print(f"[data] {msg}", flush=True)) if verbose else (lambda msg: None)
