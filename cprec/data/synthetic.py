"""Synthetic sequences with Zipf item popularity and learnable sequential structure.

Each item has a topic and a popularity weight (Zipf over a random ranking). Topics form a
sparse Markov chain: every topic has a few successor topics. Every item has one fixed
"successor" item, drawn by popularity from a successor topic of its own topic. A user starts
at a popularity-weighted item of a random topic; at each step, with probability `follow_prob`
the next item is the current item's successor, otherwise a popularity-weighted draw from the
current item's topic. Generation is vectorized over users per time step.
"""

from __future__ import annotations

import numpy as np

from cprec.errors import ConfigError

Events = tuple[np.ndarray, np.ndarray, np.ndarray]

MIN_LENGTH = 5
_LENGTH_SIGMA = 0.5
_SUCCESSOR_TOPICS = 3


class _TopicSampler:
    """Popularity-weighted draws inside topics with one `searchsorted` over all topics.

    Items are grouped by topic; topic t owns the interval [t, t+1) of a concatenated
    cumulative-weight array, so a draw from topic t is `searchsorted(cum, t + uniform)`.
    """

    def __init__(self, topic: np.ndarray, weight: np.ndarray, num_topics: int):
        self.items = np.argsort(topic, kind="stable")
        sizes = np.bincount(topic, minlength=num_topics)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)])
        w = weight[self.items]
        cum = np.cumsum(w)
        before = np.concatenate([[0.0], cum[self.bounds[1:-1] - 1]])  # weight of earlier topics
        sorted_topic = topic[self.items]
        total = cum[self.bounds[1:] - 1] - before
        self.cum = sorted_topic + (cum - before[sorted_topic]) / total[sorted_topic]
        self.cum[self.bounds[1:] - 1] = np.arange(1, num_topics + 1)  # exact topic ends

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = np.searchsorted(self.cum, topics + rng.random(topics.size), side="right")
        # Rounding can land one slot outside the topic; clamp into it.
        j = np.clip(j, self.bounds[topics], self.bounds[topics + 1] - 1)
        return self.items[j]


def generate_synthetic(
    num_users: int = 2000,
    num_items: int = 3000,
    mean_len: float = 40,
    num_topics: int = 50,
    zipf_a: float = 1.1,
    follow_prob: float = 0.6,
    seed: int = 0,
) -> Events:
    """Returns (users, items, timestamps) int64 arrays grouped by user in time order.

    Items are `0..num_items-1`; lengths are lognormal around `mean_len`, at least 5.
    Deterministic in `seed`.
    """
    if num_users < 1 or num_items < 1 or not 1 <= num_topics <= num_items:
        raise ConfigError(
            f"synthetic data needs num_users >= 1 and 1 <= num_topics <= num_items, got "
            f"num_users={num_users}, num_items={num_items}, num_topics={num_topics}; fix data.*"
        )
    if mean_len < MIN_LENGTH or zipf_a < 0 or not 0 <= follow_prob <= 1:
        raise ConfigError(
            f"synthetic data needs mean_len >= {MIN_LENGTH}, zipf_a >= 0, 0 <= follow_prob <= 1, got "
            f"mean_len={mean_len}, zipf_a={zipf_a}, follow_prob={follow_prob}; fix data.*"
        )
    rng = np.random.default_rng(seed)
    weight = (rng.permutation(num_items) + 1.0) ** -zipf_a
    topic = rng.permutation(np.arange(num_items) % num_topics)  # balanced, none empty
    sampler = _TopicSampler(topic, weight, num_topics)
    next_topics = rng.integers(0, num_topics, (num_topics, _SUCCESSOR_TOPICS))
    successor = sampler.draw(next_topics[topic, rng.integers(0, _SUCCESSOR_TOPICS, num_items)], rng)

    mu = np.log(mean_len) - _LENGTH_SIGMA**2 / 2
    lengths = np.maximum(MIN_LENGTH, np.rint(rng.lognormal(mu, _LENGTH_SIGMA, num_users))).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Longest users first, so the users still active at step t are a prefix.
    by_len = np.argsort(-lengths, kind="stable")
    pos = offsets[by_len]
    active = lengths.size - np.searchsorted(lengths[by_len][::-1], np.arange(lengths.max()), side="right")

    items = np.empty(offsets[-1], np.int64)
    cur = sampler.draw(rng.integers(0, num_topics, num_users), rng)
    items[pos] = cur
    for t in range(1, int(lengths.max())):
        prev = cur[: active[t]]
        cur = successor[prev]
        jump = np.flatnonzero(rng.random(prev.size) >= follow_prob)
        cur[jump] = sampler.draw(topic[prev[jump]], rng)
        items[pos[: cur.size] + t] = cur

    users = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    step = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    # Users start at random times and space their events by a per-user gap, so their histories
    # overlap in time as real ones do and a global temporal split holds users on both sides of its
    # cut-offs. Drawn after the items: the items and every user's event order stay those of the seed.
    start = rng.integers(0, 10**9, num_users)
    gap = rng.integers(60, 2 * 10**7, num_users)
    timestamps = np.repeat(start, lengths) + np.repeat(gap, lengths) * step
    return users, items, timestamps
