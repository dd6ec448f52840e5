"""Fine-tuning and linear probing, top to bottom: set-up, state (pretrained encoder or random) and resume, data,
the loop with an evaluation every epoch and the best checkpoint kept. Images or text (model.name 'text'): the
labelled data (data/labelled.py) and the model's inputs (finetune_step) are what differ."""
import json
import math
import os
from typing import Any

import jax
import ml_collections

from simmim_jax import checkpoint, feed, finetune_step, metrics, optim, params_io, pretrained, sharding, storage
from simmim_jax.data import labelled, tokenizer
from simmim_jax.defaults import resolve_steps, steps_per_epoch_of
from simmim_jax.models.classifier import build_classifier
from simmim_jax.trainers.run import Run, log

LABELS_FILE = 'labels.json'  # {"classes": [names in label order]}, in the workdir of a run whose labels have names


def train(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None) -> dict[str, float]:
  """Fine-tunes (task 'finetune') or trains a linear probe (task 'linear_probe') to the config's total steps,
  resuming from the latest checkpoint in workdir. Returns the last evaluation's metrics."""
  # ----------------------------------------------------------------------------------------------------
  # Set-up: every check a user's config can fail happens here, before anything is compiled or written.
  # ----------------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  eval_batch_size = config.eval_batch_size or config.batch_size
  sharding.check_batch_size(eval_batch_size, mesh)
  if config.optim.accum_steps != 1:
    raise ValueError('Fine-tuning does not accumulate gradients: set optim.accum_steps=1 and batch_size per step.')
  data = labelled.build(config)  # fails fast if the data (or its eval split) is missing
  num_classes, eval_examples = data.num_classes, data.eval_examples
  steps_per_epoch = steps_per_epoch_of(data.num_examples, config.batch_size)
  total_steps = resolve_steps(config, 'total', steps_per_epoch)
  eval_every = config.eval_every_steps or steps_per_epoch
  model = build_classifier(config, num_classes)
  schedule = optim.lr_schedule(config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               batch_size=config.batch_size)
  tx = finetune_step.make_optimizer(model, config, schedule, finetune_step.abstract_params(model, config))
  init, abstract, shardings = finetune_step.abstract_state(model, tx, config, mesh)

  # ----------------------------------------------------------------------------------------------------
  # State: the latest checkpoint of this run; else the pretrained encoder (init_from) or random init.
  # ----------------------------------------------------------------------------------------------------
  def init_from() -> finetune_step.ClassifierState:
    if not config.init_from:
      log('No init_from: the encoder starts from random initialisation.')
      return init()
    encoder, report = pretrained.adapt_encoder(params_io.load_params(config.init_from), abstract.params['encoder'],
                                               resize=config.get('rel_pos_resize', 'geometric'))
    log(f"Encoder from {config.init_from}: {len(jax.tree.leaves(encoder))} arrays; per-block tables copied from "
        f"the shared one: {len(report['copied'])}; resized: {len(report['resized'])}; dropped: "
        f"{', '.join(report['dropped']) or 'none'}.")
    return init(encoder)

  run = Run(workdir, config, total_steps, max_steps)
  state = run.restore_or_init(abstract, shardings, init_from)
  if jax.process_index() == 0:  # saved with the run: what a label id means, and text's tokenizer (it travels)
    if data.classes:
      storage.write_text(os.path.join(workdir, LABELS_FILE), json.dumps({'classes': list(data.classes)}, indent=1))
    if data.tokenizer is not None:
      storage.write_bytes(os.path.join(workdir, tokenizer.FILE), data.tokenizer)
  for note in data.notes:
    log(note)
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
  log(f'{config.task} {config.model.name} {config.model.variant}: {num_params / 1e6:.2f}M parameters, '
      f'{num_classes} classes; mesh {dict(mesh.shape)}; {total_steps} steps of {config.batch_size} {data.unit} '
      f'({steps_per_epoch} per epoch); evaluation every {eval_every} steps on {config.data.eval_split} '
      f'({eval_examples} examples).')
  if run.nothing_to_do():
    return {}
  best = checkpoint.Checkpointer(workdir, config.checkpoint, subdir='best', keep=1)
  best_top1 = best.restore_meta(best.latest_step())['eval']['top1'] if best.latest_step() else -1.0

  # ----------------------------------------------------------------------------------------------------
  # Data: this process's slice of the training split (resumed at the step) and of the evaluation split.
  # ----------------------------------------------------------------------------------------------------
  local = config.batch_size // jax.process_count()
  batch_sharding = sharding.batch_sharding(mesh)
  batches = feed.prefetch(data.train_batches(local, run.start), batch_sharding, config.data.prefetch)

  def eval_batches():
    return (feed.to_global(b, batch_sharding) for b in data.eval_batches(eval_batch_size // jax.process_count()))

  # ----------------------------------------------------------------------------------------------------
  # The loop: evaluate every eval_every steps and at the end; the best top-1 is kept in workdir/best.
  # ----------------------------------------------------------------------------------------------------
  batches, train_step = run.compile(
      finetune_step.make_train_step(model, tx, schedule, config, mesh, num_classes, shardings), state, batches)
  eval_step = finetune_step.make_eval_step(model, mesh, shardings, config)
  writer = metrics.Writer(workdir, total_steps, config.batch_size, data.unit,
                          config.data.seq_len if data.unit == 'rows' else 0)
  writer.start_timer(run.start)
  result: dict[str, Any] = {}
  with run.guard:  # SIGTERM / SIGINT: finish the step, save, return
    for step in run.steps():
      state, step_metrics = train_step(state, next(batches))
      logged = run.log_now(step)
      if logged:
        writer.scalars(step, step_metrics)
      if step % eval_every == 0 or step == total_steps:
        result = finetune_step.evaluate(eval_step, state, eval_batches())
        writer.scalars(step, {f'eval_{k}': v for k, v in result.items()}, progress=False)
        if result['top1'] > best_top1:
          best_top1 = result['top1']
          best.save(step, state, {'step': step, 'eval': result, 'config': checkpoint.config_dict(config)})
        log(f"eval at step {step}: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}, loss "
            f"{result['loss']:.4f} over {result['count']} examples (best top-1 {best_top1:.4f})")
      if run.after_step(step, state, step_metrics, {}, logged, writer.flush):
        break
  run.close(best)
  writer.close()
  run.summary(step, {f'eval_{k}': v for k, v in result.items()}, [
      f'python tools/export_params.py --checkpoint {workdir}/best --out {workdir}/classifier.npz  '
      '# the best held-out top-1; tools/convert_to_torch.py takes it to PyTorch'])
  return result
