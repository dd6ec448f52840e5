"""SIGTERM / SIGINT as a preemption notice: finish the current step, save, exit cleanly.

TPU VMs, SLURM and Kubernetes send SIGTERM and then SIGKILL after a grace period (often 30 s). The first
signal only sets a flag, which the trainer reads after each step: it saves that step synchronously and
returns. A second signal exits at once (a user pressing Ctrl-C twice). With several processes, JAX's
distributed runtime owns SIGTERM and Orbax syncs the notice across processes (Checkpointer.reached_preemption),
so a signal on one host cannot make the hosts stop at different steps; the handlers here are for one process.
"""
import os
import signal
import sys
import threading
import types

import jax


class SignalGuard:
  """Context manager: while active, SIGTERM/SIGINT set `requested` instead of killing the process."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: int | None = None  # the signal number received first
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.requested is not None:  # the second signal: stop now, as the default handler would
      print(f'{signal.Signals(signum).name} again: exiting without saving.', file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access  (no cleanup that could hang)
    self.requested = signum
    print(f'{signal.Signals(signum).name} received: finishing the current step and saving '
          '(send it again to exit at once).', file=sys.stderr, flush=True)

  def __enter__(self) -> 'SignalGuard':
    # Multi-process runs leave SIGTERM to JAX's preemption notifier (see the module docstring); signal
    # handlers can only be installed from the main thread.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

