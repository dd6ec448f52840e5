"""The Task interface every modality implements (tasks/image.py, tasks/text.py), and what they share."""
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simmim_jax.feed import Batch

Arrays = dict[str, jax.Array]


@dataclasses.dataclass
class DataSource:
  """A task's data for one run, this process's view."""
  num_examples: int  # training examples per epoch, all processes (images; packed rows for text)
  batches: Callable[[int], Iterator[Batch]]  # this process's training batches from batch `start` on
  eval_batches: Callable[[], Iterator[Batch]] | None = None  # held-out, the same batches on every call
  eval_constants: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. the unigram baseline id
  tokenizer: bytes | None = None  # text: the serialized sentencepiece model, saved with the run's checkpoints


Evaluate = Callable[[Any], dict[str, float]]  # params -> held-out metrics ('eval_*')
DrawFigures = Callable[[int, Any, Arrays], None]  # (step, params, batch): draws and writes a figure


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A checked config and its model; the methods the step and the trainer call. Subclasses fill them in."""
  config: ml_collections.ConfigDict
  model: nn.Module
  unit = 'examples'  # what batch_size counts, for throughput lines

  @property
  def tokens_per_example(self) -> int:
    """Tokens per example for a tokens/s figure; 0 where the unit is not made of tokens."""
    return 0

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one batch of `batch_size` examples, as the step receives it."""
    raise NotImplementedError

  def sample(self, key: jax.Array, batch: Arrays) -> Arrays:
    """The masks (and corrupted inputs) for a batch, drawn on device."""
    raise NotImplementedError

  def model_inputs(self, batch: Arrays, masks: Arrays) -> tuple[jax.Array, ...]:
    """The positional arguments of model.apply."""
    raise NotImplementedError

  def loss(self, params: Any, batch: Arrays, masks: Arrays, key: jax.Array) -> tuple[jax.Array, Arrays]:
    """(loss, aux); aux['weight'] is the batch's share when micro-batches are accumulated."""
    raise NotImplementedError

  def data(self) -> DataSource:
    """This process's training data (and held-out data where the task evaluates); fails fast if missing."""
    raise NotImplementedError

  def make_evaluate(self, mesh: Mesh, data: DataSource) -> Evaluate | None:
    """Held-out evaluation, or None where the task has none."""
    del mesh, data
    return None

  def make_figures(self, mesh: Mesh, workdir: str, writer: Any) -> DrawFigures | None:
    """Draws the model's output on the current batch into workdir and the metric writer, or None where the
    task draws no figures."""
    del mesh, workdir, writer
    return None

  def next_steps(self, workdir: str) -> list[str]:
    """Commands a user runs after this pretraining (the end-of-run summary prints them)."""
    return [f'python tools/export_params.py --checkpoint {workdir} --out {workdir}/encoder.npz --encoder_only  '
            '# the encoder as NumPy; tools/convert_to_torch.py takes it to PyTorch / timm']

  def init_inputs(self) -> tuple[jax.Array, ...]:
    """Zero inputs of batch 1 for model.init."""
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in self.batch_spec(1).items()}
    masks = jax.eval_shape(lambda b: self.sample(jax.random.key(0), b), batch)
    return self.model_inputs(batch, {k: jnp.zeros(s.shape, s.dtype) for k, s in masks.items()})


def same_on_all_processes(value: int) -> int:
  """Process 0's value everywhere: step counts must agree or the processes run different programs."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))
