"""Data parallelism over all devices and hosts with `jax.sharding`.

Parameters and optimizer state are replicated; every batch is split along
its first axis over a 1-D mesh named 'data'. On several hosts (SLURM tasks),
`jax.distributed.initialize()` joins them and each host feeds its own rows of
the global batch, so the global batch and its order are those of one device.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cprec.errors import ConfigError


def initialize_distributed() -> None:
    """Joins the hosts of a multi-task SLURM job (no-op for a single process)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        # CPU hosts need a collectives backend; GPUs use NCCL and ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # reads the coordinator and process ids from SLURM's variables


class DataParallel:
    """Places replicated state and batch-sharded inputs on a 'data' mesh of all devices."""

    def __init__(self) -> None:
        self.mesh = Mesh(np.array(jax.devices()), ("data",))
        self.num_devices = self.mesh.size
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))

    def check_divides(self, key: str, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise ConfigError(
                f"config.{key}={batch_size} does not divide by the {self.num_devices} devices; "
                f"use a multiple of {self.num_devices}"
            )

    def replicate(self, tree):
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        # Across hosts, build each global array from this host's copy (every host holds the same values).
        def place(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

        return jax.tree.map(place, tree)

    def shard(self, global_batch: np.ndarray) -> jax.Array:
        """The global batch (the same on every host) as one array split over all devices."""
        if jax.process_count() == 1:
            return jax.device_put(global_batch, self.sharded)
        rows = len(global_batch) // jax.process_count()
        start = jax.process_index() * rows
        return jax.make_array_from_process_local_data(self.sharded, global_batch[start : start + rows])

    @staticmethod
    def gather(x: jax.Array) -> np.ndarray:
        """A batch-sharded result as one host array (gathered from every host when there are several)."""
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
