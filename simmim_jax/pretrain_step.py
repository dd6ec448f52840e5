"""The pretraining train state and step: born sharded, jitted over the mesh, reused by the trainer and
benchmark for every modality (what differs lives in simmim_jax/tasks.py).

No TensorFlow here: the step runs from any NumPy or synthetic source.
"""
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simmim_jax import optim, sharding, tasks

sample_mask = tasks.image_mask  # the image mask for a batch (figures, tools)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. The RNG is derived from (seed, step) and the data position
  from step, so step alone restores both."""
  step: jax.Array
  params: Any
  opt_state: Any


class Setup(NamedTuple):
  """What the trainer, the benchmark and the tests build the same way from a config."""
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optim.Schedule
  init: Callable[[], TrainState]  # builds the state directly in its shardings
  abstract: TrainState  # shapes and dtypes only
  shardings: Any


def setup(config: ml_collections.ConfigDict, mesh: Mesh, total_steps: int, steps_per_epoch: int) -> Setup:
  """model -> LR schedule -> optimizer -> sharded state for this config's task; checks the config first."""
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  model = tasks.for_config(config).build_model(config)
  schedule = optim.lr_schedule(config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               batch_size=config.batch_size)
  encoder = model.encoder
  tx = optim.make_optimizer(config.optim, schedule, encoder.no_weight_decay)
  init, abstract, shardings = abstract_state(model, tx, config, mesh)
  return Setup(model, tx, schedule, init, abstract, shardings)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> tuple[Callable[[], TrainState], TrainState, Any]:
  """(init, abstract state, shardings): init() builds the state directly in its shardings (no host copy)."""
  task = tasks.for_config(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)  # init draws from its own stream

  def init(key: jax.Array) -> TrainState:
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in task.batch_spec(config, 1).items()}
    masks = jax.eval_shape(lambda b: task.sample(config, key, b), batch)
    masks = {k: jnp.zeros(s.shape, s.dtype) for k, s in masks.items()}
    params = model.init({'params': key}, *task.model_inputs(config, batch, masks))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, key)
  shardings = sharding.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  return (lambda: jax.jit(init, out_shardings=shardings)(key)), abstract, shardings


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    config: ml_collections.ConfigDict, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(step(state, batch) -> (state, metrics)) with explicit shardings; the state is donated."""
  task = tasks.for_config(config)
  accum = config.optim.accum_steps
  base_key = jax.random.key(config.seed)
  micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def loss_fn(params, batch, masks, key):
    return task.loss(model, config, params, batch, masks, key)

  def micro_batches(x: jax.Array) -> jax.Array:
    # (B, ...) -> (accum, B/accum, ...): each device keeps its own rows, so no data moves.
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    mask_key, drop_key = jax.random.split(jax.random.fold_in(base_key, state.step))
    masks = task.sample(config, mask_key, batch)  # for the whole batch, so accumulation sees the same masks
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, masks, drop_key)
      aux.pop('weight')
    else:
      # Each micro-batch's mean is weighted by its share of the masked count (images: equal shares), so the
      # result is exactly the ratio over the whole batch.
      def accumulate(carry, xs):
        i, micro_batch, micro_masks = xs
        (loss, aux), grads = grad_fn(state.params, micro_batch, micro_masks, jax.random.fold_in(drop_key, i))
        weight = aux.pop('weight')
        scaled = jax.tree.map(lambda x: x * weight, (loss, aux, grads))
        return jax.tree.map(jnp.add, carry, (*scaled, weight)), None

      micro = jax.tree.map(micro_batches, (batch, masks))
      (_, aux0), _ = jax.eval_shape(grad_fn, state.params, *jax.tree.map(lambda x: x[0], micro), drop_key)
      aux0.pop('weight')
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           (jax.ShapeDtypeStruct((), jnp.float32), aux0, state.params, jax.ShapeDtypeStruct((), jnp.float32)))
      (loss, aux, grads, total), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), *micro))
      loss, aux, grads = jax.tree.map(lambda x: x / total, (loss, aux, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, **aux, 'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params),
               'lr': schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh,
                   constants: dict[str, int]) -> Callable:
  """jit(params, batch, index) -> held-out sums (text), masks from their own stream keyed by batch index,
  so every evaluation scores the same positions."""
  task = tasks.for_config(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 3)

  def evaluate(params, batch, index):
    masks = task.sample(config, jax.random.fold_in(key, index), batch)
    return task.eval_sums(model, config, params, batch, masks, **constants)

  return jax.jit(evaluate, out_shardings=sharding.replicated(mesh))


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
