"""What differs between modalities in pretraining, in one place: model, masks, loss, data, evaluation.

The train step, the trainer and the benchmark are written once against a Task; a text run differs from an
image run by config only (config.model.name == 'text' picks the text task). No TensorFlow at import: the
data sources import the pipelines only when a real dataset is asked for.
"""
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from simmim_jax import feed, losses, masking, models

Arrays = dict[str, jax.Array]


@dataclasses.dataclass
class DataSource:
  """A task's data for one run, this process's view."""
  num_examples: int  # training examples per epoch, all processes (images; packed rows for text)
  batches: Callable[[int], Iterator[feed.Batch]]  # this process's training batches from batch `start` on
  eval_batches: Callable[[], Iterator[feed.Batch]] | None = None  # held-out, the same batches on every call
  eval_constants: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. the unigram baseline id


def same_on_all_processes(value: int) -> int:
  """Process 0's value everywhere: step counts must agree or the processes run different programs."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


# ------------------------------------------------------------------------------------------------------------
# Images: SimMIM's masked pixel regression.
# ------------------------------------------------------------------------------------------------------------

def image_mask(config: ml_collections.ConfigDict, key: jax.Array, batch_size: int) -> jax.Array:
  """The token mask for a batch of images, drawn on device (static shapes, exact count per example)."""
  m = config.mask
  return masking.image_mask(key, batch_size, config.model.image_size, m.mask_patch_size, m.model_patch_size,
                            m.mask_ratio)


class ImageTask:
  """Images (B, H, W, C) -> pixel decoder; masked L1 on the masked patches."""
  name = 'image'

  def build_model(self, config: ml_collections.ConfigDict) -> nn.Module:
    """SimMIM (encoder + pixel decoder), after the config's checks."""
    model = models.build_simmim(config.model)
    if model.encoder.patch_size != config.mask.model_patch_size:
      raise ValueError(f'mask.model_patch_size={config.mask.model_patch_size} must equal the encoder patch '
                       f'size {model.encoder.patch_size} of {config.model.name} {config.model.variant}.')
    masking.check_image_mask(config.model.image_size, config.mask.mask_patch_size, config.mask.model_patch_size)
    return model

  def batch_spec(self, config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size, chans = config.model.image_size, config.model.in_chans
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, chans), jnp.float32)}

  def sample(self, config: ml_collections.ConfigDict, key: jax.Array, batch: Arrays) -> Arrays:
    return {'mask': image_mask(config, key, batch['image'].shape[0])}

  def model_inputs(self, config: ml_collections.ConfigDict, batch: Arrays, masks: Arrays) -> tuple[jax.Array, ...]:
    return batch['image'], masks['mask']

  def loss(self, model: nn.Module, config: ml_collections.ConfigDict, params: Any, batch: Arrays, masks: Arrays,
           key: jax.Array) -> tuple[jax.Array, Arrays]:
    """(masked L1, aux); every example masks the same number of pixels, so micro-batches weigh 1 each."""
    images = batch['image']
    reconstruction = model.apply({'params': params}, images, masks['mask'], train=True, rngs={'dropout': key})
    target = images
    if config.loss.norm_target:
      target = losses.normalize_target(images, config.loss.norm_target_window)
    pixel_mask = masking.upsample(masks['mask'], config.mask.model_patch_size)
    return losses.masked_l1(reconstruction, target, pixel_mask), {'weight': jnp.ones((), jnp.float32)}

  def data(self, config: ml_collections.ConfigDict) -> DataSource:
    """This process's slice of the tfds split, or of the synthetic source (one epoch per 100 steps)."""
    index, count = jax.process_index(), jax.process_count()
    if config.data.name == 'synthetic':
      return DataSource(100 * config.batch_size, lambda start: feed.synthetic_batches(
          config.batch_size, config.model.image_size, config.model.in_chans, config.seed, start, index, count))
    from simmim_jax.data import images  # pylint: disable=import-outside-toplevel
    num = images.num_examples(config.data)  # fails fast if the data is missing
    return DataSource(num, lambda start: images.pretrain_batches(
        config.data, image_size=config.model.image_size, batch_size=config.batch_size // count, seed=config.seed,
        start_batch=start))


# ------------------------------------------------------------------------------------------------------------
# Text: masked token prediction on packed sentencepiece rows.
# ------------------------------------------------------------------------------------------------------------

class TextTask:
  """Packed ids (B, L) -> token logits at the masked positions; cross-entropy on the selection only."""
  name = 'text'
  strategies = ('mask_token', 'bert')

  def build_model(self, config: ml_collections.ConfigDict) -> nn.Module:
    """The masked-LM model, after the config's checks."""
    m, length = config.mask, config.data.seq_len
    if length > config.model.max_len:
      raise ValueError(f'data.seq_len={length} exceeds model.max_len={config.model.max_len} (positions).')
    if length % m.span:
      raise ValueError(f'mask.span={m.span} must divide data.seq_len={length}.')
    if m.strategy not in self.strategies:
      raise ValueError(f'mask.strategy must be one of {self.strategies}, got {m.strategy!r}.')
    if not 0 < m.mask_ratio < 1:
      raise ValueError(f'mask.mask_ratio must be in (0, 1), got {m.mask_ratio}.')
    return models.build_masked_lm(config.model)

  def num_masked(self, config: ml_collections.ConfigDict) -> int:
    """Static count of gathered positions per row."""
    return masking.max_masked(config.data.seq_len, config.mask.span, config.mask.mask_ratio)

  def batch_spec(self, config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ('tokens', 'segment_ids', 'positions')}

  def sample(self, config: ml_collections.ConfigDict, key: jax.Array, batch: Arrays) -> Arrays:
    """Selection (span mask, never padding), corruption ([MASK] or BERT 80/10/10) and the gather indices."""
    m, tokens = config.mask, batch['tokens']
    select_key, corrupt_key = jax.random.split(key)
    selected = masking.span_mask(select_key, batch['segment_ids'] > 0, m.span, m.mask_ratio)
    inputs, blend = tokens, selected
    if m.strategy == 'bert':
      inputs, blend = masking.bert_corruption(corrupt_key, tokens, selected, config.model.vocab_size,
                                              config.model.mask_id + 1)
    gather, weights = masking.masked_positions(selected, self.num_masked(config))
    return {'inputs': inputs, 'blend': blend, 'gather': gather, 'weights': weights}

  def model_inputs(self, config: ml_collections.ConfigDict, batch: Arrays, masks: Arrays) -> tuple[jax.Array, ...]:
    return masks['inputs'], batch['segment_ids'], batch['positions'], masks['blend'], masks['gather']

  def sums(self, model: nn.Module, config: ml_collections.ConfigDict, params: Any, batch: Arrays, masks: Arrays,
           key: jax.Array | None = None) -> Arrays:
    """Loss/correct/count sums over the selected positions (train=True when a dropout key is given)."""
    rngs = {'dropout': key} if key is not None else {}
    logits = model.apply({'params': params}, *self.model_inputs(config, batch, masks), train=key is not None,
                         rngs=rngs)
    targets = jnp.take_along_axis(batch['tokens'], masks['gather'], axis=1)
    return losses.masked_token_sums(logits, targets, masks['weights']) | {'targets': targets}

  def loss(self, model: nn.Module, config: ml_collections.ConfigDict, params: Any, batch: Arrays, masks: Arrays,
           key: jax.Array) -> tuple[jax.Array, Arrays]:
    """(mean cross-entropy over the selection, aux); micro-batches weigh by their selected count."""
    s = self.sums(model, config, params, batch, masks, key)
    count = jnp.maximum(s['count'], 1.0)
    return s['loss_sum'] / count, {'weight': s['count'], 'accuracy': s['correct'] / count}

  def eval_sums(self, model: nn.Module, config: ml_collections.ConfigDict, params: Any, batch: Arrays,
                masks: Arrays, unigram_id: int) -> Arrays:
    """Held-out sums, plus how often the unigram baseline (always the most frequent id) would be right."""
    s = self.sums(model, config, params, batch, masks)
    hits = (s.pop('targets') == unigram_id).astype(jnp.float32) * masks['weights']
    return s | {'unigram_correct': jnp.sum(hits)}

  @staticmethod
  def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Held-out masked-token loss, accuracy, perplexity and the unigram baseline's accuracy."""
    count = max(sums['count'], 1.0)
    loss = sums['loss_sum'] / count
    return {'eval_loss': loss, 'eval_accuracy': sums['correct'] / count, 'eval_perplexity': float(np.exp(loss)),
            'eval_unigram_accuracy': sums['unigram_correct'] / count}

  def data(self, config: ml_collections.ConfigDict) -> DataSource:
    """Packed rows of this process's share of the split (tokenised once), and the held-out split."""
    index, count = jax.process_index(), jax.process_count()
    local, length = config.batch_size // count, config.data.seq_len
    if config.data.name == 'synthetic':
      return DataSource(100 * config.batch_size, lambda start: feed.synthetic_token_batches(
          config.batch_size, length, config.model.vocab_size, config.seed, start, index, count))
    from simmim_jax.data import text  # pylint: disable=import-outside-toplevel
    sp = text.load_tokenizer(config.data, config.model.vocab_size)
    if sp.vocab_size() != config.model.vocab_size:
      raise ValueError(f'The tokenizer has {sp.vocab_size()} pieces but model.vocab_size={config.model.vocab_size}; '
                       'set --config.model.vocab_size to match.')
    train = text.load_corpus(config.data, config.data.split, sp, index, count)
    per_epoch = same_on_all_processes(text.batches_per_epoch(train, length, local))
    if per_epoch == 0:
      raise ValueError(f'{config.data.name}:{config.data.split} packs into fewer than one batch of {local} rows x '
                       f'{length} tokens per process; lower batch_size or data.seq_len.')
    source = DataSource(per_epoch * config.batch_size, lambda start: text.packed_batches(
        train, seq_len=length, batch_size=local, seed=config.seed, index=index, start_batch=start))
    if config.data.get('eval_split'):
      held_out = text.load_corpus(config.data, config.data.eval_split, sp, index, count)
      num = same_on_all_processes(config.get('eval_batches') or text.batches_per_epoch(held_out, length, local))
      if text.batches_per_epoch(held_out, length, local) == 0:
        raise ValueError(f'{config.data.name}:{config.data.eval_split} packs into fewer than one batch of {local} '
                         f'rows x {length} tokens per process; lower batch_size or data.seq_len.')
      source.eval_batches = lambda: text.packed_batches(held_out, seq_len=length, batch_size=local,
                                                        seed=config.seed, index=index, num_batches=num)
      source.eval_constants = {'unigram_id': same_on_all_processes(text.unigram_mode(train))}
    return source


def for_config(config: ml_collections.ConfigDict) -> ImageTask | TextTask:
  """The task for this config: text when model.name is 'text', else images."""
  return TextTask() if config.model.name == 'text' else ImageTask()
