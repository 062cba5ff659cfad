"""Cutoffs and ranks chosen from a parameter budget (``model.budget``).

The search, over frequency-ordered training item counts:

- clusters: n = 2..6 clusters; the head holds the most frequent items up to a share of the target
  traffic (20% ... 95%), the tail clusters split the remaining ids geometrically (each larger than
  the one before, as in Grave et al.'s adaptive softmax);
- ranks: the head keeps ``dim``; tail cluster j gets ``dim * (f_j / f_0) ** alpha`` (f = the mean
  count of a cluster's items, Ginart et al.'s mixed-dimension rule), rounded down to a multiple of
  8 (or a power of two below 16), with the smallest alpha >= 0 whose model fits the budget; what
  the rounding leaves is spent raising tail ranks a step, the most-used cluster first;
- choice: the candidate that gives the traffic the most rank, ``sum_j share_j log(d_j) / log(dim)``
  (1 = every token at full rank), and among those within 1% of the best the one whose tree softmax
  costs the least per training token (head + expected tail work, the adaptive softmax cost model).

Everything is a closed form in numpy (no model is built per candidate), deterministic given the
counts, and checked against the built model by ``tests/test_budget.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from cprec.errors import ConfigError

MAX_CLUSTERS = 6
HEAD_SHARES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
NEAR_BEST = 0.01  # candidates this close to the best objective are equal; the cheaper one wins


@dataclasses.dataclass(frozen=True)
class Layers:
    """What a clustering changes in a model: which layers are clustered and how they are tied."""

    num_items: int
    dim: int
    embedding: str  # 'full' | 'blockwise'
    softmax: str  # 'full' | 'tree'
    tie_embeddings: bool = False
    tie_projections: bool = False
    # Any integer rank (mixed-dimension embeddings, as Ginart et al.), instead of whole SIMD tiles.
    integer_ranks: bool = False


@dataclasses.dataclass(frozen=True)
class BudgetChoice:
    cutoffs: tuple[int, ...]
    ranks: tuple[int, ...]
    params: int  # the whole model's
    target: int  # the budget, in parameters
    baseline: int  # the uncompressed model's parameters
    head_share: float  # share of the training targets in the head
    rank_share: float  # sum_j share_j log(d_j) / log(dim)
    softmax_macs: float  # expected multiply-adds of the output layer per training token
    full_softmax_macs: int  # the same for a full softmax (dim * V)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "cutoffs": list(self.cutoffs), "ranks": list(self.ranks),
                "ratio": self.baseline / self.params}

    def summary(self) -> str:
        return (f"budget {self.target:,} params ({self.baseline / self.target:.1f}x): cutoffs {list(self.cutoffs)}, "
                f"ranks {list(self.ranks)} -> {self.params:,} params ({self.baseline / self.params:.2f}x), head "
                f"{self.head_share:.0%} of targets, rank share {self.rank_share:.3f}, output layer "
                f"{self.softmax_macs:,.0f} MACs/token expected ({self.full_softmax_macs / self.softmax_macs:.1f}x "
                f"fewer than a full softmax)")


def parse_budget(spec: str | int | float, baseline: int) -> int:
    """``'20x'`` (a compression ratio against ``baseline``) or ``'5000000'`` / ``5_000_000`` -> parameters."""
    kind, value = check_budget(spec)
    return int(baseline / value) if kind == "ratio" else int(value)


def check_budget(spec: str | int | float) -> tuple[str, float]:
    """``('ratio', r)`` or ``('params', n)`` of a budget spec; ConfigError naming the problem otherwise."""
    text = str(spec).strip().replace("_", "").lower()
    kind = "ratio" if text.endswith("x") else "params"
    try:
        value = float(text[:-1] if kind == "ratio" else text)
    except ValueError:
        value = float("nan")
    if kind == "ratio" and math.isfinite(value) and value < 1.0:
        raise ConfigError(f"model.budget={spec!r} is below 1x: a budget is a compression ratio >= 1 against the "
                          f"uncompressed NextItNet, e.g. '20x'")
    if not (math.isfinite(value) and value >= 1 and (kind == "ratio" or value == int(value))):
        raise ConfigError(f"model.budget={spec!r} is invalid: give a compression ratio such as '20x' or a "
                          f"parameter count such as '5000000'")
    return kind, value


def round_rank(r: float, dim: int) -> int:
    """Down to a multiple of 8 from 16 up, to a power of two below (whole SIMD tiles); in [1, dim]."""
    r = int(min(max(r, 1.0), dim))
    return r if r == dim else (r // 8 * 8 if r >= 16 else 1 << (r.bit_length() - 1))


def cluster_params(layers: Layers, cutoffs: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of the clustered layers (block-wise embedding, tree softmax) for these clusters.

    A full embedding or a full softmax does not depend on the clusters and is not counted here.
    """
    d, bounds = layers.dim, (0,) + tuple(cutoffs)
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    tails = list(zip(sizes[1:], ranks[1:]))
    total = 0
    if layers.embedding == "blockwise":
        total += sum(k * r for k, r in zip(sizes, ranks)) + sum(r * d for _, r in tails)
    if layers.softmax == "tree":
        tokens = d * len(tails)
        projs = 0 if layers.tie_embeddings and layers.tie_projections else sum(d * r for _, r in tails)
        tables = 0 if layers.tie_embeddings else d * sizes[0] + sum(r * k for k, r in tails)
        total += tokens + projs + tables
    return total


def softmax_macs(layers: Layers, shares: Sequence[float], cutoffs: Sequence[int], ranks: Sequence[int]) -> float:
    """Expected multiply-adds of the output layer per training token: the head for every token, tail
    cluster j (projection and items) for the share of tokens whose target lies in it."""
    d = layers.dim
    if layers.softmax != "tree":
        return float(d * layers.num_items)
    bounds = (0,) + tuple(cutoffs)
    head = d * (bounds[1] + len(cutoffs) - 1)
    return float(head + sum(s * (d * r + r * (hi - lo))
                            for s, r, lo, hi in zip(shares[1:], ranks[1:], bounds[1:-1], bounds[2:])))


def _candidate_cutoffs(counts: np.ndarray) -> list[tuple[int, ...]]:
    V = len(counts)
    cum = np.cumsum(counts) / max(counts.sum(), 1e-30)
    out = []
    for n in range(2, MAX_CLUSTERS + 1):
        for share in HEAD_SHARES:
            k1 = int(np.searchsorted(cum, share)) + 1  # ids [0, k1) hold at least `share` of the targets
            if k1 + n - 1 > V:
                continue
            ratio = (V / k1) ** (1.0 / (n - 1))
            cuts = [k1] + [int(round(k1 * ratio ** i)) for i in range(1, n - 1)] + [V]
            if all(b > a for a, b in zip(cuts, cuts[1:])):
                out.append(tuple(cuts))
    return sorted(set(out))


def _ranks(dim: int, mean_freq: np.ndarray, alpha: float, integer: bool = False) -> tuple[int, ...]:
    rel = np.where(mean_freq[0] > 0, mean_freq / max(mean_freq[0], 1e-30), 0.0)
    rounded = (lambda r: int(min(max(r, 1.0), dim))) if integer else (lambda r: round_rank(r, dim))
    ranks = [dim] + [rounded(dim * float(f) ** alpha if f > 0 else 1.0) for f in rel[1:]]
    for j in range(2, len(ranks)):  # rarer clusters never get more rank
        ranks[j] = min(ranks[j], ranks[j - 1])
    return tuple(ranks)


def _fit(layers: Layers, budget: int, cutoffs: tuple[int, ...], mean_freq: np.ndarray) -> tuple[int, ...] | None:
    """The largest ranks of the mixed-dimension family (smallest alpha) that fit ``budget``, else None."""
    fits = lambda ranks: cluster_params(layers, cutoffs, ranks) <= budget
    rule = lambda alpha: _ranks(layers.dim, mean_freq, alpha, layers.integer_ranks)
    if fits(rule(0.0)):
        return rule(0.0)
    lowest = (layers.dim,) + (1,) * (len(cutoffs) - 1)
    if not fits(lowest):
        return None
    lo, hi = 0.0, 1.0
    while not fits(rule(hi)) and hi < 64:
        lo, hi = hi, hi * 2
    if not fits(rule(hi)):  # only the lowest ranks fit: spend what they leave
        return _fill(lowest, fits, layers.dim, layers.integer_ranks)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(rule(mid)) else (mid, hi)
    return _fill(rule(hi), fits, layers.dim, layers.integer_ranks)


def _fill(ranks: tuple[int, ...], fits, dim: int, integer: bool = False) -> tuple[int, ...]:
    """Spends what the rounding left of the budget: raises tail ranks a step at a time, the clusters
    with the most traffic (the first) first, keeping the ranks non-increasing."""
    ranks = list(ranks)
    grown = True
    while grown:
        grown = False
        for j in range(1, len(ranks)):
            up = min(dim, ranks[j] + 1) if integer else _next_rank(ranks[j], dim)
            if up <= ranks[j - 1] and up != ranks[j] and fits(tuple(ranks[:j] + [up] + ranks[j + 1:])):
                ranks[j], grown = up, True
                break
    return tuple(ranks)


def _next_rank(r: int, dim: int) -> int:
    """The next rank of ``round_rank``'s grid above ``r``."""
    return min(dim, r * 2 if r < 16 else r // 8 * 8 + 8)


def _shares(counts: np.ndarray, cutoffs: Sequence[int]) -> np.ndarray:
    bounds = (0,) + tuple(cutoffs)
    total = max(float(counts.sum()), 1e-30)
    return np.array([counts[lo:hi].sum() / total for lo, hi in zip(bounds[:-1], bounds[1:])])


def solve(layers: Layers, item_counts: np.ndarray, budget: int, fixed: int, baseline: int,
          cutoffs: Sequence[int] | None = None) -> BudgetChoice:
    """Cutoffs and ranks whose model (``fixed`` + the clustered layers) has at most ``budget`` parameters.

    ``fixed``: the parameters that do not depend on the clusters (residual stack, a full embedding
    or softmax, the output projection). ``cutoffs`` given: only the ranks are chosen.
    """
    counts = np.asarray(item_counts, dtype=np.float64)
    d = layers.dim
    candidates = [tuple(int(c) for c in cutoffs)] if cutoffs else _candidate_cutoffs(counts)
    if not candidates:
        raise ConfigError(f"model.budget: {len(counts)} items are too few to split into a head and a tail cluster")
    best: list[tuple[float, float, BudgetChoice]] = []
    smallest = None
    for cuts in candidates:
        lowest = cluster_params(layers, cuts, (d,) + (1,) * (len(cuts) - 1))
        smallest = lowest if smallest is None else min(smallest, lowest)
        bounds = (0,) + cuts
        shares = _shares(counts, cuts)
        mean_freq = np.array([counts[lo:hi].mean() for lo, hi in zip(bounds[:-1], bounds[1:])])
        ranks = _fit(layers, budget - fixed, cuts, mean_freq)
        if ranks is None:
            continue
        rank_share = float(sum(s * math.log(r) for s, r in zip(shares, ranks)) / math.log(d)) if d > 1 else 1.0
        choice = BudgetChoice(cuts, ranks, fixed + cluster_params(layers, cuts, ranks), budget, baseline,
                              float(shares[0]), rank_share, softmax_macs(layers, shares, cuts, ranks),
                              d * layers.num_items)
        best.append((rank_share, choice.softmax_macs, choice))
    if not best:
        reach = fixed + smallest
        raise ConfigError(f"model.budget={budget:,} params ({baseline / budget:.1f}x) cannot be reached: the smallest "
                          f"model of this config has {reach:,} ({baseline / reach:.1f}x; {fixed:,} outside the item "
                          f"tables), so give a budget of at least {reach:,} or share more of the residual stack")
    top = max(b[0] for b in best)
    near = [b for b in best if b[0] >= top - NEAR_BEST * abs(top)]
    return min(near, key=lambda b: (b[1], -b[0], b[2].cutoffs))[2]
