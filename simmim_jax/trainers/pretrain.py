"""SimMIM pretraining, top to bottom: set-up, state (born sharded) and resume, data, the loop.

One trainer for every modality: tasks.build(config) returns the task (images or text), which supplies the
model, masks, loss, data and what it has of held-out evaluation and figures."""
import math
import os

import jax
import ml_collections

from simmim_jax import feed, metrics, params_io, pretrain_step, pretrained, sharding, storage, tasks
from simmim_jax.data import tokenizer
from simmim_jax.defaults import resolve_steps, steps_per_epoch_of
from simmim_jax.trainers.run import Run, changed_fields, log


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
  task = tasks.build(config)  # the config's checks and the model, once for the whole run
  data = task.data()  # fails fast if the data is missing
  steps_per_epoch = steps_per_epoch_of(data.num_examples, config.batch_size)
  total_steps = resolve_steps(config, 'total', steps_per_epoch)
  s = pretrain_step.setup(task, mesh, total_steps, steps_per_epoch)

  # ----------------------------------------------------------------------------------------------------
  # State: restored from the latest checkpoint, else initialised directly in its shardings.
  # ----------------------------------------------------------------------------------------------------
  def init() -> pretrain_step.TrainState:
    """Random weights; with init_from (continued pretraining) the source run's, with a fresh optimizer."""
    if not config.get('init_from'):
      return s.init()
    source_config = params_io.load_config(config.init_from) or {}
    differences = ', '.join(f'model.{k} {a!r} (here {b!r})' for k, (a, b) in changed_fields(
        source_config.get('model', {}), config.model.to_dict()).items()
                            if k not in pretrained.FREE_MODEL_FIELDS and a is not None)
    params, fresh = pretrained.continued(params_io.load_params(config.init_from), s.abstract.params,
                                         config.init_from, f'the source has {differences}' if differences else '')
    if fresh:  # an encoder-only export: the rest as a random init would have it
      params |= {k: v for k, v in jax.device_get(s.init().params).items() if k in fresh}
    log(f"Continued pretraining from {config.init_from}: {len(jax.tree.leaves(params))} arrays"
        f"{', freshly initialised: ' + ', '.join(fresh) if fresh else ''}; fresh optimizer and schedule.")
    return s.init_with(params)

  run = Run(workdir, config, total_steps, max_steps)
  state = run.restore_or_init(s.abstract, s.shardings, init)
  if data.tokenizer is not None and jax.process_index() == 0:  # the tokenizer travels with the checkpoints
    storage.write_bytes(os.path.join(workdir, tokenizer.FILE), data.tokenizer)
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(s.abstract.params['encoder']))
  log(f'{config.model.name} {config.model.variant}: {num_params / 1e6:.2f}M encoder parameters; mesh '
      f'{dict(mesh.shape)}; {total_steps} steps of {config.batch_size} {task.unit} ({steps_per_epoch} per epoch).')
  if run.nothing_to_do():
    return {}

  # ----------------------------------------------------------------------------------------------------
  # Data: this process's slice, resumed at the step's position, fed to the mesh as global arrays.
  # ----------------------------------------------------------------------------------------------------
  batches = feed.prefetch(data.batches(run.start), sharding.batch_sharding(mesh), config.data.prefetch)

  # ----------------------------------------------------------------------------------------------------
  # The loop. Metrics are fetched from the device only at log steps, so the host runs ahead.
  # ----------------------------------------------------------------------------------------------------
  batches, train_step = run.compile(pretrain_step.make_train_step(task, s), state, batches)
  writer = metrics.Writer(workdir, total_steps, config.batch_size, task.unit, task.tokens_per_example)
  writer.start_timer(run.start)  # the first logged step already has a rate and an ETA
  evaluate = task.make_evaluate(mesh, data)  # None: the task has no held-out evaluation (images)
  draw_figures = task.make_figures(mesh, workdir, writer)  # None: the task draws no figures (text)
  logged = {}
  with run.guard:  # SIGTERM / SIGINT: finish the step, save, return
    for step in run.steps():
      batch = next(batches)
      state, step_metrics = train_step(state, batch)
      eval_now = evaluate is not None and (step % config.eval_every_steps == 0 or step == run.end)
      log_now = run.log_now(step) or eval_now
      if log_now:
        eval_metrics = evaluate(state.params) if eval_now else {}
        logged = writer.scalars(step, {**step_metrics, **eval_metrics})
        if eval_metrics:
          log(f'held-out at step {step}: ' + ' | '.join(f'{k[5:]} {v:.4f}' for k, v in eval_metrics.items()))
      if run.after_step(step, state, step_metrics, {'examples_seen': step * config.batch_size}, log_now,
                        writer.flush):
        break
      if draw_figures and (step % config.image_every_steps == 0 or step == run.end):
        draw_figures(step, state.params, batch)
  run.close()
  writer.close()
  run.summary(step, logged, task.next_steps(workdir))
  return logged
