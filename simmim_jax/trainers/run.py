"""What both trainers do the same way around their loop: resume (never losing good work) or start, the step
range, the finite check, saving on schedule / at the end / on preemption, and console lines. Each trainer
still reads top to bottom."""
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from simmim_jax import checkpoint, metrics, preemption, storage
from simmim_jax.errors import UserError

# Fields that change the model, its inputs or what the loss means: a run cannot resume across them.
FIXED_FIELDS = ('task', 'model.', 'mask.', 'loss.', 'data.seq_len', 'num_classes', 'probe.')
LOG_EVERY_SECONDS = 30.0  # a progress line at least this often, whatever log_every_steps says


def log(message: str) -> None:
  """One console line, from process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)


def changed_fields(saved: dict[str, Any], requested: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{'a.b': (saved, requested)} for every leaf that differs between two nested config dicts."""
  def flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
      out.update(flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {f'{prefix}{key}': value})
    return out

  a, b = flat(saved), flat(requested)
  # JSON turns tuples into lists: compare as JSON would.
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if np.asarray(a.get(k), object).tolist() != np.asarray(b.get(k), object).tolist()}


def _quiet_closed_loop_callbacks() -> None:
  """Wraps sys.unraisablehook (once) to drop 'Event loop is closed': when a save fails (disk full), the
  callbacks of its other writes find Orbax's event loop gone, and tensorstore reports each as unraisable:
  hundreds of tracebacks before the run's one-line message, which says all there is."""
  hook = sys.unraisablehook
  if getattr(hook, 'quiets_closed_loop', False):
    return

  def unraisablehook(unraisable: Any) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      hook(unraisable)

  unraisablehook.quiets_closed_loop = True
  sys.unraisablehook = unraisablehook


class Run:
  """One call of a trainer on a workdir: the steps it runs (start + 1 .. end) and the checkpoints it keeps."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, total_steps: int, max_steps: int | None):
    """max_steps limits this call to that many more steps (a time-limited job or a notebook session)."""
    self.workdir, self.config, self.total_steps, self.max_steps = workdir, config, total_steps, max_steps
    self.ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    _quiet_closed_loop_callbacks()
    self.ckpt.remove_partial_saves()  # what a killed save left behind; never a committed step
    self.set_start(self.ckpt.latest_step() or 0)
    self.guard = preemption.SignalGuard()  # the trainer's loop runs inside `with run.guard:`
    self.unchecked: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet fetched from the device
    self.saving: int | None = None  # the step of the async save in flight
    self.started = self.last_log = time.perf_counter()

  def restore_or_init(self, abstract: Any, shardings: Any, init: Callable[[], Any]) -> Any:
    """The newest checkpoint that restores, in its shardings, else init(); then writes workdir/config.json.

    A step that cannot be read is skipped for the next older one, and set aside with one warning once an older
    one restores (nothing is deleted); if none restores, the run stops and nothing is changed. A checkpoint of
    a different model or task stops the run before anything is read or written."""
    state, failed = None, []
    for step in self.ckpt.all_steps()[::-1]:
      self.check_same_run(step)
      try:
        state, _ = self.ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings))
      except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types for unreadable files)
        failed.append((step, f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'))
        continue
      for bad, reason in failed:  # set aside only once an older step has restored: nothing is lost either way
        log(f'WARNING: checkpoint step {bad} cannot be restored ({reason}); moved to {self.ckpt.set_aside(bad)}, '
            f'resuming from step {step}.')
      self.set_start(step)
      log(f'Resumed from step {step} in {self.ckpt.directory}.')
      break
    if failed and state is None:  # every step fails alike: the state no longer fits them, not corruption
      raise UserError(f'No checkpoint in {self.ckpt.directory} restores into this config (step {failed[0][0]}: '
                      f'{failed[0][1]}); use a new --workdir, or the saved config.json to resume. Nothing was changed.')
    if state is None:
      self.set_start(0)
      state = init()
    checkpoint.write_config(self.workdir, self.config)  # only after a successful start
    return state

  def set_start(self, start: int) -> None:
    self.start = start
    self.end = self.total_steps if self.max_steps is None else min(self.total_steps, start + self.max_steps)

  def check_same_run(self, step: int) -> None:
    """Refuses to resume a checkpoint of another model, input geometry or task; logs allowed changes."""
    try:
      saved = self.ckpt.restore_meta(step).get('config')
    except Exception:  # pylint: disable=broad-except  (an unreadable step: its state restore fails and says why)
      return
    if saved is None:
      return
    changes = changed_fields(saved, checkpoint.config_dict(self.config))
    fixed = {k: v for k, v in changes.items() if k.startswith(FIXED_FIELDS)}
    if fixed:
      diff = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in fixed.items())
      raise UserError(f'{self.ckpt.directory} holds a different run ({diff}); use a new --workdir for this '
                      'config, or the saved values to resume that run. Nothing was changed.')
    if changes:
      log('Resuming with changed settings: ' + ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items()))

  def nothing_to_do(self) -> bool:
    """True (with a line, the checkpoints closed) when this workdir is already at its last step."""
    if self.start < self.end:
      return False
    log(f'Nothing to do: the run is at step {self.start} of {self.total_steps}.')
    self.close()
    return True

  def steps(self) -> range:
    return range(self.start + 1, self.end + 1)

  def compile(self, step_fn: Any, state: Any, batches: Iterator[Any]) -> tuple[Iterator[Any], Callable]:
    """Compiles the step for the first batch's shapes ahead of the loop, with one line saying how long it took
    (minutes on a big model); returns the batches (the first one still in) and the compiled step."""
    first = next(batches)
    log('Compiling the train step...')
    begin = time.perf_counter()
    compiled = step_fn.lower(state, first).compile()
    log(f'Compiled in {time.perf_counter() - begin:.1f} s.')
    self.last_log = time.perf_counter()
    return itertools.chain([first], batches), compiled

  def log_now(self, step: int) -> bool:
    """A log step: every log_every_steps, the first and last step, and at least every LOG_EVERY_SECONDS."""
    now = time.perf_counter()
    due = (step % self.config.log_every_steps == 0 or step in (self.start + 1, self.end)
           or now - self.last_log >= LOG_EVERY_SECONDS)
    if due:
      self.last_log = now
    return due

  def summary(self, step: int, last: dict[str, float], next_steps: list[str]) -> None:
    """The end-of-run lines: where the run stands, what it wrote and where, and what to run next."""
    wall = metrics.format_duration(time.perf_counter() - self.started)
    if step >= self.total_steps:
      head = f'Done: step {step} of {self.total_steps} in {wall}'
    else:
      head = f'Stopped at step {step} of {self.total_steps} after {wall}; rerun the same command to continue'
    values = ', '.join(f'{k} {v:.4f}' for k, v in last.items() if k in ('loss', 'eval_loss', 'eval_accuracy',
                                                                         'eval_top1', 'eval_top5'))
    log(f'{head}{" (" + values + ")" if values else ""}.')
    root = storage.absolute(self.workdir)
    written = sorted(p.name + ('/' if p.is_dir() else '') for p in storage.path(root).iterdir())
    log(f'In {root}: {", ".join(written)} (checkpoint steps {", ".join(map(str, self.ckpt.all_steps()))}); '
        f'TensorBoard: tensorboard --logdir {root}/tensorboard')
    for line in next_steps:
      log(f'Next: {line}')

  def after_step(self, step: int, state: Any, step_metrics: dict[str, jax.Array], meta: dict[str, Any],
                 logged: bool, on_save: Callable[[], None] = lambda: None) -> bool:
    """Checks the finite flags (on log and save steps), saves on schedule, at the end and on preemption
    (a signal or a multi-host notice), then calls on_save (the metric writer's flush: at a URL, metrics reach
    the bucket with each checkpoint). Returns True when the trainer must stop: preempted and saved."""
    self.unchecked.append((step, step_metrics['finite']))
    preempted = self.guard.requested is not None or self.ckpt.reached_preemption(step)
    save = step % self.config.checkpoint.every_steps == 0 or step == self.end or preempted
    if logged or save:
      self.check_finite()  # never checkpoint a diverged state
      self.check_saves()  # a write that failed stops the run now, not at the next save
    if save:
      self.save(step, state, meta, wait=preempted)
      on_save()
    if preempted:
      log(f'Preempted at step {step}: saved; rerun the same command to resume.')
    return preempted

  def check_finite(self) -> None:
    """Stops with one message at the first step whose loss or gradient norm was not finite. The step skips
    such an update on device, so the state (and any checkpoint) stays finite; the flags are fetched here,
    at log and save steps only, so training never waits on the host."""
    flags = jax.device_get([flag for _, flag in self.unchecked])
    bad = [step for (step, _), ok in zip(self.unchecked, flags) if not ok]
    self.unchecked.clear()
    if bad:
      self.check_saves(blocking=True)
      raise FloatingPointError(
          f'The loss, gradient or update was not finite at step {bad[0]} ({len(bad)} steps since the last check; '
          f'their updates were skipped). The last good checkpoint (step {self.ckpt.latest_step()}) is kept; lower '
          'optim.base_lr or lengthen the warmup, then rerun.')

  def save(self, step: int, state: Any, meta: dict[str, Any], wait: bool = False) -> None:
    """Saves (async unless `wait`); a failed write stops the run with one message, earlier steps kept."""
    self.check_saves(blocking=True)  # Orbax finishes the previous save first anyway; its error names its step
    try:
      self.ckpt.save(step, state, {'step': step, **meta, 'config': checkpoint.config_dict(self.config)})
    except Exception as e:  # pylint: disable=broad-except  (disk full, permissions, a bucket going away)
      self.save_failed(step, e)
    self.saving = step
    if wait:
      self.check_saves(blocking=True)

  def check_saves(self, blocking: bool = False) -> None:
    """Raises the failure of the save in flight (at once, or after waiting for it when `blocking`)."""
    if self.saving is None:
      return
    try:
      self.ckpt.wait() if blocking else self.ckpt.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self.save_failed(self.saving, e)
    if blocking:
      self.saving = None

  def save_failed(self, step: int, error: Exception) -> None:
    self.ckpt.remove_partial_saves()
    # Orbax's other write tasks of this save fail alike; asyncio would log each at exit, after this message.
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
    reason = f'{type(error).__name__}: {str(error).splitlines()[0]}' if str(error) else type(error).__name__
    raise UserError(f'Saving step {step} to {self.ckpt.directory} failed ({reason}). The earlier checkpoints are '
                    'kept; free space or fix the path, then rerun the same command to resume.') from error

  def close(self, *others: checkpoint.Checkpointer) -> None:
    """Waits for the async saves of this run's checkpoints (and `others`) and closes them."""
    try:
      self.check_saves(blocking=True)
      for manager in others:
        manager.wait()
    finally:
      for manager in (self.ckpt, *others):
        manager.close()
