"""Deterministic training batches: the batch of step s depends only on (seed, s).

That makes a resumed run see exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np


class WindowBatcher:
    """Shuffled fixed-size batches of training windows, one permutation per epoch.

    The last batch of an epoch is filled with all-padding windows, whose
    targets are masked out of the loss, so no window is dropped and every
    batch has the same shape (no recompilation).
    """

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = -(-len(windows) // batch_size)
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def batch(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._epoch = epoch
        idx = np.sort(self._perm[i * self.batch_size : (i + 1) * self.batch_size])  # sorted: memmap-friendly
        out = np.zeros((self.batch_size, self.windows.shape[1]), np.int32)
        out[: len(idx)] = self.windows[idx]
        return out
