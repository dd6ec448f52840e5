"""A machine with JAX but without TensorFlow (many accelerator images): the trainer on synthetic data writes
checkpoints, TensorBoard events and metrics.jsonl and resumes; the benchmark runs. TensorFlow and
tensorflow_datasets are made unimportable in the subprocesses by stub packages that raise ImportError."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('tensorflow', 'tensorflow_datasets')
# Loaded-module report written at exit, so the test sees what the process imported, not just that it ran.
SITECUSTOMIZE = """import atexit, os, sys
def _report():
  with open(os.environ['LOADED_MODULES_OUT'], 'w') as f:
    f.write('\\n'.join(sorted(sys.modules)))
if os.environ.get('LOADED_MODULES_OUT'):
  atexit.register(_report)
"""


@pytest.fixture(scope='module')
def no_tf_env(tmp_path_factory):
  """Environment whose PYTHONPATH shadows TensorFlow and tfds with packages that raise ImportError."""
  stubs = tmp_path_factory.mktemp('no_tf')
  for name in BLOCKED:
    (stubs / name).mkdir()
    (stubs / name / '__init__.py').write_text(f'raise ImportError("{name} is not installed (test stub)")\n')
  (stubs / 'sitecustomize.py').write_text(SITECUSTOMIZE)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(PYTHONPATH=os.pathsep.join([str(stubs), ROOT]), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  check = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=env, capture_output=True, text=True)
  assert 'test stub' in check.stderr, check.stderr  # the stub, not the installed TensorFlow, answers
  return env


def run(env, out, *command, timeout=600):
  result = subprocess.run(command, cwd=ROOT, env={**env, 'LOADED_MODULES_OUT': str(out)}, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  loaded = set(open(out).read().split())
  assert not {m for m in loaded if m.split('.')[0] in (*BLOCKED, 'clu')}, 'imported TensorFlow, tfds or clu'
  return result


def train(env, tmp_path, workdir, total_steps, tag):
  return run(env, tmp_path / f'modules_{tag}.txt', sys.executable, '-m', 'simmim_jax.main', '--config=configs/base.py',
             f'--workdir={workdir}', '--config.data.name=synthetic', '--config.batch_size=8',
             f'--config.total_steps={total_steps}', '--config.log_every_steps=1', '--config.checkpoint.every_steps=2',
             '--config.image_every_steps=3')


def test_trainer_on_synthetic_data_writes_and_resumes_without_tensorflow(no_tf_env, tmp_path):
  workdir = tmp_path / 'run'
  first = train(no_tf_env, tmp_path, workdir, 3, 'first')
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['2', '3'], first.stdout[-2000:]
  assert (workdir / 'reconstructions' / 'step_0000003.png').exists()
  second = train(no_tf_env, tmp_path, workdir, 5, 'second')
  assert 'Resumed from step 3' in second.stdout, second.stdout[-2000:]
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int)[-1] == '5'
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]
  # The event files read back with TensorBoard's own reader: two sessions, the scalars of every step, the figure.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  assert len(os.listdir(workdir / 'tensorboard')) == 2
  events = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'), size_guidance={'images': 0, 'scalars': 0})
  events.Reload()
  losses = {e.step: e.value for e in events.Scalars('loss')}
  assert sorted(losses) == [1, 2, 3, 4, 5]
  assert all(abs(losses[r['step']] - r['loss']) < 1e-6 * max(1.0, abs(r['loss'])) for r in rows)
  image = events.Images('reconstruction')[0]
  assert image.step == 3 and image.width > 0 and image.encoded_image_string.startswith(b'\x89PNG')


def test_benchmark_runs_without_tensorflow(no_tf_env, tmp_path):
  result = run(no_tf_env, tmp_path / 'modules.txt', sys.executable, 'tools/benchmark.py', '--config=configs/base.py',
               '--set', 'batch_size=8', '--steps=2', '--warmup=1')
  assert 'steps/s' in result.stdout and 'MFU' not in result.stdout, result.stdout
