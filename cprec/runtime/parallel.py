"""Data parallelism over all devices and hosts with `jax.sharding`.

Parameters and optimizer state are replicated; every batch is split along
its first axis over a 1-D mesh named 'data'. On several hosts (SLURM tasks),
`jax.distributed.initialize()` joins them and each host feeds its own rows of
the global batch, so the global batch and its order are those of one device.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed  # the coordination client: jax has no public barrier with a timeout
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cprec.errors import ConfigError

CONNECT_TIMEOUT_MS = 5 * 60 * 1000  # as long as jax.distributed.initialize waits for every host


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
        if jax.process_count() > 1:
            self._connect_hosts()

    def _connect_hosts(self) -> None:
        """Runs the first collective over the mesh while every host is at the same point.

        Gloo (the CPU collectives) connects the hosts at the first collective and fails if one
        is more than 30 s late, which an uneven first compile on a busy machine easily is. Once
        connected, collectives wait as long as it takes, so connect them here, behind a barrier.
        """
        total = jax.jit(jnp.sum, out_shardings=self.replicated)
        ones = self.shard(np.ones(self.num_devices, np.float32))
        compiled = total.lower(ones).compile()  # before the barrier, so no host compiles after it
        distributed.global_state.client.wait_at_barrier("cprec_connect_hosts", CONNECT_TIMEOUT_MS)
        jax.block_until_ready(compiled(ones))

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
