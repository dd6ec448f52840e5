"""Fill-mask on a real text pretraining run: the word it was trained to recall ranks first, batching and padding
change no probability, the exported weights give the same answers, and bad input gets one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simmim_jax import params_io
from simmim_jax.data import tokenizer
from simmim_jax.errors import UserError
from simmim_jax.fill_mask import FillMask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each colour names one fruit, so a model that learnt the corpus can only fill the fruit one way (and back).
PAIRS = [('red', 'cherry'), ('yellow', 'banana'), ('green', 'lime'), ('purple', 'plum')]
# 13 words, 4 specials and the word model's '▁[MASK]': 18 pieces, so no word falls to <unk>.
VOCAB = 18


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp('fill')
  lines = [f'the {colour} fruit is a {fruit} .' for colour, fruit in PAIRS] * 50
  for split in ('train', 'validation'):
    os.makedirs(root / 'data' / split)
    (root / 'data' / split / 'docs.txt').write_text('\n'.join(lines))
  # A word model: every word is one piece, so the ranking is over whole words.
  (root / 'sp.model').write_bytes(tokenizer.train(lines, vocab_size=VOCAB, model_type='word', byte_fallback=False))
  # The main job in its own process on one CPU device: here 8 forced devices share 2 cores with tf.data, and
  # XLA's CPU all-reduce rendezvous times out when the trainer dispatches steps ahead.
  flags = {'data.name': 'text_files', 'data.data_dir': root / 'data', 'data.tokenizer': root / 'sp.model',
           'model.vocab_size': VOCAB, 'batch_size': 16, 'data.seq_len': 32, 'mask.mask_ratio': 0.15,
           'total_steps': 200, 'log_every_steps': 100, 'eval_every_steps': 1000, 'checkpoint.every_steps': 200}
  command = [sys.executable, '-m', 'simmim_jax.main', f'--config={ROOT}/configs/text_tiny.py',
             f'--workdir={root / "run"}', *(f'--config.{k}={v}' for k, v in flags.items())]
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(root / 'run')


def test_the_trained_word_ranks_first_both_ways(run):
  fill = FillMask(run, top_k=3)
  fruits = fill([f'the {colour} fruit is a [MASK] .' for colour, _ in PAIRS])
  colours = fill([f'the <mask> fruit is a {fruit} .' for _, fruit in PAIRS])
  for (colour, fruit), [by_colour], [by_fruit] in zip(PAIRS, fruits, colours):
    assert by_colour.pieces[0] == '▁' + fruit and by_fruit.pieces[0] == '▁' + colour
    assert by_colour.probabilities[0] > 0.5 and by_fruit.probabilities[0] > 0.5
    assert by_colour.probabilities == sorted(by_colour.probabilities, reverse=True)
  # Chance over 18 pieces is 0.06: the head learnt the corpus, not just a prior over fruits.
  assert fill.filled('the red fruit is a [MASK] .', fruits[0]) == 'the red fruit is a cherry .'
  assert fruits[0][0].position == 5


def test_batching_and_padding_change_no_probability(run):
  fill = FillMask(run, top_k=VOCAB)
  line = 'the yellow fruit is a [MASK] .'
  alone = fill(line)[0][0]
  # In a batch beside a longer line with two masks: other length, other row, padding after it.
  _, [beside] = fill(['the [MASK] fruit is a [MASK] . ' * 6, line])
  order = np.argsort(alone.ids)
  np.testing.assert_allclose(np.array(alone.probabilities)[order],
                             np.array(beside.probabilities)[np.argsort(beside.ids)], atol=1e-6)
  assert sum(alone.probabilities) == pytest.approx(1.0, abs=1e-5)  # top_k = the whole vocabulary
  [two] = fill(['the [MASK] fruit is a [MASK] .'])
  assert [p.position for p in two] == [1, 5]


def test_the_export_and_a_step_dir_answer_as_the_workdir(run, tmp_path):
  out = tmp_path / 'model.npz'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools/export_params.py'), '--checkpoint', run,
                  '--out', str(out)], check=True, capture_output=True)
  line = 'the green fruit is a [MASK] .'
  expected = FillMask(run)(line)
  assert FillMask(str(out))(line) == expected
  assert FillMask(os.path.join(run, 'checkpoints', '200'))(line) == expected


def test_the_tool_prints_the_ranking_and_the_filled_line(run):
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools/fill_mask.py'), '--checkpoint', run,
                           '--text', 'the purple fruit is a [MASK] .', '--top_k', '2'],
                          capture_output=True, text=True, check=True)
  lines = result.stdout.splitlines()
  assert lines[0] == 'the purple fruit is a [MASK] .'
  assert lines[1].startswith('  mask 1: ▁plum 0.') and len(lines[1].split()) == 6
  assert lines[2] == '  -> the purple fruit is a plum .'


def test_bad_input_gets_one_line(run, tmp_path):
  fill = FillMask(run)
  with pytest.raises(UserError, match='line 2 has no mask marker'):
    fill(['the red fruit is a [MASK] .', 'the red fruit is a cherry .'])
  with pytest.raises(UserError, match='max_len'):
    fill('the [MASK] ' + 'fruit ' * 200)
  encoder_only = tmp_path / 'encoder.npz'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools/export_params.py'), '--checkpoint', run,
                  '--out', str(encoder_only), '--encoder_only'], check=True, capture_output=True)
  with pytest.raises(UserError, match='no masked-LM head'):
    FillMask(str(encoder_only))
  image_export = str(tmp_path / 'vit.npz')  # an export of an image model: its config names a ViT
  np.savez(image_export, **{'patch_embed/kernel': np.zeros((4, 4, 3, 8), np.float32)})
  with open(params_io.config_path(image_export), 'w') as f:
    json.dump({'model': {'name': 'vit'}}, f)
  with pytest.raises(UserError, match='not a text pretraining run'):
    FillMask(image_export)
  with pytest.raises(FileNotFoundError, match='No checkpoint steps'):
    FillMask(str(tmp_path))  # a folder that holds no run
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools/fill_mask.py'), '--checkpoint', run,
                           '--text', 'no marker here'], capture_output=True, text=True)
  assert result.returncode != 0 and result.stdout == ''
  assert result.stderr.strip().splitlines() == ['fill_mask: line 1 has no mask marker: write [MASK] (or <mask>) '
                                                'where a word is to be predicted.']
