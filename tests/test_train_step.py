"""The jitted train step: same numbers on 1 device and on 8 (data and FSDP meshes), with accumulation."""
import jax
import numpy as np
import pytest

from simmim_jax import config_io, feed, pretrain_step, sharding, tasks


def tiny_config(**overrides):
  c = config_io.load_config('configs/base.py', {'model.variant': 'Mu/4', 'batch_size': 16, 'mesh.fsdp_min_size': 1024,
                                                 'optim.warmup_steps': 0, **overrides})
  return c


def run_steps(config, devices, num_steps=2):
  """Runs the step on a mesh over `devices`; returns per-step losses and the final params on the host."""
  mesh = sharding.make_mesh(config.mesh, devices)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=100, steps_per_epoch=10)
  state = s.init()
  step = pretrain_step.make_train_step(task, s)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(num_steps):
    batch = {'image': rng.standard_normal((config.batch_size, 32, 32, 3)).astype(np.float32)}
    state, metrics = step(state, feed.to_global(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope='module')
def one_device():
  return run_steps(tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize('mesh', [{'mesh.data': 8, 'mesh.fsdp': 1}, {'mesh.data': 2, 'mesh.fsdp': 4}])
def test_one_vs_eight_devices(one_device, mesh):
  losses, params, state = run_steps(tiny_config(**mesh), jax.devices()[:8])
  np.testing.assert_allclose(losses, one_device[0], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, one_device[1])
  if mesh['mesh.fsdp'] > 1:  # the FSDP rule really sharded the large arrays
    qkv = state.params['encoder']['blocks_0']['attn']['qkv']['kernel']
    assert 'fsdp' in str(qkv.sharding.spec)


def test_gradient_accumulation_equals_the_full_batch(one_device):
  losses, params, _ = run_steps(tiny_config(**{'optim.accum_steps': 2}), jax.devices()[:1])
  np.testing.assert_allclose(losses, one_device[0], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, one_device[1])


def test_batch_not_divisible_by_devices_fails_fast():
  mesh = sharding.make_mesh(tiny_config().mesh, jax.devices()[:8])
  with pytest.raises(ValueError, match='batch_size=12 must be divisible by the device count'):
    sharding.check_batch_size(12, mesh)
