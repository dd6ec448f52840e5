"""The text encoder in PyTorch: the documented layout (interop/text.py) loaded into interop/torch_text.py gives
the JAX features and masked-LM logits on packed rows, and the round trip through files is bit-exact."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip('torch')
pytest.importorskip('timm')

from simmim_jax import models, params_io  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import text, torch_io, torch_text

MODEL = dict(name='text', variant='tiny', vocab_size=97, max_len=24, mask_id=3, drop_path_rate=0.0, dtype='float32')


def packed_batch(rng: np.random.Generator, batch: int = 3, length: int = 16):
  """Rows packed with segments of random lengths; positions restart in each; 0 marks padding's segment."""
  tokens = rng.integers(4, MODEL['vocab_size'], (batch, length))
  segments, positions = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
  for b in range(batch):
    start, seg = 0, 1
    while start < length - 2:
      end = min(length - 2, start + int(rng.integers(3, 8)))
      segments[b, start:end], positions[b, start:end] = seg, np.arange(end - start)
      start, seg = end, seg + 1
  mask = (rng.random((batch, length)) < 0.3).astype(np.int32)
  gather = np.stack([rng.choice(length, 4, replace=False) for _ in range(batch)]).astype(np.int32)
  return tokens.astype(np.int32), segments, positions, mask, gather


@pytest.fixture(scope='module')
def model_and_params():
  model = models.build_masked_lm(ml_collections.ConfigDict(MODEL))
  args = [jnp.zeros((1, 8), jnp.int32)] * 4 + [jnp.zeros((1, 2), jnp.int32)]
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), abstract)
  return model, params


def test_pytorch_text_encoder_gives_the_same_features_and_logits(model_and_params):
  model, params = model_and_params
  tokens, segments, positions, mask, gather = packed_batch(np.random.default_rng(1))
  features = model.encoder.apply({'params': params['encoder']}, tokens, segments, positions, mask)
  logits = model.apply({'params': params}, tokens, segments, positions, mask, gather)
  state = text.to_torch(params)
  assert state['embedding.weight'].shape == (97, 128) and state['blocks.1.attn.qkv.weight'].shape == (384, 128)
  torch_model = torch_text.TextEncoder(**text.torch_kwargs(MODEL), with_head=True).eval()
  torch_model.load_state_dict({k: torch_io.to_tensor(v) for k, v in state.items()}, strict=True)
  t = lambda x: torch.from_numpy(np.asarray(x)).long()  # pylint: disable=unnecessary-lambda-assignment
  with torch.no_grad():
    theirs = torch_model(t(tokens), t(segments), t(positions), t(mask))
    picked = torch.take_along_dim(theirs, t(gather)[..., None], dim=1)
    their_logits = torch_model.logits(picked).numpy()
  diff = float(np.abs(theirs.numpy() - np.asarray(features)).max())
  print(f'text encoder: PyTorch vs JAX features max abs diff {diff:.2e}, '
        f'logits {np.abs(their_logits - np.asarray(logits)).max():.2e}')
  assert diff <= 1e-4
  np.testing.assert_allclose(their_logits, np.asarray(logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_text_round_trip_through_the_tools_is_bit_exact(model_and_params, dtype, tmp_path):
  _, params = model_and_params
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  npz, out = str(tmp_path / 'text.npz'), str(tmp_path / 'text.safetensors')
  params_io.save_npz(npz, params, {'model': MODEL})
  from tools import convert_to_torch  # pylint: disable=import-outside-toplevel
  convert_to_torch.main(['--params', npz, '--out', out])
  back = traverse_util.flatten_dict(params_io.load_params(out), sep='/')
  want = traverse_util.flatten_dict(params, sep='/')
  assert sorted(back) == sorted(want)
  for k, v in want.items():
    assert back[k].dtype == v.dtype and back[k].tobytes() == np.asarray(v).tobytes(), k
  spec = json.load(open(str(tmp_path / 'text.text.json')))
  assert spec['kwargs'] == dict(width=128, depth=2, mlp_dim=512, num_heads=2, vocab_size=97, max_len=24, mask_id=3,
                                with_head=True)
