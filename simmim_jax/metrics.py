"""Metric writers for process 0: a console progress line, TensorBoard event files and a JSONL log."""
import json
import os
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Writer:
  """Writes scalars and images; derives step time, images/s, examples seen and ETA between calls.

  Only process 0 writes; the others keep the timing so every process can call it alike.
  """

  def __init__(self, workdir: str, total_steps: int, batch_size: int, unit: str = 'images',
               tokens_per_example: int = 0):
    """unit names what batch_size counts ('images', or 'rows' of text with tokens_per_example tokens each)."""
    self.total_steps, self.batch_size = total_steps, batch_size
    self.unit, self.tokens_per_example = unit, tokens_per_example
    self.active = jax.process_index() == 0
    if self.active:
      self.tb = metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self.last_time, self.last_step = None, None

  def scalars(self, step: int, values: dict[str, Any]) -> dict[str, float]:
    """Logs device metrics (fetched here, once per log interval) with the derived throughput figures."""
    values = {k: float(v) for k, v in jax.device_get(values).items()}
    now = time.perf_counter()
    if self.last_time is not None and step > self.last_step:
      step_time = (now - self.last_time) / (step - self.last_step)
      values.update({'step_time': step_time, f'{self.unit}_per_sec': self.batch_size / step_time,
                     'eta_sec': step_time * (self.total_steps - step)})
      if self.tokens_per_example:
        values['tokens_per_sec'] = self.batch_size * self.tokens_per_example / step_time
    values['examples_seen'] = float(step * self.batch_size)
    self.last_time, self.last_step = now, step
    if self.active:
      self.tb.write_scalars(step, values)
      self.jsonl.write(json.dumps({'step': step, **values}) + '\n')
      self.jsonl.flush()
      print(self.progress_line(step, values), flush=True)
    return values

  def progress_line(self, step: int, v: dict[str, float]) -> str:
    line = f'step {step:>{len(str(self.total_steps))}}/{self.total_steps}'
    for key, fmt in (('loss', '.4f'), ('lr', '.2e'), ('grad_norm', '.3f')):
      if key in v:
        line += f' | {key} {v[key]:{fmt}}'
    rate = f'{self.unit}_per_sec'
    if rate in v:
      label = 'img' if self.unit == 'images' else self.unit
      line += f' | {v[rate]:.0f} {label}/s'
      if 'tokens_per_sec' in v:
        line += f" ({v['tokens_per_sec']:,.0f} tokens/s)"
      line += (f" | {v['step_time']:.3f} s/step"
               f" | ETA {format_duration(v['eta_sec'])}")
    return line

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """One HxWx3 uint8 image to TensorBoard."""
    if self.active:
      self.tb.write_images(step, {name: image[None]})

  def close(self) -> None:
    if self.active:
      self.tb.flush()
      self.tb.close()
      self.jsonl.close()
