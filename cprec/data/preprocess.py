"""Events -> training windows and leave-one-out evaluation rows, all vectorized numpy.

Protocol (NextItNet / CpRec): each user's events are stably sorted by time (ties keep file
order); an optional k-core filter runs until stable; users left with fewer than 3 events are
dropped, since leave-one-out needs a training item, a validation item and a test item (this
threshold is part of the k-core loop, so dropping them never leaves items under the item
threshold). Items are re-indexed by descending training frequency (training = each sequence
minus its last 2 items; ties by first appearance in the training stream), id 0 is padding, and
items seen only in validation/test come last with count 0. The training part of each sequence
is cut from its end backwards into windows of L+1 items overlapping by exactly one item, so
every training item except a user's first is a target exactly once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cprec.errors import DataError

Log = Callable[[str], None]

MIN_EVENTS_PER_USER = 3


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
    log: Log | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Runs the whole protocol; returns (arrays, stats).

    `catalog_size`: raw item ids are `0..catalog_size-1` (synthetic data); with
    `min_item_count <= 0` never-seen ids stay in the vocabulary with count 0.
    `item_tokens`: when the reader coded the item tokens (`items` index it), the tokens are kept
    as item_token_data + item_token_offsets (see `encode_tokens`), so that `raw_item_ids` maps
    back to the file's text.
    Arrays: train [N, L+1], val_inputs/test_inputs [U, L], val_targets/test_targets [U] (int32),
    item_counts [V] int64, seq_items [E] int32 + seq_offsets [U+1] int64 (the sorted, re-indexed
    sequences), raw_item_ids [V] int64 (-1 for padding), raw_user_ids [U] int64.
    """
    users, items = np.asarray(users), np.asarray(items)
    stats = {"raw_events": int(users.size)}
    with stage(log, f"sorted {users.size:,} events by user and time"):
        u_code, u_raw = dense_codes(users)
        order = sort_events(u_code, timestamps)
        u_code, items = u_code[order], items[order]
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
        if catalog_size is not None and min_item_count <= 0:
            i_code = i_code[keep]
        else:
            i_code, i_raw = dense_codes(i_raw[i_code[keep]])

    with stage(log, "split and re-indexed items by training frequency"):
        lengths = np.bincount(u_code, minlength=u_raw.size)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        starts = offsets[:-1]
        pos = np.arange(i_code.size) - np.repeat(starts, lengths)
        train_mask = pos < np.repeat(lengths - 2, lengths)
        new_id, item_counts = reindex_by_frequency(i_code, train_mask, i_raw.size, i_raw)
        seq = new_id[i_code].astype(np.int32)
        raw_item_ids = np.full(i_raw.size + 1, -1, np.int64)
        raw_item_ids[new_id] = i_raw

    with stage(log, f"cut training windows of {max_len + 1}"):
        arrays = {
            "train": make_windows(seq, starts, lengths - 2, max_len),
            "val_inputs": last_items(seq, starts, starts + lengths - 2, max_len),
            "val_targets": seq[starts + lengths - 2],
            "test_inputs": last_items(seq, starts, starts + lengths - 1, max_len),
            "test_targets": seq[starts + lengths - 1],
            "item_counts": item_counts,
            "seq_items": seq,
            "seq_offsets": offsets,
            "raw_item_ids": raw_item_ids,
            "raw_user_ids": u_raw.astype(np.int64),
        }
        if item_tokens is not None:
            arrays["item_token_data"], arrays["item_token_offsets"] = encode_tokens(item_tokens)
    stats.update(
        num_users=int(lengths.size),
        num_items=int(item_counts.size),
        num_events=int(seq.size),
        num_train_windows=int(arrays["train"].shape[0]),
        num_train_targets=int(np.count_nonzero(arrays["train"][:, :-1])),
    )
    return arrays, stats


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
