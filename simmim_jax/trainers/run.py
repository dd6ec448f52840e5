"""What both trainers do the same way around their loop: resume or start, the step range, the finite check,
saving on schedule / at the end / on preemption, and console lines. Each trainer still reads top to bottom."""
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from simmim_jax import checkpoint


def log(message: str) -> None:
  """One console line, from process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)


class Run:
  """One call of a trainer on a workdir: the steps it runs (start + 1 .. end) and the checkpoints it keeps."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, total_steps: int, max_steps: int | None):
    """max_steps limits this call to that many more steps (a time-limited job or a notebook session)."""
    self.workdir, self.config, self.total_steps = workdir, config, total_steps
    self.ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    self.start = self.ckpt.latest_step() or 0
    self.end = total_steps if max_steps is None else min(total_steps, self.start + max_steps)

  def restore_or_init(self, abstract: Any, shardings: Any, init: Callable[[], Any]) -> Any:
    """The latest checkpoint's state in its shardings, else init(); writes workdir/config.json."""
    checkpoint.write_config(self.workdir, self.config)
    if not self.start:
      return init()
    state, _ = self.ckpt.restore(self.start, checkpoint.abstract_with_shardings(abstract, shardings))
    log(f'Resumed from step {self.start} in {self.ckpt.directory}.')
    return state

  def nothing_to_do(self) -> bool:
    """True (with a line, the checkpoints closed) when this workdir is already at its last step."""
    if self.start < self.end:
      return False
    log(f'Nothing to do: the run is at step {self.start} of {self.total_steps}.')
    self.close()
    return True

  def steps(self) -> range:
    return range(self.start + 1, self.end + 1)

  def is_log_step(self, step: int) -> bool:
    return step % self.config.log_every_steps == 0 or step in (self.start + 1, self.end)

  def after_step(self, step: int, state: Any, step_metrics: dict[str, jax.Array], meta: dict[str, Any],
                 logged: bool) -> bool:
    """Checks the loss (on log and save steps), saves on schedule, at the end and on a preemption notice.
    Returns True when the trainer must stop (preempted: saved, rerun to resume)."""
    preempted = self.ckpt.reached_preemption(step)
    save = step % self.config.checkpoint.every_steps == 0 or step == self.end or preempted
    if logged or save:
      self.check_finite(step, step_metrics)  # never checkpoint a diverged state
    if save:
      self.ckpt.save(step, state, {'step': step, **meta, 'config': checkpoint.config_dict(self.config)})
    if preempted:
      log(f'Preemption notice: saved step {step}; rerun the same command to resume.')
    return preempted

  def check_finite(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
    """Stops with one message on a NaN/inf loss; the checkpoints already written stay untouched."""
    loss, grad_norm = (float(step_metrics[k]) for k in ('loss', 'grad_norm'))
    if not np.isfinite(loss):
      self.ckpt.wait()
      raise FloatingPointError(
          f'Loss is {loss} at step {step} (grad norm {grad_norm}). The last good checkpoint (step '
          f'{self.ckpt.latest_step()}) is kept; lower optim.base_lr or lengthen the warmup, then rerun.')

  def close(self, *others: checkpoint.Checkpointer) -> None:
    """Waits for the async saves of this run's checkpoints (and `others`) and closes them."""
    for manager in (self.ckpt, *others):
      manager.wait()
      manager.close()
