"""Text classification, the parts: pooling never counts padding, a padded and an unpadded copy of an example give
the same logits, class names map in sorted order, bad lines are counted or named, and the train step equals a
hand-written one (mean pool, linear head, cross-entropy, clipped AdamW) on a tiny batch."""
import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simmim_jax import config_io, finetune_step, optim, sharding
from simmim_jax.data import labelled_text, tokenizer
from simmim_jax.data.builders import medical_abstracts
from simmim_jax.errors import UserError
from simmim_jax.models import classifier, text

RECIPE = 'configs/text_finetune_cpu.py:scratch'
VOCAB = 512  # byte fallback's 256 pieces, the 4 special ones, the corpus's characters and a few learned


def tiny(**overrides):
  return config_io.load_config(RECIPE, {'model.vocab_size': VOCAB, 'data.seq_len': 16, 'batch_size': 4,
                                        'head_dropout': 0.0, 'mesh.fsdp_min_size': 2**30, **overrides})


def init(config, num_classes=3):
  model = classifier.build_classifier(config, num_classes)
  params = jax.jit(model.init)(jax.random.key(1), *finetune_step.example_inputs(config))['params']
  # A head of std .02 makes logits too small to tell anything apart: a std-1 head for these comparisons.
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  return model, params


def rows(lengths, seq_len, seed=0):
  """Random ids with `lengths` real tokens per row; padding gets random ids too (segment 0), to be ignored."""
  rng = np.random.default_rng(seed)
  real = np.arange(seq_len)[None] < np.asarray(lengths)[:, None]
  return {'tokens': rng.integers(4, VOCAB, (len(lengths), seq_len)).astype(np.int32),
          'segment_ids': real.astype(np.int32), 'positions': np.where(real, np.arange(seq_len), 0).astype(np.int32)}


@pytest.mark.parametrize('pool', text.POOLS)
def test_pooling_is_over_the_real_tokens_and_padding_changes_nothing(pool):
  config = tiny(pool=pool)
  model, params = init(config)
  apply, encode = jax.jit(model.apply), jax.jit(model.encoder.apply)
  batch = rows([16, 9, 3], 16)
  logits = apply({'params': params}, *finetune_step.text_inputs(batch))
  other = {**batch, 'tokens': np.where(batch['segment_ids'] > 0, batch['tokens'], 5).astype(np.int32),
           'positions': np.where(batch['segment_ids'] > 0, batch['positions'], 7).astype(np.int32)}
  np.testing.assert_allclose(apply({'params': params}, *finetune_step.text_inputs(other)), logits, rtol=1e-6)
  # by hand: each row's features over its own real tokens only (the encoder alone on the unpadded row)
  for row, n in enumerate([16, 9, 3]):
    alone = encode({'params': params['encoder']}, *(batch[k][row:row + 1, :n] for k in
                                                    ('tokens', 'segment_ids', 'positions')))
    pooled = alone[0].mean(0) if pool == 'mean' else alone[0, 0]
    expected = pooled @ params['head']['kernel'] + params['head']['bias']
    np.testing.assert_allclose(logits[row], expected, rtol=2e-5, atol=2e-5)
  assert np.std(np.asarray(logits)) > 0.1  # the comparison is between logits that differ


@pytest.fixture(scope='module')
def sp():
  texts = [e['text'] for e in medical_abstracts.examples('test')[:200]]
  return tokenizer.load(tokenizer.train(texts, vocab_size=VOCAB, character_coverage=0.995))


def test_a_padded_and_an_unpadded_copy_give_the_same_logits(sp):
  config = tiny(**{'model.max_len': 64})
  model, params = init(config)
  example = 'Acute myocardial infarction in young adults: risk factors and outcome.'
  n = len(sp.encode(example)) + 1  # eos closes it
  exact, padded = labelled_text.encode([example], sp, n), labelled_text.encode([example], sp, n + 23)
  assert exact['segment_ids'].all() and padded['segment_ids'].sum() == n
  np.testing.assert_array_equal(padded['tokens'][0, :n], exact['tokens'][0])
  assert padded['tokens'][0, -1] == tokenizer.PAD_ID and padded['tokens'][0, n - 1] == tokenizer.EOS_ID
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply({'params': params}, *finetune_step.text_inputs(padded)),
                             apply({'params': params}, *finetune_step.text_inputs(exact)), rtol=1e-5, atol=1e-5)
  cut = labelled_text.encode([example], sp, 5)  # truncated to seq_len: the first ids, no eos
  np.testing.assert_array_equal(cut['tokens'][0], exact['tokens'][0, :5])


def write_jsonl(path, lines, gz=False):
  body = '\n'.join(line if isinstance(line, str) else json.dumps(line) for line in lines) + '\n'
  path.write_bytes(gzip.compress(body.encode()) if gz else body.encode())


def data(tmp_path, **overrides):
  return tiny(**{'data.name': 'jsonl', 'data.data_dir': str(tmp_path), **overrides}).data


def test_class_names_map_in_sorted_order_and_the_eval_split_follows_the_training_split(tmp_path):
  write_jsonl(tmp_path / 'train.jsonl', [{'text': f'a {n}', 'label': n} for n in ('zebra', 'apple', 'mango', 'apple')])
  write_jsonl(tmp_path / 'test.jsonl.gz', [{'text': 'b', 'label': 'mango'}, {'text': 'c', 'label': 'zebra'}], gz=True)
  train = labelled_text.read_split(data(tmp_path), 'train')
  assert train.classes == ('apple', 'mango', 'zebra') and train.num_classes == 3 and train.by_name
  assert train.labels.tolist() == [2, 0, 1, 0] and train.texts[0] == 'a zebra'
  test = labelled_text.read_split(data(tmp_path), 'test', train)
  assert test.labels.tolist() == [1, 2]  # mango is 1 as in training, not 0 as in its own split
  # int ids: as given; their count from the largest (or num_classes), an id beyond it unknown in the eval split
  write_jsonl(tmp_path / 'train.jsonl', [{'text': 'x', 'label': 2}, {'text': 'y', 'label': 0}])
  write_jsonl(tmp_path / 'test.jsonl', [{'text': 'z', 'label': 3}, {'text': 'w', 'label': 1}])
  ids = labelled_text.read_split(data(tmp_path), 'train')
  assert (ids.classes, ids.num_classes, ids.labels.tolist()) == ((), 3, [2, 0])
  assert labelled_text.read_split(data(tmp_path), 'test', ids).labels.tolist() == [1]
  assert labelled_text.read_split(data(tmp_path), 'train', num_classes=5).num_classes == 5
  # a folder per label: names sorted, one example per file
  for split, label, name, body in (('train', 'b', '1.txt', ' two words \n'), ('train', 'a', '2.txt', 'one'),
                                   ('test', 'b', '3.txt', 'three')):
    (tmp_path / 'folders' / split / label).mkdir(parents=True, exist_ok=True)
    (tmp_path / 'folders' / split / label / name).write_text(body)
  folders = data(tmp_path / 'folders', **{'data.name': 'text_folder'})
  train = labelled_text.read_split(folders, 'train')
  assert (train.classes, train.texts, train.labels.tolist()) == (('a', 'b'), ['one', 'two words'], [0, 1])
  assert labelled_text.read_split(folders, 'test', train).labels.tolist() == [1]


BAD_LINES = ['{"text": "fine", "label": "x"}', 'not json at all', '[1, 2]', '{"label": "x"}',
             '{"text": "   ", "label": "x"}', '{"text": "bool label", "label": true}', '',
             '{"text": "float label", "label": 1.5}', '{"text": "also fine", "label": "y"}']


def test_bad_lines_are_counted_and_left_out_or_named_by_file_and_line(tmp_path):
  write_jsonl(tmp_path / 'train.jsonl', BAD_LINES)
  write_jsonl(tmp_path / 'test.jsonl', [{'text': 'new', 'label': 'z'}, {'text': 'ok', 'label': 'y'}])
  train = labelled_text.read_split(data(tmp_path), 'train')
  assert train.texts == ['fine', 'also fine'] and train.labels.tolist() == [0, 1]
  assert train.skipped == {'not JSON': 2, 'no text': 2, 'unknown label': 2}  # the blank line is no example
  test = labelled_text.read_split(data(tmp_path), 'test', train)
  assert test.texts == ['ok'] and test.skipped == {'unknown label': 1}
  strict = data(tmp_path, **{'data.bad_images': 'fail'})
  with pytest.raises(UserError, match=r'train\.jsonl:2: not JSON \(Expecting value') as error:
    labelled_text.read_split(strict, 'train')
  assert "data.bad_images='skip'" in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(UserError, match=r"test\.jsonl:1: unknown label \(label 'z' is not one of the training"):
    labelled_text.read_split(strict, 'test', train)
  (tmp_path / 'train.jsonl').unlink()
  with pytest.raises(ValueError, match='no train.jsonl or train.jsonl.gz'):
    labelled_text.read_split(data(tmp_path), 'train')


def test_the_train_step_equals_a_hand_written_reference():
  config = tiny(**{'optim.warmup_steps': 0, 'total_steps': 10, 'optim.weight_decay': 0.05})
  model, params = init(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  schedule = optim.lr_schedule(config.optim, total_steps=10, steps_per_epoch=10, batch_size=config.batch_size)
  tx = finetune_step.make_optimizer(model, config, schedule, params)
  _, abstract, shardings = finetune_step.abstract_state(model, tx, config, mesh)
  state = finetune_step.ClassifierState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), tx.init(params), {})
  batch = {**rows([16, 11, 6, 2], 16, seed=3), 'label': np.array([0, 2, 1, 2], np.int32)}
  step = finetune_step.make_train_step(model, tx, schedule, config, mesh, 3, shardings)
  new, metrics = step(state, batch)

  def loss(p):  # by hand: the mean of each row's real-token features, a linear head, cross-entropy
    features = model.encoder.apply({'params': p['encoder']}, batch['tokens'], batch['segment_ids'],
                                   batch['positions'])
    real = batch['segment_ids'][..., None] > 0
    pooled = jnp.sum(jnp.where(real, features, 0), 1) / jnp.sum(real, 1)
    logits = pooled @ p['head']['kernel'] + p['head']['bias']
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(4), batch['label']])

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(metrics['loss'], value, rtol=1e-6)
  norm = optax.global_norm(grads)
  assert norm > config.optim.clip_grad  # the clip acts
  lr = config.optim.base_lr * config.batch_size / 512  # step 0 of a run without warmup: the peak
  decays = optim.decay_mask(params, model.encoder.no_weight_decay)

  def adamw(p, g, d):  # first Adam step: m_hat = g, v_hat = g^2
    g = g * config.optim.clip_grad / norm
    return p - lr * (g / (jnp.abs(g) + config.optim.eps) + (config.optim.weight_decay * p if d else 0))

  expected = jax.tree.map(adamw, params, grads, decays)
  for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
