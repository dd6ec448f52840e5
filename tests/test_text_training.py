"""Text pretraining end to end: the step on 1 vs 8 devices, accumulation with unequal masked counts,
interrupt-and-resume equal to an uninterrupted run, and the tiny config beating the unigram baseline."""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simmim_jax import config_io, feed, pretrain_step, sharding, synthetic, tasks

import equivalence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'text_tiny.py')


def tiny_config(**overrides):
  return config_io.load_config(TINY, {'batch_size': 16, 'data.seq_len': 32, 'mesh.fsdp_min_size': 1024,
                                      'optim.warmup_steps': 0, 'model.vocab_size': 300, **overrides})


def text_batches(config, num_steps):
  """Synthetic packed rows; the last rows end in padding (segment 0), so rows mask different counts."""
  source = synthetic.token_batches(config.batch_size, config.data.seq_len, config.model.vocab_size, seed=1)
  batches = [dict(next(source)) for _ in range(num_steps)]
  for b in batches:
    b['segment_ids'] = b['segment_ids'].copy()
    b['segment_ids'][-4:, -13:] = 0  # half of the last micro-batch's rows hold 19 real tokens of 32
  return batches


def run_steps(config, devices, num_steps=2):
  """The text step on a mesh over `devices`: per-step metrics, the params after the first step on the host,
  the final state and the first step's gradients."""
  mesh = sharding.make_mesh(config.mesh, devices)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=100, steps_per_epoch=10)
  state = s.init()
  step = pretrain_step.make_train_step(task, s)
  history, first = [], None
  for batch in text_batches(config, num_steps):
    state, metrics = step(state, feed.to_global(batch, sharding.batch_sharding(mesh)))
    history.append({k: float(v) for k, v in metrics.items()})
    first = first or jax.device_get(state.params)
  _, grads = equivalence.loss_and_grads(config, devices, text_batches(config, 1)[0])
  return history, first, state, grads


@pytest.fixture(scope='module')
def one_device():
  return run_steps(tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize('mesh', [{'mesh.data': 8, 'mesh.fsdp': 1},
                                  pytest.param({'mesh.data': 2, 'mesh.fsdp': 4}, marks=pytest.mark.slow)])
def test_text_step_one_vs_eight_devices(one_device, mesh):
  config = tiny_config(**mesh)
  history, params, state, grads = run_steps(config, jax.devices()[:8])
  for key in ('loss', 'accuracy', 'grad_norm'):
    np.testing.assert_allclose([h[key] for h in history], [h[key] for h in one_device[0]], atol=1e-5)
  equivalence.assert_grads_close(grads, one_device[3])
  equivalence.assert_first_update_close(params, one_device[1], grads, one_device[3], history[0]['lr'],
                                        config.optim.eps)
  assert history[1]['loss'] < history[0]['loss'] + 1.0 and np.isfinite(history[1]['loss'])
  if mesh['mesh.fsdp'] > 1:
    fc1 = state.params['encoder']['blocks_0']['mlp']['fc1']['kernel']
    assert 'fsdp' in str(fc1.sharding.spec)


def test_accumulation_weights_micro_batches_by_their_masked_count(one_device):
  # The two micro-batches mask different numbers of tokens (padding in the second); weighting by count
  # gives exactly the full-batch ratio, where a plain mean of the two means would not.
  config = tiny_config(**{'optim.accum_steps': 2})
  history, params, _, grads = run_steps(config, jax.devices()[:1])
  np.testing.assert_allclose([h['loss'] for h in history], [h['loss'] for h in one_device[0]], atol=1e-5)
  equivalence.assert_grads_close(grads, one_device[3])
  equivalence.assert_first_update_close(params, one_device[1], grads, one_device[3], history[0]['lr'],
                                        config.optim.eps)


# ------------------------------------------------------------------------------------------------------------
# The main job in fresh processes
# ------------------------------------------------------------------------------------------------------------

def main_job(workdir, *flags, timeout=600):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  command = [sys.executable, '-m', 'simmim_jax.main', f'--config={TINY}', f'--workdir={workdir}', *flags]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def logged(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r for r in rows}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_text_run_interrupted_and_resumed_equals_uninterrupted(tmp_path, data_dir):
  # The uninterrupted run also saves step 3; a second workdir holding only that checkpoint is the
  # interrupted run (the same command stopped there), and its resumption must land on the same step 6.
  flags = [f'--config.data.data_dir={data_dir}', '--config.total_steps=6', '--config.batch_size=8',
           '--config.data.seq_len=64', '--config.log_every_steps=1', '--config.eval_every_steps=1000',
           '--config.eval_batches=2', '--config.checkpoint.every_steps=3', '--config.mask.strategy=bert']
  whole = main_job(tmp_path / 'whole', *flags)
  assert whole.returncode == 0, whole.stderr[-3000:]
  os.makedirs(tmp_path / 'parts' / 'checkpoints')
  shutil.copytree(tmp_path / 'whole' / 'checkpoints' / '3', tmp_path / 'parts' / 'checkpoints' / '3')
  rest = main_job(tmp_path / 'parts', *flags)
  assert rest.returncode == 0, rest.stderr[-3000:]
  assert 'Resumed from step 3' in rest.stdout and 'held-out at step 6' in rest.stdout
  a, b = logged(tmp_path / 'whole'), logged(tmp_path / 'parts')
  assert sorted(b) == [4, 5, 6]
  for key in ('loss', 'accuracy'):
    np.testing.assert_array_equal([a[s][key] for s in (4, 5, 6)], [b[s][key] for s in (4, 5, 6)])
  for key in ('eval_loss', 'eval_accuracy', 'eval_perplexity', 'eval_unigram_accuracy'):
    assert a[6][key] == b[6][key]
  assert a[6]['eval_accuracy'] > 0 and a[6]['eval_unigram_accuracy'] > 0
  p, q = (ocp.StandardCheckpointer().restore(os.path.join(w, 'checkpoints', '6', 'state'))['params']
          for w in (tmp_path / 'whole', tmp_path / 'parts'))
  flat_p, flat_q = ocp.tree.to_flat_dict(p), ocp.tree.to_flat_dict(q)
  assert flat_p.keys() == flat_q.keys()
  for key in flat_p:
    np.testing.assert_array_equal(flat_p[key], flat_q[key], err_msg=str(key))


@pytest.mark.slow
def test_tiny_text_config_beats_the_unigram_baseline(tmp_path, data_dir):
  run = main_job(tmp_path / 'run', f'--config.data.data_dir={data_dir}', timeout=3600)
  assert run.returncode == 0, run.stderr[-3000:]
  last = logged(tmp_path / 'run')[1000]
  assert last['eval_accuracy'] > 3 * last['eval_unigram_accuracy'], last  # measured 0.116 vs 0.024
  assert not os.path.exists(tmp_path / 'run' / 'reconstructions')  # text draws no image figures


def test_base_recipe_lowers_with_the_roberta_settings():
  config = config_io.load_config(os.path.join(ROOT, 'configs', 'text_base.py'))
  assert (config.model.variant, config.model.vocab_size, config.data.seq_len, config.batch_size) == ('base', 32000, 512, 8192)
  assert (config.optim.b2, config.optim.eps, config.optim.weight_decay, config.mask.strategy) == (0.98, 1e-6, 0.01, 'bert')
  config.batch_size = 2  # per device on a pod; lowering only, nothing runs
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, 500_000, 1000)
  schedule, abstract = s.schedule, s.abstract
  np.testing.assert_allclose(float(schedule(24_000)) * 8192 / 2, 6e-4, rtol=1e-6)  # peak 6e-4 at batch 8192
  n = sum(x.size for x in jax.tree.leaves(abstract.params['encoder']))
  assert 109e6 < n < 111e6  # BERT-base with a 32k vocabulary and 512 positions
  step = pretrain_step.make_train_step(task, s)
  batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh))
           for k, x in task.batch_spec(2).items()}
  _, metrics = step.lower(abstract, batch).out_info
  assert metrics['loss'].shape == () and metrics['accuracy'].shape == ()


@pytest.mark.slow
def test_two_processes_run_the_text_job_on_their_own_slices(tmp_path, data_dir):
  # Each process tokenises its half of the documents; step counts, eval batch counts and the unigram id
  # come from process 0, so both run the same programs and finish together.
  port = socket.socket()
  port.bind(('127.0.0.1', 0))
  address = f'127.0.0.1:{port.getsockname()[1]}'
  port.close()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen([sys.executable, '-m', 'simmim_jax.main', f'--config={TINY}', f'--workdir={tmp_path}',
                             f'--config.data.data_dir={data_dir}', '--config.total_steps=3', '--config.batch_size=8',
                             '--config.eval_batches=2', f'--coordinator_address={address}', '--num_processes=2',
                             f'--process_id={i}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  assert "mesh {'data': 4, 'fsdp': 1}" in outputs[0] and 'held-out at step 3' in outputs[0]
  last = logged(tmp_path)[3]
  assert np.isfinite(last['eval_loss']) and 0 < last['eval_unigram_accuracy'] < 0.1
