"""SimMIM pretraining, top to bottom: set-up, state (born sharded) and resume, data, the loop.

One trainer for every modality: config.model.name picks the task (simmim_jax/tasks.py: images or text),
which supplies the model, masks, loss, data and, for text, held-out evaluation."""
import math
import os
import jax
import ml_collections
import numpy as np

from simmim_jax import checkpoint, feed, metrics, pretrain_step, sharding, tasks, visualize
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
  task = tasks.for_config(config)
  task.build_model(config)  # the model's config checks, before any data is read
  data = task.data(config)  # fails fast if the data is missing
  steps_per_epoch = max(data.num_examples // config.batch_size, 1)
  total_steps = resolve_steps(config, 'total', steps_per_epoch)
  model, tx, schedule, init, abstract, shardings = pretrain_step.setup(config, mesh, total_steps, steps_per_epoch)

  # ----------------------------------------------------------------------------------------------------
  # State: restored from the latest checkpoint, else initialised directly in its shardings.
  # ----------------------------------------------------------------------------------------------------
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
      f'{dict(mesh.shape)}; {total_steps} steps of {config.batch_size} {"rows" if task.name == "text" else "images"} '
      f'({steps_per_epoch} per epoch).')
  end = total_steps if max_steps is None else min(total_steps, start + max_steps)
  if start >= end:
    log(f'Nothing to do: the run is at step {start} of {total_steps}.')
    ckpt.close()
    return {}

  # ----------------------------------------------------------------------------------------------------
  # Data: this process's slice, resumed at the step's position, fed to the mesh as global arrays.
  # ----------------------------------------------------------------------------------------------------
  batches = feed.prefetch(data.batches(start), sharding.batch_sharding(mesh), config.data.prefetch)

  # ----------------------------------------------------------------------------------------------------
  # The loop. Metrics are fetched from the device only at log steps, so the host runs ahead.
  # ----------------------------------------------------------------------------------------------------
  train_step = pretrain_step.make_train_step(model, tx, schedule, config, mesh, shardings)
  figures = task.name == 'image'  # text has no figure; it is scored on the held-out split instead
  reconstruct = pretrain_step.make_reconstruct(model, config, mesh, num_images=8) if figures else None
  evaluate = make_evaluate(task, model, config, mesh, data)
  units = dict(unit='rows', tokens_per_example=config.data.seq_len) if task.name == 'text' else {}
  writer = metrics.Writer(workdir, total_steps, config.batch_size, **units)
  logged = {}
  for step in range(start + 1, end + 1):
    batch = next(batches)
    state, step_metrics = train_step(state, batch)
    preempted = ckpt.reached_preemption(step)
    save = step % config.checkpoint.every_steps == 0 or step == end or preempted
    eval_now = evaluate is not None and (step % config.eval_every_steps == 0 or step == end)
    log_now = step % config.log_every_steps == 0 or step in (start + 1, end) or eval_now
    if log_now:
      eval_metrics = evaluate(state.params) if eval_now else {}
      logged = writer.scalars(step, {**step_metrics, **eval_metrics})
      if eval_metrics:
        log(f'held-out at step {step}: ' + ' | '.join(f'{k[5:]} {v:.4f}' for k, v in eval_metrics.items()))
    if log_now or save:
      check_finite(step, step_metrics, ckpt)  # never checkpoint a diverged state
    if save:
      ckpt.save(step, state, {'step': step, 'examples_seen': step * config.batch_size,
                              'config': checkpoint.config_dict(config)})
    if preempted:
      log(f'Preemption notice: saved step {step}; rerun the same command to resume.')
      break
    if figures and (step % config.image_every_steps == 0 or step == end):
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


def make_evaluate(task, model, config: ml_collections.ConfigDict, mesh, data: tasks.DataSource):
  """params -> held-out metrics over data.eval_batches (the same rows and masks every time); None if the
  task has no held-out evaluation."""
  if data.eval_batches is None:
    return None
  eval_step = pretrain_step.make_eval_step(model, config, mesh, data.eval_constants)
  batch_sharding = sharding.batch_sharding(mesh)

  def evaluate(params) -> dict[str, float]:
    totals = {}
    for index, batch in enumerate(data.eval_batches()):
      sums = jax.device_get(eval_step(params, feed.to_global(batch, batch_sharding), index))
      totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return task.eval_metrics(totals)

  return evaluate


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
