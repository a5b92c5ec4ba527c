"""Orbax checkpoints of the train state together with the data-iterator state.

`<workdir>/checkpoints/<step>` keeps the latest N (state + grain iterator, for exact resume);
`<workdir>/checkpoints/best/<step>` keeps the best-by-mIoU state. Teachers are never saved here.
`restore_raw` reads a state back without a template (tools that inspect a run).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mgd_jax import paths
from mgd_jax.errors import ExportError

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
    # Multi-host: orbax names its barriers by step; two managers saving the same step (the latest
    # and the best at an evaluation step) would join one barrier and hang without a prefix each.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
        """`directory`: a local path or a URL orbax writes natively (`gs://bucket/run/...`)."""
        directory = paths.resolve(directory)
        self.directory = directory
        self._latest = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
                multiprocessing_options=_barriers("latest"),
            ),
            item_names=("state", "data_iter"),
        )
        self._best = ocp.CheckpointManager(
            directory / BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m["miou"], best_mode="max",
                enable_async_checkpointing=asynchronous, create=True,
                multiprocessing_options=_barriers("best"),
            ),
            item_names=("state",),
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def restore_or_init(self, state: Any, data_iter: Any) -> tuple[Any, bool]:
        """Restores the latest state and advances `data_iter` in place to its saved position.

        Returns `(state, resumed)`; `state` keeps its shardings (the given state is the template).
        """
        step = self._latest.latest_step()
        if step is None:
            return state, False
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self._latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data_iter=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        return restored["state"], True

    def save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> None:
        self._latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=grain.checkpoint.CheckpointSave(data_iter),
            ),
            force=force,
        )

    def save_best(self, step: int, state: Any, miou: float) -> None:
        self._best.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
            metrics={"miou": float(miou)}, force=True,
        )

    def best(self, template: Any) -> tuple[int, Any] | None:
        """(step, state) of the best checkpoint so far, or None."""
        self._best.wait_until_finished()
        step = self._best.best_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._best.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return step, restored["state"]

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def _is_not_read_only_notice(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return "read only" not in message and "read_only=True" not in message


def _read_only(where: epath.Path, **kwargs: Any) -> ocp.CheckpointManager:
    """A read-only manager, without orbax's warnings about it (reading a run is the point)."""
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_is_not_read_only_notice)
    try:
        return ocp.CheckpointManager(
            where, options=ocp.CheckpointManagerOptions(read_only=True), **kwargs)
    finally:
        absl_logger.removeFilter(_is_not_read_only_notice)


def _saved_steps(where: epath.Path) -> list[int]:
    if not where.is_dir():
        return []
    with _read_only(where) as manager:
        return sorted(manager.all_steps())


def restore_raw(workdir: str, step: int | str = "latest") -> tuple[int, dict[str, Any]]:
    """(step, state as nested dicts of arrays on one local device) of a workdir's checkpoint;
    `step` is "latest", "best" or a step number (of the latest ones, else of the best).
    Needs no template and works on any topology: for tools that read a run (also while it
    trains: a checkpoint still being written is not listed)."""
    directory = paths.resolve(workdir) / CHECKPOINTS_DIR
    best_dir = directory / BEST_DIR
    latest, best = _saved_steps(directory), _saved_steps(best_dir)
    if step == "best" or (step != "latest" and int(step) not in latest and int(step) in best):
        where, steps = best_dir, best
    else:
        where, steps = directory, latest
    if not steps:
        raise ExportError(f"{workdir}: no {'best ' if where == best_dir else ''}checkpoints "
                          f"in {where} yet")
    chosen = steps[-1] if step in ("latest", "best") else int(step)
    if chosen not in steps:
        raise ExportError(f"{workdir}: no checkpoint at step {step!r}; saved steps: {latest}"
                          + (f", best: {best}" if best else ""))
    with _read_only(where, item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
            manager.item_metadata(chosen)["state"],
        )
        restored = manager.restore(
            chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
    return int(chosen), dict(restored["state"])
