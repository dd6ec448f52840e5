"""Text: masked token prediction on packed sentencepiece rows. Span mask (never on padding), [MASK] or BERT's
80/10/10 corruption, logits only at the gathered masked positions, cross-entropy over them; held-out
masked-token loss, accuracy and perplexity beside the unigram baseline."""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simmim_jax import feed, losses, masking, models, sharding, synthetic
from simmim_jax.tasks.base import Arrays, DataSource, Evaluate, Task, same_on_all_processes

STRATEGIES = ('mask_token', 'bert')
EVAL_STREAM = 2**31 - 3  # held-out masks come from their own key stream, the same at every evaluation


@dataclasses.dataclass(frozen=True, eq=False)
class TextTask(Task):
  """Packed ids (B, L) -> token logits at the masked positions; cross-entropy on the selection only."""
  unit = 'rows'

  @property
  def tokens_per_example(self) -> int:
    return self.config.data.seq_len

  @property
  def num_masked(self) -> int:
    """Static count of gathered positions per row."""
    return masking.max_masked(self.config.data.seq_len, self.config.mask.span, self.config.mask.mask_ratio)

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch_size, self.config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ('tokens', 'segment_ids', 'positions')}

  def sample(self, key: jax.Array, batch: Arrays) -> Arrays:
    """Selection (span mask, never padding), corruption ([MASK] or BERT 80/10/10) and the gather indices."""
    m, tokens = self.config.mask, batch['tokens']
    select_key, corrupt_key = jax.random.split(key)
    selected = masking.span_mask(select_key, batch['segment_ids'] > 0, m.span, m.mask_ratio)
    inputs, blend = tokens, selected
    if m.strategy == 'bert':
      inputs, blend = masking.bert_corruption(corrupt_key, tokens, selected, self.config.model.vocab_size,
                                              self.config.model.mask_id + 1)
    gather, weights = masking.masked_positions(selected, self.num_masked)
    return {'inputs': inputs, 'blend': blend, 'gather': gather, 'weights': weights}

  def model_inputs(self, batch: Arrays, masks: Arrays) -> tuple[jax.Array, ...]:
    return masks['inputs'], batch['segment_ids'], batch['positions'], masks['blend'], masks['gather']

  def sums(self, params: Any, batch: Arrays, masks: Arrays, key: jax.Array | None = None) -> Arrays:
    """Loss/correct/count sums over the selected positions (train=True when a dropout key is given)."""
    rngs = {'dropout': key} if key is not None else {}
    logits = self.model.apply({'params': params}, *self.model_inputs(batch, masks), train=key is not None,
                              rngs=rngs)
    targets = jnp.take_along_axis(batch['tokens'], masks['gather'], axis=1)
    return losses.masked_token_sums(logits, targets, masks['weights']) | {'targets': targets}

  def loss(self, params: Any, batch: Arrays, masks: Arrays, key: jax.Array) -> tuple[jax.Array, Arrays]:
    """(mean cross-entropy over the selection, aux); micro-batches weigh by their selected count."""
    s = self.sums(params, batch, masks, key)
    count = jnp.maximum(s['count'], 1.0)
    return s['loss_sum'] / count, {'weight': s['count'], 'accuracy': s['correct'] / count}

  def data(self) -> DataSource:
    """Packed rows of this process's share of the split (tokenised once), and the held-out split."""
    c = self.config
    index, count = jax.process_index(), jax.process_count()
    local, length = c.batch_size // count, c.data.seq_len
    if c.data.name == 'synthetic':
      return DataSource(100 * c.batch_size, lambda start: synthetic.token_batches(
          c.batch_size, length, c.model.vocab_size, c.seed, start, index, count))
    from simmim_jax.data import text  # pylint: disable=import-outside-toplevel  (TensorFlow only when asked)
    sp = text.load_tokenizer(c.data, c.model.vocab_size, c.get('init_from'))  # init_from: the source's own
    if sp.vocab_size() != c.model.vocab_size:
      raise ValueError(f'The tokenizer has {sp.vocab_size()} pieces but model.vocab_size={c.model.vocab_size}; '
                       'set --config.model.vocab_size to match.')

    def load(split: str) -> tuple[Any, int]:
      """This process's share of the split and process 0's batch count (every process runs that many)."""
      corpus = text.load_corpus(c.data, split, sp, index, count)
      batches = same_on_all_processes(text.batches_per_epoch(corpus, length, local))
      if batches == 0:
        raise ValueError(f'{c.data.name}:{split} packs into fewer than one batch of {local} rows x {length} '
                         'tokens per process; lower batch_size or data.seq_len.')
      return corpus, batches

    train, per_epoch = load(c.data.split)
    source = DataSource(per_epoch * c.batch_size, lambda start: text.packed_batches(
        train, seq_len=length, batch_size=local, seed=c.seed, index=index, start_batch=start),
                        tokenizer=sp.serialized_model_proto())
    if c.data.get('eval_split'):
      held_out, available = load(c.data.eval_split)
      num = c.get('eval_batches') or available
      source.eval_batches = lambda: text.packed_batches(held_out, seq_len=length, batch_size=local, seed=c.seed,
                                                        index=index, num_batches=num)
      source.eval_constants = {'unigram_id': same_on_all_processes(text.unigram_mode(train))}
    return source

  def make_evaluate(self, mesh: Mesh, data: DataSource) -> Evaluate | None:
    """params -> held-out loss, accuracy, perplexity and the unigram baseline's accuracy over
    data.eval_batches, the same rows and masks every time (masks keyed by batch index)."""
    if data.eval_batches is None:
      return None
    key = jax.random.fold_in(jax.random.key(self.config.seed), EVAL_STREAM)
    unigram_id = data.eval_constants['unigram_id']

    def eval_sums(params, batch, index):
      masks = self.sample(jax.random.fold_in(key, index), batch)
      s = self.sums(params, batch, masks)
      hits = (s.pop('targets') == unigram_id).astype(jnp.float32) * masks['weights']
      return s | {'unigram_correct': jnp.sum(hits)}

    eval_sums = jax.jit(eval_sums, out_shardings=sharding.replicated(mesh))
    batch_sharding = sharding.batch_sharding(mesh)

    def evaluate(params: Any) -> dict[str, float]:
      totals: dict[str, float] = {}
      for index, batch in enumerate(data.eval_batches()):
        sums = jax.device_get(eval_sums(params, feed.to_global(batch, batch_sharding), index))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
      count = max(totals['count'], 1.0)
      loss = totals['loss_sum'] / count
      return {'eval_loss': loss, 'eval_accuracy': totals['correct'] / count,
              'eval_perplexity': float(np.exp(loss)), 'eval_unigram_accuracy': totals['unigram_correct'] / count}

    return evaluate


def build(config: ml_collections.ConfigDict) -> TextTask:
  """The masked-LM model, after the config's checks."""
  m, length = config.mask, config.data.seq_len
  if length > config.model.max_len:
    raise ValueError(f'data.seq_len={length} exceeds model.max_len={config.model.max_len} (positions).')
  if length % m.span:
    raise ValueError(f'mask.span={m.span} must divide data.seq_len={length}.')
  if m.strategy not in STRATEGIES:
    raise ValueError(f'mask.strategy must be one of {STRATEGIES}, got {m.strategy!r}.')
  if not 0 < m.mask_ratio < 1:
    raise ValueError(f'mask.mask_ratio must be in (0, 1), got {m.mask_ratio}.')
  return TextTask(config, models.build_masked_lm(config.model))
