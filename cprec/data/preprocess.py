"""Events -> training windows and evaluation rows, all vectorized numpy.

Protocol (NextItNet / CpRec): each user's events are stably sorted by time (ties keep file
order); an optional k-core filter runs until stable; users left with fewer than 3 events are
dropped, since leave-one-out needs a training item, a validation item and a test item (this
threshold is part of the k-core loop, so dropping them never leaves items under the item
threshold). Then one of two splits (``SPLITS``):

- ``leave_one_out``: a user's last event is their test target, the one before it their validation
  target, the rest is training.
- ``temporal`` (global time cut-offs; Ji et al., ACM TOIS 2023): with t_val and t_test the times
  below which lie the first 1 - valid_fraction - test_fraction and 1 - test_fraction of all
  events, training is every event before t_val; a user's validation target is their first event
  in [t_val, t_test) and their test target their first event at or after t_test, each predicted
  from everything the user did before it. Users without such an event, or with nothing before
  it, are not scored in that split. No model trains on an event at or after t_val, so none
  sees the future of another user's test event.

Items are re-indexed by descending training frequency (ties by first appearance in the training
stream), id 0 is padding, and items with no training event come last with count 0. Each user's
training events are cut from their end backwards into windows of L+1 items overlapping by exactly
one item, so every training item except a user's first is a target exactly once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cprec.errors import DataError

Log = Callable[[str], None]

MIN_EVENTS_PER_USER = 3
SPLITS = ("leave_one_out", "temporal")


@contextlib.contextmanager
def stage(log: Log | None, what: str) -> Iterator[None]:
    """Logs `what` with its wall time once the block ends."""
    start = time.perf_counter()
    yield
    if log is not None:
        log(f"{what} ({time.perf_counter() - start:.2f}s)")


def dense_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques) with `uniques[codes] == x` and `uniques` sorted; O(n) for compact ids."""
    if x.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, x.dtype)
    lo, hi = int(x.min()), int(x.max())
    if hi - lo <= 4 * x.size + 1024:
        present = np.zeros(hi - lo + 1, bool)
        present[x - lo] = True
        code_of = np.cumsum(present, dtype=np.int64) - 1
        return code_of[x - lo], np.flatnonzero(present).astype(x.dtype) + lo
    uniques, codes = np.unique(x, return_inverse=True)
    return codes.astype(np.int64), uniques


def sort_events(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Permutation grouping events by user (ascending id) then time; stable on ties."""
    if users.size == 0:
        return np.zeros(0, np.int64)
    t = np.asarray(timestamps)
    t_lo, t_hi = float(t.min()), float(t.max())
    u_hi = int(users.max()) + 1
    # One stable sort on a combined integer key when it fits, else two stable passes.
    if np.all(t == np.floor(t)) and u_hi * (t_hi - t_lo + 1) < 2**62:
        key = users.astype(np.int64) * int(t_hi - t_lo + 1) + (t - t_lo).astype(np.int64)
        return np.argsort(key, kind="stable")
    order = np.argsort(t, kind="stable")
    return order[np.argsort(users[order], kind="stable")]


def kcore(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Ascending indices of the events kept by the iterated (min_user, min_item) core."""
    keep = np.arange(users.size)
    u, i = users, items
    n_users, n_items = (int(u.max()) + 1, int(i.max()) + 1) if u.size else (0, 0)
    while u.size:
        ok = np.ones(u.size, bool)
        if min_user > 0:
            ok &= np.bincount(u, minlength=n_users)[u] >= min_user
        if min_item > 0:
            ok &= np.bincount(i, minlength=n_items)[i] >= min_item
        if ok.all():
            break
        keep, u, i = keep[ok], u[ok], i[ok]
    return keep


def make_windows(seq: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """[N, L+1] windows over `seq[starts[u] : starts[u] + lengths[u]]`, left-padded with 0.

    Cut from each sequence's end backwards, consecutive windows share one item; a user's
    windows are listed oldest first, users in order.
    """
    n_win = np.where(lengths > 1, (lengths - 2) // max_len + 1, 0)
    user = np.repeat(np.arange(lengths.size), n_win)
    first = np.cumsum(n_win) - n_win
    back = n_win[user] - 1 - (np.arange(user.size) - first[user])  # 0 = the user's last window
    end = starts[user] + lengths[user] - back * max_len
    return _gather(seq, starts[user], end, max_len + 1)


def last_items(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """[U, L]: the last `max_len` items of each `seq[starts[u] : ends[u]]`, left-padded with 0."""
    return _gather(seq, starts, ends, max_len)


def _gather(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((starts.size, width), np.int32)
    step = max(1, (32 << 20) // (8 * width))  # bound the int64 index temporaries to ~32 MB
    cols = np.arange(width) - width
    for lo in range(0, starts.size, step):
        idx = ends[lo : lo + step, None] + cols
        valid = idx >= starts[lo : lo + step, None]
        out[lo : lo + step][valid] = seq[idx[valid]]
    return out


def reindex_by_frequency(
    items: np.ndarray, train_mask: np.ndarray, num_items: int, raw_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(new id per old id, training counts by new id incl. padding 0) for dense `items`.

    Order: descending training count, then first appearance in the training stream; items with
    no training event by first appearance anywhere, never-seen items (catalog) by raw id.
    """
    counts = np.bincount(items[train_mask], minlength=num_items)
    n = items.size
    first_train = np.full(num_items, n, np.int64)
    np.minimum.at(first_train, items[train_mask], np.flatnonzero(train_mask))
    first_any = np.full(num_items, n, np.int64)
    np.minimum.at(first_any, items, np.arange(n))
    tie = np.where(counts > 0, first_train, n + first_any)
    order = np.lexsort((raw_ids, tie, -counts))
    new_id = np.empty(num_items, np.int64)
    new_id[order] = np.arange(1, num_items + 1)
    return new_id, np.concatenate([[0], counts[order]]).astype(np.int64)


def prepare_events(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    *,
    max_len: int,
    min_user_count: int = 5,
    min_item_count: int = 5,
    catalog_size: int | None = None,
    item_tokens: Sequence[str] | None = None,
    split: str = "leave_one_out",
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    log: Log | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Runs the whole protocol; returns (arrays, stats).

    `catalog_size`: raw item ids are `0..catalog_size-1` (synthetic data); with
    `min_item_count <= 0` never-seen ids stay in the vocabulary with count 0.
    `item_tokens`: when the reader coded the item tokens (`items` index it), the tokens are kept
    as item_token_data + item_token_offsets (see `encode_tokens`), so that `raw_item_ids` maps
    back to the file's text.
    `split`, `valid_fraction`, `test_fraction`: see the module docstring.
    Arrays: train [N, L+1], val_inputs/test_inputs [U_s, L], val_targets/test_targets [U_s] (int32),
    val_positions/test_positions [U_s] int64 (each target's index in seq_items; U_s = U under
    leave-one-out, the users scored in that split under the temporal split), item_counts [V]
    int64, seq_items [E] int32 + seq_offsets [U+1] int64 (the sorted, re-indexed sequences),
    raw_item_ids [V] int64 (-1 for padding), raw_user_ids [U] int64.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is unknown; valid choices: {', '.join(SPLITS)}")
    users, items = np.asarray(users), np.asarray(items)
    stats = {"raw_events": int(users.size)}
    with stage(log, f"sorted {users.size:,} events by user and time"):
        u_code, u_raw = dense_codes(users)
        order = sort_events(u_code, timestamps)
        u_code, items, times = u_code[order], items[order], np.asarray(timestamps)[order]
    stats["raw_users"] = int(u_raw.size)
    if catalog_size is not None and min_item_count <= 0:
        i_code, i_raw = items.astype(np.int64), np.arange(catalog_size, dtype=np.int64)
    else:
        i_code, i_raw = dense_codes(items)
    stats["raw_items"] = int(np.count_nonzero(np.bincount(i_code))) if i_code.size else 0

    with stage(log, f"k-core filter (min_user_count={min_user_count}, min_item_count={min_item_count})"):
        keep = kcore(u_code, i_code, max(min_user_count, MIN_EVENTS_PER_USER), min_item_count)
        if keep.size == 0:
            raise DataError(
                f"dataset is empty after the k-core filter (min_user_count={min_user_count}, "
                f"min_item_count={min_item_count}, and every user needs {MIN_EVENTS_PER_USER} events); lower them"
            )
        u_code, u_raw = dense_codes(u_raw[u_code[keep]])
        times = times[keep]
        if catalog_size is not None and min_item_count <= 0:
            i_code = i_code[keep]
        else:
            i_code, i_raw = dense_codes(i_raw[i_code[keep]])

    with stage(log, f"{split} split and re-indexed items by training frequency"):
        lengths = np.bincount(u_code, minlength=u_raw.size)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        starts = offsets[:-1]
        if split == "leave_one_out":
            n_train = lengths - 2
            val_pos, test_pos = starts + lengths - 2, starts + lengths - 1
        else:
            n_train, val_pos, test_pos, cut = temporal_positions(u_code, times, starts, lengths, valid_fraction,
                                                                 test_fraction)
            stats.update(cut)
        train_mask = np.arange(i_code.size) - np.repeat(starts, lengths) < np.repeat(n_train, lengths)
        new_id, item_counts = reindex_by_frequency(i_code, train_mask, i_raw.size, i_raw)
        seq = new_id[i_code].astype(np.int32)
        raw_item_ids = np.full(i_raw.size + 1, -1, np.int64)
        raw_item_ids[new_id] = i_raw

    with stage(log, f"cut training windows of {max_len + 1}"):
        user_start = np.repeat(starts, lengths)  # the first event of each event's user
        arrays = {
            "train": make_windows(seq, starts, n_train, max_len),
            "val_inputs": last_items(seq, user_start[val_pos], val_pos, max_len),
            "val_targets": seq[val_pos],
            "val_positions": val_pos,
            "test_inputs": last_items(seq, user_start[test_pos], test_pos, max_len),
            "test_targets": seq[test_pos],
            "test_positions": test_pos,
            "item_counts": item_counts,
            "seq_items": seq,
            "seq_offsets": offsets,
            "raw_item_ids": raw_item_ids,
            "raw_user_ids": u_raw.astype(np.int64),
        }
        if item_tokens is not None:
            arrays["item_token_data"], arrays["item_token_offsets"] = encode_tokens(item_tokens)
    stats.update(
        split=split,
        num_val_users=int(val_pos.size),
        num_test_users=int(test_pos.size),
        num_users=int(lengths.size),
        num_items=int(item_counts.size),
        num_events=int(seq.size),
        num_train_windows=int(arrays["train"].shape[0]),
        num_train_targets=int(np.count_nonzero(arrays["train"][:, :-1])),
    )
    return arrays, stats


def temporal_positions(
    users: np.ndarray, times: np.ndarray, starts: np.ndarray, lengths: np.ndarray, valid_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The global temporal split of events grouped by user in time order (see the module docstring).

    Returns (training events per user [U], validation target positions, test target positions,
    stats with the cut-off times and the share of events on each side).
    """
    n = times.size
    ordered = np.sort(times, kind="stable")
    t_val = ordered[min(int(round(n * (1.0 - valid_fraction - test_fraction))), n - 1)]
    t_test = ordered[min(int(round(n * (1.0 - test_fraction))), n - 1)]
    n_train = np.bincount(users, weights=times < t_val, minlength=lengths.size).astype(np.int64)
    n_before_test = np.bincount(users, weights=times < t_test, minlength=lengths.size).astype(np.int64)
    # A target needs an event in its window and something before it to predict from.
    has_val = (n_before_test > n_train) & (n_train > 0)
    has_test = (lengths > n_before_test) & (n_before_test > 0)
    val_pos, test_pos = (starts + n_train)[has_val], (starts + n_before_test)[has_test]
    if t_val >= t_test or not val_pos.size or not test_pos.size:
        raise DataError(
            f"the temporal split (valid_fraction={valid_fraction}, test_fraction={test_fraction}) leaves no "
            f"{'validation' if t_val >= t_test or not val_pos.size else 'test'} target: too many events share the "
            "cut-off time or the dataset is too small; raise data.valid_fraction / data.test_fraction")
    cut = {"t_val": float(t_val), "t_test": float(t_test), "train_event_share": float(np.mean(times < t_val)),
           "test_event_share": float(np.mean(times >= t_test))}
    return n_train, val_pos.astype(np.int64), test_pos.astype(np.int64), cut


def encode_tokens(tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [B], offsets int64 [n+1]): the tokens' UTF-8 bytes, concatenated; token k is
    `data[offsets[k]:offsets[k+1]]`. Plain arrays, so the cache needs no pickle and any token fits."""
    encoded = [t.encode("utf-8") for t in tokens]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def decode_tokens(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The tokens of `encode_tokens`."""
    blob, bounds = np.asarray(data).tobytes(), np.asarray(offsets).tolist()
    return [blob[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
