"""Stopping a run at a step boundary on SIGTERM or SIGINT, with a checkpoint of that step.

A TPU VM is told of a preemption or a maintenance event by SIGTERM, some time before it goes; Ctrl-C sends
SIGINT. While ``StopSignals`` is entered, the first of them does not interrupt the step in flight: the loop asks
``reached(step)`` after each step, saves a checkpoint of the step it answers True for and raises ``Preempted``;
rerunning the same command resumes from that checkpoint. A second signal stops at once (SIGINT: Python's
``KeyboardInterrupt``; SIGTERM: the default action, the process ends).

With several processes, one host's notice must stop every host at the same step: SIGTERM is then left to jax's
preemption service (started by ``jax.distributed.initialize``), which spreads the notice and agrees on the step
(``multihost_utils.reached_preemption_sync_point``); SIGINT keeps its default (``KeyboardInterrupt`` on the host
it reaches).
"""

from __future__ import annotations

import os
import signal
import threading


class Preempted(Exception):
    """The run stopped on ``signal_name`` after saving checkpoint ``step`` in ``ckpt_dir``.

    ``exit_status``: 128 + the signal's number, as a shell reports a process ended by it."""

    def __init__(self, signal_name: str, step: int, ckpt_dir: str):
        self.signal_name, self.step, self.ckpt_dir = signal_name, step, ckpt_dir
        self.exit_status = 128 + int(getattr(signal, signal_name))
        super().__init__(f"stopped by {signal_name}: checkpoint step {step} saved in {ckpt_dir}; rerun the same "
                         f"command to resume")


class StopSignals:
    """A context manager: while entered, the first SIGTERM or SIGINT is recorded instead of interrupting.

    Handlers are installed only from the main thread (Python's rule) and restored on exit. ``multi_process``:
    SIGTERM goes to jax's preemption service and ``reached`` asks it (see the module docstring)."""

    def __init__(self, multi_process: bool | None = None):
        if multi_process is None:
            import jax  # here, so that the CLI can catch ``Preempted`` without importing jax

            multi_process = jax.process_count() > 1
        self.multi_process = multi_process
        self.received: str | None = None  # the name of the first signal, once one arrived
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in () if self.multi_process else (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self.__exit__()  # the second one: what it would have done without us
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def reached(self, step: int) -> bool:
        """Whether to save ``step`` and stop: a signal arrived (one process), or every process reached the step
        agreed on after any of them got a preemption notice (several; call it at every step on every process)."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None
