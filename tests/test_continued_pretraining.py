"""Continued pretraining (init_from for task=pretrain): the run starts from exactly the source's weights (its
step-1 loss is the source params' loss on that batch), tokenises the domain text with the source's tokenizer,
resumes its own checkpoint on a restart, and refuses another tokenizer or another model in one line."""
import json
import os

import jax
import numpy as np
import pytest
from pydoc_data import topics

from simmim_jax import config_io, params_io, tasks
from simmim_jax.data import text, tokenizer
from simmim_jax.errors import UserError
from simmim_jax.trainers import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'text_tiny.py')
NAMES = sorted(topics.topics)


def write_corpus(folder, names):
  """data_dir/train/docs.txt: one pydoc paragraph per line (text_files)."""
  os.makedirs(folder / 'train')
  lines = [' '.join(p.split()) for n in names for p in topics.topics[n].split('\n\n') if p.strip()]
  (folder / 'train' / 'docs.txt').write_text('\n'.join(lines))
  return lines


def config(data_dir, **overrides):
  return config_io.load_config(TINY, {
      'data.name': 'text_files', 'data.data_dir': str(data_dir), 'data.eval_split': None, 'batch_size': 8,
      'data.seq_len': 32, 'model.vocab_size': 512, 'total_steps': 2, 'log_every_steps': 1,
      'optim.warmup_steps': 0, 'checkpoint.every_steps': 1, 'checkpoint.enable_async': False, **overrides})


def logged(workdir):
  return {r['step']: r for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A 2-step text run on one half of the topics (its own tokenizer file), and a domain corpus of the rest."""
  root = tmp_path_factory.mktemp('continued')
  lines = write_corpus(root / 'general', NAMES[:40])
  write_corpus(root / 'domain', NAMES[40:])
  model = root / 'sp.model'
  model.write_bytes(tokenizer.train(lines, vocab_size=512, character_coverage=0.995))
  pretrain.train(config(root / 'general', **{'data.tokenizer': str(model)}), str(root / 'source'))
  return root


def test_continued_run_starts_from_the_source_weights_and_resumes_itself(source, tmp_path, capsys):
  cont = config(source / 'domain', init_from=str(source / 'source'))
  first = pretrain.train(cont, str(tmp_path / 'a'), max_steps=1)
  # The source's tokenizer tokenised the domain text (no data.tokenizer set) and travels with the new run.
  assert (tmp_path / 'a' / tokenizer.FILE).read_bytes() == (source / 'sp.model').read_bytes()
  # Step 1's loss is computed before the update: the source params on the continued run's first batch and masks.
  task = tasks.build(cont)
  batch = next(task.data().batches(0))
  mask_key, drop_key = jax.random.split(jax.random.fold_in(jax.random.key(cont.seed), 0))
  masks = task.sample(mask_key, batch)
  want, _ = task.loss(params_io.load_params(str(source / 'source')), batch, masks, drop_key)
  assert first['loss'] == pytest.approx(float(want), rel=1e-5)
  random_init = tasks.build(cont).model.init({'params': jax.random.key(0)}, *task.init_inputs())['params']
  assert abs(float(task.loss(random_init, batch, masks, drop_key)[0]) - first['loss']) > 0.1
  assert 'Continued pretraining from' in capsys.readouterr().out
  # A restart resumes this run's checkpoint (step 1), not the source again.
  capsys.readouterr()
  pretrain.train(cont, str(tmp_path / 'a'))
  out = capsys.readouterr().out
  assert 'Resumed from step 1' in out and 'Continued pretraining from' not in out
  assert sorted(logged(tmp_path / 'a')) == [1, 2]

@pytest.mark.slow
def test_encoder_only_export_keeps_the_encoder_and_starts_a_fresh_head(source, tmp_path):
  encoder = params_io.load_params(str(source / 'source'), 'encoder')
  export = tmp_path / 'encoder.npz'
  params_io.save_npz(str(export), encoder, params_io.load_config(str(source / 'source')))
  (tmp_path / tokenizer.FILE).write_bytes((source / 'sp.model').read_bytes())  # beside the export
  cont = config(source / 'domain', init_from=str(export), total_steps=1)
  pretrain.train(cont, str(tmp_path / 'run'))
  state = params_io.load_params(str(tmp_path / 'run'))
  assert set(state) == {'encoder', 'head'}


def test_refuses_another_tokenizer_in_one_line(source, tmp_path):
  other = tmp_path / 'other.model'
  other.write_bytes(tokenizer.train(write_corpus(tmp_path / 'x', NAMES[40:]), vocab_size=512, character_coverage=0.995))
  cont = config(source / 'domain', init_from=str(source / 'source'), **{'data.tokenizer': str(other)})
  with pytest.raises(UserError, match="is not the tokenizer init_from=.* was trained with") as error:
    pretrain.train(cont, str(tmp_path / 'run'))
  assert '\n' not in str(error.value) and not (tmp_path / 'run').exists()
  # The same file as the source's is accepted: data.tokenizer may repeat it.
  same = config(source / 'domain', init_from=str(source / 'source'), **{'data.tokenizer': str(source / 'sp.model')})
  sp = text.load_tokenizer(same.data, 512, same.init_from)
  assert sp.serialized_model_proto() == (source / 'sp.model').read_bytes()


def test_refuses_another_model_in_one_line(source, tmp_path):
  cont = config(source / 'domain', init_from=str(source / 'source'), **{'model.variant': 'mini'})
  with pytest.raises(UserError, match=r"holds a different model \(.*the source has model.variant 'tiny' "
                                      r"\(here 'mini'\)\)") as error:
    pretrain.train(cont, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints') or not os.listdir(tmp_path / 'run' / 'checkpoints')
