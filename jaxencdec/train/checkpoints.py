"""A run's orbax checkpoints: which are complete, saving one, and choosing, restoring and moving aside on resume.

A checkpoint holds the ``TrainState`` (params, optimizer state, step, rng), the data position, the run config and
the global parameter norm of each save. A resume restores the latest complete one (complete as orbax's
``all_steps`` says: a save cut short is never picked). A read that fails with a storage error that may pass (a
timeout, a dropped connection, HTTP 429/5xx, tensorstore's UNAVAILABLE / DEADLINE_EXCEEDED, after the storage
client's own retries) is tried again with a growing wait, and if it keeps failing the resume stops with an error
naming the checkpoint, having moved nothing. One that fails otherwise (damaged files: truncated or missing arrays,
bad metadata, another tree) is reported and moved aside to ``checkpoints/<step>.corrupt-<n>`` (kept for
inspection: a copy, whose local files are links, not copied bytes; the step itself is then deleted through orbax's
``CheckpointManager.delete``), and the one before it is tried. With several processes each reads on its own and the
outcome of every try is the worst of all processes' (one that sees damage, or a storage error, decides for all), so
that every process restores the same step. ``checkpoint.resume_step`` picks an older checkpoint; the newer ones are
moved aside (the same way) to ``checkpoints/<step>.discarded-<n>``. A resume whose learning-rate schedule settings
differ from the checkpoint's is refused unless ``checkpoint.allow_schedule_change`` is set (``check_schedule``). A
state saved in the other layer layout (``model.scan_layers``) is read in its own layout and converted.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxencdec import paths
from jaxencdec.errors import CheckpointError
from jaxencdec.train import step as steps
from jaxencdec.train.config import CheckpointSection, RunConfig, RunConfigError

# The settings that define the learning rate of every step; a resume that changes one changes the schedule.
SCHEDULE_KEYS = ("optim.learning_rate", "optim.warmup_steps", "optim.schedule", "optim.end_lr_ratio",
                 "train.num_steps")
# A checkpoint whose parameter norm is this many times the previous one's is reported as a jump.
NORM_JUMP = 4.0
# A checkpoint read that failed with a transient storage error is tried this many more times, waiting
# RETRY_WAIT_S, then twice as long each time.
READ_RETRIES = 3
RETRY_WAIT_S = 2.0
# Storage failures that may pass: tensorstore's status codes, and HTTP statuses as storage clients report them.
_TRANSIENT = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b|"
                        r"\b(?:HTTP|status|response code)\b\D{0,20}\b(?:408|429|500|502|503|504)\b", re.IGNORECASE)


# What reading a checkpoint came to on one process, worst last: with several processes, the largest counts.
READ, TRANSIENT, DAMAGED = 0, 1, 2


def _agreed(outcome: int) -> int:
    """The worst of every process's ``outcome`` (collective with several processes)."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _process_reader(ckpt_dir: str) -> ocp.CheckpointManager:
    """A read-only manager of ``ckpt_dir`` that this process uses alone: its restores wait for no other process
    (orbax's barriers among the active processes), so that one that fails cannot leave the others waiting before
    the outcomes are compared (``_agreed``)."""
    me = jax.process_index()
    processes = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                   barrier_sync_key_prefix=f"jaxencdec-read-{me}")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                                           cleanup_tmp_directories=False, multiprocessing_options=processes)
    return _manager(ckpt_dir, options)


def _manager(ckpt_dir: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` of ``ckpt_dir`` whose checkpoints hold three items: ``state`` (the
    ``TrainState``, through ``_state_handler``), ``data`` (the data position) and ``meta`` (JSON)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    json_args = (ocp.args.JsonSave, ocp.args.JsonRestore)
    for item, handler, args in (("state", _state_handler(), (ocp.args.PyTreeSave, ocp.args.PyTreeRestore)),
                                ("data", ocp.JsonCheckpointHandler(), json_args),
                                ("meta", ocp.JsonCheckpointHandler(), json_args)):
        for kind in args:
            registry.add(item, kind, handler)
    return ocp.CheckpointManager(ckpt_dir, options=options, handler_registry=registry)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the ``state`` item: orbax's pytree handler with its default type handlers (what
    ``StandardSave`` writes, in the same layout), except on CPU devices, where an array replicated over several
    devices is written from one replica instead of in slices spread over the replicas (orbax's replica-parallel
    saving, its default on TPUs). A CPU device's shards already sit in host memory, so the slices gain nothing and
    each costs a compiled slicing program at the first save: 2.5 s of a 9.5 s 6-step run of a tiny bert2bert on 8
    CPU devices (``tests/testing.py``'s ``tiny_run_config``). On CPU no per-array metadata files are written either:
    orbax reads them back only to rewrap typed PRNG keys, and the state's ``rng`` is a uint32 key."""
    registry = ocp.type_handlers.create_type_handler_registry(*[
        (kind, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
         if kind is jax.Array and jax.default_backend() == "cpu" else ocp.type_handlers.get_type_handler(kind))
        for kind in ocp.type_handlers.supported_types()])
    # the limits on bytes in flight that StandardCheckpointHandler gives the same pytree handler
    return ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                       type_handler_registry=registry)


def run_folder(output_dir: str) -> str:
    """``output_dir`` as the run's folder: a bucket URL as given, a local path made absolute."""
    return output_dir if paths.is_url(output_dir) else os.path.abspath(output_dir)


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """The steps of the complete checkpoints in ``ckpt_dir``, ascending, as orbax lists them."""
    if not paths.is_dir(ckpt_dir):
        return []
    return sorted(ocp.utils.checkpoint_steps(ckpt_dir))


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a storage failure that may pass on a later try:
    a timeout, a dropped connection, HTTP 408/429/5xx, tensorstore's UNAVAILABLE, DEADLINE_EXCEEDED or
    RESOURCE_EXHAUSTED. Damaged files (truncated or missing data, bad JSON, another tree) are not."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (TimeoutError, ConnectionError)) or _TRANSIENT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def check_resumable(ckpt_dir: str, resume_step: int | None, evaluate_only: bool) -> None:
    """Fails at once (before anything is built) when ``evaluate_only`` finds no checkpoint in ``ckpt_dir``
    (``FileNotFoundError``) or ``resume_step`` is not kept there (``RunConfigError``)."""
    kept = checkpoint_steps(ckpt_dir)
    if evaluate_only and not kept:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first (jaxencdec train CONFIG) or pass "
                                f"--model FOLDER")
    if resume_step is not None and resume_step not in kept:
        raise RunConfigError(f"checkpoint.resume_step {resume_step}: there is no such checkpoint in {ckpt_dir} "
                             f"(kept steps: {', '.join(map(str, kept)) or 'none'})")


def schedule_changes(saved: dict[str, Any], config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, value now)`` for the ``SCHEDULE_KEYS`` where ``config`` differs from ``saved`` (a
    run config dict stored with a checkpoint). ``train.num_steps`` counts only when the decay depends on it."""
    now = config.to_dict()
    changes = {}
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        if name in saved.get(section, {}) and saved[section][name] != now[section][name]:
            changes[key] = (saved[section][name], now[section][name])
    schedules = {saved.get("optim", {}).get("schedule"), config.optim.schedule}
    if schedules == {"constant"}:
        changes.pop("train.num_steps", None)
    return changes


def check_schedule(step: int, saved_config: dict[str, Any], config: RunConfig, ckpt_dir: str,
                   warn: Callable[[str], None]) -> None:
    """Refuses (``RunConfigError``) a resume from ``step`` whose learning-rate schedule differs from the
    checkpoint's (``saved_config``), unless ``checkpoint.allow_schedule_change``; then it warns."""
    changes = schedule_changes(saved_config, config)
    if not changes:
        return
    old_optim = dataclasses.replace(config.optim, **{k.split(".")[1]: old for k, (old, _) in changes.items()
                                                     if k.startswith("optim.")})
    old_steps = changes.get("train.num_steps", (config.train.num_steps,))[0]
    old_lr = float(steps.learning_rate_schedule(old_optim, old_steps)(step))
    new_lr = float(steps.learning_rate_schedule(config.optim, config.train.num_steps)(step))
    what = (", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
            + f": the learning rate of step {step + 1} becomes {new_lr:.3g} instead of {old_lr:.3g}")
    if config.checkpoint.allow_schedule_change:
        warn(f"resuming from checkpoint step {step} with a changed learning-rate schedule ({what})")
        return
    raise RunConfigError(f"checkpoint step {step} in {ckpt_dir} was trained with another learning-rate "
                         f"schedule ({what}). Use a new output_dir to train with the new settings, or pass "
                         f"--set checkpoint.allow_schedule_change=true to continue with them from step {step}")


def summarize_error(error: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to about ``limit`` characters (tensorstore's spec dump dropped)."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def norm_jump(norms: dict[int, float]) -> int | None:
    """The first step (ascending) whose parameter norm is not finite or ``NORM_JUMP`` x the previous one's."""
    ordered = sorted(norms.items())
    for (_, before), (step, norm) in zip(ordered, ordered[1:]):
        if not np.isfinite(norm) or norm > NORM_JUMP * before:
            return step
    return None


@dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its step, ``TrainState`` (in the run's layout and shardings), data position and
    metadata, and ``failed``: the newer steps that did not restore (step -> why)."""

    step: int
    state: steps.TrainState
    data: dict[str, Any]
    meta: dict[str, Any]
    failed: dict[int, str]


class RunCheckpoints:
    """The orbax ``CheckpointManager`` of ``ckpt_dir`` (items ``state``, ``data``, ``meta``) and what a run does
    with it. ``read_only``: restores only (no folder created, nothing written, moved or cleaned up).
    ``info`` / ``warn``: where messages go (process 0 prints them)."""

    def __init__(self, ckpt_dir: str, section: CheckpointSection, *, read_only: bool,
                 info: Callable[[str], None], warn: Callable[[str], None]):
        self.dir = ckpt_dir
        self.info, self.warn = info, warn
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                   save_interval_steps=0, cleanup_tmp_directories=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=section.keep, cleanup_tmp_directories=True,
                                                   enable_async_checkpointing=section.async_save, create=True)
        self.manager = _manager(ckpt_dir, options)
        self.reader = self.manager if jax.process_count() == 1 else _process_reader(ckpt_dir)

    def save(self, step: int, state: steps.TrainState, data: dict[str, Any], meta: dict[str, Any]) -> None:
        """Saves ``state``, the data position and the JSON ``meta`` as step ``step`` (async; all processes)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)))

    def restore(self, target: steps.TrainState, scanned: bool, chosen: int | None) -> Restored | None:
        """The newest checkpoint that restores, or ``chosen`` (a kept step); None when there is none.

        ``target``: the state's ``ShapeDtypeStruct``s with their shardings, in the run's layout (``scanned``).
        A newest one that fails is reported and the one before it tried; ``CheckpointError`` when ``chosen``
        fails or none restores."""
        kept = sorted(self.manager.all_steps(), reverse=True)
        if not kept:
            return None
        failed = {}
        for step in [chosen] if chosen is not None else kept:
            read, why = self._read_agreed(step, target, scanned)
            if read is not None:
                return Restored(step, **read, failed=failed)
            failed[step] = why
            if chosen is not None:
                raise CheckpointError(f"checkpoint step {step} in {self.dir} cannot be restored ({why}); choose "
                                      f"another checkpoint.resume_step (kept steps: "
                                      f"{', '.join(map(str, sorted(kept)))})")
            self.warn(f"checkpoint step {step} in {self.dir} cannot be restored ({why}); trying the one before it")
        reasons = "; ".join(f"step {s}: {why}" for s, why in failed.items())
        raise CheckpointError(f"no checkpoint in {self.dir} can be restored ({reasons}). If the model, mesh or "
                              f"data settings changed since they were written, restore those; to start over, use "
                              f"a new output_dir or move {self.dir} away")

    def _read_agreed(self, step: int, target: steps.TrainState,
                     scanned: bool) -> tuple[dict[str, Any] | None, str | None]:
        """``(what _read returned, None)``, or ``(None, why)`` when checkpoint ``step`` is damaged (tensorstore,
        JSON and pytree-structure errors alike). A transient storage error is tried again (``READ_RETRIES``
        times, the wait doubling), then ``CheckpointError``. With several processes each try's outcome is the
        worst of every process's, so that all of them restore the same step."""
        wait = RETRY_WAIT_S
        for attempt in range(READ_RETRIES + 1):
            read, error = None, None
            try:
                read = self._read(step, target, scanned)
            except Exception as e:
                error = e
            outcome = _agreed(READ if error is None else TRANSIENT if is_transient(error) else DAMAGED)
            if outcome == READ:
                return read, None
            why = summarize_error(error) if error is not None else "another process could not read it"
            if outcome == DAMAGED:
                return None, why
            if attempt == READ_RETRIES:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.dir} could not be read: the store kept failing after "
                    f"{READ_RETRIES + 1} tries ({why}). Nothing was moved or deleted; rerun the same command once "
                    f"the store answers") from error
            self.warn(f"checkpoint step {step} in {self.dir}: storage error ({why}); trying again in {wait:.0f} s")
            time.sleep(wait)
            wait *= 2

    def _read(self, step: int, target: steps.TrainState, scanned: bool) -> dict[str, Any]:
        """Checkpoint ``step``'s state, data position and metadata; a state saved in the other layer layout
        (``model.scan_layers``, recorded in the metadata's config) is read in its own layout and converted."""
        meta = self.reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_scanned = bool(meta.get("config", {}).get("model", {}).get("scan_layers", False))
        saved = steps.state_in_layout(target, saved_scanned)
        restored = self.reader.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(saved, restore_args=ocp.checkpoint_utils.construct_restore_args(saved)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        if saved_scanned != scanned:
            self.info(f"checkpoint step {step} holds {'scanned' if saved_scanned else 'unrolled'} layers: converted")
            shardings = jax.tree.map(lambda x: x.sharding, target)
            state = jax.device_put(steps.state_in_layout(state, scanned), shardings)
        return {"state": state, "data": restored["data"], "meta": restored["meta"]}

    def move_newer_aside(self, restored: Restored) -> None:
        """Sets the checkpoints newer than ``restored`` aside: ``corrupt`` those that failed, ``discarded`` the
        others (see the module docstring)."""
        for newer in sorted((s for s in self.manager.all_steps() if s > restored.step), reverse=True):
            self._set_aside(newer, "corrupt" if newer in restored.failed else "discarded")

    def _set_aside(self, step: int, label: str) -> None:
        """Keeps checkpoint ``step`` as ``<step>.<label>-<n>`` (``paths.copy_folder``: local files linked, not
        copied; orbax lists only whole-number steps, so it does not see the kept one), then deletes the step
        through orbax (``CheckpointManager.delete``), so that it can be saved again. Process 0 copies; every
        process takes part in the delete, whose barrier also waits for the copy."""
        if jax.process_index() == 0:
            n = 1
            while paths.exists(os.path.join(self.dir, f"{step}.{label}-{n}")):
                n += 1
            target = os.path.join(self.dir, f"{step}.{label}-{n}")
            paths.copy_folder(os.path.join(self.dir, str(step)), target)
            self.info(f"checkpoint step {step} moved aside to {target}")
        self.manager.delete(step)
        if self.reader is not self.manager:
            self.reader.reload()

    def divergence_message(self, head: str, param_norms: dict[int, float]) -> str:
        """``head`` (where training diverged), then the global parameter norm of the start (step 0) and of each
        kept checkpoint (``param_norms``: step -> norm), and which checkpoint to resume from."""
        self.manager.wait_until_finished()
        kept = sorted(self.manager.all_steps())
        if not kept:
            return f"{head}; no checkpoint was written yet"
        norms = {s: n for s, n in param_norms.items() if s in kept or s == 0}
        listing = ", ".join(f"step {s}{' (start)' if s == 0 else ''} {norms[s]:.4g}" if s in norms else
                            f"step {s} not recorded" for s in sorted(set(norms) | set(kept)))
        jump = norm_jump(norms)
        before = [s for s in kept if jump is None or s < jump]
        if jump is None:
            advice = (f"no norm jumps, so step {kept[-1]} looks sound: rerunning resumes from it (an earlier "
                      f"one: --set checkpoint.resume_step=STEP)")
        elif before:
            advice = (f"the norm jumps at step {jump}, so that checkpoint already holds diverged params: resume "
                      f"from step {before[-1]} with --set checkpoint.resume_step={before[-1]}")
        else:
            advice = (f"the norm jumps at step {jump}: no kept checkpoint predates it; start over with a new "
                      f"output_dir")
        return (f"{head}. Global parameter norm of the kept checkpoints in {self.dir}: {listing}; {advice} "
                f"(with a lower optim.learning_rate, add --set checkpoint.allow_schedule_change=true)")

    def wait(self) -> None:
        """Waits for a save in flight."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a save in flight and closes the managers."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self.reader is not self.manager:
            self.reader.close()
