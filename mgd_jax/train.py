"""The training loop shared by every method: `train_and_evaluate(config, workdir)`.

Colab and `main.py` call exactly this. One jitted step over a 1-D `data` mesh (global batches,
SyncBN for free), the train state donated, only the method's trainable networks differentiated;
periodic report / evaluation / checkpoint; exact resume from `<workdir>/checkpoints`.
Reliability (docs/tools.md "Resuming and preemption"): SIGTERM / SIGINT stop after the current step
with a checkpoint; a step with a non-finite loss or gradient is not applied and stops the run at
the next host sync (or is skipped and counted: `config.skip_nonfinite`); resuming with a config
that changes the run is refused (`config_lib.resume_changes`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mgd_jax import config_lib, methods, models, optim
from mgd_jax.methods.base import eval_variables, select
from mgd_jax.runtime import errors, interrupts, logs, parallel, paths, reporting, workdir_lock


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def train_step(state: TrainState, frozen: Any, batch: dict, *, method, tx, schedule):
    """One optimisation step; gradients flow only into `state.params`.

    A non-finite loss or gradient norm leaves params, BN statistics and optimizer state as they
    were (metric "nonfinite" = 1): no host sync here, the loop reads it at its next sync.
    """
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        return method.loss(params, state.batch_stats, frozen, batch, rng, state.step)

    (loss, (batch_stats, step_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, batch_stats, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, batch_stats, opt_state), (state.params, state.batch_stats, state.opt_state))
    step_metrics = dict(step_metrics, lr=schedule(state.step), grad_norm=grad_norm,
                        nonfinite=1.0 - finite.astype(jnp.float32))
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, step_metrics


def note_nonfinite(record: dict | None, step_metrics: dict[str, jax.Array], step: jax.Array
                   ) -> tuple[dict, dict[str, jax.Array]]:
    """(record, metrics to average): `record` keeps the count of non-finite steps and the step
    number and metrics of the first (on device: no host sync); a non-finite step's metrics are
    averaged as 0 (a skipped step leaves the logged averages finite)."""
    bad = step_metrics["nonfinite"] > 0
    if record is None:
        record = {"step": jnp.int32(-1), "count": jnp.int32(0),
                  "metrics": jax.tree.map(jnp.zeros_like, step_metrics)}
    first = bad & (record["step"] < 0)
    record = {
        "step": jnp.where(first, step + 1, record["step"]),
        "count": record["count"] + bad.astype(jnp.int32),
        "metrics": jax.tree.map(lambda old, new: jnp.where(first, new, old),
                                record["metrics"], step_metrics),
    }
    return record, jax.tree.map(lambda m: jnp.where(bad, jnp.zeros_like(m), m), step_metrics)


def diverged_message(record: dict, config: ml_collections.ConfigDict, last_good: str) -> str:
    """The stop message of a non-finite step (`record` from `note_nonfinite`, on the host)."""
    values = {k: float(v) for k, v in record["metrics"].items() if k != "nonfinite"}
    what = ("loss" if not np.isfinite(values.get("loss", np.nan))
            else "gradient norm (the loss was finite)")
    terms = ", ".join(f"{k}={v:.5g}" for k, v in values.items())
    return (f"non-finite {what} at step {int(record['step'])} ({int(record['count'])} such "
            f"step(s) so far): {terms}; that step's update was not applied and no checkpoint holds "
            f"it; last good checkpoint: {last_good}. Rerun with a lower --config.lr (now "
            f"{config.lr:g}), or --config.skip_nonfinite=true to skip and count such steps")


def check_workdir(workdir: str | os.PathLike) -> None:
    """A clear error before training when `workdir` cannot be created or written (no space, no
    permission, a file in the way, a bucket without access)."""
    probe = paths.resolve(workdir) / f".mgd_jax_write_test_{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        if paths.is_remote(workdir):  # an object store: one small object, no fsync
            probe.write_bytes(b"\0")
            probe.unlink()
            return
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise errors.UserError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); "
                               "free space or pick another folder") from None


def check_resume_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                        resuming: bool) -> None:
    """Refuses to resume a run whose recorded `config.json` differs in a field that changes the
    run, unless `config.allow_config_change`."""
    path = paths.resolve(workdir) / "config.json"
    if not resuming or not path.is_file():
        return
    changes = config_lib.resume_changes(json.loads(path.read_text()), config)
    if not changes:
        return
    listed = "; ".join(changes)
    if config.get("allow_config_change", False):
        logs.say(f"warning: resuming with changed settings (config.allow_config_change): {listed}")
        return
    raise errors.ConfigError(
        f"{path}: this workdir's run was trained with other settings: {listed}. Rerun with the "
        "recorded settings, use a new --workdir, or pass --config.allow_config_change=true")


def average_of(step_metrics: dict[str, jax.Array]) -> Any:
    """A clu collection averaging every scalar of `step_metrics` over the steps it merges."""
    from clu import metrics as clu_metrics

    collection = clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in step_metrics}
    )
    return collection.single_from_model_output(**step_metrics)


def total_steps(config: ml_collections.ConfigDict, num_labeled: int, num_unlabeled: int) -> int:
    """`num_train_steps`, else epochs x the official iterations per epoch (docs/method.md §4.2):
    max(N // r, N - N // r) // batch for the 1/r partitions, max(labeled, unlabeled) // batch for
    a partition given by an exact labeled count."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    if config.labeled_count > 0:
        per_epoch = max(num_labeled, num_unlabeled) // config.batch_size
    else:
        per_epoch = config_lib.iters_per_epoch(
            num_labeled + num_unlabeled, config.partition, config.batch_size
        )
    if per_epoch < 1:
        raise errors.ConfigError(
            f"config.batch_size={config.batch_size} exceeds the training set "
            f"({max(num_labeled, num_unlabeled)} images)"
        )
    return int(config.num_epochs) * per_epoch


def create_train_state(method: methods.Method, tx: optax.GradientTransformation, seed: int
                       ) -> TrainState:
    """Fresh trainable variables of `method` and their optimizer state, from `seed`."""
    # The init key uses the "rbg" generator: a jitted threefry init of a DeepLabv3+ takes ~20 s to
    # compile on CPU, rbg ~1.5 s. Both are deterministic for a given seed and backend.
    variables = method.init_variables(jax.random.key(seed, impl="rbg"))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(seed),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Trains `config.method` and evaluates it; returns the final / best val scores.

    `workdir`: a local folder or a cloud storage URL (`gs://bucket/run`; `paths`). Everything the
    run logs also goes to `<workdir>/log.txt` (`logs.log_file`; primary process).
    """
    dataset = config_lib.validate(config, device_count=jax.device_count())
    config = config_lib.resolve_backend_defaults(config)
    workdir = paths.resolve(workdir)
    check_workdir(workdir)
    is_main = jax.process_index() == 0
    # One run per workdir, refused at once before anything is written (workdir_lock).
    with workdir_lock.hold(workdir, primary=is_main) as lock, \
            logs.log_file(str(workdir), enabled=is_main) as log:
        guards = tuple(g.check for g in (lock, log) if g is not None)
        run = None
        try:
            run = _setup(config, dataset, workdir, is_main, guards)
            extra_scores = run.evals.extras(run.method, run.frozen, run.start)
            with interrupts.StopSignals() as signals:
                end = _loop(run, signals)
                if end.stopped:
                    return _stopped(run, end.step, signals)
            return _finish(run, end, extra_scores)
        except Exception as error:
            failure = _end_after_failure(run, workdir, error)
            if failure is error:
                raise
            raise failure from error


# What a failed write into the workdir raises (a full disk or quota, a file size limit, a storage
# gone read-only or away).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def _end_after_failure(run: _Run | None, workdir: Any, error: Exception) -> Exception:
    """The end of a run after its first failure: the pending checkpoint writes waited for and
    every writer closed, each quietly (on a full disk they fail too; the first failure is the
    one to report). Returns what to raise: a failed write as one `WriteError` naming the file,
    the step whose write failed and the intact checkpoints; any other error as it is."""
    if run is not None:
        closers = (run.ckpt.close, getattr(run.train_iter, "close", None), run.reporter.close)
        for close in closers:
            try:
                if close is not None:
                    close()
            except Exception:  # noqa: BLE001 - consequences of `error`, kept in the log file
                logging.info("closing after a failed run failed", exc_info=True)
    if not isinstance(error, OSError) or not (
            error.errno in WRITE_ERRNOS or str(error.filename or "").startswith(str(workdir))):
        return error
    what = error.filename or f"into {workdir}"
    when = "before the first step" if run is None else f"at step {run.at}"
    if run is not None:
        intact = run.ckpt.intact_steps()
    else:
        from mgd_jax.runtime import checkpoint

        intact = checkpoint.sealed_steps(workdir / checkpoint.CHECKPOINTS_DIR)
    resume = (f"it resumes from step {intact[-1]}" if intact else "it starts afresh")
    return errors.WriteError(
        f"writing {what} failed {when}: {error.strerror or error}; the run stops (intact "
        f"checkpoints: steps {intact}). Free space (or fix the storage) and rerun the same "
        f"command: {resume}")


# ----------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class _Run:
    """What `_setup` prepares for the loop and the finish."""

    config: ml_collections.ConfigDict
    workdir: Any  # epath.Path
    is_main: bool
    method: methods.Method
    data: Any  # input_pipeline.Streams
    steps: int
    reporter: reporting.Reporter
    network_meta: dict[str, Any]  # what its exported networks carry (network_dir.run_meta)
    state: TrainState  # fresh or restored
    start: int  # the restored step
    frozen: Any
    step_fn: Callable
    train_iter: Any  # parallel.DevicePrefetch
    ckpt: Any  # checkpoint.Checkpointer
    evals: _Evaluations
    num_params: int  # of the evaluated network
    # Raise when something beside the checkpoints failed (the workdir lock taken over, a log
    # write failed): asked after every step's writes.
    guards: tuple[Callable[[], None], ...] = ()
    at: int = 0  # the step whose results are being written (a failed write names it)

    def check(self) -> None:
        for guard in self.guards:
            guard()


def _setup(config: ml_collections.ConfigDict, dataset: Any, workdir: Any, is_main: bool,
           guards: tuple[Callable[[], None], ...] = ()) -> _Run:
    """Data, state (restored when the workdir has a checkpoint), jitted step and evaluations;
    `dataset`: the config's, resolved (`datasets.Dataset`)."""
    # Local: `train_step` (the step benchmark) runs without the data / checkpoint stacks.
    from mgd_jax.data import input_pipeline
    from mgd_jax.runtime import checkpoint

    checkpoints_dir = workdir / checkpoint.CHECKPOINTS_DIR
    check_resume_config(config, workdir, bool(checkpoint.saved_steps(checkpoints_dir)))
    mesh = parallel.make_mesh()

    method = methods.get(config)
    data = input_pipeline.create_streams(config, dataset, with_unlabeled=method.uses_unlabeled)
    steps = total_steps(config, data.num_labeled, data.num_unlabeled)
    schedule = optim.poly_schedule(config.lr, steps, power=config.lr_power)
    tx = optim.make_optimizer(schedule, config.weight_decay, momentum=config.momentum)

    reporter = reporting.Reporter(str(workdir), total_steps=steps, is_main=is_main)
    network_meta = _record_run(config, workdir, is_main, method, data, reporter)
    state = parallel.replicate(create_train_state(method, tx, config.seed), mesh)
    frozen = parallel.replicate(method.frozen_variables(), mesh)
    num_params = _report_parameters(config, workdir, is_main, method, state, reporter)

    train_iter = parallel.DevicePrefetch(iter(data.train), mesh, config.get("prefetch", 2))
    ckpt = checkpoint.Checkpointer(checkpoints_dir, keep=config.keep_checkpoints)
    state, resumed = ckpt.restore_or_init(state, train_iter)
    start = int(jax.device_get(state.step))
    reporter.restart_at(start)  # the rows of the steps this run repeats are replaced
    if resumed:
        reporter.text("resume", f"resumed from step {start}")

    step_fn = jax.jit(
        functools.partial(train_step, method=method, tx=tx, schedule=schedule),
        donate_argnums=(0,),
    )
    evals = _Evaluations(config, data, mesh, reporter, method, is_main)
    return _Run(config=config, workdir=workdir, is_main=is_main, method=method, data=data,
                steps=steps, reporter=reporter, network_meta=network_meta, state=state,
                start=start, frozen=frozen, step_fn=step_fn, train_iter=train_iter, ckpt=ckpt,
                evals=evals, num_params=num_params, guards=(*guards, reporter.check), at=start)


def _record_run(config: ml_collections.ConfigDict, workdir: Any, is_main: bool,
                method: methods.Method, data: Any, reporter: reporting.Reporter
                ) -> dict[str, Any]:
    """Writes the run's config and network description; returns what a network of this run is:
    its build, its data and protocol (network_dir.run_meta)."""
    from mgd_jax import network_dir

    network_meta = dict(method.export_meta,
                        **network_dir.run_meta(config.dataset, data.info, config.eval))
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        _write_json(workdir / network_dir.NETWORK_FILE,
                    dict(network_meta, state_path=list(method.eval_path)))
    reporter.text("config", str(config), console=False)  # the log file and TensorBoard only
    reporter.text("data", data.description)
    return network_meta


def _report_parameters(config: ml_collections.ConfigDict, workdir: Any, is_main: bool,
                       method: methods.Method, state: TrainState,
                       reporter: reporting.Reporter) -> int:
    """The evaluated network's parameter count, reported; the per-leaf overview in a file."""
    from clu import parameter_overview

    eval_params = select(state.params, method.eval_path)
    num_params = models.count_params(eval_params)
    reporter.text("parameters", f"{config.method}: evaluated network has {num_params:,} parameters"
                  f" (per-leaf overview in {workdir / 'parameters.txt'})")
    if is_main:
        (workdir / "parameters.txt").write_text(
            parameter_overview.get_parameter_overview(jax.device_get(eval_params)))
    return num_params


class _Evaluations:
    """The run's evaluations on val, reported as scalars and tables; prediction panels of fixed
    val images (primary process): the method's extra networks (e.g. MGD's teachers) predicted
    once, the trained network at every evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, data: Any, mesh: Any,
                 reporter: reporting.Reporter, method: methods.Method, is_main: bool):
        from mgd_jax.evaluation import evaluate, panels

        self.config, self.data, self.reporter = config, data, reporter
        self.evaluator = evaluate.Evaluator.from_config(config, mesh)
        self.apply_eval = evaluate.model_logits(method.eval_model)
        self.panel_set, self.fixed_columns = None, {}
        if is_main and config.eval.panels > 0:
            self.panel_set = panels.PanelSet.from_batches(
                data.eval_batches(), config.eval.panels, data.info.palette_array(),
                evaluate.Evaluator.from_config(config))

    def network(self, step: int, prefix: str, apply_fn: Callable, variables: Any) -> dict:
        """The scores of one network on val, reported under `prefix`."""
        from mgd_jax.evaluation import evaluate

        class_names = self.data.info.class_names
        self.reporter.line(f"{prefix}: evaluating on {self.config.eval_split} at step {step} "
                           f"({self.data.num_eval_batches} batches per process)")
        scores = self.evaluator.scores(apply_fn, variables, self.data.eval_batches(),
                                       label=prefix, num_batches=self.data.num_eval_batches)
        self.reporter.scalars(step, evaluate.score_scalars(prefix, scores, class_names))
        self.reporter.text(f"{prefix}/table", evaluate.format_table(scores, class_names))
        return scores

    def extras(self, method: methods.Method, frozen: Any, start: int) -> dict[str, dict]:
        """The method's extra networks: scored before the first step (a cheap guard against a
        wrong import), and predicted once into the panels."""
        from mgd_jax.evaluation import evaluate

        scores = {}
        for name, (model, variables) in method.extra_evals(frozen).items():
            if start == 0:
                scores[name] = self.network(0, f"{name}_eval", evaluate.model_logits(model),
                                            variables)
            if self.panel_set is not None:
                self.fixed_columns[name] = self.panel_set.predict(evaluate.model_logits(model),
                                                                  variables)
        return scores

    def trained(self, step: int, variables: Any) -> dict:
        """The trained network's scores (and panels) at `step`."""
        scores = self.network(step, "eval", self.apply_eval, variables)
        if self.panel_set is not None:
            trained = {f"{self.config.method} (step {step})": self.panel_set.predict(
                self.apply_eval, variables)}
            path = self.reporter.image(
                "panels", self.panel_set.render({**trained, **self.fixed_columns}), step)
            self.reporter.line(f"prediction panels: {path}")
        return scores


# ----------------------------------------------------------------------------------------------
# Loop


class _NonFiniteSteps:
    """The record of non-finite steps (`note_nonfinite`), kept on the device and read at the
    loop's host syncs."""

    def __init__(self, config: ml_collections.ConfigDict, ckpt: Any):
        self.config, self.ckpt = config, ckpt
        self.record = None
        self.skip = bool(config.get("skip_nonfinite", False))
        self._note = jax.jit(note_nonfinite, donate_argnums=(0,))

    def note(self, step_metrics: dict[str, jax.Array], step: jax.Array
             ) -> dict[str, jax.Array]:
        """`step_metrics` to average (see `note_nonfinite`)."""
        self.record, step_metrics = self._note(self.record, step_metrics, step)
        return step_metrics

    def check(self) -> int:
        """At a host sync: the number of non-finite steps so far; stops the run (pending
        checkpoint writes finished first) unless they are skipped."""
        record = jax.device_get(self.record)
        if record is None or int(record["count"]) == 0:
            return 0
        if not self.skip:
            self.ckpt.wait()
            last = self.ckpt.latest_step()
            last_good = ("none yet" if last is None
                         else f"step {last} in {self.ckpt.directory} (rerunning resumes from it)")
            raise errors.DivergedError(diverged_message(record, self.config, last_good))
        return int(record["count"])


@dataclasses.dataclass
class _LoopEnd:
    state: TrainState
    step: int  # the last completed step
    scores: dict | None  # of the last evaluation; at `steps` unless stopped
    variables: Any  # the evaluated network's variables at the last evaluation
    seconds: float
    stopped: bool = False


def _loop(run: _Run, signals: interrupts.StopSignals) -> _LoopEnd:
    """The steps from `run.start` to `run.steps`: periodic log line, evaluation (the last step
    always), checkpoint; a stop signal ends it after the current step, with a checkpoint."""
    config, ckpt, state = run.config, run.ckpt, run.state
    nonfinite = _NonFiniteSteps(config, ckpt)
    interval = None  # clu averages of the step metrics since the last log line (on device)
    scores = variables = None
    done = run.start
    t0 = time.time()
    for step in range(run.start, run.steps):
        state, step_metrics = run.step_fn(state, run.frozen, next(run.train_iter))
        current = average_of(nonfinite.note(step_metrics, state.step - 1))
        interval = current if interval is None else interval.merge(current)
        done = run.at = step + 1
        interrupts.fault_point("step", done)
        ckpt.check()
        log, evaluate_now = done % config.log_every == 0, done % config.eval_every == 0
        due = done % config.checkpoint_every == 0 or done == run.steps
        synced = log or evaluate_now or due
        if synced:
            skipped = nonfinite.check()
        if log or done == run.steps:
            _log_interval(run, done, interval, skipped)
            interval = None
        # A stop already asked for skips the evaluation (a collective: one process only).
        stopping = jax.process_count() == 1 and signals.received is not None
        if (evaluate_now or done == run.steps) and not stopping:
            variables = eval_variables(run.method, state.params, state.batch_stats)
            scores = run.evals.trained(done, variables)
            ckpt.save_best(done, state, scores["miou"])
        stop = signals.stop_now(done)
        if stop and not synced:
            nonfinite.check()
        if due or stop:
            ckpt.save(done, state, run.train_iter, force=done == run.steps or stop)
        run.check()
        if stop:
            return _LoopEnd(state, done, scores, variables, time.time() - t0, stopped=True)
    ckpt.wait()
    return _LoopEnd(state, done, scores, variables, time.time() - t0)


def _log_interval(run: _Run, done: int, interval: Any, skipped: int) -> None:
    """The log line of the steps since the last one: averaged metrics and progress."""
    values = {k: float(v) for k, v in jax.device_get(interval.compute()).items()}
    del values["nonfinite"]  # averaged as 0 (see `note_nonfinite`); counted instead
    if skipped:
        values["skipped_steps"] = skipped
    run.reporter.scalars(done, {f"train/{k}": v for k, v in values.items()})
    run.reporter.progress(done, run.method.images_per_step(run.config.batch_size))


# ----------------------------------------------------------------------------------------------
# Finish


def _stopped(run: _Run, step: int, signals: interrupts.StopSignals) -> dict[str, Any]:
    """The end of a run stopped by a signal: its checkpoint written, the files closed."""
    run.ckpt.close()  # waits for the writes
    if hasattr(run.train_iter, "close"):
        run.train_iter.close()
    name = "SIGTERM" if signals.received is None else interrupts.signal_name(signals.received)
    run.reporter.line(f"stopped by {name} after step {step}: checkpoint written to "
                      f"{run.ckpt.directory}/{step}; rerun the same command to continue")
    run.reporter.close()
    return {"stopped": True, "step": step, "workdir": str(run.workdir)}


def _finish(run: _Run, end: _LoopEnd, extra_scores: dict[str, dict]) -> dict[str, Any]:
    """The exports (final and best), the final metrics; returns them."""
    final, scores = end.variables, end.scores
    run.at = run.steps
    if final is None:  # resumed after the last step: evaluate what was restored
        final = eval_variables(run.method, end.state.params, end.state.batch_stats)
        scores = run.evals.trained(run.steps, final)
    if hasattr(run.train_iter, "close"):  # worker processes, shared memory
        run.train_iter.close()
    export_dir = _save_export(run, "export", final, run.steps, scores["miou"])
    best_summary = _best(run, end.state, scores, export_dir)
    run.ckpt.close()

    result = {
        "method": run.config.method,
        "steps": run.steps,
        "miou": float(scores["miou"]),
        "pixel_accuracy": float(scores["pixel_accuracy"]),
        "iou_per_class": [float(x) for x in scores["iou_per_class"]],
        "best": best_summary,
        "params": int(run.num_params),
        "export": export_dir,
        "train_seconds": end.seconds,
        "extra_evals": {k: float(v["miou"]) for k, v in extra_scores.items()},
    }
    if run.is_main:
        _write_json(run.workdir / "final_metrics.json", result)
    run.reporter.text("final", json.dumps({k: result[k] for k in ("miou", "best", "params")}))
    run.reporter.close()
    run.check()
    return result


def _best(run: _Run, state: TrainState, scores: dict, export_dir: str) -> dict | None:
    """The best checkpoint's summary; one before the last step is re-evaluated (a check of the
    checkpoint) and exported to `export_best`."""
    best = run.ckpt.best(state)
    if best is None:
        return None
    best_step, best_state = best
    summary = {"step": int(best_step), "miou": float(scores["miou"]), "export": export_dir}
    if best_step != run.steps:
        variables = eval_variables(run.method, best_state.params, best_state.batch_stats)
        best_scores = run.evals.network(best_step, "best", run.evals.apply_eval, variables)
        summary.update(
            miou=float(best_scores["miou"]),
            export=_save_export(run, "export_best", variables, best_step, best_scores["miou"]),
        )
    return summary


def _save_export(run: _Run, name: str, variables: Any, step: int, miou: float) -> str:
    """`<workdir>/<name>`: a network directory of `variables` (network_dir)."""
    from mgd_jax import network_dir

    directory = str(run.workdir / name)
    meta = dict(run.network_meta, source=str(run.workdir), step=int(step), miou=float(miou))
    network_dir.save_network(directory, jax.device_get(variables), meta, overwrite=True)
    return directory


def _write_json(path: os.PathLike, value: Any) -> None:
    paths.resolve(path).write_text(json.dumps(value, indent=2))
