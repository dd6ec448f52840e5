"""Text fine-tuning end to end with the real trainer, checkpoints and tokenizer: interrupted and resumed equals
uninterrupted (and the best checkpoint, labels and tokenizer are saved with the run); from a text pretraining run
the encoder loads exactly with the run's own tokenizer, and the classifier's encoder exports with it."""
import gzip
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from simmim_jax import config_io, params_io
from simmim_jax.data import tokenizer
from simmim_jax.data.builders import medical_abstracts
from simmim_jax.trainers import finetune, pretrain
from tools import export_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, 'configs', 'text_finetune_cpu.py')
VOCAB = 512


def small(spec, data_dir, **overrides):
  """A few steps of the recipe on 64 training and 20 test abstracts (a jsonl folder), on the 8 test devices."""
  return config_io.load_config(spec, {
      'data.name': 'jsonl', 'data.data_dir': str(data_dir), 'model.vocab_size': VOCAB, 'data.seq_len': 32,
      'batch_size': 8, 'total_steps': 8, 'eval_every_steps': 4, 'checkpoint.every_steps': 4,
      'checkpoint.enable_async': False, 'log_every_steps': 2, 'mesh.fsdp_min_size': 2**30, **overrides})


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('abstracts')
  for split, examples in (('train', medical_abstracts.examples('train')[:64]),
                          ('test', medical_abstracts.examples('test')[:20])):
    lines = ''.join(json.dumps({'text': e['text'], 'label': e['label']}) + '\n' for e in examples)
    (folder / f'{split}.jsonl.gz').write_bytes(gzip.compress(lines.encode()))
  return folder


def evals(workdir):
  return {r['step']: r for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'eval_top1' in r}


def flat(params):
  return traverse_util.flatten_dict(params, sep='/')


def test_finetune_resumed_equals_uninterrupted_and_saves_labels_tokenizer_and_best(data_dir, tmp_path):
  config = small(f'{RECIPE}:scratch', data_dir)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  result = finetune.train(config, straight)
  finetune.train(config, resumed, max_steps=4)  # stops after a checkpoint at step 4
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['4']
  assert finetune.train(config, resumed) == result
  assert {s: r['eval_loss'] for s, r in evals(resumed).items()} == {s: r['eval_loss'] for s, r in
                                                                     evals(straight).items()}
  assert sorted(evals(straight)) == [4, 8] and result['count'] == 20
  a, b = flat(params_io.load_params(straight, step=8)), flat(params_io.load_params(resumed, step=8))
  assert a.keys() == b.keys() and 'head/kernel' in a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  classes = json.load(open(os.path.join(straight, finetune.LABELS_FILE)))['classes']
  assert classes == list(medical_abstracts.CLASSES)  # the names in sorted order, saved with the run
  sp = tokenizer.load(open(os.path.join(straight, tokenizer.FILE), 'rb').read())
  assert sp.vocab_size() == VOCAB
  best = max(evals(straight).values(), key=lambda r: r['eval_top1'])['step']
  assert os.listdir(os.path.join(straight, 'best')) == [str(best)]  # the best held-out top-1 (the first of ties)


def test_from_a_text_pretraining_run_the_encoder_and_tokenizer_load_exactly_and_export(data_dir, tmp_path):
  # a real (2-step) text pretraining run on the same abstracts' text, with its tokenizer saved in its workdir
  docs = tmp_path / 'docs' / 'train'
  docs.mkdir(parents=True)
  (docs / 'abstracts.txt').write_text('\n'.join(e['text'] for e in medical_abstracts.examples('train')[:64]))
  model_file = tmp_path / 'sp.model'
  model_file.write_bytes(tokenizer.train([e['text'] for e in medical_abstracts.examples('train')[:64]],
                                         vocab_size=VOCAB, character_coverage=0.995))
  source = str(tmp_path / 'pretrain')
  pretrain.train(config_io.load_config(os.path.join(ROOT, 'configs', 'text_medical_cpu.py'), {
      'data.name': 'text_files', 'data.data_dir': str(tmp_path / 'docs'), 'data.eval_split': None,
      'data.tokenizer': str(model_file), 'model.vocab_size': VOCAB, 'data.seq_len': 32, 'batch_size': 8,
      'total_steps': 2, 'checkpoint.enable_async': False, 'mesh.fsdp_min_size': 2**30}), source)
  # fine-tune with a zero learning rate: the encoder must come out exactly as the pretraining run left it
  workdir = str(tmp_path / 'ft')
  finetune.train(small(RECIPE, data_dir, init_from=source, total_steps=1, eval_every_steps=1,
                       **{'optim.base_lr': 0.0}), workdir)
  assert open(os.path.join(workdir, tokenizer.FILE), 'rb').read() == model_file.read_bytes()
  export_params.main(['--checkpoint', os.path.join(workdir, 'best'), '--out', str(tmp_path / 'out' / 'enc.npz'),
                      '--encoder_only'])
  exported, pretrained = flat(params_io.load_params(str(tmp_path / 'out' / 'enc.npz'))), flat(
      params_io.load_params(source, 'encoder'))
  assert exported.keys() == pretrained.keys() and 'embedding/embedding' in exported
  for key in exported:
    np.testing.assert_array_equal(exported[key], pretrained[key], err_msg=key)
  assert tokenizer.saved_with(str(tmp_path / 'out' / 'enc.npz')) == model_file.read_bytes()  # travels beside it
