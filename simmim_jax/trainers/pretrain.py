"""SimMIM pretraining, top to bottom: set-up, state (born sharded) and resume, data, the loop."""
import math
import os
from typing import Iterator

import jax
import ml_collections
import numpy as np

from simmim_jax import checkpoint, feed, masking, metrics, models, optim, pretrain_step, sharding, visualize
from simmim_jax.data import images
from simmim_jax.defaults import resolve_steps


def train(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None) -> dict[str, float]:
  """Pretrains to the config's total steps, resuming from the latest checkpoint in workdir.

  max_steps limits this call to that many more steps (a time-limited job or a notebook session); the run
  continues from its checkpoint next time. Returns the last logged metrics.
  """
  # ----------------------------------------------------------------------------------------------------
  # Set-up: every check a user's config can fail happens here, before anything is compiled or written.
  # ----------------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  model = models.build_simmim(config.model)
  if model.encoder.patch_size != config.mask.model_patch_size:
    raise ValueError(f'mask.model_patch_size={config.mask.model_patch_size} must equal the encoder patch '
                     f'size {model.encoder.patch_size} of {config.model.name} {config.model.variant}.')
  masking.check_image_mask(config.model.image_size, config.mask.mask_patch_size, config.mask.model_patch_size)
  steps_per_epoch = max(num_examples(config) // config.batch_size, 1)  # fails fast if data is missing
  total_steps = resolve_steps(config, 'total', steps_per_epoch)
  schedule = optim.lr_schedule(config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               batch_size=config.batch_size)
  tx = optim.make_optimizer(config.optim, schedule, model.encoder.no_weight_decay)

  # ----------------------------------------------------------------------------------------------------
  # State: restored from the latest checkpoint, else initialised directly in its shardings.
  # ----------------------------------------------------------------------------------------------------
  init, abstract, shardings = pretrain_step.abstract_state(model, tx, config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  checkpoint.write_config(workdir, config)
  start = ckpt.latest_step() or 0
  if start:
    state, _ = ckpt.restore(start, checkpoint.abstract_with_shardings(abstract, shardings))
    log(f'Resumed from step {start} in {ckpt.directory}.')
  else:
    state = init()
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params['encoder']))
  log(f'{config.model.name} {config.model.variant}: {num_params / 1e6:.2f}M encoder parameters; mesh '
      f'{dict(mesh.shape)}; {total_steps} steps of {config.batch_size} images ({steps_per_epoch} per epoch).')
  end = total_steps if max_steps is None else min(total_steps, start + max_steps)
  if start >= end:
    log(f'Nothing to do: the run is at step {start} of {total_steps}.')
    ckpt.close()
    return {}

  # ----------------------------------------------------------------------------------------------------
  # Data: this process's slice, resumed at the step's position, fed to the mesh as global arrays.
  # ----------------------------------------------------------------------------------------------------
  batches = feed.prefetch(local_batches(config, start), sharding.batch_sharding(mesh), config.data.prefetch)

  # ----------------------------------------------------------------------------------------------------
  # The loop. Metrics are fetched from the device only at log steps, so the host runs ahead.
  # ----------------------------------------------------------------------------------------------------
  train_step = pretrain_step.make_train_step(model, tx, schedule, config, mesh, shardings)
  reconstruct = pretrain_step.make_reconstruct(model, config, mesh, num_images=8)
  writer = metrics.Writer(workdir, total_steps, config.batch_size)
  logged = {}
  for step in range(start + 1, end + 1):
    batch = next(batches)
    state, step_metrics = train_step(state, batch)
    preempted = ckpt.reached_preemption(step)
    save = step % config.checkpoint.every_steps == 0 or step == end or preempted
    log_now = step % config.log_every_steps == 0 or step in (start + 1, end)
    if log_now:
      logged = writer.scalars(step, step_metrics)
    if log_now or save:
      check_finite(step, step_metrics, ckpt)  # never checkpoint a diverged state
    if save:
      ckpt.save(step, state, {'step': step, 'examples_seen': step * config.batch_size,
                              'config': checkpoint.config_dict(config)})
    if preempted:
      log(f'Preemption notice: saved step {step}; rerun the same command to resume.')
      break
    if step % config.image_every_steps == 0 or step == end:
      write_reconstructions(writer, workdir, step, config, reconstruct(state.params, batch['image'], step))
  ckpt.wait()
  ckpt.close()
  writer.close()
  return logged


def check_finite(step: int, step_metrics: dict[str, jax.Array], ckpt: checkpoint.Checkpointer) -> None:
  """Stops with one message on a NaN/inf loss; the checkpoints already written stay untouched."""
  loss, grad_norm = (float(step_metrics[k]) for k in ('loss', 'grad_norm'))
  if not np.isfinite(loss):
    ckpt.wait()
    raise FloatingPointError(
        f'Loss is {loss} at step {step} (grad norm {grad_norm}). The last good checkpoint (step '
        f'{ckpt.latest_step()}) is kept; lower optim.base_lr or lengthen the warmup, then rerun.')


def num_examples(config: ml_collections.ConfigDict) -> int:
  """Examples in the training split (all processes); 'synthetic' counts as one epoch per 100 steps."""
  if config.data.name == 'synthetic':
    return 100 * config.batch_size
  return images.num_examples(config.data)


def local_batches(config: ml_collections.ConfigDict, start: int) -> Iterator[feed.Batch]:
  """This process's batches from step `start` on: its slice of the tfds split, or of the synthetic source."""
  local = config.batch_size // jax.process_count()
  if config.data.name == 'synthetic':
    return feed.synthetic_batches(config.batch_size, config.model.image_size, config.model.in_chans, config.seed,
                                  start, jax.process_index(), jax.process_count())
  return images.pretrain_batches(config.data, image_size=config.model.image_size, batch_size=local,
                                 seed=config.seed, start_batch=start)


def write_reconstructions(writer: metrics.Writer, workdir: str, step: int, config: ml_collections.ConfigDict,
                          figure_arrays) -> None:
  """PNG grid (and TensorBoard image) of input / masked input / reconstruction / pasted / L1 error heat map,
  drawn by the same visualize.figure_from_arrays as tools/visualize.py; process 0 only."""
  originals, mask, reconstruction = jax.device_get(figure_arrays)
  if jax.process_index() != 0:
    return
  fig = visualize.figure_from_arrays(originals, mask, reconstruction, config)
  visualize.save_png(fig.grid, os.path.join(workdir, 'reconstructions', f'step_{step:07d}.png'), min_size=512,
                     title=f'step {step}\n{visualize.caption(fig)}')
  writer.image(step, 'reconstruction', fig.grid)


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
