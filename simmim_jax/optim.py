"""Optimizer: AdamW with the official no-decay rules, global-norm clipping, and per-iteration LR schedules.

Learning rates in the config are per 512 images; base, warmup and min LR are each multiplied by
batch_size / 512 with batch_size the effective global batch (micro-batch x accumulation steps), as the
official code does.

Clipping with gradient accumulation: the official loop (main_simmim.py, main_finetune.py) calls
clip_grad_norm_ after every micro-batch's backward, so it clips each partial sum of the accumulated gradient.
Here the full accumulated gradient is clipped once, which is what the same batch without accumulation gets:
the correct large-batch equivalent, kept on purpose (the reference runs do not accumulate).
"""
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax.defaults import resolve_steps
from simmim_jax.errors import UserError

Schedule = Callable[..., jax.Array]  # schedule(step, peak_scale=1.0) -> the learning rate of update `step`


def lr_schedule(optim: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int,
                batch_size: int) -> Schedule:
  """The official per-iteration schedule: linear warmup from warmup_lr, then cosine, multistep or linear.

  cosine follows timm's CosineLRScheduler as SimMIM configures it: t_initial = total steps with no warmup
  prefix, so after warmup lr = min + (base - min)(1 + cos(pi t / T)) / 2 with t counted from step 0 (a small
  dip right after warmup). warmup_prefix=True is the Swin-Transformer variant: cosine over T - warmup.

  peak_scale multiplies only the peak (base) LR: layer-wise decay groups share the warmup start and the
  cosine floor, as the official fine-tuning code builds one scheduler per group on scaled base LRs.

  Timing (optim.lr_lag, 1 by default): the official loop calls lr_scheduler.step_update(k) after
  optimizer.step() of iteration k, so update k runs at f(k - 1), and update 0 at the LR the scheduler set
  when it was built (warmup_lr, = f(0)). schedule(k) is the LR of update k: f(max(k - lr_lag, 0)).
  lr_lag=0 is update k at f(k) (BERT, RoBERTa). With accumulation the lag counts optimizer steps; the
  official scheduler counts micro-batches there (f(k - 1/accum_steps) in optimizer steps).
  """
  lag = int(optim.get('lr_lag', 1))  # configs saved before the field: the official timing
  if lag < 0:
    raise ValueError(f'optim.lr_lag must be 0 or more, got {lag}.')
  scale = batch_size / 512
  base_lr, warmup_lr, min_lr = optim.base_lr * scale, optim.warmup_lr * scale, optim.min_lr * scale
  warmup = warmup_steps(optim, total_steps, steps_per_epoch)

  if optim.schedule == 'cosine':
    period = total_steps - warmup if optim.warmup_prefix else total_steps
    offset = warmup if optim.warmup_prefix else 0

    def after_warmup(t, base):
      frac = jnp.clip((t - offset) / max(period, 1), 0.0, 1.0)
      return min_lr + 0.5 * (base - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
  elif optim.schedule == 'linear':  # BERT/RoBERTa: straight down to min_lr over the steps after warmup

    def after_warmup(t, base):
      frac = jnp.clip((t - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
      return base + (min_lr - base) * frac
  elif optim.schedule == 'multistep':
    milestones = milestone_steps(optim, steps_per_epoch)

    def after_warmup(t, base):
      passed = jnp.sum(t >= jnp.asarray(milestones, jnp.int32)) if milestones else 0
      return base * optim.gamma**passed
  else:
    raise ValueError(f"optim.schedule must be 'cosine', 'linear' or 'multistep', got {optim.schedule!r}.")

  def schedule(step: jax.Array, peak_scale: float | jax.Array = 1.0) -> jax.Array:
    t = jnp.maximum(jnp.asarray(step, jnp.float32) - lag, 0.0)
    base = base_lr * peak_scale
    warm = warmup_lr + (base - warmup_lr) * t / max(warmup, 1)
    return jnp.where(t < warmup, warm, after_warmup(t, base))

  return schedule


CLAMPED_WARMUP_FRACTION = 0.1  # a warmup in epochs that a shortened run cannot fit becomes this share of it


def warmup_steps(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int, *,
                 say: Callable[[str], None] | None = None) -> int:
  """Warmup updates: optim.warmup_steps if set, else round(optim.warmup_fraction * total_steps) if set (the CPU
  recipes: a shortened run keeps its proportion), else optim.warmup_epochs (the paper recipes, exact).

  A warmup in epochs that is not below total_steps (a run shortened by --config.total_steps) would never leave
  warmup: it becomes CLAMPED_WARMUP_FRACTION of the run, said in one line (`say`, default: print on process 0).
  An explicit warmup_steps is left as given (validate.check refuses one >= total_steps before a run starts).
  """
  fraction = optim.get('warmup_fraction')
  if optim.get('warmup_steps') is None and fraction is not None:
    if not 0 <= fraction < 1:
      raise UserError(f'optim.warmup_fraction={fraction} must be in [0, 1): the share of total_steps spent warming up.')
    return int(round(fraction * total_steps))
  warmup = resolve_steps(optim, 'warmup', steps_per_epoch)
  if optim.get('warmup_steps') is None and warmup >= total_steps > 0:
    clamped = int(round(CLAMPED_WARMUP_FRACTION * total_steps))
    message = (f'optim.warmup_epochs={optim.warmup_epochs} is {warmup} steps, not below total_steps={total_steps}: '
               f'warming up over the first {clamped} steps instead (set optim.warmup_fraction or warmup_steps to '
               'choose).')
    if say is not None:
      say(message)
    elif jax.process_index() == 0:
      print(message, flush=True)
    return clamped
  return warmup


def milestone_steps(optim: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """Multistep milestones in steps (from milestone_steps, or milestone_epochs x steps per epoch)."""
  if optim.get('milestone_steps') is not None:
    return sorted(int(s) for s in optim.milestone_steps)
  return sorted(int(round(e * steps_per_epoch)) for e in optim.milestone_epochs)


def decay_mask(params, no_decay_names: Sequence[str]):
  """True where weight decay applies: not 1-D (norms, biases, q/v biases, gammas) and not a named exemption."""

  def decays(path, leaf) -> bool:
    names = {getattr(k, 'key', str(k)) for k in path}
    return leaf.ndim > 1 and not names & set(no_decay_names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, schedule: Schedule, no_decay_names: Sequence[str],
                   peak_scales: Any = None) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_grad) -> AdamW(schedule) with the decay mask (one clip of the whole
  accumulated gradient: see the module docstring; clip_grad 0 or None: no clipping).

  peak_scales (a tree of floats like the params, from layer_decay_scales) gives each parameter the schedule
  of its layer-decay group; optax.adamw is exactly scale_by_adam -> add_decayed_weights -> -lr, so only the
  last stage changes.
  """
  mask = lambda p: decay_mask(p, no_decay_names)
  # clip_grad 0 (or None) is no clipping, as the official `if config.TRAIN.CLIP_GRAD:` (0 would zero every step).
  clip = optax.clip_by_global_norm(optim.clip_grad) if optim.clip_grad else optax.identity()
  if peak_scales is None:
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=mask)
    return optax.chain(clip, adamw)
  return optax.chain(clip, optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
                     optax.add_decayed_weights(optim.weight_decay, mask), scale_by_group_lr(schedule, peak_scales))


def scale_by_group_lr(schedule: Schedule, peak_scales: Any) -> optax.GradientTransformation:
  """update -> -schedule(step, peak_scale) * update, the peak scale looked up per parameter.

  Written here because optax's scale_by_schedule takes one schedule for all parameters; multi_transform
  with one AdamW per group would do the same maths with N + 2 optimizer states.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u, s: (-schedule(state.count, s) * u).astype(u.dtype), updates, peak_scales)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _names(path) -> list[str]:
  return [str(getattr(k, 'key', k)) for k in path]


def vit_layer_id(names: Sequence[str], depth: int) -> int:
  """The official get_vit_layer on a Flax path under 'encoder' (or a head outside it): 0 .. depth + 1. The text
  encoder has the same layout (its token embedding, like a patch embedding, is layer 0), as BERT's layer decay."""
  if names[0] != 'encoder':
    return depth + 1
  if names[1] in ('cls_token', 'mask_token', 'pos_embed', 'embedding') or names[1].startswith('patch_embed'):
    return 0
  block = re.fullmatch(r'blocks_(\d+)', names[1])
  return int(block.group(1)) + 1 if block else depth + 1  # rel_pos_bias and norms: the top group


def swin_layer_id(names: Sequence[str], depths: Sequence[int]) -> int:
  """The official get_swin_layer: blocks count from 1 across stages; a stage's downsample joins its last block."""
  top = sum(depths) + 1
  if names[0] != 'encoder':
    return top
  if names[1] in ('mask_token', 'patch_embed'):
    return 0
  stage = re.fullmatch(r'layers_(\d+)', names[1])
  if not stage:
    return top
  s = int(stage.group(1))
  if names[2] == 'downsample':
    return sum(depths[:s + 1])
  return sum(depths[:s]) + int(names[2].removeprefix('blocks_')) + 1


def layer_decay_scales(params: Any, encoder: Any, layer_decay: float) -> Any:
  """Per-parameter peak-LR scale layer_decay ** (N + 1 - layer_id), N the encoder's block count."""
  if hasattr(encoder, 'depths'):
    top, layer_id = sum(encoder.depths) + 1, lambda names: swin_layer_id(names, encoder.depths)
  else:
    top, layer_id = encoder.depth + 1, lambda names: vit_layer_id(names, encoder.depth)
  return jax.tree_util.tree_map_with_path(lambda path, _: float(layer_decay**(top - layer_id(_names(path)))),
                                          params)


def update_if_finite(tx: optax.GradientTransformation, grads: Any, loss: jax.Array, opt_state: Any,
                     params: Any) -> tuple[Any, Any, jax.Array]:
  """(params, opt_state, finite): the optimizer's update when the loss, the gradients and the update are finite, else
  the inputs unchanged, so no state (and no checkpoint) ever holds a NaN. The flag is left on device: the
  trainer fetches it at log and save steps, never waiting on the host in between."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  # The update too: a finite gradient times an infinite learning rate is not a finite step.
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads)) & jnp.isfinite(optax.global_norm(updates))
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(new_params, params), keep(new_opt_state, opt_state), finite
