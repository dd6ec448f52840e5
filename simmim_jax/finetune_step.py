"""Fine-tuning / linear-probe state, train step and eval step: born sharded, jitted over the mesh, TF-free."""
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simmim_jax import losses, mixup, optim, pixels, sharding
from simmim_jax.defaults import IMAGENET_MEAN, IMAGENET_STD
from simmim_jax.models.classifier import Classifier

ERASE_STREAM = 2**31 - 3  # the random-erasing noise's key stream, apart from Mixup's and dropout's


@flax.struct.dataclass
class ClassifierState:
  """What changes in training; batch_stats holds the probe BatchNorm's running statistics ({} otherwise)."""
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any


def example_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
  """Zero inputs of batch 1 for model.init: an image, or a text row (ids, segment ids, positions)."""
  if config.model.name == 'text':
    return (jnp.zeros((1, config.data.seq_len), jnp.int32),) * 3
  size, chans = config.model.image_size, config.model.in_chans
  return (jnp.zeros((1, size, size, chans), jnp.float32),)


def text_inputs(batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  """A text batch's model inputs: rows of ids, segment ids (0 on padding) and positions."""
  return batch['tokens'], batch['segment_ids'], batch['positions']


def abstract_params(model: Classifier, config: ml_collections.ConfigDict) -> Any:
  """The params' shapes (no memory), for building the optimizer before the state."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(config)))['params']


def make_optimizer(model: Classifier, config: ml_collections.ConfigDict, schedule: optim.Schedule,
                   abstract_params: Any) -> optax.GradientTransformation:
  """AdamW with layer-wise LR decay (fine-tuning) or on the head alone with the encoder frozen (probe)."""
  no_decay = model.encoder.no_weight_decay
  if model.frozen:
    labels = {k: 'frozen' if k == 'encoder' else 'trained' for k in abstract_params}
    return optax.multi_transform({'trained': optim.make_optimizer(config.optim, schedule, no_decay),
                                  'frozen': optax.set_to_zero()}, labels)
  decay = config.optim.get('layer_decay', 1.0)
  scales = None if decay == 1.0 else optim.layer_decay_scales(abstract_params, model.encoder, decay)
  return optim.make_optimizer(config.optim, schedule, no_decay, scales)


def abstract_state(model: Classifier, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> tuple[Callable[..., ClassifierState], ClassifierState, Any]:
  """(init, abstract state, shardings). init(encoder_params=None) builds the state in its shardings,
  with the given (adapted, pretrained) encoder params in place of the random ones."""
  key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)

  def init(key: jax.Array, encoder_params: Any = None) -> ClassifierState:
    variables = model.init({'params': key}, *example_inputs(config))
    params = variables['params']
    if encoder_params is not None:
      params = {**params, 'encoder': jax.tree.map(jnp.asarray, encoder_params)}
    return ClassifierState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           batch_stats=variables.get('batch_stats', {}))

  abstract = jax.eval_shape(init, key)
  shardings = sharding.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)

  def init_sharded(encoder_params: Any = None) -> ClassifierState:
    return jax.jit(init, out_shardings=shardings)(key, encoder_params)

  return init_sharded, abstract, shardings


def make_train_step(model: Classifier, tx: optax.GradientTransformation, schedule: optim.Schedule,
                    config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int,
                    state_shardings: Any) -> Callable:
  """jit(step(state, batch) -> (state, metrics)): images: uint8 normalised on device, the host-drawn random
  erasing boxes ('erase', if present) filled, Mixup/CutMix on device; text: the rows as they come, one-hot
  targets; then soft-target cross-entropy."""
  base_key = jax.random.key(config.seed)
  mix = config.get('mixup')

  def train_inputs(step_key: jax.Array, mix_key: jax.Array,
                   batch: dict[str, jax.Array]) -> tuple[tuple[jax.Array, ...], jax.Array]:
    if config.model.name == 'text':
      return text_inputs(batch), jax.nn.one_hot(batch['label'], num_classes)
    images = pixels.normalise(batch['image'], config.data.mean, config.data.std)
    if 'erase' in batch:  # timm's order: Normalize -> RandomErasing (per image) -> Mixup (per batch)
      images = pixels.erase(jax.random.fold_in(step_key, ERASE_STREAM), images, batch['erase'])
    images, targets = mixup.mixup_cutmix(mix_key, images, batch['label'], num_classes,
                                         mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
                                         switch_prob=mix.switch_prob, label_smoothing=mix.label_smoothing)
    return (images,), targets

  def step(state: ClassifierState, batch: dict[str, jax.Array]) -> tuple[ClassifierState, dict[str, jax.Array]]:
    step_key = jax.random.fold_in(base_key, state.step)
    mix_key, drop_key = jax.random.split(step_key)
    inputs, targets = train_inputs(step_key, mix_key, batch)

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, *inputs, train=True,
                                    rngs={'dropout': drop_key}, mutable=['batch_stats'])
      return jnp.mean(losses.cross_entropy(logits, targets)), updates.get('batch_stats', {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, finite = optim.update_if_finite(tx, grads, loss, state.opt_state, state.params)
    batch_stats = jax.tree.map(lambda n, o: jnp.where(finite, n, o), batch_stats, state.batch_stats)
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params),
               'lr': schedule(state.step), 'finite': finite}
    return ClassifierState(state.step + 1, params, opt_state, batch_stats), metrics

  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(model: Classifier, mesh: Mesh, state_shardings: Any,
                   config: ml_collections.ConfigDict | None = None) -> Callable:
  """jit(state, batch) -> integer counts {correct_top1, correct_top5, count} and the summed loss.

  uint8 images are normalised on device with config.data.mean / std (config None: ImageNet's, the default of
  every recipe); text rows go in as they come. Padding rows (valid = 0) count nowhere, so summing over a padded
  split counts every example once.
  """
  text = config is not None and config.model.name == 'text'
  mean, std = (config.data.mean, config.data.std) if config is not None and not text else (IMAGENET_MEAN, IMAGENET_STD)

  def evaluate(state: ClassifierState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    inputs = text_inputs(batch) if text else (pixels.normalise(batch['image'], mean, std),)
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, *inputs, train=False)
    labels, valid = batch['label'], batch['valid'].astype(jnp.int32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    nll = losses.cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    return {'correct_top1': jnp.sum((top5[:, 0] == labels) * valid),
            'correct_top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * valid),
            'count': jnp.sum(valid), 'loss_sum': jnp.sum(nll * valid)}

  return jax.jit(evaluate, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step: Callable, state: ClassifierState, batches) -> dict[str, float]:
  """Sums the counts over a finite iterator of global batches -> top1, top5 (fractions), loss, count."""
  totals: dict[str, Any] = {}
  for batch in batches:
    for k, v in eval_step(state, batch).items():
      totals[k] = totals.get(k, 0) + v  # stays on device; one transfer at the end
  totals = {k: np.asarray(v) for k, v in jax.device_get(totals).items()}
  count = int(totals['count'])
  return {'top1': int(totals['correct_top1']) / max(count, 1), 'top5': int(totals['correct_top5']) / max(count, 1),
          'loss': float(totals['loss_sum']) / max(count, 1), 'count': count}
