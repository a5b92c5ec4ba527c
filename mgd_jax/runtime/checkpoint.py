"""Orbax checkpoints of the train state together with the data-iterator state.

`<workdir>/checkpoints/<step>` keeps the latest N (state + grain iterator, for exact resume);
`<workdir>/checkpoints/best/<step>` keeps the best-by-mIoU state. Teachers are never saved here.
`restore_raw` reads a state back without a template (tools that inspect a run).

Every completely written checkpoint is sealed with a hash manifest (`integrity`); resuming skips
a damaged latest one for the newest intact one, with a warning naming both, and moves the damaged
one to `<workdir>/checkpoints_damaged/`. A failed write raises `CheckpointError` at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mgd_jax.runtime import integrity, interrupts, paths
from mgd_jax.runtime.errors import CheckpointError, ExportError

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
DAMAGED_DIR = "checkpoints_damaged"  # beside CHECKPOINTS_DIR: orbax must not list them


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
        # The step of each manager's last started write: a failure found later (a background
        # write, seen at the next save, check or wait) names the step whose write failed.
        self._started: dict[int, int | None] = {id(self._latest): None, id(self._best): None}

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def restore_or_init(self, state: Any, data_iter: Any) -> tuple[Any, bool]:
        """Restores the newest intact checkpoint and advances `data_iter` in place to its saved
        position; newer damaged ones are moved aside with a warning naming both.

        Returns `(state, resumed)`; `state` keeps its shardings (the given state is the template).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        damaged: list[tuple[int, str]] = []
        for step in sorted(self._latest.all_steps(), reverse=True):
            problem = integrity.damage(_step_dir(self._latest, step))
            if problem is None:
                try:
                    restored = self._latest.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract),
                            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
                        ),
                    )
                except Exception as e:  # a missing or unreadable file (orbax, tensorstore)
                    logging.info("restoring step %d failed", step, exc_info=True)  # to log.txt
                    problem = f"{_step_dir(self._latest, step)} cannot be read ({_first_line(e)})"
            if problem is None:
                self._set_aside(damaged, step)
                return restored["state"], True
            damaged.append((step, problem))
        if damaged:
            raise CheckpointError(
                f"{self.directory}: no checkpoint can be resumed from: "
                + "; ".join(f"step {step}: {problem}" for step, problem in damaged)
                + ". Move the folder away to start afresh, or rerun with the config that wrote it")
        return state, False

    def _set_aside(self, damaged: list[tuple[int, str]], used: int) -> None:
        """Moves damaged checkpoints newer than the `used` one out of orbax's sight (their step
        numbers are saved again later), with a warning naming both."""
        if not damaged:
            return
        aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        for step, problem in damaged:
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            logging.warning("checkpoint of step %d is damaged: %s; resuming from step %d (%s) "
                            "instead; the damaged one is moved to %s", step, problem, used,
                            _step_dir(self._latest, used), target)
            if jax.process_index() == 0:
                os.makedirs(aside, exist_ok=True)
                shutil.move(_step_dir(self._latest, step), target)
        _sync("mgd_jax_checkpoints_set_aside")
        self._latest.reload()

    def save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> None:
        """Starts writing the checkpoint of `step` (asynchronously); seals the finished ones."""
        interrupts.fault_point("save:before", step)
        self._finish_started(self._latest)
        with self._writing(self._latest, step):
            self._started[id(self._latest)] = step
            self._latest.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data_iter=grain.checkpoint.CheckpointSave(data_iter),
                ),
                force=force,
            )
        interrupts.fault_point("save:during", step)
        self._seal(self._latest)

    def save_best(self, step: int, state: Any, miou: float) -> None:
        self._finish_started(self._best)
        with self._writing(self._best, step):
            self._started[id(self._best)] = step
            self._best.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                metrics={"miou": float(miou)}, force=True,
            )
        self._seal(self._best)

    def check(self) -> None:
        """Raises `CheckpointError` if a write that has finished in the background failed
        (cheap: call it at every step)."""
        for manager in (self._latest, self._best):
            with self._writing(manager, self._started[id(manager)]):
                manager.check_for_errors()

    def _finish_started(self, manager: ocp.CheckpointManager) -> None:
        """Waits for the manager's write in flight (orbax's `save` would, naming the new step in
        a failure of the old one)."""
        with self._writing(manager, self._started[id(manager)]):
            manager.wait_until_finished()
            manager.check_for_errors()

    @contextlib.contextmanager
    def _writing(self, manager: ocp.CheckpointManager, step: int | None):
        try:
            yield
        except Exception as e:
            logging.info("checkpoint write failed", exc_info=True)  # the log file keeps the trace
            try:  # the finished ones (on a full disk the manifests may fail too: not sealed then)
                self._seal(manager, failed=step)
            except Exception:  # noqa: BLE001 - this error is the one to report
                logging.info("sealing after a failed write failed", exc_info=True)
            intact = sorted(s for s in manager.all_steps()
                            if s != step and integrity.is_sealed(_step_dir(manager, s)))
            raise CheckpointError(
                f"writing the checkpoint of step {step} in {manager.directory} failed: "
                f"{_first_line(e)}; the run stops (intact checkpoints: steps {intact})"
            ) from e

    def _seal(self, manager: ocp.CheckpointManager, failed: int | None = None) -> None:
        """Writes the hash manifest of every finished, unsealed checkpoint (primary process)."""
        busy = failed
        if failed is None and manager.is_saving_in_progress():
            busy = manager.latest_step()
        for step in manager.all_steps():
            where = _step_dir(manager, step)
            if step == busy or not os.path.isdir(where) or integrity.is_sealed(where):
                continue
            interrupts.fault_point("save:committed", step)
            if jax.process_index() == 0:
                integrity.seal(where)
            interrupts.fault_point("save:after", step)

    def best(self, template: Any) -> tuple[int, Any] | None:
        """(step, state) of the best checkpoint so far, or None (also when it is damaged)."""
        self.wait()
        step = self._best.best_step()
        if step is None:
            return None
        problem = integrity.damage(_step_dir(self._best, step))
        if problem is not None:
            logging.warning("the best checkpoint is damaged (%s): it is not exported", problem)
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._best.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return step, restored["state"]

    def wait(self) -> None:
        """Waits for the pending writes and seals them."""
        for manager in (self._latest, self._best):
            self._finish_started(manager)
            self._seal(manager)

    def intact_steps(self) -> list[int]:
        """The latest checkpoints completely written (sealed), e.g. after a failed write."""
        return [step for step in sorted(self._latest.all_steps())
                if integrity.is_sealed(_step_dir(self._latest, step))]

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _first_line(error: BaseException) -> str:
    """The innermost cause's first line (orbax and tensorstore wrap OS errors)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def saved_steps(where: str | os.PathLike) -> list[int]:
    where = paths.resolve(where)
    if not where.is_dir():
        return []
    with _read_only(where) as manager:
        return sorted(manager.all_steps())


def sealed_steps(where: str | os.PathLike) -> list[int]:
    """The steps of the completely written (sealed) checkpoints in `where`."""
    return [step for step in saved_steps(where)
            if integrity.is_sealed(paths.resolve(where) / str(step))]


def restore_raw(workdir: str, step: int | str = "latest") -> tuple[int, dict[str, Any]]:
    """(step, state as nested dicts of arrays on one local device) of a workdir's checkpoint;
    `step` is "latest", "best" or a step number (of the latest ones, else of the best).
    Needs no template and works on any topology: for tools that read a run (also while it
    trains: a checkpoint still being written is not listed)."""
    directory = paths.resolve(workdir) / CHECKPOINTS_DIR
    best_dir = directory / BEST_DIR
    latest, best = saved_steps(directory), saved_steps(best_dir)
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
    problem = integrity.damage(os.path.join(where, str(chosen)))
    if problem is not None:
        raise ExportError(f"{workdir}: the checkpoint of step {chosen} is damaged: {problem}; "
                          f"saved steps: {latest}" + (f", best: {best}" if best else ""))
    with _read_only(where, item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
        # (the constructor: SingleDeviceSharding is deprecated from jax 0.12 on)
        local = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
            manager.item_metadata(chosen)["state"],
        )
        restored = manager.restore(
            chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
    return int(chosen), dict(restored["state"])
