"""Swin / SwinV2 training: 1 vs 8 devices, the tiny config end to end, and the paper recipes lowering at
their real per-device batch."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import config_io, feed, optim, pretrain_step, sharding, tasks

import equivalence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  return os.path.join(ROOT, 'configs', name)


# ------------------------------------------------------------------------------------------------------------
# The train step: 1 vs 8 devices, and the tiny config end to end
# ------------------------------------------------------------------------------------------------------------

def one_step(config, devices):
  """One train step of the tiny Swin config on a mesh over `devices`: (loss, lr, params before, params after,
  the step's gradients)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=100, steps_per_epoch=10)
  state = s.init()
  before = jax.device_get(state.params)
  step = pretrain_step.make_train_step(task, s)
  batch = {'image': np.random.default_rng(0).standard_normal((config.batch_size, 32, 32, 3)).astype(np.float32)}
  state, metrics = step(state, feed.to_global(batch, sharding.batch_sharding(mesh)))
  _, grads = equivalence.loss_and_grads(config, devices, batch)
  return float(metrics['loss']), float(metrics['lr']), before, jax.device_get(state.params), grads


@pytest.mark.parametrize('name', ['swin', pytest.param('swinv2', marks=pytest.mark.slow)])
def test_one_step_on_one_and_eight_devices_agree(name):
  config = config_io.load_config(config_path(f'swin_tiny_cpu.py:{name}'),
                                 {'batch_size': 8, 'optim.warmup_steps': 0})
  loss_1, lr, before, params_1, grads_1 = one_step(config, jax.devices()[:1])
  loss_8, _, _, params_8, grads_8 = one_step(config, jax.devices()[:8])
  assert np.isfinite(loss_1)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  equivalence.assert_grads_close(grads_8, grads_1)
  equivalence.assert_first_update_close(params_8, params_1, grads_8, grads_1, lr, config.optim.eps)
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params_1, before)))
  assert moved > 1e-4  # the step really updated the parameters (2.5e-4 x sign on the first Adam step)


@pytest.mark.slow  # ~2 minutes: 100 steps in a fresh process
def test_tiny_swin_config_end_to_end(tmp_path):
  # The documented command in a fresh process on one CPU device, as a user runs it. (In this process the
  # 8 forced host devices share 2 cores with tf.data, and XLA's CPU all-reduce rendezvous can time out
  # when the trainer dispatches steps ahead.)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  command = [sys.executable, '-m', 'simmim_jax.main', f'--config={config_path("swin_tiny_cpu.py")}',
             f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "tfds"}',
             '--config.total_steps=100', '--config.log_every_steps=25', '--config.checkpoint.every_steps=100',
             '--config.image_every_steps=100', '--config.data.shuffle_buffer=512']
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  logged = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  first, last = logged[0]['loss'], logged[-1]['loss']
  assert logged[-1]['step'] == 100 and last < 0.6 * first, (first, last)
  assert (tmp_path / 'run' / 'reconstructions' / 'step_0000100.png').exists()


# ------------------------------------------------------------------------------------------------------------
# The paper recipes: load, build and lower at the real per-device batch (16 devices x 128), without running
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('spec,name,variant,window,epochs', [
    ('simmim_swin_base.py:100', 'swin', 'B', 6, 100),
    ('simmim_swin_base.py', 'swin', 'B', 6, 800),
    ('simmim_swin_large.py', 'swin', 'L', 12, 800),
    ('simmim_swinv2_base.py', 'swinv2', 'B', 12, 800),
])
def test_recipe_lowers_at_the_real_per_device_batch(spec, name, variant, window, epochs):
  config = config_io.load_config(config_path(spec))
  assert (config.model.name, config.model.variant, config.model.window_size) == (name, variant, window)
  assert config.model.image_size == 192 and config.batch_size == 2048 and config.total_epochs == epochs
  assert (config.mask.mask_patch_size, config.mask.model_patch_size) == (32, 4)
  assert config.model.dtype == 'bfloat16' and config.data.name == 'imagenet2012'
  assert config.loss.norm_target == (name == 'swinv2')
  steps_per_epoch = 1_281_167 // config.batch_size
  schedule = optim.lr_schedule(config.optim, total_steps=steps_per_epoch * epochs, steps_per_epoch=steps_per_epoch,
                               batch_size=config.batch_size)
  scale = config.batch_size / 512
  peak = 2e-4 if epochs == 100 else 1e-4
  warmup, total = 10 * steps_per_epoch, epochs * steps_per_epoch
  np.testing.assert_allclose(float(schedule(0)), (1e-6 if epochs == 100 else 5e-7) * scale, rtol=1e-5)
  # schedule(k) is the LR of update k, the official f(k - 1) (optim.lr_lag): f(t) reaches update t + 1.
  if epochs == 800:  # the peak after warmup, x0.1 from epoch 700
    np.testing.assert_allclose(float(schedule(warmup + 1)), peak * scale, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(700 * steps_per_epoch + 1)), peak * scale * 0.1, rtol=1e-5)
  else:  # timm cosine over all steps (no warmup prefix: the small dip after warmup), min LR per 512 images
    low = 1e-5 * scale
    np.testing.assert_allclose(float(schedule(warmup + 1)),
                               low + 0.5 * (peak * scale - low) * (1 + np.cos(np.pi * warmup / total)), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(total + 1)), low, rtol=1e-4)

  per_device = config.batch_size // 16
  config.batch_size = per_device
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total, steps_per_epoch)
  abstract = s.abstract
  assert task.model.encoder.stride == 32 and task.model.encoder.patch_size == config.mask.model_patch_size
  step = pretrain_step.make_train_step(task, s)
  batch = {'image': jax.ShapeDtypeStruct((per_device, 192, 192, 3), jnp.float32,
                                         sharding=sharding.batch_sharding(mesh))}
  lowered = step.lower(abstract, batch)
  state_out, metrics = lowered.out_info
  assert metrics['loss'].shape == () and jax.tree.structure(state_out) == jax.tree.structure(abstract)
