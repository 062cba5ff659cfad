"""load_dataset end to end: cache reuse, memmap, atomic writes, config/data errors, prepare.py."""

import importlib.util
import json
import os
import pathlib
import time

import numpy as np
import pytest

from cprec.data import SequenceDataset, dataset, load_dataset, store
from cprec.data.dataset import default_data_config, load_sequences
from cprec.errors import ConfigError, DataError
from tests.helpers import SHARED_DATA, user_error

SHARED_ML100K = SHARED_DATA / "ml-100k" / "ml-100k.inter"


def _csv(tmp_path, users=30, per_user=12, seed=0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    lines = ["user,item,when"]
    for u in range(users):
        for k in range(per_user):
            lines.append(f"user{u},item{int(rng.zipf(1.6)) % 25},{rng.integers(0, 10**6)}")
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(path=None, **kwargs):
    c = default_data_config()
    if path is not None:
        c.name, c.path, c.user_col, c.item_col, c.time_col = "csv", str(path), "user", "item", "when"
    c.max_len = 5
    c.min_user_count, c.min_item_count = 3, 2
    for k, v in kwargs.items():
        c[k] = v
    return c


def _message(error_type, fn, *args, **kwargs) -> str:
    with pytest.raises(error_type) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_csv_memmapped_with_interface(tmp_path):
    data = load_dataset(_cfg(_csv(tmp_path)), cache_root=tmp_path / "cache", verbose=False)
    assert isinstance(data, SequenceDataset)
    U, L = data.val_inputs.shape
    assert L == data.max_len == 5 and data.train.shape[1] == L + 1
    assert data.test_inputs.shape == (U, L) and data.val_targets.shape == data.test_targets.shape == (U,)
    for a in (data.train, data.val_inputs, data.val_targets, data.test_inputs, data.test_targets):
        assert isinstance(a, np.memmap) and a.dtype == np.int32
        assert a.max() < data.num_items and a.min() >= 0
    assert data.item_counts.dtype == np.int64 and data.item_counts[0] == 0
    assert np.all(np.diff(data.item_counts[1:]) <= 0)
    m = data.meta
    assert (m["name"], m["num_users"], m["num_items"], m["max_len"]) == ("csv", U, data.num_items, 5)
    assert m["num_events"] == data.item_counts.sum() + 2 * U
    assert pathlib.Path(m["cache_dir"]).parent == tmp_path / "cache"
    items, offsets = load_sequences(data)
    assert offsets[-1] == items.size == m["num_events"]
    np.testing.assert_array_equal(items[offsets[1:] - 1], data.test_targets)


def test_second_load_reuses_cache(tmp_path, monkeypatch, capsys):
    cfg, cache = _cfg(_csv(tmp_path)), tmp_path / "cache"
    first = load_dataset(cfg, cache_root=cache)
    assert "preparing csv" in capsys.readouterr().out

    def boom(*args):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(dataset, "_build", boom)
    second = load_dataset(cfg, cache_root=cache)
    assert f"reusing cache {first.meta['cache_dir']}" in capsys.readouterr().out
    np.testing.assert_array_equal(first.train, second.train)
    assert len(list(cache.iterdir())) == 1


def test_cache_key_tracks_config_and_file(tmp_path):
    path, cache = _csv(tmp_path), tmp_path / "cache"
    a = dataset.prepare(_cfg(path), cache, verbose=False)
    assert dataset.prepare(_cfg(path, max_len=7), cache, verbose=False) != a
    os.utime(path, ns=(0, 12345))  # same bytes, new mtime: treated as a new file
    assert dataset.prepare(_cfg(path), cache, verbose=False) != a
    assert dataset.prepare(_cfg(path, cache_dir=str(tmp_path / "other")), verbose=False).parent == tmp_path / "other"


def test_each_split_has_its_own_cache(tmp_path):
    cache = tmp_path / "cache"
    loo = dataset.prepare(_cfg(num_users=200, num_items=100), cache, verbose=False)
    temporal = dataset.prepare(_cfg(num_users=200, num_items=100, split="temporal"), cache, verbose=False)
    other = dataset.prepare(_cfg(num_users=200, num_items=100, split="temporal", test_fraction=0.2), cache, verbose=False)
    assert len({loo, temporal, other}) == 3
    # The fractions are part of the temporal cache's key only: leave-one-out caches keep their key.
    assert dataset.prepare(_cfg(num_users=200, num_items=100, test_fraction=0.3), cache, verbose=False) == loo
    data = load_dataset(_cfg(num_users=200, num_items=100, split="temporal"), cache, verbose=False)
    assert data.meta["split"] == "temporal" and 0 < len(data.test_targets) < 200
    assert data.meta["num_test_users"] == len(data.test_targets) and data.meta["num_val_users"] == len(data.val_targets)
    items, _ = load_sequences(data)
    starts, ends = dataset.split_histories(data, "test")
    np.testing.assert_array_equal(items[ends], data.test_targets)
    for k in range(len(ends)):  # the window is the end of the history before the target
        window = data.test_inputs[k]
        np.testing.assert_array_equal(window[window > 0], items[starts[k]:ends[k]][-data.max_len:])


def test_interrupted_save_leaves_no_cache(tmp_path, monkeypatch):
    calls = []

    def dying_save(file, array):
        calls.append(file)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(file, array)

    real_save = np.save
    monkeypatch.setattr(store.np, "save", dying_save)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_dataset(_cfg(_csv(tmp_path)), cache_root=cache, verbose=False)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(store.np, "save", real_save)
    assert load_dataset(_cfg(_csv(tmp_path)), cache_root=cache, verbose=False).train.size > 0


def _dead_pid() -> int:
    pid = 4_000_000  # above Linux's pid_max default; checked anyway
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_killed_save_leftovers_are_removed_by_the_next_save(tmp_path):
    """A SIGKILLed prepare leaves its hidden tmp directory; the next save sweeps the old, dead ones."""
    cache = tmp_path / "cache"
    cache.mkdir()
    old = time.time() - 2 * store.STALE_TMP_SECONDS
    stale = cache / f".synthetic-abc.tmp-{_dead_pid()}-0123abcd"
    recent = cache / f".synthetic-def.tmp-{_dead_pid()}-4567abcd"  # maybe another host's, still writing
    live = cache / f".synthetic-ghi.tmp-{os.getpid()}-89abcdef"
    other = cache / ".not-ours"
    for path in (stale, recent, live, other):
        path.mkdir()
        (path / "x.npy").write_bytes(b"0")
    for path in (stale, live, other):
        os.utime(path, (old, old))
    load_dataset(_cfg(_csv(tmp_path)), cache_root=cache, verbose=False)
    assert not stale.exists()
    assert recent.exists() and live.exists() and other.exists()


def test_synthetic_dataset_keeps_catalog_without_item_filter(tmp_path):
    cfg = _cfg(name="synthetic", num_users=100, num_items=400, mean_len=10, num_topics=8, min_item_count=0)
    data = load_dataset(cfg, cache_root=tmp_path, verbose=False)
    assert data.num_items == 401 and data.meta["source"] == "synthetic"
    assert np.all(np.diff(data.item_counts[1:]) <= 0)


def test_empty_after_filter(tmp_path):
    cfg = _cfg(_csv(tmp_path), min_user_count=1000)
    message = _message(DataError, load_dataset, cfg, tmp_path / "cache", False)
    assert "empty after the k-core filter (min_user_count=1000, min_item_count=2" in message


def test_missing_default_file_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "REPO_ROOT", tmp_path / "repo")
    message = _message(DataError, load_dataset, _cfg(name="ml-1m"), tmp_path, False)
    assert "ratings.dat not found" in message and "python data/prepare.py ml-1m" in message
    monkeypatch.setenv(dataset.DATA_PATH_VAR, str(tmp_path / "datasets"))
    message = _message(DataError, load_dataset, _cfg(name="ml-100k"), tmp_path, False)
    assert "u.data not found" in message and str(tmp_path / "datasets" / "ml-100k" / "ml-100k.inter") in message
    message = _message(DataError, load_dataset, _cfg(tmp_path / "nope.csv"), tmp_path, False)
    assert "nope.csv not found; check data.path" in message


def test_ml100k_default_falls_back_to_a_recbole_file_on_the_data_path(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    shared = tmp_path / "shared" / "data" / "ml-100k"
    shared.mkdir(parents=True)
    rows = "".join(f"{u}\t{i}\t3\t{u * 100 + i}\n" for u in range(1, 5) for i in range(1, 6))
    (shared / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + rows)
    monkeypatch.setattr(dataset, "REPO_ROOT", repo)
    monkeypatch.delenv(dataset.DATA_PATH_VAR, raising=False)
    with pytest.raises(DataError, match="u.data not found"):  # the library knows no development paths
        load_dataset(_cfg(name="ml-100k"), cache_root=tmp_path / "cache", verbose=False)
    monkeypatch.setenv(dataset.DATA_PATH_VAR, f"{tmp_path / 'empty'}{os.pathsep}{tmp_path / 'shared' / 'data'}")
    data = load_dataset(_cfg(name="ml-100k"), cache_root=tmp_path / "cache", verbose=False)
    assert data.meta["format"] == "recbole" and data.meta["num_users"] == 4
    (repo / "data" / "raw" / "ml-100k").mkdir(parents=True)
    (repo / "data" / "raw" / "ml-100k" / "u.data").write_text(rows)
    data = load_dataset(_cfg(name="ml-100k"), cache_root=tmp_path / "cache", verbose=False)
    assert data.meta["format"] == "movielens-100k" and data.meta["num_users"] == 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(name="netflix"), "config.data.name='netflix' is invalid"),
        (dict(name="csv"), "needs a file: set config.data.path"),
        (dict(name="synthetic", format="xml"), "config.data.format='xml' is invalid"),
        (dict(name="synthetic", max_len=0), "config.data.max_len=0"),
        (dict(name="synthetic", min_item_count=-1), "config.data.min_item_count=-1"),
        (dict(name="synthetic", split="random"), "config.data.split='random' is invalid: valid choices: leave_one_out"),
        (dict(name="synthetic", split="temporal", test_fraction=0.0), "config.data.test_fraction=0.0 is invalid"),
        (dict(name="synthetic", split="temporal", valid_fraction=0.5, test_fraction=0.5), "must be < 1"),
    ],
)
def test_config_errors(tmp_path, kwargs, needle):
    assert needle in _message(ConfigError, load_dataset, _cfg(**kwargs), tmp_path, False)


def test_corrupt_cache_is_a_data_error(tmp_path):
    cfg = _cfg(_csv(tmp_path))
    directory = dataset.prepare(cfg, tmp_path / "cache", verbose=False)
    (directory / "train.npy").write_bytes(b"garbage")
    message = _message(DataError, load_dataset, cfg, tmp_path / "cache", False)
    assert "is unreadable" in message and "delete that directory" in message


def _prepare_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", dataset.REPO_ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_cli_summary_and_errors(tmp_path, capsys):
    cli = _prepare_cli()
    path = _csv(tmp_path)
    argv = ["--path", str(path), "--user-col", "user", "--item-col", "item", "--time-col", "when"]
    assert cli.main(argv + ["--cache-dir", str(tmp_path / "c"), "--max-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "csv: 30 users" in out and "training windows of 5" in out and str(tmp_path / "c") in out
    err = user_error(capsys, cli.main, ["--path", str(path), "--cache-dir", str(tmp_path / "c")])
    assert "no column 'user_id'" in err


@pytest.mark.skipif(not SHARED_ML100K.is_file(), reason="needs ../shared/data/ml-100k")
def test_ml100k_shared(tmp_path, monkeypatch):
    monkeypatch.setenv(dataset.DATA_PATH_VAR, str(SHARED_DATA))
    cfg = _cfg(name="ml-100k", max_len=50, min_user_count=5, min_item_count=5)
    data = load_dataset(cfg, cache_root=tmp_path, verbose=False)
    assert data.meta["num_users"] == 943 and data.num_items - 1 <= 1682
    assert data.meta["source"] == str(SHARED_ML100K.resolve())
    assert np.all(np.diff(data.item_counts[1:]) <= 0) and data.item_counts[1] > 0
    # The same ratings in GroupLens' u.data format prepare to identical arrays.
    body = SHARED_ML100K.read_text().split("\n", 1)[1]
    (tmp_path / "u.data").write_text(body)
    cfg.path = str(tmp_path / "u.data")
    other = load_dataset(cfg, cache_root=tmp_path, verbose=False)
    assert other.meta["format"] == "movielens-100k"
    for name in ("train", "val_inputs", "val_targets", "test_inputs", "test_targets", "item_counts"):
        np.testing.assert_array_equal(getattr(data, name), getattr(other, name))


def test_item_raw_ids_give_back_the_file_ids(tmp_path):
    data = load_dataset(_cfg(_csv(tmp_path)), cache_root=tmp_path / "cache", verbose=False)
    ids = dataset.item_raw_ids(data)
    assert data.meta["item_ids"] == "tokens" and data.meta["cache_version"] == store.CACHE_VERSION
    assert len(ids) == data.num_items and ids[0] is None and all(t.startswith("item") for t in ids[1:])
    # The most frequent training item of the file is internal id 1.
    rows = [line.split(",") for line in _csv(tmp_path).read_text().splitlines()[1:]]
    by_user = {}
    for user, item, when in rows:
        by_user.setdefault(user, []).append((int(when), item))
    seqs = [[item for _, item in sorted(events)] for events in by_user.values()]
    train = [item for seq in seqs if len(seq) >= 3 for item in seq[:-2]]
    assert data.item_counts[1] == max(train.count(t) for t in set(train)) == train.count(ids[1])
    integer = load_dataset(_cfg(name="synthetic", num_users=50, num_items=40, mean_len=8, num_topics=4,
                                min_item_count=0), cache_root=tmp_path / "cache", verbose=False)
    ids = dataset.item_raw_ids(integer)
    assert integer.meta["item_ids"] == "integers" and ids[0] is None and sorted(ids[1:]) == list(range(40))


def test_a_cache_without_item_ids_says_how_to_prepare_again(tmp_path):
    cfg = _cfg(_csv(tmp_path), sep=",")
    directory = dataset.prepare(cfg, tmp_path / "cache", verbose=False)
    meta_path = directory / store.META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["item_ids"]  # as written before the tokens were kept
    meta_path.write_text(json.dumps(meta))
    data = load_dataset(cfg, cache_root=tmp_path / "cache", verbose=False)
    message = _message(DataError, dataset.item_raw_ids, data)
    assert f"data cache {directory} was prepared by an older cprec" in message and "delete that directory" in message
    command = message.split("`")[1]
    assert command.startswith("python data/prepare.py csv ") and f"--path {cfg.path} " in command
    assert f"--cache-dir {tmp_path / 'cache'}" in command and "--max-len 5" in command and "--user-col user" in command


def test_cache_directory_prepares_nothing(tmp_path):
    cfg = _cfg(_csv(tmp_path))
    directory = dataset.cache_directory(cfg, tmp_path / "cache")
    assert not directory.exists() and not (tmp_path / "cache").exists()
    assert dataset.prepare(cfg, tmp_path / "cache", verbose=False) == directory and store.is_complete(directory)
    assert dataset.prepare_command(_cfg(name="synthetic")) == (
        "python data/prepare.py synthetic --max-len 5 --min-item-count 2 --min-user-count 3")
