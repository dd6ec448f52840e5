"""params_io: .npz and .safetensors round trips (bfloat16 bit-exact), sub-trees, and params read back from a real
Orbax checkpoint (without Orbax's spurious metadata warning)."""
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simmim_jax import checkpoint, config_io, models, params_io


def test_npz_round_trip_is_bit_exact_with_bfloat16(tmp_path):
  rng = np.random.default_rng(0)
  bf16 = rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16)
  params = {'encoder': {'blocks_0': {'attn': {'qkv': {'kernel': bf16, 'bias': jnp.arange(3, dtype=jnp.bfloat16)}}},
                        'norm': {'scale': rng.standard_normal(4).astype(np.float32)}},
            'decoder': {'conv': {'kernel': jnp.asarray(rng.standard_normal((1, 1, 4, 8)), jnp.float32)}},
            'step_like': np.int32(7)}
  path = str(tmp_path / 'out' / 'model.npz')
  params_io.save_npz(path, params, {'model': {'name': 'vit'}})
  with np.load(path) as raw:  # the file itself: '/'-joined names, bf16 stored as its uint16 bits, nothing else
    assert sorted(raw.files) == sorted(traverse_util.flatten_dict(params, sep='/'))
    assert raw['encoder/blocks_0/attn/qkv/kernel'].dtype == np.uint16
  loaded = params_io.load_params(path)
  got = loaded['encoder']['blocks_0']['attn']['qkv']['kernel']
  assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == bf16.tobytes()
  assert loaded['encoder']['blocks_0']['attn']['qkv']['bias'].dtype == ml_dtypes.bfloat16
  flat_in, flat_out = traverse_util.flatten_dict(params, sep='/'), traverse_util.flatten_dict(loaded, sep='/')
  assert sorted(flat_in) == sorted(flat_out)
  for name, value in flat_in.items():
    assert np.asarray(value).dtype == flat_out[name].dtype and np.asarray(value).tobytes() == flat_out[name].tobytes()
  assert params_io.load_config(path) == {'model': {'name': 'vit'}}
  assert json.load(open(tmp_path / 'out' / 'model.json')) == {
      'model': {'name': 'vit'}, '__dtypes__': {'encoder/blocks_0/attn/qkv/bias': 'bfloat16',
                                               'encoder/blocks_0/attn/qkv/kernel': 'bfloat16'}}
  norm = params_io.load_params(path, subtree='encoder/norm')
  np.testing.assert_array_equal(norm['scale'], params['encoder']['norm']['scale'])


def test_npz_without_ml_dtypes_or_config_is_params_alone(tmp_path):
  path = str(tmp_path / 'p.npz')
  (tmp_path / 'p.json').write_text('{"__dtypes__": {"w": "bfloat16"}}')  # a stale sidecar of an earlier export
  params_io.save_npz(path, {'w': np.arange(3, dtype=np.float32)})
  assert not (tmp_path / 'p.json').exists()
  with np.load(path) as raw:
    assert raw.files == ['w']
  np.testing.assert_array_equal(params_io.load_params(path)['w'], np.arange(3, dtype=np.float32))


def test_npz_of_earlier_versions_still_loads(tmp_path):
  """The dtype record used to be an entry of the .npz itself."""
  bf16 = np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)
  buffer = io.BytesIO()
  np.savez(buffer, **{'encoder/w': bf16.view(np.uint16), '__dtypes__': np.array(json.dumps({'encoder/w': 'bfloat16'}))})
  (tmp_path / 'old.npz').write_bytes(buffer.getvalue())
  got = params_io.load_params(str(tmp_path / 'old.npz'))
  assert got == {'encoder': {'w': got['encoder']['w']}} and got['encoder']['w'].tobytes() == bf16.tobytes()
  assert got['encoder']['w'].dtype == ml_dtypes.bfloat16


def test_npz_bits_without_their_sidecar_are_flagged(tmp_path, caplog):
  path = str(tmp_path / 'p.npz')
  params_io.save_npz(path, {'w': np.ones(2, ml_dtypes.bfloat16)})
  os.remove(tmp_path / 'p.json')
  with caplog.at_level(logging.WARNING):
    assert params_io.load_params(path)['w'].dtype == np.uint16
  assert 'no p.json beside it' in caplog.text


def test_safetensors_round_trip_is_bit_exact_with_config(tmp_path):
  rng = np.random.default_rng(1)
  params = {'encoder': {'qkv': {'kernel': rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
                                'bias': rng.standard_normal(5).astype(np.float32)},
                        'pos': jnp.asarray(rng.standard_normal((1, 2, 2)), jnp.float16)},
            'count': np.int32(7), 'flags': np.array([True, False])}
  path = str(tmp_path / 'model.safetensors')
  config = config_io.load_config('configs/base.py')
  params_io.save_safetensors(path, params, config)
  loaded = params_io.load_params(path)
  flat_in, flat_out = traverse_util.flatten_dict(params, sep='/'), traverse_util.flatten_dict(loaded, sep='/')
  assert sorted(flat_in) == sorted(flat_out)
  for name, value in flat_in.items():
    value = np.asarray(value)
    assert value.dtype == flat_out[name].dtype and value.shape == flat_out[name].shape, name
    assert value.tobytes() == flat_out[name].tobytes(), name
  assert params_io.load_config(path) == json.loads(config.to_json_best_effort())
  assert params_io.load_params(path, 'encoder/qkv')['kernel'].dtype == ml_dtypes.bfloat16
  # Other readers take the file as it is: the format's own library (no bfloat16 in its NumPy reader).
  safetensors = pytest.importorskip('safetensors')
  with safetensors.safe_open(path, 'np') as f:
    assert f.metadata()['producer'] == 'simmim_jax' and json.loads(f.metadata()['config'])['model']['name'] == 'vit'
    np.testing.assert_array_equal(f.get_tensor('encoder/qkv/bias'), params['encoder']['qkv']['bias'])
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  kernel = load_file(path)['encoder/qkv/kernel']
  assert kernel.dtype == torch.bfloat16
  assert kernel.view(torch.int16).numpy().tobytes() == params['encoder']['qkv']['kernel'].tobytes()


def test_user_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match='ending in .npz'):
    params_io.save_npz(str(tmp_path / 'x.bin'), {'a': np.zeros(2)})
  with pytest.raises(FileNotFoundError, match='does not exist'):
    params_io.load_params(str(tmp_path / 'missing.npz'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    params_io.load_params(str(tmp_path / 'no_such_workdir'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No checkpoint steps'):
    params_io.load_params(str(tmp_path / 'empty'))
  params_io.save_npz(str(tmp_path / 'p.npz'), {'encoder': {'w': np.ones(2)}})
  with pytest.raises(KeyError, match="'decoder'"):
    params_io.load_params(str(tmp_path / 'p.npz'), subtree='decoder')
  assert params_io.load_config(str(tmp_path / 'p.npz')) is None


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A train state {'step', 'params', 'opt_state'} sharded over an 8-device FSDP mesh, saved twice by the
  trainer's Checkpointer."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = config_io.load_config('configs/base.py', {'model.variant': 'Mu/4'})
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'fsdp'))
  model = models.build_simmim(config.model)
  images, mask = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8, 8), jnp.int32)
  params = model.init(jax.random.key(0), images, mask)['params']
  fsdp = NamedSharding(mesh, P('fsdp'))  # rows split over 4 devices: the restore must gather them
  params = jax.tree.map(lambda x: jax.device_put(x, fsdp) if x.ndim == 2 and x.shape[0] % 4 == 0 else x, params)
  assert 'fsdp' in str(params['encoder']['blocks_0']['mlp']['fc1']['kernel'].sharding.spec)
  state = {'step': jnp.int32(3), 'params': params, 'opt_state': optax.adamw(1e-3).init(params)}
  checkpoint.write_config(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  meta = {'step': 0, 'config': checkpoint.config_dict(config)}
  ckpt.save(3, state, meta)
  later = dict(state, params=jax.tree.map(lambda x: x + 1, params))
  ckpt.save(5, later, meta)
  ckpt.wait()
  ckpt.close()
  return workdir, config, jax.device_get(params), jax.device_get(later['params'])


def test_orbax_checkpoint_params_come_back_exactly(saved_run, caplog):
  workdir, config, params3, params5 = saved_run
  with caplog.at_level(logging.INFO):
    latest = params_io.load_params(workdir)  # workdir -> latest step (5)
    assert params_io.load_config(workdir)['model']['variant'] == 'Mu/4'
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # e.g. no Orbax metadata warning
  jax.tree.map(np.testing.assert_array_equal, latest, params5)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(latest))
  step3 = params_io.load_params(os.path.join(workdir, 'checkpoints', '3'))
  jax.tree.map(np.testing.assert_array_equal, step3, params3)
  via_dir = params_io.load_params(os.path.join(workdir, 'checkpoints'), subtree='encoder', step=3)
  jax.tree.map(np.testing.assert_array_equal, via_dir, params3['encoder'])
  assert params_io.load_config(workdir)['model']['variant'] == config.model.variant == 'Mu/4'
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    params_io.load_params(workdir, step=4)


def test_checkpoint_to_npz_and_back(saved_run, tmp_path):
  workdir, _, params3, params5 = saved_run
  path = str(tmp_path / 'enc.npz')
  params_io.save_npz(path, params_io.load_params(workdir, 'encoder'), params_io.load_config(workdir))
  jax.tree.map(np.testing.assert_array_equal, params_io.load_params(path), params5['encoder'])
  assert params_io.load_config(path)['model']['name'] == 'vit'
  from tools import export_params  # pylint: disable=import-outside-toplevel
  bf16 = str(tmp_path / 'bf16.npz')
  export_params.main(['--checkpoint', os.path.join(workdir, 'checkpoints'), '--step', '3', '--out', bf16,
                      '--dtype', 'bfloat16'])
  exported = traverse_util.flatten_dict(params_io.load_params(bf16), sep='/')
  for name, value in traverse_util.flatten_dict(params3, sep='/').items():
    assert exported[name].dtype == ml_dtypes.bfloat16
    assert exported[name].tobytes() == value.astype(ml_dtypes.bfloat16).tobytes(), name
  config = params_io.load_config(bf16)
  assert config['model']['variant'] == 'Mu/4' and config['export']['step'] == 3 and not config['export']['encoder_only']
  single = str(tmp_path / 'bf16.safetensors')  # the same export as one self-contained file
  export_params.main(['--checkpoint', os.path.join(workdir, 'checkpoints'), '--step', '3', '--out', single,
                      '--dtype', 'bfloat16'])
  again = traverse_util.flatten_dict(params_io.load_params(single), sep='/')
  assert sorted(again) == sorted(exported)
  for name, value in exported.items():
    assert again[name].dtype == value.dtype and again[name].tobytes() == value.tobytes(), name
  assert params_io.load_config(single) == config
