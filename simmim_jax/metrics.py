"""Metric writers for process 0: a console progress line, TensorBoard event files and a JSONL log.

No TensorFlow: the event files are written here (tensorboard's protos, TFRecord framing), so the trainer runs
on machines with JAX alone. workdir may be a URL (gs://): object stores cannot append, so there the JSONL
log is rewritten whole and every TensorBoard flush becomes a new event file, at most every flush_secs.
"""
import io
import json
import os
import socket
import struct
import time
from typing import Any

import jax
import numpy as np

from simmim_jax import storage

try:  # the tensorboard package without TensorFlow: its protos and CRC are all the event files need
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
except ImportError:  # a JAX-only machine without it still trains; metrics.jsonl is written regardless
  event_pb2 = summary_pb2 = masked_crc32c = None

FLUSH_SECS_URL = 30.0  # remote writes at most this often (and at close); a killed run loses at most this much


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class JsonlLog:
  """workdir/metrics.jsonl: one JSON object per line; a resumed run adds its lines after the earlier ones.

  Local: appended line by line (each on disk as written). URL: the whole file rewritten on flush.
  """

  def __init__(self, path: storage.PathLike, flush_secs: float):
    self.path, self.flush_secs = storage.path(path), flush_secs
    self.remote = storage.is_url(path)
    self.pending: list[str] = []
    self.last_flush = time.monotonic()
    if self.remote:
      self.text = storage.read_text(self.path) if self.path.exists() else ''
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.file = open(self.path, 'a', encoding='utf-8')

  def write(self, row: dict[str, Any]) -> None:
    line = json.dumps(row) + '\n'
    if not self.remote:
      self.file.write(line)
      self.file.flush()
      return
    self.pending.append(line)
    if time.monotonic() - self.last_flush >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    if self.remote and self.pending:
      self.text += ''.join(self.pending)
      storage.write_text(self.path, self.text)
      self.pending = []
    self.last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self.file.close()


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C (what TensorBoard reads)."""
  header = struct.pack('<Q', len(data))
  return header + struct.pack('<I', masked_crc32c(header)) + data + struct.pack('<I', masked_crc32c(data))


class EventWriter:
  """TensorBoard event files in `logdir` without TensorFlow: scalars (simple_value) and PNG images.

  Local: one file per session, appended as written. URL: the events since the last flush go to a new file
  (`...<session>.<part>`); TensorBoard reads a run's event files in name order, so the parts read as one log.
  """

  def __init__(self, logdir: storage.PathLike, flush_secs: float):
    self.logdir, self.flush_secs = storage.path(logdir), flush_secs
    self.remote = storage.is_url(logdir)
    now = time.time()
    # Zero-padded fields: names sort in write order (session start time, then part).
    self.stem = f'events.out.tfevents.{now:017.6f}.{socket.gethostname()}.{os.getpid()}'
    self.pending: list[bytes] = [self._event(now, file_version='brain.Event:2')]
    self.part, self.last_flush = 0, time.monotonic()
    if not self.remote:
      self.logdir.mkdir(parents=True, exist_ok=True)
      self.file = open(self.logdir / self.stem, 'ab')
      self.flush()

  def _event(self, wall_time: float, **fields: Any) -> bytes:
    return _record(event_pb2.Event(wall_time=wall_time, **fields).SerializeToString())

  def _summary(self, step: int, values: list[Any]) -> None:
    self.pending.append(self._event(time.time(), step=step, summary=summary_pb2.Summary(value=values)))
    if time.monotonic() - self.last_flush >= self.flush_secs:
      self.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """One HxWx3 uint8 image, PNG-encoded."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    png = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(png, format='PNG')
    encoded = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
                                        encoded_image_string=png.getvalue())
    self._summary(step, [summary_pb2.Summary.Value(tag=tag, image=encoded)])

  def flush(self) -> None:
    if self.pending:
      data = b''.join(self.pending)
      if self.remote:
        storage.write_bytes(self.logdir / f'{self.stem}.{self.part:06d}', data)
        self.part += 1
      else:
        self.file.write(data)
        self.file.flush()
      self.pending = []
    self.last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self.file.close()


class Writer:
  """Writes scalars and images; derives step time, images/s, examples seen and ETA between calls.

  Only process 0 writes; the others keep the timing so every process can call it alike.
  """

  def __init__(self, workdir: str, total_steps: int, batch_size: int, unit: str = 'images',
               tokens_per_example: int = 0, flush_secs: float | None = None):
    """unit names what batch_size counts ('images', or 'rows' of text with tokens_per_example tokens each).
    flush_secs: how often files are written (default: as written locally, FLUSH_SECS_URL for URLs)."""
    self.total_steps, self.batch_size = total_steps, batch_size
    self.unit, self.tokens_per_example = unit, tokens_per_example
    self.active = jax.process_index() == 0
    if self.active:
      if flush_secs is None:
        flush_secs = FLUSH_SECS_URL if storage.is_url(workdir) else 0.0
      workdir = storage.path(workdir)
      self.tb = EventWriter(workdir / 'tensorboard', flush_secs) if event_pb2 else None
      if not self.tb:
        print('The tensorboard package is not installed: no TensorBoard events (pip install tensorboard); '
              'metrics.jsonl has every logged value.', flush=True)
      self.jsonl = JsonlLog(workdir / 'metrics.jsonl', flush_secs)
    self.last_time, self.last_step = None, None

  def start_timer(self, step: int) -> None:
    """Times from here (after compiling), so the first logged step already has a rate and an ETA."""
    self.last_time, self.last_step = time.perf_counter(), step

  def scalars(self, step: int, values: dict[str, Any], progress: bool = True) -> dict[str, float]:
    """Logs device metrics (fetched here, once per log interval) with the derived throughput figures; the
    console line only with `progress` (an evaluation prints its own line, not the step's a second time)."""
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
      if self.tb:
        self.tb.scalars(step, values)
      self.jsonl.write({'step': step, **values})
      if progress:
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
    if self.active and self.tb:
      self.tb.image(step, name, image)

  def flush(self) -> None:
    """Writes what is pending now (before a checkpoint or a planned stop)."""
    if self.active:
      if self.tb:
        self.tb.flush()
      self.jsonl.flush()

  def close(self) -> None:
    if self.active:
      if self.tb:
        self.tb.close()
      self.jsonl.close()
