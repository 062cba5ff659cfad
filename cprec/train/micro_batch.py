"""How many rows one loss-and-gradient pass of the train step covers (gradient accumulation).

On CPU the train step is bound by memory traffic, not by its matmuls: a whole batch's activations
(B x L x d floats per layer) outgrow the caches, so each of the many elementwise passes per residual
block (pad, concatenate, LayerNorm, ReLU and their gradients) streams from DRAM. Splitting the
batch into micro-batches whose activations stay in cache, and summing their gradients in a
`lax.scan`, computes the same gradient (sums of the same per-token terms, in another order)
faster (docs/benchmarks.md, `python -m cprec.bench.nextitnet`). Accelerators want the whole batch
at once, so the automatic choice splits on CPU only.

A full softmax over a large catalogue is the other reason to split, on every platform: it
materialises [positions, V] logits and their gradient (B x L x V floats twice). The automatic
choice also caps a micro-batch's logits at a memory budget when it knows V.
"""
from __future__ import annotations

import jax
import ml_collections

from cprec.errors import ConfigError

# Positions (rows x L) per micro-batch that ran fastest here: 3,200 at d=64, 1,600 at d=256.
# Roughly the activations of one layer fitting in a core's share of cache, hence the 1/sqrt(d).
_CPU_POSITIONS_AT_D64 = 3200
# Bytes a full softmax's float32 logits plus their gradient may take in one micro-batch.
_FULL_LOGITS_BUDGET = {"cpu": 1 << 30, "accelerator": 8 << 30}


def _largest_divisor(n: int, at_most: int) -> int:
    return max(r for r in range(1, max(1, min(at_most, n)) + 1) if n % r == 0)


def _cpu_cache_rows(dim: int, max_len: int) -> int:
    target = _CPU_POSITIONS_AT_D64 * (64 / dim) ** 0.5 / max_len
    rows = 1
    while rows * 2 <= target:
        rows *= 2
    return rows


def _per_device_rows(config: ml_collections.ConfigDict, num_devices: int) -> int:
    return max(1, config.train.batch_size // num_devices)


def micro_batch_rows(config: ml_collections.ConfigDict, num_devices: int | None = None,
                     platform: str | None = None, num_items: int | None = None) -> int:
    """Rows of one device in one micro-batch (``config.train.micro_batch_size``; 0 = automatic).

    Automatic: the whole per-device batch on accelerators; on CPU a cache-sized chunk (see the
    module docstring); with a full softmax and ``num_items`` (its output columns) known, also
    no more rows than keep the logits within _FULL_LOGITS_BUDGET; always a divisor of the
    per-device batch. An explicit size must divide the per-device batch.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    platform = jax.default_backend() if platform is None else platform
    t = config.train
    per_device = _per_device_rows(config, num_devices)
    size = int(t.micro_batch_size)
    if size > 0:
        if per_device % size:
            raise ConfigError(
                f"config.train.micro_batch_size={size} does not divide the {per_device} rows each of the "
                f"{num_devices} device(s) gets from train.batch_size={t.batch_size}; use a divisor of {per_device} "
                "or 0 (automatic)")
        return size
    max_len = int(config.data.max_len)
    rows = per_device if platform != "cpu" else _cpu_cache_rows(int(config.model.dim), max_len)
    if num_items is not None and config.model.softmax == "full":
        budget = _FULL_LOGITS_BUDGET["cpu" if platform == "cpu" else "accelerator"]
        rows = min(rows, budget // (2 * 4 * max_len * num_items))
    return _largest_divisor(per_device, rows)


def num_micro_batches(config: ml_collections.ConfigDict, num_devices: int | None = None,
                      platform: str | None = None, num_items: int | None = None) -> int:
    """How many micro-batches one train step accumulates."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    return _per_device_rows(config, num_devices) // micro_batch_rows(config, num_devices, platform, num_items)
