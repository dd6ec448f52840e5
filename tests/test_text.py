"""Text pieces: tokenizer ids and reproducibility, the pydoc corpus, packing, span masks, BERT corruption,
the masked cross-entropy against NumPy, and attention that never crosses packed segments."""
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from simmim_jax import losses, masking
from simmim_jax.data import text, tokenizer
from simmim_jax.data.builders import pydoc_topics
from simmim_jax.models import text as text_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [p for name, _, p in pydoc_topics.documents('train')[:400]]


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and corpus
# ------------------------------------------------------------------------------------------------------------

def test_tokenizer_tool_is_reproducible_with_the_specified_ids(tmp_path):
  (tmp_path / 'a.txt').write_text('\n'.join(TEXTS) + '\n', encoding='utf-8')
  outputs = []
  for name in ('one', 'two'):
    run = subprocess.run([sys.executable, 'tools/train_tokenizer.py', f'--files={tmp_path}/*.txt', '--vocab_size=500',
                          f'--output={tmp_path}/{name}'], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    outputs.append(((tmp_path / f'{name}.model').read_bytes(), (tmp_path / f'{name}.vocab').read_text()))
  assert outputs[0] == outputs[1]  # byte-identical model and vocab from the same input
  sp = tokenizer.load(str(tmp_path / 'one.model'))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.vocab_size() == 500 and sp.piece_to_id('[MASK]') == 3
  assert outputs[0][1].splitlines()[:4] == ['<pad>\t0', '</s>\t0', '<unk>\t0', '[MASK]\t0']
  assert 3 in sp.encode('the [MASK] token')  # a user-defined symbol is never split
  assert 2 not in sp.encode('snowman \u2603')  # byte fallback: an unseen character is bytes, not <unk>
  different = tokenizer.train(TEXTS[:200], vocab_size=500)
  assert different != outputs[0][0]


def test_tokenizer_with_wrong_ids_is_refused():
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=writer, vocab_size=300, minloglevel=2)
  with pytest.raises(ValueError, match='expected \\(0, 1, 2, -1, 3\\)'):
    tokenizer.load(writer.getvalue())


def test_pydoc_corpus_splits_by_topic(tmp_path):
  builder = pydoc_topics.ensure_prepared(str(tmp_path))
  splits = {s: list(builder.as_dataset(split=s).as_numpy_iterator()) for s in ('train', 'validation')}
  topics = {s: {ex['topic'].decode() for ex in v} for s, v in splits.items()}
  assert len(topics['train']) == 71 and len(topics['validation']) == 8 and not topics['train'] & topics['validation']
  assert len(splits['train']) == len(pydoc_topics.documents('train')) > 2000
  assert all(ex['text'].strip() for ex in splits['validation'])


# ------------------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------------------

def toy_corpus(seed=0, num_docs=40) -> text.TokenCorpus:
  rng = np.random.default_rng(seed)
  docs = [np.append(rng.integers(4, 100, rng.integers(1, 30)), 1).astype(np.int32) for _ in range(num_docs)]
  return text.TokenCorpus(np.concatenate(docs), np.concatenate([[0], np.cumsum([len(d) for d in docs])]))


def reference_rows(corpus, order, seq_len, num_rows):
  """Concatenate the documents in order and cut into rows, numbering pieces and positions by hand."""
  stream, doc_of = [], []
  for k, d in enumerate(order):
    piece = corpus.tokens[corpus.offsets[d]:corpus.offsets[d + 1]]
    stream += list(piece)
    doc_of += [k] * len(piece)
  rows = []
  for r in range(num_rows):
    tok, seg, pos = [], [], []
    for i in range(r * seq_len, (r + 1) * seq_len):
      new = i == r * seq_len or doc_of[i] != doc_of[i - 1]
      seg.append(1 if i == r * seq_len else seg[-1] + new)
      pos.append(0 if new else pos[-1] + 1)
      tok.append(stream[i])
    rows.append((tok, seg, pos))
  return [np.array(x) for x in zip(*rows)]


def test_packing_matches_a_hand_reference_and_covers_each_document_once_per_epoch():
  corpus, seq_len, batch = toy_corpus(), 16, 4
  per_epoch = text.batches_per_epoch(corpus, seq_len, batch)
  batches = list(text.packed_batches(corpus, seq_len=seq_len, batch_size=batch, seed=3, num_batches=per_epoch + 1))
  order, _ = text.epoch_order(corpus, 3, 0, 0)
  tokens, segments, positions = reference_rows(corpus, order, seq_len, per_epoch * batch)
  epoch = {k: np.concatenate([b[k] for b in batches[:per_epoch]]) for k in batches[0]}
  np.testing.assert_array_equal(epoch['tokens'], tokens)
  np.testing.assert_array_equal(epoch['segment_ids'], segments)
  np.testing.assert_array_equal(epoch['positions'], positions)
  assert sorted(order) == list(range(corpus.num_documents))
  assert (epoch['segment_ids'] > 0).all()  # concatenate-and-cut never pads
  # The next epoch is a new order, and a resumed iterator continues exactly (across the epoch boundary).
  assert not np.array_equal(batches[per_epoch]['tokens'], batches[0]['tokens'])
  resumed = next(text.packed_batches(corpus, seq_len=seq_len, batch_size=batch, seed=3, start_batch=per_epoch))
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], batches[per_epoch][k])
  other_seed = next(text.packed_batches(corpus, seq_len=seq_len, batch_size=batch, seed=4))
  assert not np.array_equal(other_seed['tokens'], batches[0]['tokens'])


def test_text_files_source_gives_each_process_its_own_documents(tmp_path):
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'a.txt').write_text('\n'.join(f'document {i}' for i in range(11)) + '\n\n')
  data = ml_collections.ConfigDict({'name': 'text_files', 'data_dir': str(tmp_path), 'text_key': 'text'})
  shares = [text.read_documents(data, 'train', i, 2) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 5 and not set(shares[0]) & set(shares[1])
  with pytest.raises(ValueError, match='no .*/validation/\\*.txt'):
    text.read_documents(data, 'validation', 0, 1)


def test_token_cache_is_reused_memory_mapped(tmp_path):
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'a.txt').write_text('\n'.join(' '.join(t.split()) for t in TEXTS[:50]) + '\n')
  data = ml_collections.ConfigDict({'name': 'text_files', 'data_dir': str(tmp_path), 'text_key': 'text',
                                    'cache_dir': str(tmp_path / 'cache')})
  sp = tokenizer.load(tokenizer.train(TEXTS, vocab_size=400))
  fresh = text.load_corpus(data, 'train', sp, 0, 1)
  assert fresh.tokens.dtype == np.uint16 and fresh.num_documents == 50
  assert fresh.tokens[fresh.offsets[1] - 1] == tokenizer.EOS_ID
  (tmp_path / 'train' / 'a.txt').write_text('changed\n')  # the cache, not the file, is read now
  cached = text.load_corpus(data, 'train', sp, 0, 1)
  assert isinstance(cached.tokens, np.memmap)
  np.testing.assert_array_equal(cached.tokens, fresh.tokens)
  np.testing.assert_array_equal(cached.offsets, fresh.offsets)


# ------------------------------------------------------------------------------------------------------------
# Masks, corruption, loss
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('span,ratio', [(1, 0.15), (4, 0.3)])
def test_span_mask_exact_count_never_on_padding(span, ratio):
  length, batch = 64, 6
  real = np.array([64, 63, 40, 17, 4, 1])
  valid = np.arange(length)[None] < real[:, None]
  mask = np.asarray(masking.span_mask(jax.random.key(0), jnp.asarray(valid), span, ratio))
  assert not (mask * ~valid).any()
  for row, n in zip(mask, real):
    cells = n // span
    assert row.sum() == masking.mask_count(cells, ratio) * span  # counted from the real length
    assert (row.reshape(-1, span).min(1) == row.reshape(-1, span).max(1)).all()  # whole spans only
  # A row without padding draws exactly what block_mask draws on the 1-d grid.
  full = masking.span_mask(jax.random.key(1), jnp.ones((batch, length), bool), span, ratio)
  block = masking.block_mask(jax.random.key(1), batch, (length // span,), (span,), ratio)
  np.testing.assert_array_equal(full, block)


def test_masked_positions_gather_the_selection_in_order():
  mask = jnp.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
  positions, weights = masking.masked_positions(mask, 3)
  np.testing.assert_array_equal(positions[0], [1, 3, 4])
  assert positions[1, 0] == 0 and weights.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_bert_corruption_is_80_10_10_on_the_selection_only():
  tokens = jnp.full((64, 512), 7, jnp.int32)
  selected = masking.span_mask(jax.random.key(0), jnp.ones(tokens.shape, bool), 1, 0.15)
  inputs, blend = masking.bert_corruption(jax.random.key(1), tokens, selected, 1000, 4)
  inputs, blend, selected = map(np.asarray, (inputs, blend, selected))
  assert (inputs[selected == 0] == 7).all() and (blend[selected == 0] == 0).all()
  n = selected.sum()
  shares = [blend.sum() / n, ((inputs != 7) & (selected == 1)).sum() / n]
  np.testing.assert_allclose(shares, [0.8, 0.1], atol=0.015)  # the rest (~10 %) stay as they were
  assert inputs.min() >= 4 and inputs.max() < 1000


def test_masked_token_sums_equal_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 5))
  targets[0, 0] = 0  # id 0 is a real target here: weights, not `targets > 0`, decide
  weights = (rng.random((3, 5)) < 0.6).astype(np.float32)
  weights[0, 0] = 1
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  expected = (ce * weights).sum() / weights.sum()
  sums = losses.masked_token_sums(jnp.asarray(logits), jnp.asarray(targets), weights)
  np.testing.assert_allclose(sums['loss_sum'] / sums['count'], expected, rtol=1e-6)
  assert float(sums['correct']) == ((logits.argmax(-1) == targets) * weights).sum()
  assert float(sums['count']) == weights.sum()


# ------------------------------------------------------------------------------------------------------------
# The encoder on packed rows
# ------------------------------------------------------------------------------------------------------------

def encoder_and_params():
  encoder = text_model.TextEncoder(vocab_size=50, max_len=32, **text_model.decode_variant('tiny'))
  ones = jnp.ones((1, 32), jnp.int32)
  return encoder, encoder.init(jax.random.key(0), ones, ones, ones)


def test_attention_never_crosses_packed_segments():
  encoder, params = encoder_and_params()
  rng = np.random.default_rng(0)
  segments = np.repeat([1, 2, 3], [10, 12, 10])[None]
  positions = np.concatenate([np.arange(10), np.arange(12), np.arange(10)])[None]
  tokens = rng.integers(4, 50, (1, 32))
  perturbed = tokens.copy()
  perturbed[0, 10:22] = rng.integers(4, 50, 12)
  mask = np.zeros((1, 32), np.int32)
  mask[0, 12] = 1  # masking inside segment 2 must not leak either
  a = encoder.apply(params, tokens, segments, positions)
  b = encoder.apply(params, perturbed, segments, positions, jnp.asarray(mask))
  others = np.r_[0:10, 22:32]
  np.testing.assert_allclose(b[0, others], a[0, others], atol=1e-6)
  assert np.abs(b[0, 10:22] - a[0, 10:22]).max(-1).min() > 1e-3  # every token of segment 2 changed
  # Positions restart per segment: the last document packed at offset 22 equals it alone at offset 0.
  alone_tokens = np.zeros((1, 32), np.int64)
  alone_tokens[0, :10] = tokens[0, 22:]
  alone = encoder.apply(params, alone_tokens, (np.arange(32) < 10)[None].astype(np.int32),
                        np.where(np.arange(32) < 10, np.arange(32), 0)[None])
  np.testing.assert_allclose(alone[0, :10], a[0, 22:], atol=1e-5)


def test_mask_blending_uses_the_tied_mask_embedding():
  encoder, params = encoder_and_params()
  tokens = np.arange(4, 36)[None]
  ones = np.ones((1, 32), np.int32)
  positions = np.arange(32)[None]
  mask = np.zeros((1, 32), np.int32)
  mask[0, [3, 7]] = 1
  blended = encoder.apply(params, tokens, ones, positions, jnp.asarray(mask))
  replaced = tokens.copy()
  replaced[0, [3, 7]] = 3  # [MASK]
  np.testing.assert_allclose(blended, encoder.apply(params, replaced, ones, positions), atol=1e-6)


def test_unknown_text_variant_fails_with_the_choices():
  with pytest.raises(ValueError, match="Unknown text variant 'huge'.*'base'"):
    text_model.decode_variant('huge')
