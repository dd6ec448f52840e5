"""The pretraining train state and step: born sharded, jitted over the mesh, reused by the trainer, the
benchmark and the tools for every modality (what differs lives in the Task, simmim_jax/tasks/).

No TensorFlow here: the step runs from any NumPy or synthetic source.
"""
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simmim_jax import optim, sharding
from simmim_jax.tasks import Task


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. The RNG is derived from (seed, step) and the data position
  from step, so step alone restores both."""
  step: jax.Array
  params: Any
  opt_state: Any


class Setup(NamedTuple):
  """What the trainer, the benchmark and the tests build the same way from a Task."""
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optim.Schedule
  init: Callable[[], TrainState]  # builds the state directly in its shardings
  init_with: Callable[[Any], TrainState]  # the same from given params (continued pretraining): fresh optimizer
  abstract: TrainState  # shapes and dtypes only
  shardings: Any


def setup(task: Task, mesh: Mesh, total_steps: int, steps_per_epoch: int) -> Setup:
  """LR schedule -> optimizer -> sharded state for this task (its config already checked by tasks.build)."""
  config = task.config
  schedule = optim.lr_schedule(config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               batch_size=config.batch_size)
  tx = optim.make_optimizer(config.optim, schedule, task.model.encoder.no_weight_decay)
  key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)  # init draws from its own stream

  def start(params: Any) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def init(key: jax.Array) -> TrainState:
    return start(task.model.init({'params': key}, *task.init_inputs())['params'])

  abstract = jax.eval_shape(init, key)
  shardings = sharding.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  start = jax.jit(start, out_shardings=shardings)

  def init_with(params: Any) -> TrainState:
    # Host arrays (the same on every process) -> global arrays in the params' shardings, each device its slice.
    placed = jax.tree.map(lambda x, like, sh: jax.make_array_from_callback(
        like.shape, sh, lambda index: np.asarray(x, like.dtype)[index]), params, abstract.params, shardings.params)
    return start(placed)

  return Setup(mesh, tx, schedule, lambda: jax.jit(init, out_shardings=shardings)(key), init_with, abstract,
               shardings)


def make_train_step(task: Task, s: Setup) -> Callable:
  """jit(step(state, batch) -> (state, metrics)) with explicit shardings; the state is donated."""
  accum = task.config.optim.accum_steps
  base_key = jax.random.key(task.config.seed)
  micro_sharding = NamedSharding(s.mesh, P(None, sharding.BATCH_AXES))
  loss_fn, tx = task.loss, s.tx

  def micro_batches(x: jax.Array) -> jax.Array:
    # (B, ...) -> (accum, B/accum, ...): each device keeps its own rows, so no data moves.
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    mask_key, drop_key = jax.random.split(jax.random.fold_in(base_key, state.step))
    masks = task.sample(mask_key, batch)  # for the whole batch, so accumulation sees the same masks
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
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           (jax.ShapeDtypeStruct((), jnp.float32), aux0, state.params, jax.ShapeDtypeStruct((), jnp.float32)))
      (loss, aux, grads, total), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), *micro))
      loss, aux, grads = jax.tree.map(lambda x: x / total, (loss, aux, grads))
    params, opt_state, finite = optim.update_if_finite(tx, grads, loss, state.opt_state, state.params)
    metrics = {'loss': loss, **aux, 'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params),
               'lr': s.schedule(state.step), 'finite': finite}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(s.shardings, sharding.batch_sharding(s.mesh)),
                 out_shardings=(s.shardings, sharding.replicated(s.mesh)), donate_argnums=0)
