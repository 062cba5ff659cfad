"""Orbax checkpoints of a run (training state, best parameters), with user-facing errors."""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cprec.errors import WorkdirError


class Checkpointer:
    """Saves and restores the dict-shaped train state under `<workdir>/checkpoints`.

    ``read_only``: for readers of a run that may still be training (evaluation, export): nothing is
    created, written or deleted, and no step is pruned (``keep`` is ignored).
    """

    def __init__(self, workdir: str | pathlib.Path, keep: int | None, subdir: str = "checkpoints",
                 read_only: bool = False) -> None:
        self.directory = pathlib.Path(workdir).absolute() / subdir
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_root_metadata=False,
                                                   save_interval_steps=0, enable_async_checkpointing=False)
        else:
            # Across hosts, async saves wait on a completion barrier that our tests saw time out;
            # synchronous saves need no such barrier.
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                   enable_async_checkpointing=jax.process_count() == 1)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, force: bool = False) -> None:
        """Saves ``step`` (async: the write overlaps training; `close()` waits for it).

        ``force``: also a step below the latest kept one, which the manager otherwise skips silently.
        """
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def delete(self, step: int) -> None:
        """Removes a kept step, once every save in flight has finished."""
        self._manager.wait_until_finished()
        self._manager.delete(step)

    def restore(self, step: int, like: Any, partial: bool = False) -> Any:
        """Restores step `step` into arrays shaped like `like`; a damaged checkpoint is a WorkdirError.

        ``partial``: `like` may name a subset of the saved tree (e.g. only ``{"params": ...}`` of a
        training state), and only that part is read: no optimizer is needed to load a model.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        self._manager.wait_until_finished()  # a save of this step may still be in flight
        try:
            if partial:  # the manager's standard handler restores whole trees only
                args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
                with ocp.PyTreeCheckpointer() as reader:
                    return reader.restore(self.directory / str(step) / "default", args=args)
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as exc:  # orbax raises many types for damaged files
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise WorkdirError(
                f"checkpoint {self.directory / str(step)} is corrupted or does not match the model ({reason}); "
                "delete that step folder to resume from an earlier one, or use a new --workdir"
            ) from None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def best_state_like(params: Any) -> dict:
    """The layout of a `best/` checkpoint (parameters, their validation score and step), for restoring."""
    return {"params": params, "score": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}
