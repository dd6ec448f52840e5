"""Fine-tuning and linear probing end to end, as a user runs them (fresh processes, real checkpoints): from a
base.py pretraining checkpoint, evaluation every few steps with the best kept, resume equal to an
uninterrupted run, and a probe that leaves the pretrained encoder untouched; the CPU recipes refuse to start
without init_from (one line saying what to pass) unless ':scratch' asks for random initialisation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from simmim_jax import config_io, params_io, validate
from simmim_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_job(config, workdir, *flags, timeout=600):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  command = [sys.executable, '-m', 'simmim_jax.main', f'--config={config}', f'--workdir={workdir}', *flags]
  run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  return run.stdout


def test_cpu_recipes_need_init_from_or_scratch(tmp_path):
  for recipe in ('configs/finetune_cpu.py', 'configs/linear_probe_cpu.py'):
    with pytest.raises(UserError, match='init_from is not set: pass --config.init_from=PATH') as error:
      validate.check(config_io.load_config(recipe))
    assert '\n' not in str(error.value) and '/tmp' not in str(error.value)
    scratch = config_io.load_config(f'{recipe}:scratch')
    assert scratch.from_scratch and scratch.init_from is None
    validate.check(scratch)
    with pytest.raises(UserError, match='set one of them'):
      validate.check(config_io.load_config(f'{recipe}:scratch', {'init_from': str(tmp_path)}))
  # As the main job: one line on stderr, before anything is built or written.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  run = subprocess.run([sys.executable, '-m', 'simmim_jax.main', '--config=configs/finetune_cpu.py',
                        f'--workdir={tmp_path / "ft"}'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert 'init_from is not set' in run.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'ft').exists()


def evals(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r for r in rows if 'eval_top1' in r}


# The official BEiT-style ViT (base.py's CPU default is the plain one): its shared relative position table is the
# part of loading a pretrained encoder with most to get wrong (copied into every block's own table).
BEIT = '--config.model.style=beit'


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A real base.py pretraining checkpoint (a few steps: the mechanics, not the accuracy, are tested here)."""
  root = tmp_path_factory.mktemp('ft')
  data_dir, workdir = str(root / 'tfds'), str(root / 'pretrain')
  main_job('configs/base.py', workdir, f'--config.data.data_dir={data_dir}', '--config.total_steps=4', BEIT)
  return data_dir, workdir


def common(data_dir, pretrained_dir, steps):
  return [f'--config.data.data_dir={data_dir}', f'--config.init_from={pretrained_dir}', f'--config.total_steps={steps}',
          '--config.eval_every_steps=4', '--config.checkpoint.every_steps=4', '--config.log_every_steps=1', BEIT]


# The full ImageNet recipe's augmentation (the CPU config turns it down for the tiny digits).
FULL_AUGMENTATION = ['--config.data.rand_augment=rand-m9-mstd0.5-inc1', '--config.mixup.mixup_alpha=0.8',
                     '--config.mixup.cutmix_alpha=1.0', '--config.data.flip=True']


def test_finetune_evaluates_keeps_the_best_and_resumes_exactly(pretrained, tmp_path):
  data_dir, pretrained_dir = pretrained
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  out = main_job('configs/finetune_cpu.py', straight, *common(data_dir, pretrained_dir, 8), *FULL_AUGMENTATION)
  assert 'per-block tables copied from the shared one: 6' in out and 'decoder/conv/kernel' in out
  step_lines = [l.split('|')[0].strip() for l in out.splitlines() if l.startswith('step ')]
  assert step_lines == [f'step {s}/8' for s in range(1, 9)], step_lines  # once each, evaluations included
  results = evals(straight)
  assert sorted(results) == [4, 8] and all(r['eval_count'] == 360 for r in results.values())
  best_step = max(results, key=lambda s: (results[s]['eval_top1'], -s))
  assert os.listdir(straight / 'best') == [str(best_step)]

  # Stopped after 4 of the 8 steps (--max_steps: the same run, schedule and all), then resumed.
  main_job('configs/finetune_cpu.py', resumed, *common(data_dir, pretrained_dir, 8), *FULL_AUGMENTATION,
           '--max_steps=4')
  out = main_job('configs/finetune_cpu.py', resumed, *common(data_dir, pretrained_dir, 8), *FULL_AUGMENTATION)
  assert 'Resumed from step 4' in out
  a, b = params_io.load_params(str(straight)), params_io.load_params(str(resumed))
  for key, value in traverse_util.flatten_dict(a, sep='/').items():
    np.testing.assert_array_equal(value, traverse_util.flatten_dict(b, sep='/')[key], err_msg=key)
  assert evals(resumed)[8]['eval_top1'] == results[8]['eval_top1']


def test_linear_probe_trains_the_head_and_leaves_the_encoder_as_pretrained(pretrained, tmp_path):
  data_dir, pretrained_dir = pretrained
  workdir = tmp_path / 'probe'
  main_job('configs/linear_probe_cpu.py', workdir, *common(data_dir, pretrained_dir, 4))
  probe = traverse_util.flatten_dict(params_io.load_params(str(workdir)), sep='/')
  source = traverse_util.flatten_dict(params_io.load_params(pretrained_dir, subtree='encoder'), sep='/')
  assert not any(k.startswith('encoder/blocks_4') for k in probe)  # block-4 features: later blocks not built
  for key in ('blocks_0/attn/qkv/kernel', 'blocks_3/mlp/fc2/kernel', 'patch_embed/kernel'):
    np.testing.assert_array_equal(probe[f'encoder/{key}'], source[key])
  # Initialised within +-2e-5 (trunc-normal 0.02 x 0.001): larger values mean the head was trained.
  assert np.abs(np.asarray(probe['head/kernel'])).max() > 1e-4
  assert evals(workdir)[4]['eval_count'] == 360
