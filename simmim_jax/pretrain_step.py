"""The SimMIM train state and step: born sharded, jitted over the mesh, reused by the trainer and benchmark.

No TensorFlow here: the step runs from any NumPy or synthetic source.
"""
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simmim_jax import losses, masking, sharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. The RNG is derived from (seed, step) and the data position
  from step, so step alone restores both."""
  step: jax.Array
  params: Any
  opt_state: Any


def sample_mask(config: ml_collections.ConfigDict, key: jax.Array, batch_size: int) -> jax.Array:
  """The token mask for a batch, drawn on device (static shapes, exact count per example)."""
  m = config.mask
  return masking.image_mask(key, batch_size, config.model.image_size, m.mask_patch_size,
                            m.model_patch_size, m.mask_ratio)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> tuple[Callable[[], TrainState], TrainState, Any]:
  """(init, abstract state, shardings): init() builds the state directly in its shardings (no host copy)."""
  size, chans = config.model.image_size, config.model.in_chans
  grid = size // config.mask.model_patch_size
  key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)  # init draws from its own stream

  def init(key: jax.Array) -> TrainState:
    images = jnp.zeros((1, size, size, chans), jnp.float32)
    params = model.init({'params': key}, images, jnp.zeros((1, grid, grid), jnp.int32))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, key)
  shardings = sharding.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  return (lambda: jax.jit(init, out_shardings=shardings)(key)), abstract, shardings


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    config: ml_collections.ConfigDict, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(step(state, batch) -> (state, metrics)) with explicit shardings; the state is donated."""
  accum = config.optim.accum_steps
  base_key = jax.random.key(config.seed)
  micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def loss_fn(params, images, mask, key):
    reconstruction = model.apply({'params': params}, images, mask, train=True, rngs={'dropout': key})
    target = images
    if config.loss.norm_target:
      target = losses.normalize_target(images, config.loss.norm_target_window)
    return losses.masked_l1(reconstruction, target, masking.upsample(mask, config.mask.model_patch_size))

  def micro_batches(x: jax.Array) -> jax.Array:
    # (B, ...) -> (accum, B/accum, ...): each device keeps its own rows, so no data moves.
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    images = batch['image']
    mask_key, drop_key = jax.random.split(jax.random.fold_in(base_key, state.step))
    mask = sample_mask(config, mask_key, images.shape[0])
    grad_fn = jax.value_and_grad(loss_fn)
    if accum == 1:
      loss, grads = grad_fn(state.params, images, mask, drop_key)
    else:
      # Every example masks the same number of pixels, so the mean of the micro-batch ratios is exactly
      # the global ratio over the whole batch.
      def accumulate(carry, xs):
        i, micro_images, micro_mask = xs
        loss, grads = grad_fn(state.params, micro_images, micro_mask, jax.random.fold_in(drop_key, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                      (jnp.arange(accum), micro_batches(images), micro_batches(mask)))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params),
               'lr': schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_reconstruct(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh,
                     num_images: int) -> Callable:
  """jit(params, images, step) -> (images, token mask, reconstruction) of the first num_images, replicated.

  Every process calls it (the arrays are global); the mask stream is separate from training's.
  """
  key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 2)

  def reconstruct(params, images, step):
    images = images[:num_images]
    mask = sample_mask(config, jax.random.fold_in(key, step), images.shape[0])
    return images, mask, model.apply({'params': params}, images, mask, train=False)

  return jax.jit(reconstruct, out_shardings=sharding.replicated(mesh))
