"""The jitted train step: same numbers on 1 device and on 8 (data and FSDP meshes), with accumulation."""
import jax
import numpy as np
import pytest

from simmim_jax import config_io, feed, pretrain_step, sharding, tasks

import equivalence


def tiny_config(**overrides):
  c = config_io.load_config('configs/base.py', {'model.variant': 'Mu/4', 'batch_size': 16, 'mesh.fsdp_min_size': 1024,
                                                 'optim.warmup_steps': 0, **overrides})
  return c


def batches(config, num_steps):
  rng = np.random.default_rng(0)
  return [{'image': rng.standard_normal((config.batch_size, 32, 32, 3)).astype(np.float32)} for _ in range(num_steps)]


def run_steps(config, devices, num_steps=2):
  """Runs the step on a mesh over `devices`: per-step losses and lrs, the params after each step on the host,
  and the final state."""
  mesh = sharding.make_mesh(config.mesh, devices)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=100, steps_per_epoch=10)
  state = s.init()
  step = pretrain_step.make_train_step(task, s)
  losses, lrs, params = [], [], []
  for batch in batches(config, num_steps):
    state, metrics = step(state, feed.to_global(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics['loss']))
    lrs.append(float(metrics['lr']))
    params.append(jax.device_get(state.params))
  return losses, lrs, params, state


@pytest.fixture(scope='module')
def one_device():
  config = tiny_config()
  return run_steps(config, jax.devices()[:1]), equivalence.loss_and_grads(config, jax.devices()[:1],
                                                                         batches(config, 1)[0])


@pytest.mark.parametrize('mesh', [{'mesh.data': 8, 'mesh.fsdp': 1}, {'mesh.data': 2, 'mesh.fsdp': 4}])
def test_one_vs_eight_devices(one_device, mesh):
  (losses_1, lrs, params_1, _), (loss_1, grads_1) = one_device
  config = tiny_config(**mesh)
  losses, _, params, state = run_steps(config, jax.devices()[:8])
  loss, grads = equivalence.loss_and_grads(config, jax.devices()[:8], batches(config, 1)[0])
  np.testing.assert_allclose(loss, loss_1, rtol=1e-6)
  equivalence.assert_grads_close(grads, grads_1)
  np.testing.assert_allclose(losses, losses_1, atol=1e-5)
  equivalence.assert_first_update_close(params[0], params_1[0], grads, grads_1, lrs[0], config.optim.eps)
  if mesh['mesh.fsdp'] > 1:  # the FSDP rule really sharded the large arrays
    qkv = state.params['encoder']['blocks_0']['attn']['qkv']['kernel']
    assert 'fsdp' in str(qkv.sharding.spec)


def test_gradient_accumulation_equals_the_full_batch(one_device):
  (losses_1, lrs, params_1, _), (loss_1, grads_1) = one_device
  config = tiny_config(**{'optim.accum_steps': 2})
  losses, _, params, _ = run_steps(config, jax.devices()[:1])
  loss, grads = equivalence.loss_and_grads(config, jax.devices()[:1], batches(config, 1)[0])
  np.testing.assert_allclose(loss, loss_1, rtol=1e-6)
  equivalence.assert_grads_close(grads, grads_1)
  np.testing.assert_allclose(losses, losses_1, atol=1e-5)
  equivalence.assert_first_update_close(params[0], params_1[0], grads, grads_1, lrs[0], config.optim.eps)


def test_batch_not_divisible_by_devices_fails_fast():
  mesh = sharding.make_mesh(tiny_config().mesh, jax.devices()[:8])
  with pytest.raises(ValueError, match='batch_size=12 must be divisible by the device count'):
    sharding.check_batch_size(12, mesh)
