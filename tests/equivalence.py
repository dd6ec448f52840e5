"""Tolerances for "the same step on another device layout" that follow from the math, not from one machine.

Two meshes reduce the same sums in different orders, so losses and gradients agree to float32 rounding of a
reduction (relative ~1e-6 of the values' scale). The first AdamW update, though, is lr * g / (|g| + eps)
(m and v bias-corrected), whose derivative in g is eps / (|g| + eps)^2 <= 1 / eps: where a gradient is near
zero, a rounding difference dg moves the parameter by up to lr * min(2, |dg| / eps), while where |g| >> |dg| it
moves it by almost nothing. A fixed absolute tolerance on parameters is therefore not sound on every CPU; these
bounds are.
"""
from typing import Any

import jax
import numpy as np

from simmim_jax import feed, pretrain_step, sharding, tasks


def loss_and_grads(config, devices, batch: dict[str, np.ndarray]) -> tuple[float, Any]:
  """The first train step's loss and gradients (the step's own masks and dropout keys, its micro-batches with
  optim.accum_steps) on a mesh over devices."""
  mesh = sharding.make_mesh(config.mesh, devices)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=100, steps_per_epoch=10)
  params = s.init().params
  mask_key, drop_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))  # as the step at 0

  accum = config.optim.accum_steps

  @jax.jit
  def value_and_grad(params, batch):
    masks = task.sample(mask_key, batch)
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    if accum == 1:
      (loss, _), grads = grad_fn(params, batch, masks, drop_key)
      return loss, grads
    # As the step: micro-batch i holds rows i, i + accum, ... and weighs by its share (aux['weight']).
    parts = [grad_fn(params, *jax.tree.map(lambda x, i=i: x[i::accum], (batch, masks)), jax.random.fold_in(drop_key, i))
             for i in range(accum)]
    total = sum(aux['weight'] for (_, aux), _ in parts)
    return jax.tree.map(lambda *xs: sum(x * aux['weight'] for x, ((_, aux), _) in zip(xs, parts)) / total,
                        *[(loss, grads) for (loss, _), grads in parts])

  loss, grads = value_and_grad(params, feed.to_global(batch, sharding.batch_sharding(mesh)))
  return float(loss), jax.device_get(grads)


def assert_grads_close(grads_a: Any, grads_b: Any, rtol: float = 1e-4) -> None:
  """Each gradient array agrees to rtol of its own largest entry (reduction order only)."""
  def check(path, a, b):
    scale = max(float(np.abs(a).max()), 1e-12)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, grads_a, grads_b)


def assert_first_update_close(params_a: Any, params_b: Any, grads_a: Any, grads_b: Any, lr: float,
                              eps: float, rounding: float = 1e-5) -> None:
  """Parameters after one AdamW step from the same start. The first update is lr * f(g), f(g) = g / (|g| + eps),
  and f' = eps / (|g| + eps)^2, so by the mean value theorem two gradients within d of each other move a
  parameter apart by at most lr * min(2, d * eps / (max(|g| - d, 0) + eps)^2): tight where |g| >> d, up to
  lr * d / eps where the gradient is within rounding of zero. d is the gradients' measured difference plus
  `rounding` of the array's largest gradient, because the step's own gradients are a different compilation
  (another reduction order) than the ones measured here. Plus float32 rounding of the parameter itself.
  Clipping scales both gradients alike (norms agree to ~1e-7)."""
  def check(path, pa, pb, ga, gb):
    d = np.abs(ga - gb) + rounding * np.abs(ga).max()
    slope = eps / (np.maximum(np.abs(ga) - d, 0) + eps) ** 2
    bound = lr * np.minimum(2.0, d * slope) + 1e-6 * (np.abs(pa) + 1e-2)
    excess = np.abs(pa - pb) - bound
    assert excess.max() <= 0, f'{jax.tree_util.keystr(path)}: exceeds the AdamW bound by {excess.max():.3g}'
  jax.tree_util.tree_map_with_path(check, params_a, params_b, grads_a, grads_b)
