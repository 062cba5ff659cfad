"""Preprocessing on a hand-computed example, k-core, and window invariants on random data."""

import numpy as np
import pytest

from cprec.data import preprocess
from cprec.errors import DataError

# (user, raw item, time) in file order. User 10 has a time tie (300 and 100 at t=3): file order
# wins. User 8 has only 2 events and is dropped, taking item 700 with it.
EVENTS = [
    (10, 100, 5), (7, 300, 2), (10, 200, 1), (10, 300, 3), (8, 700, 1), (10, 100, 3),
    (7, 100, 1), (10, 400, 9), (7, 600, 4), (10, 200, 10), (8, 100, 2), (10, 500, 11), (7, 300, 3),
]


def _prepare(times_offset=0.0, **kwargs):
    u, i, t = (np.array(c) for c in zip(*EVENTS))
    args = dict(max_len=3, min_user_count=0, min_item_count=0) | kwargs
    return preprocess.prepare_events(u, i, t + times_offset, **args)


@pytest.mark.parametrize("offset", [0.0, 0.25])  # integer times (one combined key) and float times
def test_hand_computed_example(offset):
    arrays, stats = _prepare(offset)
    # Sorted: user 7 -> raw [100, 300, 300, 600]; user 10 -> [200, 300, 100, 100, 400, 200, 500].
    # Training parts [100, 300] and [200, 300, 100, 100, 400] give counts 100:3, 300:2, 200:1,
    # 400:1 (200 first in the training stream); 600 and 500 are only in test, 600 seen first.
    np.testing.assert_array_equal(arrays["raw_item_ids"], [-1, 100, 300, 200, 400, 600, 500])
    np.testing.assert_array_equal(arrays["item_counts"], [0, 3, 2, 1, 1, 0, 0])
    np.testing.assert_array_equal(arrays["raw_user_ids"], [7, 10])
    np.testing.assert_array_equal(arrays["seq_items"], [1, 2, 2, 5, 3, 2, 1, 1, 4, 3, 6])
    np.testing.assert_array_equal(arrays["seq_offsets"], [0, 4, 11])
    np.testing.assert_array_equal(arrays["train"], [[0, 0, 1, 2], [0, 0, 3, 2], [2, 1, 1, 4]])
    np.testing.assert_array_equal(arrays["val_inputs"], [[0, 1, 2], [1, 1, 4]])
    np.testing.assert_array_equal(arrays["val_targets"], [2, 3])
    np.testing.assert_array_equal(arrays["test_inputs"], [[1, 2, 2], [1, 4, 3]])
    np.testing.assert_array_equal(arrays["test_targets"], [5, 6])
    for name in ("train", "val_inputs", "val_targets", "test_inputs", "test_targets", "seq_items"):
        assert arrays[name].dtype == np.int32, name
    assert arrays["item_counts"].dtype == np.int64
    assert stats == dict(
        raw_events=13, raw_users=3, raw_items=7, num_users=2, num_items=7, num_events=11,
        num_train_windows=3, num_train_targets=5, split="leave_one_out", num_val_users=2, num_test_users=2,
    )


def test_kcore_iterates_until_stable():
    # min_item=2 removes items 4..7; user 2 is then left with 2 < 3 events and goes too.
    users = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    items = np.array([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 6, 7])
    np.testing.assert_array_equal(preprocess.kcore(users, items, 3, 2), [0, 1, 2, 4, 5, 6])
    np.testing.assert_array_equal(preprocess.kcore(users, items, 0, 0), np.arange(12))


def test_prepare_applies_kcore_and_reports_empty():
    arrays, _ = _prepare(min_item_count=2)  # 400, 500, 600, 700 have 1 event; then user 8 has 1
    assert set(arrays["raw_item_ids"][1:]) == {100, 300, 200}
    with pytest.raises(DataError) as info:
        _prepare(min_user_count=50, min_item_count=5)
    message = str(info.value)
    assert "empty after the k-core filter (min_user_count=50, min_item_count=5" in message
    assert "lower them" in message and "\n" not in message


def test_catalog_keeps_unseen_items_only_without_item_filter():
    u, i, t = np.repeat([0, 1], 4), np.array([3, 3, 1, 2, 3, 1, 1, 2]), np.arange(8)
    arrays, _ = preprocess.prepare_events(u, i, t, max_len=4, min_user_count=0, min_item_count=0, catalog_size=6)
    # Training: [3, 3] and [3, 1] -> 3:3, 1:1; 2 only in val/test; 0, 4, 5 never seen (by raw id).
    np.testing.assert_array_equal(arrays["raw_item_ids"], [-1, 3, 1, 2, 0, 4, 5])
    np.testing.assert_array_equal(arrays["item_counts"], [0, 3, 1, 0, 0, 0, 0])
    arrays, _ = preprocess.prepare_events(u, i, t, max_len=4, min_user_count=0, min_item_count=1, catalog_size=6)
    np.testing.assert_array_equal(arrays["raw_item_ids"], [-1, 3, 1, 2])


def _naive_windows(seq, max_len):
    """Reference: cut from the end backwards, one shared item between neighbours."""
    out, end = [], len(seq)
    while end > 1:
        piece = seq[max(0, end - max_len - 1) : end]
        out.append([0] * (max_len + 1 - len(piece)) + list(piece))
        end -= max_len
    return out[::-1]


@pytest.mark.parametrize("max_len", [1, 2, 5, 8])
def test_windows_match_reference_and_cover_each_target_once(max_len):
    rng = np.random.default_rng(max_len)
    lengths = rng.integers(0, 30, 40)
    seq = rng.integers(1, 1000, lengths.sum()).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    windows = preprocess.make_windows(seq, starts, lengths, max_len)
    expected = [w for s, n in zip(starts, lengths) for w in _naive_windows(seq[s : s + n], max_len)]
    np.testing.assert_array_equal(windows, np.array(expected, np.int32).reshape(-1, max_len + 1))
    # Positions with a real input predict each training item except a user's first exactly once.
    assert np.count_nonzero(windows[:, :-1]) == np.maximum(lengths - 1, 0).sum()


def test_last_items_left_pads():
    seq = np.array([5, 6, 7, 8, 9], np.int32)
    got = preprocess.last_items(seq, np.array([0, 2]), np.array([2, 5]), 2)
    np.testing.assert_array_equal(got, [[5, 6], [8, 9]])
    got = preprocess.last_items(seq, np.array([0]), np.array([1]), 3)
    np.testing.assert_array_equal(got, [[0, 0, 5]])


def test_item_counts_non_increasing_on_random_data():
    rng = np.random.default_rng(0)
    n = 5000
    u, i = rng.integers(0, 100, n), rng.zipf(1.5, n) % 300
    arrays, stats = preprocess.prepare_events(u, i, rng.random(n), max_len=10, min_user_count=5, min_item_count=3)
    counts = arrays["item_counts"]
    assert counts[0] == 0 and np.all(np.diff(counts[1:]) <= 0)
    # Counts really are training counts: every training item except users' first ones is a target.
    train = arrays["train"]
    firsts = arrays["seq_items"][arrays["seq_offsets"][:-1]]
    targets = np.bincount(train[:, 1:][train[:, :-1] > 0], minlength=counts.size)
    np.testing.assert_array_equal(targets + np.bincount(firsts, minlength=counts.size), counts)
    assert stats["num_train_targets"] == targets.sum()


def test_dense_codes_sparse_and_compact():
    for x in (np.array([10, 3, 10, 7]), np.array([10**12, 3, 10**12, 7])):
        codes, uniques = preprocess.dense_codes(x)
        np.testing.assert_array_equal(uniques[codes], x)
        np.testing.assert_array_equal(uniques, np.sort(np.unique(x)))


def test_item_tokens_are_kept_for_the_raw_ids():
    tokens = ["", "plain", "café", "a,b", "x" * 300]
    data, offsets = preprocess.encode_tokens(tokens)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64 and offsets[-1] == data.size
    assert preprocess.decode_tokens(data, offsets) == tokens
    assert preprocess.decode_tokens(*preprocess.encode_tokens([])) == []
    u, i, t = (np.array(c) for c in zip(*EVENTS))
    codes = {100: 0, 300: 1, 200: 2, 700: 3, 400: 4, 600: 5, 500: 6}
    names = [f"item-{raw}" for raw in codes]
    arrays, _ = preprocess.prepare_events(u, np.array([codes[x] for x in i]), t, max_len=3, min_user_count=0,
                                          min_item_count=0, item_tokens=names)
    kept = preprocess.decode_tokens(arrays["item_token_data"], arrays["item_token_offsets"])
    assert [kept[c] for c in arrays["raw_item_ids"][1:]] == ["item-100", "item-300", "item-200", "item-400",
                                                            "item-600", "item-500"]
    assert "item_token_data" not in _prepare()[0]


def test_temporal_split_hand_computed():
    # 11 events after user 8 is dropped; sorted times 1 1 2 3 3 3 4 5 9 10 11: with 0.2 / 0.2 held out,
    # t_val = the 8th (5) and t_test = the 10th (10). User 7 (t 1-4) is all training; user 10 trains on
    # 200, 300, 100 (t 1, 3, 3), validates on 100 (t 5) and is tested on 200 (t 10).
    arrays, stats = _prepare(split="temporal", valid_fraction=0.2, test_fraction=0.2)
    assert (stats["t_val"], stats["t_test"]) == (5, 10)
    # Training counts 300:3, 100:2, 600:1, 200:1 (600 first in the training stream); 400 and 500 unseen.
    np.testing.assert_array_equal(arrays["raw_item_ids"], [-1, 300, 100, 600, 200, 400, 500])
    np.testing.assert_array_equal(arrays["item_counts"], [0, 3, 2, 1, 1, 0, 0])
    np.testing.assert_array_equal(arrays["seq_items"], [2, 1, 1, 3, 4, 1, 2, 2, 5, 4, 6])
    np.testing.assert_array_equal(arrays["train"], [[2, 1, 1, 3], [0, 4, 1, 2]])
    np.testing.assert_array_equal(arrays["val_inputs"], [[4, 1, 2]])
    np.testing.assert_array_equal(arrays["val_targets"], [2])
    np.testing.assert_array_equal(arrays["val_positions"], [7])
    np.testing.assert_array_equal(arrays["test_inputs"], [[2, 2, 5]])
    np.testing.assert_array_equal(arrays["test_targets"], [4])
    np.testing.assert_array_equal(arrays["test_positions"], [9])
    assert (stats["num_val_users"], stats["num_test_users"]) == (1, 1)


def test_temporal_split_trains_on_the_past_only_and_targets_the_first_event_after_each_cut():
    # Every event has its own raw item, so a prepared id names one event and its time.
    rng = np.random.default_rng(3)
    n = 3000
    users = rng.integers(0, 150, n)
    times = rng.integers(0, 500, n)  # many ties, also at the cut-offs
    arrays, stats = preprocess.prepare_events(users, np.arange(n), times, max_len=6, min_user_count=0,
                                              min_item_count=0, split="temporal", valid_fraction=0.15,
                                              test_fraction=0.1)
    t_val, t_test = stats["t_val"], stats["t_test"]
    time_of = np.concatenate([[-1], times[arrays["raw_item_ids"][1:]]])  # by prepared id
    train = arrays["train"]
    assert np.all(time_of[train[train > 0]] < t_val)
    assert np.sum(arrays["item_counts"]) == np.sum(times < t_val)  # re-indexing counts training events only
    assert np.all(arrays["item_counts"][1:][time_of[1:] >= t_val] == 0)
    n_targets = np.count_nonzero((train[:, 1:] > 0) & (train[:, :-1] > 0))
    per_user = np.bincount(users[times < t_val], minlength=150)
    assert n_targets == np.sum(np.maximum(per_user - 1, 0))  # each training event but a user's first, once
    # The reference: each user's events in time order (ties in file order), by python loops.
    expected = {"val": [], "test": []}
    for u in np.unique(users):
        events = [e for e in np.argsort(times, kind="stable") if users[e] == u]
        for split, lo, hi in (("val", t_val, t_test), ("test", t_test, np.inf)):
            after = [k for k, e in enumerate(events) if lo <= times[e] < hi]
            if after and after[0] > 0:
                expected[split].append((events[after[0]], [events[k] for k in range(after[0])][-6:]))
    raw = arrays["raw_item_ids"]
    for split in ("val", "test"):
        got = [(raw[t], list(raw[x[x > 0]])) for t, x in zip(arrays[f"{split}_targets"], arrays[f"{split}_inputs"])]
        assert sorted(got) == sorted((e, h) for e, h in expected[split]), split
        assert len(got) == stats[f"num_{split}_users"] > 10
        assert np.all(time_of[arrays[f"{split}_targets"]] >= (t_val if split == "val" else t_test))
    assert 0.7 < stats["train_event_share"] < 0.8


def test_temporal_split_without_a_validation_window_is_an_error():
    u, i = np.repeat(np.arange(5), 4), np.arange(20)
    t = np.where(np.arange(20) % 4 == 3, 9, 1)  # a quarter of the events at the last time: both cut-offs there
    with pytest.raises(DataError, match="leaves no validation target"):
        preprocess.prepare_events(u, i, t, max_len=3, min_user_count=0, min_item_count=0, split="temporal")
