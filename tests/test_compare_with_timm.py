"""tools/compare_with_timm.py: on a tiny budget the project's fine-tuning learns about as well as the timm peer
(same images, batch size and steps), and the table it prints carries both means."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip('torch')
pytest.importorskip('timm')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # two trainings of 80 steps: ~1-2 minutes on 2 idle cores
def test_project_is_not_far_behind_the_peer(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'compare_with_timm.py'), '--config',
       'configs/finetune_cpu.py:scratch', '--set', f'data.data_dir={tmp_path}', '--steps', '80', '--seeds', '0',
       '--threads', '2'], cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  mean = re.search(r'^mean \| ([0-9.]+)\s*\| ([0-9.]+)$', result.stdout, re.M)
  assert mean, result.stdout[-2000:]
  project, peer = float(mean.group(1)), float(mean.group(2))
  assert peer > 0.4, result.stdout[-2000:]  # the peer itself learns (0.47 at 80 steps): chance is 0.1
  # 80 steps of one seed are noisy (+-0.05 between seeds); a gap of 0.10 is the failure (0.40 vs 0.80).
  # Before issue 14's fixes: project 0.311, peer 0.472 here (220 steps, 3 seeds: 0.608 vs 0.773).
  assert project >= peer - 0.10, result.stdout[-2000:]


def test_paired_peer_starts_from_the_trainers_initial_weights(tmp_path):
  """--paired: the peer's starting weights are those the project's trainer starts from for the seed (read back
  from a 1-step run at learning rate 0, whose checkpoint holds them), and another seed gives other weights."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  from tools import compare_with_timm  # pylint: disable=import-outside-toplevel  (torch and timm before TF)
  from simmim_jax import config_io, params_io  # pylint: disable=import-outside-toplevel
  from simmim_jax.interop import timm as timm_interop  # pylint: disable=import-outside-toplevel
  from simmim_jax.trainers import finetune  # pylint: disable=import-outside-toplevel

  config = config_io.load_config('configs/finetune_cpu.py:scratch', [
      'seed=3', 'total_steps=1', 'optim.base_lr=0.0', 'optim.warmup_lr=0.0', 'optim.min_lr=0.0'])
  finetune.train(config, str(tmp_path / 'run'))
  trained, _ = timm_interop.to_timm(params_io.load_params(str(tmp_path / 'run')))
  peer, batches = compare_with_timm.project_start(config, seed=3)
  images, labels = next(batches)
  assert images.shape == (config.batch_size, 32, 32, 3) and labels.shape == (config.batch_size,)
  start = {k: v.numpy() for k, v in peer.state_dict().items()}
  assert set(start) == set(trained)
  for name, value in trained.items():
    np.testing.assert_array_equal(start[name], value, err_msg=name)
  other, _ = compare_with_timm.project_start(config, seed=4)
  assert not np.array_equal(other.state_dict()['blocks.0.attn.qkv.weight'].numpy(), start['blocks.0.attn.qkv.weight'])
