"""What differs between modalities in pretraining: a Task, built ONCE from the config and carried everywhere.

`build(config)` checks the config, builds the model and returns an ImageTask (SimMIM's masked pixel
regression) or a TextTask (masked tokens on packed sentencepiece rows). The train step, the trainer, the
benchmark and the tools are written once against a Task: what differs (masks, loss, data, throughput unit,
held-out evaluation, figures) is a method or an attribute of it, so none of them branches on the modality.
No TensorFlow at import: the data sources import the pipelines only when a real dataset is asked for.
"""
import jax
import ml_collections

from simmim_jax.tasks import image, text
from simmim_jax.tasks.base import DataSource, Task

__all__ = ['DataSource', 'Task', 'build']


def build(config: ml_collections.ConfigDict) -> Task:
  """The task for this config (text when model.name is 'text', else images), its config checked and its
  model built: call once per run and pass the result on."""
  task = text.build(config) if config.model.name == 'text' else image.build(config)
  jax.eval_shape(task.sample, jax.random.key(0), task.batch_spec(1))  # the mask's own checks, nothing computed
  return task
