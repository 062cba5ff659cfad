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
import hashlib
import json
import math
import os
import pathlib
import threading
import zipfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from cprec.errors import CprecError
from cprec.model.conv import padded_conv_fast
from cprec.model.sasrec import SASRec
from cprec.model.sequential import SequentialRecommender
from cprec.serve.artifact import Artifact, load_artifact
from cprec.serve import incremental, kv_cache
from cprec.serve.chunks import in_row_chunks
from cprec.serve.incremental import (encode_suffix, padding_window,
                                     receptive_field, window_prefixes)
from cprec.serve.quantize import dequantize_tree

CONTEXTS = ("window", "stream")
# Items a request or a session excludes with exclude_seen: its E most recent distinct ones (one
# compiled exclusion width; the StableHLO export takes the same). An artifact may set its own E
# (manifest "max_exclude"); this is the default.
MAX_EXCLUDE = 128


def default_encoder_rows() -> int | None:
    """Rows per pass of the conv stack inside one jitted call (None: the whole batch at once).

    On CPU the stack over [B*T, d] slows down per row once a batch's activations outgrow the
    caches, so a big batch is encoded in chunks of 64 rows (measured in docs/serving.md, "HTTP
    server benchmark"). A GPU wants the whole batch.
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


def recommend_program(model: SequentialRecommender, params: Any, stats: Any, histories: jax.Array, exclude: jax.Array,
                      max_clusters: jax.Array, n: int, padded_window: tuple, encoder_rows: int | None = None,
                      conv: Callable = padded_conv_fast) -> tuple[jax.Array, ...]:
    """The one recommend computation (pure; ``Recommender`` jits it, ``stablehlo.py`` exports it):
    histories [B, T] (the last T ids of an L-item window, left-padded with 0) -> the hidden state
    after the last item -> the head's exact top-n with exclusions [B, E] (-1: none) and per-row
    cluster budgets [B]. Returns (scores, ids, expanded, exact).

    ``params`` as stored (int8 tables dequantised inside); ``stats``: the early stop's cluster
    statistics; ``padded_window``: ``padding_window(model, params, L)``, the left context of the
    window's padding positions; ``encoder_rows``: rows per pass of the conv stack
    (``in_row_chunks``); ``conv``: the conv kernel (``padded_conv_fast`` on this backend, or the
    portable ``padded_conv``).
    """
    p = dequantize_tree(params)
    h = window_hidden(model, p, histories, padded_window, encoder_rows, conv)
    return model.apply({"params": p}, h, n, stats, exclude, max_clusters, method=lambda m, *a: m.head.recommend(*a))


def window_hidden(model: SequentialRecommender, params: Any, histories: jax.Array, padded_window: tuple | None,
                  encoder_rows: int | None = None, conv: Callable = padded_conv_fast) -> jax.Array:
    """h [B, d] after each row's last item; histories [B, T], the last T ids of an L-item window
    (every earlier position padding, whose left context ``padded_window`` holds; a SASRec masks
    padding and counts positions from the right, so it encodes the T ids as they are)."""
    if isinstance(model, SASRec):
        return in_row_chunks(lambda x: model.apply({"params": params}, x, method="encode")[:, -1], histories,
                             encoder_rows)
    prefixes = window_prefixes(model, padded_window, histories.shape[1])
    return in_row_chunks(lambda x: encode_suffix(model, params, x, prefixes, conv)[:, -1], histories, encoder_rows)


class Shapes:
    """The shapes each kind of jitted call ("recommend", "advance", "score", "top") has compiled.

    With ``only_compiled`` (a server warming up the rest in the background), a call takes the
    cheapest compiled shape that holds it (more rows, a wider history, a larger n or more
    candidates: the answers are the same, padding is never returned), and a batch with more rows
    than any compiled shape runs in chunks of the largest: no request waits on a compile that a
    compiled shape could have spared. Only a shape that no compiled one holds compiles on use.
    """

    def __init__(self) -> None:
        self.only_compiled = False
        self._done: dict[str, frozenset[tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    def fit(self, kind: str, want: tuple[int, ...]) -> tuple[int, ...]:
        done = self._done.get(kind, frozenset())
        if not self.only_compiled or want in done:
            return want
        fits = [s for s in done if all(a >= b for a, b in zip(s, want))]
        return min(fits, key=lambda s: (math.prod(s), s)) if fits else want

    def rows_step(self, kind: str, largest: int) -> int:
        """Rows per chunk of a batch: ``largest``, or with ``only_compiled`` the most any compiled shape holds."""
        done = self._done.get(kind)
        return max(s[0] for s in done) if self.only_compiled and done else largest

    def note(self, kind: str, shape: tuple[int, ...]) -> None:
        if shape not in self._done.get(kind, ()):
            with self._lock:
                self._done[kind] = self._done.get(kind, frozenset()) | {shape}

    def compiled(self, kind: str) -> frozenset[tuple[int, ...]]:
        return self._done.get(kind, frozenset())


class RequestError(CprecError, ValueError):
    """A request the model cannot answer as asked (e.g. n outside [1, number of items])."""


class Recommendation(NamedTuple):
    items: list  # raw item ids, best first
    scores: list[float]  # their log-probabilities
    exact: bool  # False only when max_clusters stopped a cluster that could have changed the list
    unknown_items: list  # history ids the model does not know (skipped)
    session: str | None = None  # session events: "cached", "new" (no cached state) or "rebuilt" (from a history)


class Scores(NamedTuple):
    scores: list  # log-probability per candidate, None for an unknown candidate
    unknown_items: list  # unknown history and candidate ids (skipped / None)


def bucket(size: int, smallest: int = 1, largest: int | None = None) -> int:
    """The padded size of a dimension: the next power of two >= size (and >= smallest), capped at largest."""
    b = max(smallest, 1 << max(0, int(size) - 1).bit_length())
    return b if largest is None else min(b, largest)


def recent_distinct(ids: Iterable[int], limit: int, start: dict | None = None) -> dict:
    """The ``limit`` most recent distinct ids of ``start`` (a previous result) followed by ``ids``,
    as a dict in recency order (oldest first): the exclusion policy of sessions and requests alike."""
    newest = list(dict.fromkeys(reversed(list(ids))))[:limit]  # newest first
    if start and len(newest) < limit:
        taken = set(newest)
        newest += [i for i in reversed(start) if i not in taken][:limit - len(newest)]
    return dict.fromkeys(reversed(newest))


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
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}

    def _sorted_index(self, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(sorted raw ids, their internal ids) when every raw id is of numpy kind 'i' or 'U' (else None);
        built on first use."""
        if kind not in self._sorted:
            index = None
            if kind in "iU" and self.raw[1:]:
                keys = np.asarray(self.raw[1:])
                if keys.dtype.kind == kind:
                    order = np.argsort(keys, kind="stable")
                    index = keys[order], (order + 1).astype(np.int32)
            self._sorted[kind] = index
        return self._sorted[kind]

    def lookup_array(self, raw_ids: Sequence) -> np.ndarray:
        """[M] int32 internal ids, 0 (padding) where unknown: one vectorised search when the ids are all
        integers or all strings like the catalogue's, else ``lookup``."""
        arr = np.asarray(raw_ids) if len(raw_ids) else np.zeros((0,), np.int64)
        index = self._sorted_index(arr.dtype.kind) if arr.ndim == 1 and arr.dtype.kind in "iU" else None
        if index is not None and arr.dtype.kind == "U" and not all(isinstance(r, str) for r in raw_ids):
            index = None  # numpy made text of some integers: look those up as they are
        if index is None:
            return np.asarray([0 if i is None else i for i in self.lookup(raw_ids)], np.int32)
        keys, ids = index
        if keys.dtype.kind == "i" and keys[0] >= 0 and keys[-1] < 4 * len(keys) + 1024:
            dense = self._dense_index(keys, ids)  # dense non-negative ids: one gather, no binary search
            inside = (arr >= 0) & (arr < len(dense))
            return np.where(inside, dense[np.where(inside, arr, 0)], 0).astype(np.int32)
        pos = np.minimum(np.searchsorted(keys, arr), len(keys) - 1)
        return np.where(keys[pos] == arr, ids[pos], 0).astype(np.int32)

    def _dense_index(self, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """[max raw id + 1] int32: the internal id of every raw integer id, 0 where none."""
        if getattr(self, "_dense", None) is None:
            dense = np.zeros(int(keys[-1]) + 1, np.int32)
            dense[keys] = ids
            self._dense = dense
        return self._dense

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
    receptive field, as a ``Session`` does (docs/serving.md says which scores better).
    ``encoder_rows``: rows per pass of the conv stack within a batch ("auto": 64 on CPU, the whole
    batch on GPU; see ``default_encoder_rows``); results do not depend on it.
    ``length_buckets``: the widths a batch of histories is encoded at, the smallest that holds its
    longest history ("auto": 16, 32, ... up to the context length; None: always the context
    length). The positions before a history are padding, whose activations are the same for every
    row and computed once at load, so a batch of 20-item histories encodes 32 positions instead of
    50, with the same results (up to float32 rounding).
    ``max_exclude``: E, how many of a history's most recent distinct items ``exclude_seen`` excludes
    (default: the artifact's manifest ``max_exclude``, else ``MAX_EXCLUDE``); a session keeps only
    those E in ``seen``. Every batch passes exactly E exclusion slots: one compiled shape.
    """

    def __init__(self, artifact: Artifact, context: str = "window", max_batch: int = 256,
                 encoder_rows: int | None | str = "auto",
                 length_buckets: Sequence[int] | None | str = "auto", max_exclude: int | None = None) -> None:
        if context not in CONTEXTS:
            raise RequestError(f"context={context!r} is unknown; valid choices: {', '.join(CONTEXTS)}")
        self.artifact, self.context, self.max_batch = artifact, context, max_batch
        self.max_exclude = int(artifact.manifest.get("max_exclude", MAX_EXCLUDE) if max_exclude is None else max_exclude)
        if self.max_exclude < 1:
            raise RequestError(f"max_exclude={self.max_exclude} is invalid: give 1 or more")
        self.encoder_rows = default_encoder_rows() if encoder_rows == "auto" else encoder_rows
        self.model: SequentialRecommender = artifact.model()
        # A session's state: NextItNet's conv queues, or SASRec's KV cache (same functions, same shapes of use).
        self.sasrec = isinstance(self.model, SASRec)
        self._sessions = kv_cache if self.sasrec else incremental
        self.ids = ItemIds(artifact.item_ids)
        self.num_items = len(artifact.item_ids)
        self.max_len = int(artifact.max_len)
        self.receptive_field = self.max_len if self.sasrec else receptive_field(self.model)
        self.length_buckets = self._length_buckets(length_buckets)
        self.num_tail_clusters = max(0, len(self.model.cutoffs) - 1) if self.model.softmax == "tree" else 0
        self.params = jax.device_put(artifact.params)  # int8 tables stay int8 on the device
        model = self.model
        # Per model, once: the early stop's statistics (from the dequantised weights, so the bound
        # holds for the model that is served) and the state of an empty session.
        self.stats = jax.jit(lambda p: model.apply({"params": dequantize_tree(p)}, method="serving_stats"))(
            self.params)
        # The state of an empty session (an empty state for SASRec, which has no sessions).
        self._padding = jax.tree.map(np.asarray, jax.jit(
            lambda p: self._sessions.padding_row(model, dequantize_tree(p)))(self.params))
        # What a window's padding positions feed every conv layer: the left context of a shorter
        # encode (the stream context starts from the padding state instead).
        self._padded_window = None
        if context == "window" and not self.sasrec:
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
        self.shapes = Shapes()

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> "Recommender":
        """The artifact in ``path``; its StableHLO signature's E (``max_exclude``), if it has one, is
        the default exclusion width, so that both paths answer alike."""
        signature = pathlib.Path(path) / "stablehlo.json"
        if kwargs.get("max_exclude") is None and signature.is_file():
            kwargs["max_exclude"] = json.loads(signature.read_text()).get("max_exclude")
        return cls(load_artifact(path), **kwargs)

    # -- jitted pieces: parameters (possibly quantised) are arguments, dequantised inside ----------

    def _hidden(self, params, histories):
        """h [B, d] after each row's last item; histories [B, T] left-padded with 0, T one of
        ``length_buckets`` (the window's earlier positions are padding)."""
        p = dequantize_tree(params)
        if self.context == "window":
            return window_hidden(self.model, p, histories, self._padded_window, self.encoder_rows)
        return in_row_chunks(lambda x: self._sessions.encode_state(self.model, p, x, self._padding)[1], histories,
                             self.encoder_rows)

    def _top(self, params, stats, h, exclude, budget, n):
        p = dequantize_tree(params)
        return self.model.apply({"params": p}, h, n, stats, exclude, budget,
                                method=lambda m, *a: m.head.recommend(*a))

    def _recommend(self, params, stats, histories, exclude, budget, n):
        """Encode and top-n in one call: one dispatch per batch, the hidden states never leave the device."""
        if self.context == "window":
            return recommend_program(self.model, params, stats, histories, exclude, budget, n, self._padded_window,
                                     self.encoder_rows)
        return self._top(params, stats, self._hidden(params, histories), exclude, budget, n)

    def _score(self, params, stats, histories, candidates):
        """Encode and score candidates [B, M] in one call (only the head and the candidates' clusters)."""
        return self.model.apply({"params": dequantize_tree(params)}, self._hidden(params, histories), candidates,
                                stats, method=lambda m, *a: m.head.score(*a))

    def _append(self, params, packed, items, mask):
        if self.sasrec:  # a full KV cache re-encodes its window; its branches dequantize what they read
            state, _ = kv_cache.append_many(self.model, params, self._unpack(packed), items, mask=mask,
                                            encoder_rows=self.encoder_rows)
        else:
            state, _ = incremental.append_many(self.model, dequantize_tree(params), self._unpack(packed), items,
                                               mask=mask)
        return self._pack(state), state["h"]

    def _pack(self, state):
        return jax.vmap(lambda row: ravel_pytree(row)[0])(state)

    def _unpack(self, packed):
        return jax.vmap(self._unravel)(packed)

    def fingerprint(self) -> str:
        """What a saved session state is valid for: the model's configuration, its items and export,
        and its padding state (a function of the embedding and every conv layer's weights)."""
        m = self.artifact.manifest
        about = [self.artifact.model_kwargs, self.num_items, m.get("created"), m.get("files")]
        digest = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode())
        digest.update(np.ascontiguousarray(self._padding_packed).tobytes())
        return digest.hexdigest()[:32]

    def unpack_state(self, packed: np.ndarray) -> dict:
        """A packed session state [B, S] as the incremental state pytree (numpy; see incremental.py)."""
        return jax.tree.map(np.asarray, self._unpack(packed))

    def _append_top(self, params, stats, packed, items, mask, exclude, budget, n):
        """Appends the events and recommends from the new state in one call (one dispatch per batch)."""
        packed, h = self._append(params, packed, items, mask)
        return packed, self._top(params, stats, h, exclude, budget, n)

    def _state(self, params, histories):
        p = dequantize_tree(params)
        return in_row_chunks(lambda x: self._pack(self._sessions.encode_state(self.model, p, x, self._padding)[0]),
                             histories, self.encoder_rows)

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
        seen = [list(recent_distinct(k, self.max_exclude)) if x else [] for k, x in zip(known, excluding)]

        def encode_and_rank(start, stop, rows, width, e, b, n_pad):
            x = left_padded(known[start:stop], width, rows)
            return self._recommend_fn(self.params, self.stats, x, e, b, n_pad)
        results = self._ranked(len(known), n, seen, budgets, encode_and_rank, "recommend",
                               lambda start, stop: self.history_width(known[start:stop]))
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
        def rank(start, stop, rows, width, e, b, n_pad):
            hp = np.zeros((rows, hidden.shape[1]), np.float32)
            hp[:stop - start] = hidden[start:stop]
            return self._top_fn(self.params, self.stats, hp, e, b, n_pad)
        return self._ranked(len(hidden), n, exclude, budgets, rank, "top", lambda start, stop: 0)

    def _ranked(self, count: int, n: int, exclude: Sequence[Sequence[int]], budgets: Sequence[int | None],
                run: Callable, kind: str, width: Callable[[int, int], int]) -> list[tuple[list, list[float], bool]]:
        """Top-n of ``count`` rows in chunks: ``run(start, stop, rows, width, exclude, budget, n_pad)`` is
        the jitted call for rows [start, stop) padded to a (rows, width, n_pad) shape of ``kind``
        (``Shapes.fit``); ``width(start, stop)`` is the history width those rows need."""
        n = self.check_n(n)
        results = []
        step = self.shapes.rows_step(kind, self.max_batch)
        for start in range(0, count, step):
            stop = min(start + step, count)
            shape = self.shapes.fit(kind, (bucket(stop - start, largest=self.max_batch), width(start, stop),
                                           self._n_bucket(n)))
            rows, w, n_pad = shape
            e, b = self._top_inputs(exclude[start:stop], budgets[start:stop], rows)
            results += self._decode(run(start, stop, rows, w, e, b, n_pad), stop - start, n)
            self.shapes.note(kind, shape)
        return results

    def _n_bucket(self, n: int) -> int:
        return bucket(n, smallest=8, largest=self.num_items - 1)  # few compiled n, sliced per request

    def _top_inputs(self, exclude: Sequence[Sequence[int]], budgets: Sequence[int | None],
                    rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(exclude [rows, E] padded with -1, budget [rows]) for the jitted top-n: always E = max_exclude
        columns, so no request's history widens (and recompiles) its batch."""
        e = np.full((rows, self.max_exclude), -1, np.int32)
        for r, ids in enumerate(exclude):
            if len(ids) > self.max_exclude:
                raise RequestError(f"{len(ids)} items to exclude; at most max_exclude={self.max_exclude} (the most "
                                   "recent distinct ones)")
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
        encoded once and only the head and the candidates' clusters normalised (``score_many``)."""
        return self.score_many([history], [candidates])[0]

    def candidate_width(self, count: int) -> int:
        """The padded candidate count a request of ``count`` candidates is scored at (a power of two >= 8)."""
        return bucket(count, smallest=8)

    def score_many(self, histories: Sequence[Sequence], candidates: Sequence[Sequence]) -> list[Scores]:
        """``score`` of each (history, candidates) pair: one jitted call (encode + scores) per batch
        of rows with the same ``candidate_width``, so a long candidate list widens no other row."""
        if len(histories) != len(candidates):
            raise RequestError(f"{len(candidates)} candidate lists for {len(histories)} histories")
        known, unknown = zip(*(self.ids.internal(h) for h in histories)) if histories else ((), ())
        internal = [self.ids.lookup_array(c) for c in candidates]
        groups: dict[int, list[int]] = {}
        for r, c in enumerate(internal):
            groups.setdefault(self.candidate_width(len(c)), []).append(r)
        out: list[Scores | None] = [None] * len(histories)
        step = self.shapes.rows_step("score", self.max_batch)
        for m, members in groups.items():
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                hist = [known[r] for r in chunk]
                shape = self.shapes.fit("score", (bucket(len(chunk), largest=self.max_batch), self.history_width(hist), m))
                rows, width, m_pad = shape
                x = left_padded(hist, width, rows)
                cand = np.zeros((rows, m_pad), np.int32)  # id 0 (padding) scores -inf
                for k, r in enumerate(chunk):
                    cand[k, :len(internal[r])] = internal[r]
                scores = np.asarray(self._score_fn(self.params, self.stats, x, cand))
                for k, r in enumerate(chunk):
                    ids = internal[r]
                    values = scores[k, :len(ids)].tolist()  # Python floats at once (no object array)
                    missing = np.flatnonzero(ids == 0).tolist()
                    for j in missing:
                        values[j] = None
                    out[r] = Scores(values, [*unknown[r], *(candidates[r][j] for j in missing)])
                self.shapes.note("score", shape)
        return out

    def compile_shape(self, kind: str, shape: tuple[int, ...]) -> None:
        """Compiles (and runs once on padding) the jitted call of ``kind`` at ``shape``: (rows, history
        width, n_pad) for "recommend", (rows, events width, n_pad) for "advance", (rows, history
        width, candidates) for "score"; then ``shapes`` holds it."""
        rows, width, last = shape
        e, b = self._top_inputs([], [], rows)
        ones = np.ones((rows, width), np.int32)
        if kind == "recommend":
            out = self._recommend_fn(self.params, self.stats, ones, e, b, last)
        elif kind == "advance":
            packed = np.repeat(self._padding_packed, rows, axis=0)
            out = self._append_top_fn(self.params, self.stats, packed, ones, ones > 0, e, b, last)
        elif kind == "score":
            out = self._score_fn(self.params, self.stats, ones, np.ones((rows, last), np.int32))
        else:
            raise ValueError(f"unknown kind of call {kind!r}")
        jax.block_until_ready(out)
        self.shapes.note(kind, shape)

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
        return [Session(self, row, recent_distinct(k, self.max_exclude), list(u)[-self.max_exclude:])
                for row, k, u in zip(packed, known, unknown)]

    def appended(self, sessions: Sequence["Session"], items: Sequence[Sequence]) -> list["Session"]:
        """New sessions: each one's events (raw ids, oldest first) appended, in batched calls. The
        given sessions are left as they were (a caller commits the new ones once all succeeded)."""
        known, unknown = self._known_events(sessions, items)
        new = [s.noted(k, u) for s, k, u in zip(sessions, known, unknown)]
        todo = [r for r, k in enumerate(known) if k]
        for start in range(0, len(todo), self.max_batch):
            chunk = todo[start:start + self.max_batch]
            stacked, x = self._stacked([sessions[r] for r in chunk], [known[r] for r in chunk])
            packed, _ = self._append_fn(self.params, stacked, x, x > 0)
            self._store(new, chunk, packed)
        return new

    def append_sessions(self, sessions: Sequence["Session"], items: Sequence[Sequence]) -> list[list]:
        """Appends each session's new events (raw ids, oldest first) in place, once all are computed;
        returns each one's unknown ids (skipped). Sessions with nothing known to append keep their state."""
        new = self.appended(sessions, items)
        for s, n in zip(sessions, new):
            s.assign(n)
        return [self.ids.internal(x)[1] for x in items]

    def advanced(self, sessions: Sequence["Session"], items: Sequence[Sequence], n: int = 20,
                 exclude_seen: bool | Sequence[bool] = True, max_clusters: int | Sequence[int | None] | None = None,
                 ) -> tuple[list["Session"], list[Recommendation]]:
        """New sessions with each one's events appended, and each one's top-n from its new state: one
        jitted call per batch of sessions. Pure: the given sessions are left as they were."""
        n = self.check_n(n)
        budgets = _per_row(max_clusters, len(sessions), "max_clusters")
        excluding = _per_row(exclude_seen, len(sessions), "exclude_seen")
        known, unknown = self._known_events(sessions, items)
        new = [s.noted(k, u) for s, k, u in zip(sessions, known, unknown)]
        results = []
        step = self.shapes.rows_step("advance", self.max_batch)
        for start in range(0, len(sessions), step):
            chunk = list(range(start, min(start + step, len(sessions))))
            shape = self.shapes.fit("advance", (bucket(len(chunk), largest=self.max_batch),
                                                self._events_width([known[r] for r in chunk]), self._n_bucket(n)))
            rows, width, n_pad = shape
            stacked, x = self._stacked([sessions[r] for r in chunk], [known[r] for r in chunk], rows, width)
            seen = [list(new[r].seen) if excluding[r] else [] for r in chunk]
            e, b = self._top_inputs(seen, [budgets[r] for r in chunk], rows)
            packed, out = self._append_top_fn(self.params, self.stats, stacked, x, x > 0, e, b, n_pad)
            self._store(new, chunk, packed)
            results += self._decode(out, len(chunk), n)
            self.shapes.note("advance", shape)
        return new, [Recommendation(items_, scores, exact, list(s.unknown_items))
                     for (items_, scores, exact), s in zip(results, new)]

    def advance(self, sessions: Sequence["Session"], items: Sequence[Sequence], n: int = 20,
                exclude_seen: bool | Sequence[bool] = True,
                max_clusters: int | Sequence[int | None] | None = None) -> list[Recommendation]:
        """``advanced``, then the given sessions take their new states (all of them, only once every
        batch succeeded): what a session-event request needs (see ``recommend``)."""
        new, recs = self.advanced(sessions, items, n, exclude_seen, max_clusters)
        for s, x in zip(sessions, new):
            s.assign(x)
        return recs

    def recommend_sessions(self, sessions: Sequence["Session"], n: int = 20, exclude_seen: bool | Sequence[bool] = True,
                           max_clusters: int | Sequence[int | None] | None = None) -> list[Recommendation]:
        """Top-n for each session from its cached state, in batched calls (see ``recommend``)."""
        budgets = _per_row(max_clusters, len(sessions), "max_clusters")
        excluding = _per_row(exclude_seen, len(sessions), "exclude_seen")
        if not sessions:
            return []
        hidden = np.concatenate([s.packed for s in sessions])[:, self._h_columns]
        seen = [list(s.seen) if x else [] for s, x in zip(sessions, excluding)]
        return [Recommendation(items, scores, exact, list(s.unknown_items)) for (items, scores, exact), s in
                zip(self.top(hidden, n, seen, budgets), sessions)]

    def _known_events(self, sessions: Sequence["Session"], items: Sequence[Sequence]) -> tuple[tuple, tuple]:
        if len(sessions) != len(items):
            raise RequestError(f"{len(items)} lists of items for {len(sessions)} sessions")
        return tuple(zip(*(self.ids.internal(x) for x in items))) if items else ((), ())

    @staticmethod
    def _events_width(known: Sequence[Sequence[int]]) -> int:
        return bucket(max((len(k) for k in known), default=1))

    def _stacked(self, sessions: Sequence["Session"], known: Sequence[Sequence[int]], rows: int | None = None,
                 width: int | None = None) -> tuple[Any, np.ndarray]:
        """The sessions' states as one bucketed batch of ``rows`` (padding rows: the empty state) and
        their events [rows, width] left-padded with 0 (masked: a row without events keeps its state)."""
        rows = bucket(len(sessions), largest=self.max_batch) if rows is None else rows
        states = [s.packed for s in sessions] + [self._padding_packed] * (rows - len(sessions))
        stacked = states[0] if rows == 1 else np.concatenate(states)
        return stacked, left_padded(known, self._events_width(known) if width is None else width, rows)

    @staticmethod
    def _store(sessions: Sequence["Session"], chunk: Sequence[int], new: Any) -> None:
        for r, row in zip(chunk, _rows(new, len(chunk))):
            sessions[r].packed = row


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
    """One user's incremental state (batch 1), the most recent distinct items seen (at most the
    recommender's ``max_exclude``, oldest first) and the latest unknown ids (as many at most)."""

    def __init__(self, rec: Recommender, packed: np.ndarray, seen: dict[int, None], unknown: list) -> None:
        self.rec, self.packed, self.seen, self.unknown_items = rec, packed, seen, list(unknown)

    @property
    def state(self) -> dict:
        """The incremental state (queues, count, h; batch 1), unpacked from ``packed``."""
        return self.rec.unpack_state(self.packed)

    def noted(self, known: Sequence[int], unknown: Sequence) -> "Session":
        """A new session with these events' items seen and unknown ids noted (the same state array)."""
        limit = self.rec.max_exclude
        return Session(self.rec, self.packed, recent_distinct(known, limit, self.seen) if known else self.seen,
                       [*self.unknown_items, *unknown][-limit:])

    def assign(self, other: "Session") -> None:
        self.packed, self.seen, self.unknown_items = other.packed, other.seen, other.unknown_items

    def append(self, items: Sequence) -> list:
        """Appends events (raw ids, oldest first); returns the unknown ones, which are skipped."""
        return self.rec.append_sessions([self], [items])[0]

    def recommend(self, n: int = 20, exclude_seen: bool = True, max_clusters: int | None = None) -> Recommendation:
        return self.rec.recommend_sessions([self], n, exclude_seen, max_clusters)[0]

    @property
    def nbytes(self) -> int:
        # the seen dict and unknown list: about one int object and one slot per item
        return int(self.packed.nbytes) + 64 * (len(self.seen) + len(self.unknown_items))


SESSIONS_FORMAT = "cprec-sessions"


class SessionStore:
    """Sessions by user id, least recently used first out, bounded by entries and bytes.

    Thread-safe, and transactional: ``advance`` reads the sessions it needs under the lock,
    computes without it, and commits every new state only once the whole computation succeeded,
    so a failed batch changes nothing (its retry never applies an event twice), and ``delete``,
    ``len`` or a save never wait on a computation. Batches are expected from one thread at a time
    (a server's batch worker): two concurrent ``advance`` calls for the same user would each
    commit their own result, the later one winning.
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
            session = self._sessions.get(user)
            if session is None:
                session = self.rec.session()
            self._commit({user: session})
            return session

    def append(self, user: Hashable, items: Sequence) -> Session:
        """Appends the user's events (computed outside the lock, then committed); returns the new session."""
        with self._lock:
            session = self._sessions.get(user) or self.rec.session()
        [new] = self.rec.appended([session], [items])
        with self._lock:
            self._commit({user: new})
        return new

    def advance(self, users: Sequence[Hashable], items: Sequence[Sequence], n: int = 20,
                exclude_seen: bool | Sequence[bool] = True,
                max_clusters: int | Sequence[int | None] | None = None,
                histories: Sequence[Sequence | None] | None = None) -> list[Recommendation]:
        """Appends each user's events and recommends from the new state, batched (``Recommender.advanced``).

        A user who appears k times is served in k successive rounds, in order, so no event is lost.
        ``histories`` (one per request, None for none): for a user with no cached session, the
        history (raw ids) to rebuild its state from before appending; each result's ``session``
        says "cached", "new" (no cached session and no history: an empty start) or "rebuilt".
        Nothing is committed unless every round succeeded.
        """
        budgets = _per_row(max_clusters, len(users), "max_clusters")
        excluding = _per_row(exclude_seen, len(users), "exclude_seen")
        histories = [None] * len(users) if histories is None else list(histories)
        if len(items) != len(users) or len(histories) != len(users):
            raise RequestError(f"{len(items)} lists of items and {len(histories)} histories for {len(users)} users")
        self.rec.check_n(n)
        with self._lock:  # bookkeeping only: which users have a cached session
            work = {u: self._sessions[u] for u in dict.fromkeys(users) if u in self._sessions}
        status = ["cached"] * len(users)
        first: dict[Hashable, int] = {}
        for r, u in enumerate(users):
            if u not in work and u not in first:
                first[u] = r
                status[r] = "new" if histories[r] is None else "rebuilt"
        rebuild = [r for r in first.values() if histories[r] is not None]
        for r, s in zip(rebuild, self.rec.sessions([histories[r] for r in rebuild])):
            work[users[r]] = s
        empty = None
        for u in first:
            if u not in work:
                empty = empty or self.rec.session()
                work[u] = empty  # never mutated: every round makes new sessions
        results: list[Recommendation | None] = [None] * len(users)
        pending = list(range(len(users)))
        while pending:
            taken, later, in_round = [], [], set()
            for r in pending:
                (later if users[r] in in_round else taken).append(r)
                in_round.add(users[r])
            new, out = self.rec.advanced([work[users[r]] for r in taken], [items[r] for r in taken], n,
                                         [excluding[r] for r in taken], [budgets[r] for r in taken])
            for r, s, rec in zip(taken, new, out):
                work[users[r]] = s
                results[r] = rec._replace(session=status[r])
            pending = later
        with self._lock:
            self._commit(work)
        return results

    def save(self, path: str | pathlib.Path) -> int:
        """Writes every cached session (least recently used first) to ``path`` atomically: a
        temporary file, synced, renamed over it. Returns how many."""
        path = pathlib.Path(path)
        with self._lock:
            entries = list(self._sessions.items())
        sessions = [s for _, s in entries]
        meta = {"format": SESSIONS_FORMAT, "version": 1, "model": self.rec.fingerprint(),
                "users": [u for u, _ in entries], "unknown_items": [s.unknown_items for s in sessions]}
        width = self.rec._padding_packed.shape[1]
        arrays = {
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "packed": np.concatenate([s.packed for s in sessions]) if sessions else np.zeros((0, width), np.float32),
            "seen": np.fromiter((i for s in sessions for i in s.seen), np.int64),
            "seen_counts": np.asarray([len(s.seen) for s in sessions], np.int64),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return len(entries)

    def load(self, path: str | pathlib.Path) -> int:
        """Adds the sessions saved in ``path`` (by ``save``); returns how many. A file that is not a
        session file of this model raises a one-line CprecError and changes nothing."""
        path = pathlib.Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]))
                packed, seen, counts = z["packed"], z["seen"], z["seen_counts"]
            if not isinstance(meta, dict) or meta.get("format") != SESSIONS_FORMAT:
                raise ValueError("no cprec session header")
            users, unknown = meta["users"], meta["unknown_items"]
            if not (packed.ndim == 2 and packed.shape[0] == len(users) == len(unknown) == len(counts)
                    and int(counts.sum()) == len(seen)):
                raise ValueError("inconsistent sizes")
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise CprecError(f"{path} is not a readable cprec session file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]}); move it away to start without sessions") from None
        if meta.get("model") != self.rec.fingerprint() or packed.shape[1] != self.rec._padding_packed.shape[1]:
            raise CprecError(f"{path} holds the sessions of another model (or another export of it); move it away "
                             "to start without sessions, or serve the model that wrote it")
        limit, bounds = self.rec.max_exclude, np.cumsum(counts)
        loaded = {}
        for r, user in enumerate(users):
            ids = seen[bounds[r] - counts[r]:bounds[r]].tolist()
            loaded[user] = Session(self.rec, packed[r:r + 1].astype(np.float32), dict.fromkeys(ids[-limit:]),
                                   list(unknown[r])[-limit:])
        with self._lock:
            self._commit(loaded)
        return len(loaded)

    def delete(self, user: Hashable) -> bool:
        with self._lock:
            session = self._sessions.pop(user, None)
            if session is not None:
                self.nbytes -= session.nbytes
            return session is not None

    def _commit(self, sessions: dict[Hashable, Session]) -> None:
        """Puts the sessions in (replacing the users' old ones) as the most recently used, in order;
        then evicts the least recently used beyond the bounds. Call with the lock held."""
        for user, session in sessions.items():
            old = self._sessions.pop(user, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._sessions[user] = session
            self.nbytes += session.nbytes
        self._evict(keep=next(reversed(sessions), None))

    def _evict(self, keep: Hashable | None = None) -> None:
        while self._sessions and (len(self._sessions) > self.max_entries or self.nbytes > self.max_bytes):
            user, oldest = next(iter(self._sessions.items()))
            if user == keep and len(self._sessions) == 1:
                break  # a single session larger than the byte bound is still served
            self._sessions.pop(user)
            self.nbytes -= oldest.nbytes
            self.evicted += 1
