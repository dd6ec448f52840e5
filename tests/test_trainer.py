"""The main job end to end, as a user runs it (fresh processes): base.py learns, resume equals an
uninterrupted run, two processes equal one, and user errors fail fast with one clear message."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_job(workdir, *flags, devices=1, extra_env=None, timeout=600, wait=True):
  """Runs `python -m simmim_jax.main --config=configs/base.py` on `devices` forced CPU devices."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', **(extra_env or {})}
  command = [sys.executable, '-m', 'simmim_jax.main', '--config=configs/base.py', f'--workdir={workdir}', *flags]
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def logged(workdir):
  """step -> metrics from metrics.jsonl (a resumed run appends; later lines win)."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r for r in rows}


def final_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return state['params']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


SHORT = ['--config.log_every_steps=1', '--config.checkpoint.every_steps=1000', '--config.image_every_steps=1000']


@pytest.mark.slow  # ~3-5 minutes: 150 steps of the README recipe and a rerun (resume: other default tests)
def test_base_config_learns_and_a_rerun_resumes(tmp_path, data_dir):
  workdir = tmp_path / 'base'
  run = main_job(workdir, f'--config.data.data_dir={data_dir}', '--config.total_steps=150',
                 '--config.log_every_steps=10', '--config.checkpoint.every_steps=100')
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  metrics = logged(workdir)
  first, last = metrics[1]['loss'], metrics[150]['loss']
  assert last < 0.7 * first, (first, last)
  assert os.listdir(workdir / 'tensorboard') and (workdir / 'reconstructions' / 'step_0000150.png').exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['100', '150']
  assert json.load(open(workdir / 'config.json'))['total_steps'] == 150
  again = main_job(workdir, f'--config.data.data_dir={data_dir}', '--config.total_steps=150')
  assert again.returncode == 0 and 'Nothing to do: the run is at step 150 of 150' in again.stdout
  longer = main_job(workdir, f'--config.data.data_dir={data_dir}', '--config.total_steps=160', *SHORT)
  assert 'Resumed from step 150' in longer.stdout and max(logged(workdir)) == 160


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, data_dir):
  flags = [f'--config.data.data_dir={data_dir}', '--config.total_steps=6', '--config.batch_size=16', *SHORT]
  whole = main_job(tmp_path / 'whole', *flags)
  part = main_job(tmp_path / 'parts', *flags, '--max_steps=3')
  rest = main_job(tmp_path / 'parts', *flags)
  for run in (whole, part, rest):
    assert run.returncode == 0, run.stderr[-3000:]
  assert 'Resumed from step 3' in rest.stdout
  a, b = logged(tmp_path / 'whole'), logged(tmp_path / 'parts')
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal([a[s]['loss'] for s in range(1, 7)], [b[s]['loss'] for s in range(1, 7)])
  p, q = final_params(tmp_path / 'whole', 6), final_params(tmp_path / 'parts', 6)
  flat_p, flat_q = ocp.tree.to_flat_dict(p), ocp.tree.to_flat_dict(q)
  assert flat_p.keys() == flat_q.keys()
  for key in flat_p:
    np.testing.assert_array_equal(flat_p[key], flat_q[key], err_msg=str(key))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  # The synthetic source gives the same global batch for any process count, so the numbers must agree;
  # per-process slicing of real data is checked in test_data.py.
  flags = ['--config.data.name=synthetic', '--config.total_steps=3', '--config.batch_size=16', *SHORT]
  single = main_job(tmp_path / 'single', *flags, devices=4)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  procs = [main_job(tmp_path / 'multi', *flags, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                    f'--process_id={i}', devices=2, wait=False) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  a, b = logged(tmp_path / 'single'), logged(tmp_path / 'multi')
  np.testing.assert_allclose([b[s]['loss'] for s in (1, 2, 3)], [a[s]['loss'] for s in (1, 2, 3)], atol=1e-5)
  assert "mesh {'data': 4, 'fsdp': 1}" in outputs[0]


def test_missing_dataset_fails_fast_with_one_message(tmp_path):
  start = time.perf_counter()
  run = main_job(tmp_path / 'w', '--config.data.name=mnist', f'--config.data.data_dir={tmp_path / "empty"}', timeout=120)
  assert run.returncode != 0 and time.perf_counter() - start < 60
  assert 'mnist' in run.stderr and str(tmp_path / 'empty') in run.stderr and 'tfds build' in run.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_batch_not_divisible_by_devices_fails_fast(tmp_path, data_dir):
  run = main_job(tmp_path / 'w', f'--config.data.data_dir={data_dir}', '--config.batch_size=12', devices=8, timeout=120)
  assert run.returncode != 0
  assert 'batch_size=12 must be divisible by the device count (8)' in run.stderr


def test_divergence_stops_with_one_message_and_keeps_checkpoints(tmp_path, data_dir):
  flags = [f'--config.data.data_dir={data_dir}', '--config.batch_size=16', '--config.checkpoint.every_steps=2',
           '--config.log_every_steps=100', '--config.image_every_steps=1000']
  good = main_job(tmp_path / 'w', *flags, '--config.total_steps=2')
  assert good.returncode == 0, good.stderr[-3000:]
  bad = main_job(tmp_path / 'w', *flags, '--config.total_steps=4', '--config.optim.base_lr=inf')
  assert bad.returncode != 0 and 'The last good checkpoint (step 2) is kept' in bad.stderr, bad.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'w' / 'checkpoints')) == ['2']
