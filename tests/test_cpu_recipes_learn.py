"""The CPU recipes do what their docstrings promise (issue 14): configs/base.py, run whole, draws the masked
digit's own strokes (its masked L1 beats the best image-independent guess, the per-pixel median digit), and
configs/finetune_cpu.py from that encoder beats the same run from random initialisation; configs/text_finetune_cpu.py
on the shipped medical abstracts beats the majority class clearly."""
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from simmim_jax import losses, masking, params_io, visualize
from simmim_jax.data import samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_job(*flags: str) -> str:
  run = subprocess.run([sys.executable, '-m', 'simmim_jax.main', *flags], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout + run.stderr


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """configs/base.py as the README runs it (600 steps; ~5 minutes on 2 idle cores)."""
  workdir, data_dir = str(tmp_path_factory.mktemp('base')), str(tmp_path_factory.mktemp('tfds'))
  main_job('--config=configs/base.py', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}')
  return workdir, data_dir


def split(config: ml_collections.ConfigDict, name: str, count: int) -> np.ndarray:
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.split = name
  return samples.split_images(data, count, config.model.image_size)


@pytest.mark.slow
def test_pretraining_reconstructs_each_digits_strokes(pretrained):
  workdir, _ = pretrained
  config = ml_collections.ConfigDict(params_io.load_config(workdir))
  test, train = split(config, 'test', 256), split(config, 'train', 1024)
  fig = visualize.figure(params_io.load_params(workdir), config, test, seed=0)
  pixel_mask = masking.upsample(fig.token_mask, config.mask.model_patch_size)
  # Predicting the background everywhere (what base.py learned with 8 px cells) or the typical digit at each
  # pixel: guesses that ignore the visible part of the image.
  median = np.broadcast_to(np.median(train, axis=0), test.shape)
  guesses = {name: float(losses.masked_l1(guess, test, pixel_mask)) for name, guess in
             [('median digit', median), ('background', np.full_like(test, train.min()))]}
  model = float(np.mean(fig.l1))  # every image has the same number of masked pixels: the mean is the batch's L1
  # Measured 2026-12-02: model 0.581, median digit 0.664, background 1.489 (random init 1.468).
  assert model < 0.93 * guesses['median digit'] < guesses['background'], (model, guesses)


@pytest.mark.slow
def test_finetuning_the_pretrained_encoder_beats_scratch(pretrained, tmp_path):
  workdir, data_dir = pretrained

  def top1(*flags: str) -> float:
    out = main_job(*flags, f'--config.data.data_dir={data_dir}', '--config.total_steps=80',
                   '--config.eval_every_steps=80')
    return float(re.findall(r'eval at step 80: top-1 ([0-9.]+)', out)[-1])

  scratch = top1('--config=configs/finetune_cpu.py:scratch', f'--workdir={tmp_path / "scratch"}')
  from_base = top1('--config=configs/finetune_cpu.py', f'--config.init_from={workdir}',
                   f'--workdir={tmp_path / "pretrained"}')
  # The README's criterion (3 points, mean of 3 seeds) at a shorter budget and one seed.
  assert from_base >= scratch + 0.03, (from_base, scratch)


@pytest.mark.slow
def test_the_text_classification_recipe_beats_the_majority_class(tmp_path):
  """configs/text_finetune_cpu.py:scratch, run whole on the shipped medical abstracts (5 conditions)."""
  from simmim_jax.data.builders import medical_abstracts  # pylint: disable=import-outside-toplevel
  out = main_job('--config=configs/text_finetune_cpu.py:scratch', f'--workdir={tmp_path / "text"}',
                 f'--config.data.data_dir={tmp_path / "tfds"}')
  top1 = float(re.findall(r'Done: step \d+ of \d+ .*eval_top1 ([0-9.]+)', out)[-1])
  counts = np.bincount([medical_abstracts.CLASSES.index(e['label']) for e in medical_abstracts.examples('test')])
  majority = counts.max() / counts.sum()  # 171 / 532 = 0.321
  assert top1 > majority + 0.1, (top1, majority)
