"""Optimizer: AdamW with the official no-decay rules, global-norm clipping, and per-iteration LR schedules.

Learning rates in the config are per 512 images; base, warmup and min LR are each multiplied by
batch_size / 512 with batch_size the effective global batch (micro-batch x accumulation steps), as the
official code does.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax.defaults import resolve_steps

Schedule = Callable[[jax.Array], jax.Array]


def lr_schedule(optim: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int,
                batch_size: int) -> Schedule:
  """The official per-iteration schedule: linear warmup from warmup_lr, then cosine or multistep.

  cosine follows timm's CosineLRScheduler as SimMIM configures it: t_initial = total steps with no warmup
  prefix, so after warmup lr = min + (base - min)(1 + cos(pi t / T)) / 2 with t counted from step 0 (a small
  dip right after warmup). warmup_prefix=True is the Swin-Transformer variant: cosine over T - warmup.
  """
  scale = batch_size / 512
  base, warmup_lr, min_lr = optim.base_lr * scale, optim.warmup_lr * scale, optim.min_lr * scale
  warmup = resolve_steps(optim, 'warmup', steps_per_epoch)

  if optim.schedule == 'cosine':
    period = total_steps - warmup if optim.warmup_prefix else total_steps
    offset = warmup if optim.warmup_prefix else 0

    def after_warmup(t):
      frac = jnp.clip((t - offset) / max(period, 1), 0.0, 1.0)
      return min_lr + 0.5 * (base - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
  elif optim.schedule == 'multistep':
    milestones = milestone_steps(optim, steps_per_epoch)

    def after_warmup(t):
      passed = jnp.sum(t >= jnp.asarray(milestones, jnp.int32)) if milestones else 0
      return base * optim.gamma**passed
  else:
    raise ValueError(f"optim.schedule must be 'cosine' or 'multistep', got {optim.schedule!r}.")

  def schedule(step: jax.Array) -> jax.Array:
    t = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + (base - warmup_lr) * t / max(warmup, 1)
    return jnp.where(t < warmup, warm, after_warmup(t))

  return schedule


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


def make_optimizer(optim: ml_collections.ConfigDict, schedule: Schedule,
                   no_decay_names: Sequence[str]) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_grad) -> AdamW(schedule) with the decay mask."""
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                      mask=lambda p: decay_mask(p, no_decay_names))
  return optax.chain(optax.clip_by_global_norm(optim.clip_grad), adamw)
