"""`Recommender`: top-n recommendations, candidate scores and incremental sessions in raw item ids.

    rec = Recommender.load("exports/cprec-1m")
    [r] = rec.recommend([[1193, 661, 914]], n=20)          # r.items, r.scores, r.exact, r.unknown_items
    rec.score([1193, 661, 914], candidates=[3408, 2355])    # exact log-probs of a few candidates
    s = rec.session([1193, 661]); s.append([914]); s.recommend(20)   # O(layers) per new event

Everything per model (dequantised statistics of the early stop, the padding state of a session) is
computed once at load; every call pads its batch to a few bucket shapes, so a server compiles each
shape once. Item tables quantised to int8 stay int8 in memory and are dequantised inside the jitted
calls. Imports the model package only (never training or evaluation).
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from cprec.errors import CprecError
from cprec.model.nextitnet import NextItNet
from cprec.serve.artifact import Artifact, load_artifact
from cprec.serve.incremental import (append_many, encode_state, encode_suffix, padding_row, padding_window,
                                     receptive_field, window_prefixes)
from cprec.serve.quantize import dequantize_tree

CONTEXTS = ("window", "stream")


def default_encoder_rows() -> int | None:
    """Rows per pass of the conv stack inside one jitted call (None: the whole batch at once).

    On CPU the stack over [B*T, d] slows down per row once a batch's activations outgrow the
    caches: on the 1M-item preset, 256 windows of 50 in one pass took 1.5x the time of four
    passes of 64 (README, "Server benchmark"). A GPU wants the whole batch.
    """
    return 64 if jax.default_backend() == "cpu" else None


def default_length_buckets(context_len: int, smallest: int = 16) -> tuple[int, ...]:
    """The history widths a batch is encoded at: powers of two from ``smallest`` below the context
    length, then the context length itself (50 -> 16, 32, 50)."""
    widths, b = [], smallest
    while b < context_len:
        widths.append(b)
        b *= 2
    return (*widths, context_len)


def in_row_chunks(fn: Callable, x: jax.Array, rows: int | None) -> Any:
    """``fn(x)`` for x [B, ...] computed as ``lax.map`` over chunks of ``rows`` rows (fn is row-wise).

    The batch buckets are powers of two, so B > rows divides by rows; any other B runs whole.
    """
    b = x.shape[0]
    if rows is None or b <= rows or b % rows:
        return fn(x)
    out = jax.lax.map(fn, x.reshape(b // rows, rows, *x.shape[1:]))
    return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), out)


class RequestError(CprecError, ValueError):
    """A request the model cannot answer as asked (e.g. n outside [1, number of items])."""


class Recommendation(NamedTuple):
    items: list  # raw item ids, best first
    scores: list[float]  # their log-probabilities
    exact: bool  # False only when max_clusters stopped a cluster that could have changed the list
    unknown_items: list  # history ids the model does not know (skipped)


class Scores(NamedTuple):
    scores: list  # log-probability per candidate, None for an unknown candidate
    unknown_items: list  # unknown history and candidate ids (skipped / None)


def bucket(size: int, smallest: int = 1, largest: int | None = None) -> int:
    """The padded size of a dimension: the next power of two >= size (and >= smallest), capped at largest."""
    b = max(smallest, 1 << max(0, int(size) - 1).bit_length())
    return b if largest is None else min(b, largest)


def left_padded(rows: Sequence[Sequence[int]], width: int, num_rows: int | None = None) -> np.ndarray:
    """[num_rows, width] int32: each row's last ``width`` ids at the right, 0 (padding) before them."""
    out = np.zeros((len(rows) if num_rows is None else num_rows, width), np.int32)
    for r, ids in enumerate(rows):
        ids = list(ids)[-width:]
        if ids:
            out[r, width - len(ids):] = ids
    return out


class ItemIds:
    """Raw dataset item id <-> internal id (1..V-1; 0 is padding)."""

    def __init__(self, raw_ids: Sequence) -> None:
        self.raw = list(raw_ids)
        self._index = {raw: i for i, raw in enumerate(self.raw) if i > 0}

    def lookup(self, raw_ids: Sequence) -> list[int | None]:
        """The internal id of each raw id, None where unknown."""
        index = self._index
        out = [index.get(r) for r in raw_ids]
        if None in out:  # a second pass only when some are missing: the hot path is all known
            for k, (r, i) in enumerate(zip(raw_ids, out)):
                if i is None and isinstance(r, str) and r.lstrip("-").isdigit():
                    out[k] = index.get(int(r))  # JSON clients may send integer ids as strings
        return out

    def internal(self, raw_ids: Iterable) -> tuple[list[int], list]:
        """(known internal ids in order, unknown raw ids)."""
        raw_ids = list(raw_ids)
        found = self.lookup(raw_ids)
        return [i for i in found if i is not None], [r for r, i in zip(raw_ids, found) if i is None]


class Recommender:
    """A trained model loaded from an export directory (``python -m cprec.export``), for serving.

    ``context``: what a stateless ``recommend`` reads of a history. 'window' (default): the last
    L items, left-padded, as the model was trained and evaluated; 'stream': everything in the
    receptive field, as a ``Session`` does (see the README for which scores better).
    ``encoder_rows``: rows per pass of the conv stack within a batch ("auto": 64 on CPU, the whole
    batch on GPU; see ``default_encoder_rows``); results do not depend on it.
    ``length_buckets``: the widths a batch of histories is encoded at, the smallest that holds its
    longest history ("auto": 16, 32, ... up to the context length; None: always the context
    length). The positions before a history are padding, whose activations are the same for every
    row and computed once at load, so a batch of 20-item histories encodes 32 positions instead of
    50, with the same results (up to float32 rounding).
    """

    def __init__(self, artifact: Artifact, context: str = "window", max_batch: int = 256,
                 encoder_rows: int | None | str = "auto",
                 length_buckets: Sequence[int] | None | str = "auto") -> None:
        if context not in CONTEXTS:
            raise RequestError(f"context={context!r} is unknown; valid choices: {', '.join(CONTEXTS)}")
        self.artifact, self.context, self.max_batch = artifact, context, max_batch
        self.encoder_rows = default_encoder_rows() if encoder_rows == "auto" else encoder_rows
        self.model: NextItNet = artifact.model()
        self.ids = ItemIds(artifact.item_ids)
        self.num_items = len(artifact.item_ids)
        self.max_len = int(artifact.max_len)
        self.receptive_field = receptive_field(self.model)
        self.length_buckets = self._length_buckets(length_buckets)
        self.num_tail_clusters = max(0, len(self.model.cutoffs) - 1) if self.model.softmax == "tree" else 0
        self.params = jax.device_put(artifact.params)  # int8 tables stay int8 on the device
        model = self.model
        # Per model, once: the early stop's statistics (from the dequantised weights, so the bound
        # holds for the model that is served) and the state of an empty session.
        self.stats = jax.jit(lambda p: model.apply({"params": dequantize_tree(p)}, method=NextItNet.serving_stats))(
            self.params)
        self._padding = jax.tree.map(np.asarray, jax.jit(lambda p: padding_row(model, dequantize_tree(p)))(self.params))
        # What a window's padding positions feed every conv layer: the left context of a shorter
        # encode (the stream context starts from the padding state instead).
        self._padded_window = None
        if context == "window":
            self._padded_window = jax.tree.map(np.asarray, jax.jit(
                lambda p: padding_window(model, dequantize_tree(p), self.max_len))(self.params))
        # A session's state travels as one float32 row [1, S] (its pytree raveled; the small int
        # count is exact in float32): stacking and splitting a batch of sessions is then one array
        # operation, not one per leaf and session. The jitted calls unravel it inside.
        packed_row, self._unravel = ravel_pytree(jax.tree.map(lambda a: a[0], self._padding))
        self._padding_packed = np.asarray(packed_row, np.float32)[None]
        self._h_columns = np.asarray(self._unravel(np.arange(packed_row.size, dtype=np.float32))["h"]).astype(np.int64)
        self._hidden_fn = jax.jit(self._hidden)
        self._top_fn = jax.jit(self._top, static_argnums=5)
        self._recommend_fn = jax.jit(self._recommend, static_argnums=5)
        self._score_fn = jax.jit(self._score)
        self._append_fn = jax.jit(self._append)
        self._append_top_fn = jax.jit(self._append_top, static_argnums=7)
        self._state_fn = jax.jit(self._state)

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> "Recommender":
        return cls(load_artifact(path), **kwargs)

    # -- jitted pieces: parameters (possibly quantised) are arguments, dequantised inside ----------

    def _hidden(self, params, histories):
        """h [B, d] after each row's last item; histories [B, T] left-padded with 0, T one of
        ``length_buckets`` (the window's earlier positions are padding)."""
        p = dequantize_tree(params)
        if self.context == "window":
            prefixes = window_prefixes(self.model, self._padded_window, histories.shape[1])

            def rows(x):
                return encode_suffix(self.model, p, x, prefixes)[:, -1]
        else:
            def rows(x):
                return encode_state(self.model, p, x, self._padding)[1]
        return in_row_chunks(rows, histories, self.encoder_rows)

    def _top(self, params, stats, h, exclude, budget, n):
        p = dequantize_tree(params)
        return self.model.apply({"params": p}, h, n, stats, exclude, budget,
                                method=lambda m, *a: m.head.recommend(*a))

    def _recommend(self, params, stats, histories, exclude, budget, n):
        """Encode and top-n in one call: one dispatch per batch, the hidden states never leave the device."""
        return self._top(params, stats, self._hidden(params, histories), exclude, budget, n)

    def _score(self, params, h, candidates):
        return self.model.apply({"params": dequantize_tree(params)}, h, candidates,
                                method=lambda m, *a: m.head.score(*a))

    def _append(self, params, packed, items, mask):
        state, _ = append_many(self.model, dequantize_tree(params), self._unpack(packed), items, mask=mask)
        return self._pack(state), state["h"]

    def _pack(self, state):
        return jax.vmap(lambda row: ravel_pytree(row)[0])(state)

    def _unpack(self, packed):
        return jax.vmap(self._unravel)(packed)

    def unpack_state(self, packed: np.ndarray) -> dict:
        """A packed session state [B, S] as the incremental state pytree (numpy; see incremental.py)."""
        return jax.tree.map(np.asarray, self._unpack(packed))

    def _append_top(self, params, stats, packed, items, mask, exclude, budget, n):
        """Appends the events and recommends from the new state in one call (one dispatch per batch)."""
        packed, h = self._append(params, packed, items, mask)
        return packed, self._top(params, stats, h, exclude, budget, n)

    def _state(self, params, histories):
        p = dequantize_tree(params)
        return in_row_chunks(lambda x: self._pack(encode_state(self.model, p, x, self._padding)[0]), histories,
                             self.encoder_rows)

    # -- public API ------------------------------------------------------------------------------

    @property
    def context_len(self) -> int:
        return self.max_len if self.context == "window" else self.receptive_field

    def _length_buckets(self, widths: Sequence[int] | None | str) -> tuple[int, ...]:
        if widths == "auto":
            return default_length_buckets(self.context_len)
        widths = sorted({int(w) for w in widths or ()})
        if any(not 1 <= w <= self.context_len for w in widths):
            raise RequestError(f"length_buckets={widths} is invalid: give widths from 1 to the context length "
                               f"{self.context_len}")
        return (*(w for w in widths if w < self.context_len), self.context_len)

    def history_width(self, histories: Sequence[Sequence[int]]) -> int:
        """The width a batch of histories is encoded at: the smallest length bucket holding the longest."""
        longest = min(max((len(h) for h in histories), default=0), self.context_len)
        return next(w for w in self.length_buckets if w >= longest)

    def check_n(self, n: int) -> int:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n < self.num_items:
            raise RequestError(f"n={n!r} is invalid: ask for 1 to {self.num_items - 1} items (the catalogue)")
        return int(n)

    def recommend(self, histories: Sequence[Sequence], n: int = 20, exclude_seen: bool | Sequence[bool] = True,
                  max_clusters: int | Sequence[int | None] | None = None) -> list[Recommendation]:
        """Top-n next items for each history of raw ids (most recent last), best first.

        Unknown ids are skipped and reported per row. ``exclude_seen`` (one value or one per row):
        never recommend an item of the history (exact: excluded items score -inf, the early stop's
        bounds still hold).
        ``max_clusters``: at most this many tail clusters per row (one value or one per row; None =
        exact); the result says whether each row is exact.
        """
        n = self.check_n(n)
        known, unknown = zip(*(self.ids.internal(h) for h in histories)) if histories else ((), ())
        budgets = _per_row(max_clusters, len(known), "max_clusters")
        excluding = _per_row(exclude_seen, len(known), "exclude_seen")
        seen = [sorted(set(k)) if x else [] for k, x in zip(known, excluding)]

        def encode_and_rank(start, stop, rows, e, b, n_pad):
            x = left_padded(known[start:stop], self.history_width(known[start:stop]), rows)
            return self._recommend_fn(self.params, self.stats, x, e, b, n_pad)
        results = self._ranked(len(known), n, seen, budgets, encode_and_rank)
        return [Recommendation(items, scores, exact, list(u)) for (items, scores, exact), u in zip(results, unknown)]

    def hidden(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """The hidden states [B, d] of internal-id histories (encoded in bucketed batches)."""
        out = []
        for start in range(0, len(histories), self.max_batch):
            rows = histories[start:start + self.max_batch]
            x = left_padded(rows, self.history_width(rows), bucket(len(rows), largest=self.max_batch))
            out.append(np.asarray(self._hidden_fn(self.params, x))[:len(rows)])
        return np.concatenate(out) if out else np.zeros((0, self.model.dim), np.float32)

    def top(self, hidden: np.ndarray, n: int, exclude: Sequence[Sequence[int]],
            budgets: Sequence[int | None]) -> list[tuple[list, list[float], bool]]:
        """Top-n (raw ids, scores, exact) from hidden states, with per-row exclusions and budgets."""
        def rank(start, stop, rows, e, b, n_pad):
            hp = np.zeros((rows, hidden.shape[1]), np.float32)
            hp[:stop - start] = hidden[start:stop]
            return self._top_fn(self.params, self.stats, hp, e, b, n_pad)
        return self._ranked(len(hidden), n, exclude, budgets, rank)

    def _ranked(self, count: int, n: int, exclude: Sequence[Sequence[int]], budgets: Sequence[int | None],
                run: Callable) -> list[tuple[list, list[float], bool]]:
        """Top-n of ``count`` rows in chunks of at most max_batch: ``run(start, stop, rows, exclude, budget,
        n_pad)`` is the jitted call for rows [start, stop) padded to ``rows``."""
        n = self.check_n(n)
        n_pad = self._n_bucket(n)
        results = []
        for start in range(0, count, self.max_batch):
            stop = min(start + self.max_batch, count)
            rows = bucket(stop - start, largest=self.max_batch)
            e, b = self._top_inputs(exclude[start:stop], budgets[start:stop], rows)
            results += self._decode(run(start, stop, rows, e, b, n_pad), stop - start, n)
        return results

    def _n_bucket(self, n: int) -> int:
        return bucket(n, smallest=8, largest=self.num_items - 1)  # few compiled n, sliced per request

    def _top_inputs(self, exclude: Sequence[Sequence[int]], budgets: Sequence[int | None],
                    rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(exclude [rows, E] padded with -1, budget [rows]) for the jitted top-n."""
        # One exclusion width up to 64 ids (a server compiles it once); wider lists round up to a power of 2.
        e = np.full((rows, bucket(max((len(x) for x in exclude), default=0), smallest=64)), -1, np.int32)
        for r, ids in enumerate(exclude):
            e[r, :len(ids)] = ids
        # Padding rows (past the requests) get no tail cluster: whatever an empty history's early
        # stop would expand, no request needs it (and rows never change each other's answers).
        b = np.zeros((rows,), np.int32)
        b[:len(budgets)] = self.num_tail_clusters
        for r, budget in enumerate(budgets):
            if budget is not None:
                if int(budget) < 0:
                    raise RequestError(f"max_clusters={budget} is invalid: give 0 or more tail clusters (or null)")
                b[r] = min(int(budget), self.num_tail_clusters)
        return e, b

    def _decode(self, out, count: int, n: int) -> list[tuple[list, list[float], bool]]:
        scores, ids, _, exact = (np.asarray(x) for x in out)
        results, raw = [], self.ids.raw
        for r in range(count):
            keep = np.isfinite(scores[r, :n])
            results.append(([raw[i] for i in ids[r, :n][keep].tolist()], scores[r, :n][keep].tolist(), bool(exact[r])))
        return results

    def score(self, history: Sequence, candidates: Sequence) -> Scores:
        """Exact log-probabilities of the next item being each candidate (raw ids), the history
        encoded once and only the head and the candidates' clusters normalised."""
        known, unknown = self.ids.internal(history)
        h = self.hidden([known])
        internal = self.ids.lookup(candidates)
        unknown = [*unknown, *(c for c, i in zip(candidates, internal) if i is None)]
        cand = np.zeros((1, bucket(len(candidates), smallest=8)), np.int32)  # id 0 (padding) scores -inf
        cand[0, :len(internal)] = [0 if i is None else i for i in internal]
        out = np.asarray(self._score_fn(self.params, h, cand))[0]
        return Scores([float(out[j]) if i is not None else None for j, i in enumerate(internal)], list(unknown))

    def session(self, history: Sequence = ()) -> "Session":
        """A user's cached state: each ``append`` costs O(layers), not O(L x layers)."""
        return self.sessions([history])[0]

    def sessions(self, histories: Sequence[Sequence]) -> list["Session"]:
        """One session per history (raw ids), encoded in bucketed batches."""
        known, unknown = zip(*(self.ids.internal(h) for h in histories)) if histories else ((), ())
        # An empty history's state is the padding state computed at load: nothing to encode (a
        # server creates every new user's session this way).
        packed: list[np.ndarray | None] = [None if k else self._padding_packed.copy() for k in known]
        todo = [r for r, k in enumerate(known) if k]
        for start in range(0, len(todo), self.max_batch):
            chunk = todo[start:start + self.max_batch]
            # Items before the receptive field cannot reach the state.
            x = left_padded([known[r] for r in chunk], self.receptive_field, bucket(len(chunk), largest=self.max_batch))
            for r, row in zip(chunk, _rows(self._state_fn(self.params, x), len(chunk))):
                packed[r] = row
        return [Session(self, row, set(k), list(u)) for row, k, u in zip(packed, known, unknown)]

    def append_sessions(self, sessions: Sequence["Session"], items: Sequence[Sequence]) -> list[list]:
        """Appends each session's new events (raw ids, oldest first) in batched calls; returns each
        one's unknown ids (skipped). Sessions with nothing known to append are left as they were."""
        known, unknown = self._known_events(sessions, items)
        todo = [r for r, k in enumerate(known) if k]
        for start in range(0, len(todo), self.max_batch):
            chunk = todo[start:start + self.max_batch]
            stacked, x = self._stacked([sessions[r] for r in chunk], [known[r] for r in chunk])
            new, _ = self._append_fn(self.params, stacked, x, x > 0)
            self._store(sessions, chunk, new)
        self._note(sessions, known, unknown)
        return [list(u) for u in unknown]

    def advance(self, sessions: Sequence["Session"], items: Sequence[Sequence], n: int = 20,
                exclude_seen: bool | Sequence[bool] = True,
                max_clusters: int | Sequence[int | None] | None = None) -> list[Recommendation]:
        """Appends each session's new events and recommends its top-n from the new state: one jitted
        call per batch of sessions (what a session-event request needs; see ``recommend``)."""
        n = self.check_n(n)
        budgets = _per_row(max_clusters, len(sessions), "max_clusters")
        excluding = _per_row(exclude_seen, len(sessions), "exclude_seen")
        known, unknown = self._known_events(sessions, items)
        self._note(sessions, known, unknown)
        results = []
        for start in range(0, len(sessions), self.max_batch):
            chunk = list(range(start, min(start + self.max_batch, len(sessions))))
            stacked, x = self._stacked([sessions[r] for r in chunk], [known[r] for r in chunk])
            seen = [sorted(sessions[r].seen) if excluding[r] else [] for r in chunk]
            e, b = self._top_inputs(seen, budgets[start:start + self.max_batch], x.shape[0])
            new, out = self._append_top_fn(self.params, self.stats, stacked, x, x > 0, e, b, self._n_bucket(n))
            self._store(sessions, chunk, new)
            results += self._decode(out, len(chunk), n)
        return [Recommendation(items_, scores, exact, list(s.unknown_items))
                for (items_, scores, exact), s in zip(results, sessions)]

    def recommend_sessions(self, sessions: Sequence["Session"], n: int = 20, exclude_seen: bool | Sequence[bool] = True,
                           max_clusters: int | Sequence[int | None] | None = None) -> list[Recommendation]:
        """Top-n for each session from its cached state, in batched calls (see ``recommend``)."""
        budgets = _per_row(max_clusters, len(sessions), "max_clusters")
        excluding = _per_row(exclude_seen, len(sessions), "exclude_seen")
        if not sessions:
            return []
        hidden = np.concatenate([s.packed for s in sessions])[:, self._h_columns]
        seen = [sorted(s.seen) if x else [] for s, x in zip(sessions, excluding)]
        return [Recommendation(items, scores, exact, list(s.unknown_items)) for (items, scores, exact), s in
                zip(self.top(hidden, n, seen, budgets), sessions)]

    def _known_events(self, sessions: Sequence["Session"], items: Sequence[Sequence]) -> tuple[tuple, tuple]:
        if len(sessions) != len(items):
            raise RequestError(f"{len(items)} lists of items for {len(sessions)} sessions")
        return tuple(zip(*(self.ids.internal(x) for x in items))) if items else ((), ())

    def _stacked(self, sessions: Sequence["Session"], known: Sequence[Sequence[int]]) -> tuple[Any, np.ndarray]:
        """The sessions' states as one bucketed batch (padding rows: the empty state) and their events
        [rows, T] left-padded with 0 (masked: a row without events keeps its state)."""
        rows = bucket(len(sessions), largest=self.max_batch)
        states = [s.packed for s in sessions] + [self._padding_packed] * (rows - len(sessions))
        stacked = states[0] if rows == 1 else np.concatenate(states)
        return stacked, left_padded(known, bucket(max((len(k) for k in known), default=1)), rows)

    @staticmethod
    def _store(sessions: Sequence["Session"], chunk: Sequence[int], new: Any) -> None:
        for r, row in zip(chunk, _rows(new, len(chunk))):
            sessions[r].packed = row

    @staticmethod
    def _note(sessions: Sequence["Session"], known: Sequence, unknown: Sequence) -> None:
        for session, k, u in zip(sessions, known, unknown):
            session.seen.update(k)
            session.unknown_items.extend(u)


def _per_row(value: Any, rows: int, name: str) -> list:
    """A request option given once for all rows or as a list or tuple with one value per row."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * rows
    if len(values) != rows:
        raise RequestError(f"{name} has {len(values)} values for {rows} histories")
    return values


def _rows(packed: Any, count: int) -> list[np.ndarray]:
    """The first `count` rows of a packed batch, each its own [1, S] copy (no row keeps the batch alive)."""
    host = np.asarray(packed)
    return [host] if count == 1 and host.shape[0] == 1 else [host[r:r + 1].copy() for r in range(count)]


class Session:
    """One user's incremental state (batch 1) and the items seen so far."""

    def __init__(self, rec: Recommender, packed: np.ndarray, seen: set[int], unknown: list) -> None:
        self.rec, self.packed, self.seen, self.unknown_items = rec, packed, seen, list(unknown)

    @property
    def state(self) -> dict:
        """The incremental state (queues, count, h; batch 1), unpacked from ``packed``."""
        return self.rec.unpack_state(self.packed)

    def append(self, items: Sequence) -> list:
        """Appends events (raw ids, oldest first); returns the unknown ones, which are skipped."""
        return self.rec.append_sessions([self], [items])[0]

    def recommend(self, n: int = 20, exclude_seen: bool = True, max_clusters: int | None = None) -> Recommendation:
        return self.rec.recommend_sessions([self], n, exclude_seen, max_clusters)[0]

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes) + 28 * len(self.seen)  # the seen set: about one int object per item


class SessionStore:
    """Sessions by user id, least recently used first out, bounded by entries and bytes.

    Thread-safe: every method holds one lock (a server's batch thread and its event loop share it).
    """

    def __init__(self, rec: Recommender, max_entries: int = 100_000, max_bytes: int = 1 << 30) -> None:
        self.rec, self.max_entries, self.max_bytes = rec, max_entries, max_bytes
        self._sessions: collections.OrderedDict[Hashable, Session] = collections.OrderedDict()
        self.nbytes = 0
        self.evicted = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, user: Hashable) -> bool:
        return user in self._sessions

    def get(self, user: Hashable) -> Session:
        """The user's session (a new empty one if none), now the most recently used."""
        with self._lock:
            session = self._sessions.pop(user, None)
            if session is None:
                session = self.rec.session()
            else:
                self.nbytes -= session.nbytes
            return self._put(user, session)

    def append(self, user: Hashable, items: Sequence) -> Session:
        with self._lock:
            session = self.get(user)
            self.nbytes -= session.nbytes
            session.append(items)
            self.nbytes += session.nbytes
            self._evict(keep=user)
            return session

    def advance(self, users: Sequence[Hashable], items: Sequence[Sequence], n: int = 20,
                exclude_seen: bool | Sequence[bool] = True,
                max_clusters: int | Sequence[int | None] | None = None) -> list[Recommendation]:
        """Appends each user's events and recommends from the new state, batched (``Recommender.advance``).

        A user who appears k times is served in k successive rounds, in order, so no event is lost.
        """
        budgets = _per_row(max_clusters, len(users), "max_clusters")
        excluding = _per_row(exclude_seen, len(users), "exclude_seen")
        if len(items) != len(users):
            raise RequestError(f"{len(items)} lists of items for {len(users)} users")
        self.rec.check_n(n)
        results: list[Recommendation | None] = [None] * len(users)
        pending = list(range(len(users)))
        with self._lock:
            while pending:
                taken, later, in_round = [], [], set()
                for r in pending:
                    if users[r] in in_round:
                        later.append(r)
                    else:
                        in_round.add(users[r])
                        taken.append(r)
                sessions = [self.get(users[r]) for r in taken]
                # A small store may already have evicted some of them again: count only the kept ones.
                kept = [self._sessions.get(users[r]) is s for r, s in zip(taken, sessions)]
                self.nbytes -= sum(s.nbytes for s, k in zip(sessions, kept) if k)
                out = self.rec.advance(sessions, [items[r] for r in taken], n, [excluding[r] for r in taken],
                                       [budgets[r] for r in taken])
                self.nbytes += sum(s.nbytes for s, k in zip(sessions, kept) if k)
                for r, rec in zip(taken, out):
                    results[r] = rec
                self._evict(keep=users[taken[-1]])
                pending = later
        return results

    def delete(self, user: Hashable) -> bool:
        with self._lock:
            session = self._sessions.pop(user, None)
            if session is not None:
                self.nbytes -= session.nbytes
            return session is not None

    def _put(self, user: Hashable, session: Session) -> Session:
        self._sessions[user] = session
        self.nbytes += session.nbytes
        self._evict(keep=user)
        return session

    def _evict(self, keep: Hashable | None = None) -> None:
        while self._sessions and (len(self._sessions) > self.max_entries or self.nbytes > self.max_bytes):
            user, oldest = next(iter(self._sessions.items()))
            if user == keep and len(self._sessions) == 1:
                break  # a single session larger than the byte bound is still served
            self._sessions.pop(user)
            self.nbytes -= oldest.nbytes
            self.evicted += 1
