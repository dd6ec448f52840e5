"""Bad input fails fast with one line that names the field and says what to do, and changes no file.

The in-process cases check simmim_jax.validate and the model/task checks behind tasks.build; the slow table
runs each case as the main job in a fresh process against a copy of a real run's workdir, timing it and
checking that every file in the workdir is byte-identical afterwards."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from simmim_jax import config_io, params_io, tasks, validate
from simmim_jax.errors import UserError
from workdir_helpers import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'configs', 'base.py')

# (overrides on configs/base.py, a piece of the one-line message)
CONFIG_CASES = [
    ({'mask.mask_ratio': 1.5}, 'mask.mask_ratio=1.5 must be in (0, 1)'),
    ({'mask.mask_ratio': 0.0}, 'mask.mask_ratio=0.0 must be in (0, 1)'),
    ({'batch_size': 0}, 'batch_size=0 must be a whole number >= 1'),
    ({'batch_size': -8}, 'batch_size=-8 must be a whole number >= 1'),
    ({'total_steps': 0}, 'total_steps=0 must be > 0'),
    ({'total_steps': None, 'total_epochs': None}, 'Set total_steps or total_epochs'),
    ({'total_steps': -5}, 'total_steps=-5 must be > 0'),
    ({'optim.warmup_steps': 600}, 'optim.warmup_steps=600 must be below total_steps=600'),
    ({'optim.warmup_steps': -1}, 'optim.warmup_steps=-1 must be >= 0'),
    ({'optim.schedule': 'cosin'}, "optim.schedule='cosin'"),
    ({'optim.accum_steps': 0}, 'optim.accum_steps=0 must be a whole number >= 1'),
    ({'log_every_steps': 0}, 'log_every_steps=0 must be a whole number >= 1'),
    ({'checkpoint.every_steps': 0}, 'checkpoint.every_steps=0 must be a whole number >= 1'),
    ({'model.dtype': 'float8'}, "model.dtype='float8'"),
    ({'model.dtype': 'int32'}, "model.dtype='int32'"),
    ({'task': 'pretrian'}, "config.task='pretrian' is not a task"),
]
# Checks that need the model: tasks.build raises them before anything is compiled or read.
MODEL_CASES = [
    ({'model.variant': 'Q/4'}, 'variant'),
    ({'model.name': 'resnet'}, "Unknown model.name 'resnet'"),
    ({'mask.mask_patch_size': 12}, 'mask.mask_patch_size=12 must divide model.image_size=32'),
    ({'mask.model_patch_size': 8}, 'mask.model_patch_size=8 must equal the encoder patch size 4'),
    ({'model.attention': 'flash'}, 'model.attention must be one of'),
    ({'model.remat': 'sometimes'}, 'model.remat must be one of'),
]


def load(overrides):
  return config_io.load_config(BASE, overrides)


@pytest.mark.parametrize('overrides,message', CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_config_values_fail_with_one_clear_line(overrides, message):
  with pytest.raises(UserError) as error:
    validate.check(load(overrides))
  assert message in str(error.value) and '\n' not in str(error.value), str(error.value)


@pytest.mark.parametrize('overrides,message', MODEL_CASES, ids=[str(c[0]) for c in MODEL_CASES])
def test_model_values_fail_before_anything_is_built(overrides, message):
  config = load(overrides)
  validate.check(config)
  with pytest.raises(ValueError) as error:
    tasks.build(config)
  assert message in str(error.value), str(error.value)


def test_init_from_that_is_not_there_or_not_weights(tmp_path):
  config = config_io.load_config(os.path.join(ROOT, 'configs', 'finetune_cpu.py'),
                                 {'init_from': str(tmp_path / 'nope')})
  with pytest.raises(UserError, match='does not exist'):
    validate.check(config)
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a zip file')  # np.load alone would call it a pickle and suggest allow_pickle
  with pytest.raises(ValueError, match='garbage.npz is not an .npz archive'):
    params_io.load_params(str(garbage))


def test_a_flag_that_does_not_parse_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'simmim_jax.main', f'--config={BASE}', f'--workdir={tmp_path / "w"}',
                           '--config.total_steps=ten'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [
      "error: flag --config.total_steps=ten: invalid literal for int() with base 10: 'ten' (--helpshort lists the "
      'flags, --print_config the config fields and their values).'], result.stderr
  assert not (tmp_path / 'w').exists()


# ------------------------------------------------------------------------------------------------------------
# The table: each case as the main job, against a copy of a real run's workdir
# ------------------------------------------------------------------------------------------------------------

def flags_of(overrides) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.mark.slow
def test_the_bad_input_table(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  data = [f'--config.data.data_dir={tmp_path / "tfds"}']
  main = [sys.executable, '-m', 'simmim_jax.main']
  good = tmp_path / 'good'
  first = subprocess.run([*main, f'--config={BASE}', f'--workdir={good}', *data, '--config.total_steps=2',
                          '--config.batch_size=16'], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert first.returncode == 0, first.stderr[-3000:]
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a zip file')
  # On the command line an int field does not take None: the flag parser's one line names the flag instead.
  parsed = {'Set total_steps or total_epochs': 'flag --config.total_steps=None: invalid literal for int()'}
  cases = [(flags_of(o), parsed.get(m, m)) for o, m in CONFIG_CASES + MODEL_CASES] + [
      (['--config.model.image_size=64', '--config.mask.mask_patch_size=16'], 'model.image_size: 32 -> 64'),
      (['--config.model.variant=Ti/4'], "model.variant: 'Mu/4' -> 'Ti/4'"),
      (['--config.batch_size=12', '--config.optim.accum_steps=8'], 'batch_size=12 must be divisible'),  # 1 device
      (['--config.data.name=mnist'], 'mnist'),
      (['--config.data.name=image_folder', f'--config.data.data_dir={tmp_path / "no_images"}'], 'no_images'),
      (['--config.mesh.fsdp=3'], 'mesh.data=-1 x mesh.fsdp=3'),
      ([f'--config=configs/finetune_cpu.py', f'--config.init_from={garbage}'], 'garbage.npz is not an .npz archive'),
      ([f'--config=configs/finetune_cpu.py', f'--config.init_from={tmp_path / "missing"}'], 'does not exist'),
      (['--config.unknown_field=1'], 'unknown_field'),
      (['--config=configs/finetune_cpu.py:scratch'], 'holds a different run'),  # fine-tuning into a pretraining run
      (['--config.total_steps=ten'], "flag --config.total_steps=ten: invalid literal for int()"),
  ]
  rows = []
  for flags, message in cases:
    workdir = tmp_path / f'case{len(rows)}'
    if not any('init_from' in f for f in flags):  # the init_from cases start in a new workdir (nothing written)
      shutil.copytree(good, workdir)
    before = snapshot(workdir)
    config = [f for f in flags if f.startswith('--config=')] or [f'--config={BASE}']
    start = time.perf_counter()
    result = subprocess.run([*main, *config, f'--workdir={workdir}', *data, '--config.batch_size=16',
                             *[f for f in flags if not f.startswith('--config=')]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    seconds = time.perf_counter() - start
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''
    rows.append((' '.join(flags)[:70], last, seconds, result.returncode, snapshot(workdir) == before,
                 'Traceback' in result.stderr))
  print('\n| input | message (last line) | s | exit | files unchanged | traceback |')
  for row in rows:
    print('| {} | {} | {:.1f} | {} | {} | {} |'.format(row[0], row[1][:150], *row[2:]))
  for (flags, message), (_, last, seconds, code, unchanged, traceback) in zip(cases, rows):
    assert code != 0 and unchanged and not traceback, (flags, last)
    assert message in last, (flags, last)
  assert len(rows) >= 30
