"""Magnitude pruning of the item table (Zhu and Gupta, "To prune, or not to prune", 2017).

The table is the uncompressed ``[V, dim]`` one (``embed/embedding``, as ``FullTable``) with a target
share ``prune_sparsity`` of its entries zero. Training (``cprec.train.pruning``) raises the share
cubically from 0 to the target over a window of the run, each time zeroing the smallest-magnitude
entries, and keeps zeroed entries at zero after every update; so the zeros in the parameters are
the mask, and the forward pass is the full table's. Tran et al. (ACM TOIS 2024) found this simple
method rivals far more complex embedding compressions. The budget counts non-zeros; an export
stores the table sparsely (``cprec.serve.sparse``), so the artifact shrinks with them.
"""
from __future__ import annotations

from cprec.errors import ConfigError
from cprec.model.tables.full import FullTable


def pruned_count(num_items: int, dim: int, sparsity: float) -> int:
    """Entries zeroed at ``sparsity`` (the count the pruner reaches)."""
    return int(round(float(sparsity) * num_items * dim))


def prune_param_count(num_items: int, dim: int, options: dict) -> int:
    """Non-zero entries of the pruned table."""
    return num_items * dim - pruned_count(num_items, dim, options["prune_sparsity"])


def prune_fit(budget: int, num_items: int, dim: int, options: dict) -> dict | None:
    """The sparsity that keeps ``budget`` non-zeros (0 if the whole table fits); None below one."""
    size = num_items * dim
    keep = min(int(budget), size)
    return {**options, "prune_sparsity": (size - keep) / size} if keep >= 1 else None


class PrunedTable(FullTable):
    prune_sparsity: float = 0.0

    def setup(self) -> None:
        if not 0.0 < self.prune_sparsity < 1.0:
            raise ConfigError(f"model.prune_sparsity={self.prune_sparsity} is invalid: give the share of the item "
                              f"table's entries to prune, in (0, 1), or a model.budget for the solver to choose it")
        super().setup()
