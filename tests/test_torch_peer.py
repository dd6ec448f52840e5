"""tools/torch_peer.py: the PyTorch peer builds and steps on tiny models, and is the same model as the JAX one
(the JAX params loaded into it give the same masked L1 loss)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('timm')

from simmim_jax import config_io, losses, masking, models  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import timm as timm_interop  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import torch_peer  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = {
    'vit_beit': ('base.py', ['batch_size=4', 'model.style=beit', 'model.drop_path_rate=0.1']),
    'vit_plain': ('base.py', ['batch_size=4', 'model.style=plain']),
    'swin': ('swin_tiny_cpu.py', ['batch_size=2']),
    'swinv2': ('swin_tiny_cpu.py', ['batch_size=2', 'model.name=swinv2']),
}


def config(family: str):
  name, overrides = CONFIGS[family]
  return config_io.load_config(os.path.join(ROOT, 'configs', name), overrides)


@pytest.mark.parametrize('family', sorted(CONFIGS))
def test_peer_builds_and_steps(family):
  torch.set_num_threads(1)
  c = config(family)
  step = torch_peer.make_train_step(c, seed=0)
  r = torch_peer.time_steps(step, steps=2, warmup=1, batch_size=c.batch_size)
  assert np.isfinite(r['loss']) and r['examples_per_s'] > 0
  mask = torch_peer.block_mask(3, 4, 2, 0.6, torch.Generator().manual_seed(0))
  assert mask.shape == (3, 8, 8) and (mask.sum((1, 2)) == 10 * 4).all()  # ceil(0.6 * 16) cells of 2x2


@pytest.mark.parametrize('family', ['vit_beit', 'vit_plain', 'swin'])
def test_peer_is_the_same_model(family):
  """The JAX model's params in the peer: the same loss on the same images and mask (train=False, no drop)."""
  c = config(family)
  c.model.drop_path_rate = 0.0
  model = models.build_simmim(c.model)
  size, grid = c.model.image_size, c.model.image_size // c.mask.model_patch_size
  images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  mask = masking.image_mask(jax.random.key(1), 2, size, c.mask.mask_patch_size, c.mask.model_patch_size, 0.6)
  params = model.init(jax.random.key(2), images, mask)['params']
  # Non-zero everywhere (zero-initialised tables and layer scales would hide a wrong wiring).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
  out = model.apply({'params': params}, images, mask)
  expected = float(losses.masked_l1(out, images, masking.upsample(mask, c.mask.model_patch_size)))

  peer, _ = torch_peer.build(c)
  state, extras = timm_interop.to_timm(jax.tree.map(np.asarray, params))
  peer.encoder.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  with torch.no_grad():
    peer.mask_token.copy_(torch.from_numpy(np.array(extras['mask_token'])).view_as(peer.mask_token))
    peer.decoder[0].weight.copy_(torch.from_numpy(np.array(extras['decoder.0.weight'])))
    peer.decoder[0].bias.copy_(torch.from_numpy(np.array(extras['decoder.0.bias'])))
    loss = peer.eval()(torch.from_numpy(np.array(jnp.transpose(images, (0, 3, 1, 2)))),
                       torch.from_numpy(np.array(mask)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_against_summary_hand_computed():
  """--against's summary: per-pair ratios of img/s (= inverse step times), their median, % of each peak."""
  import benchmark  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  sides = [benchmark.Side('jax', 0.5, [0.1, 0.2, 0.4]), benchmark.Side('jax@old', 0.5, [0.2, 0.2, 0.2]),
           benchmark.Side('torch', 0.25, [0.2, 0.1, 0.8])]
  lines = benchmark.summary(sides, batch=8, model_flops=1e10)
  assert lines[0] == 'jax / torch: median 2.00x (pairs: 2.00 0.50 2.00)'
  assert lines[1] == 'jax@old / torch: median 1.00x (pairs: 1.00 0.50 4.00)'
  assert lines[2] == 'jax / jax@old: median 1.00x (pairs: 2.00 1.00 0.50)'
  # jax: median step 0.2 s -> 40 img/s, 1e10 / 0.2 = 0.05 TFLOP/s = 10% of 0.5; torch: 0.2 s -> 20% of 0.25.
  assert lines[3] == 'jax: median 40.00 img/s | 0.0500 TFLOP/s = 10.0% of its matmul peak 0.500 TFLOP/s'
  assert lines[5] == 'torch: median 40.00 img/s | 0.0500 TFLOP/s = 20.0% of its matmul peak 0.250 TFLOP/s'


def test_against_torch_one_pair():
  """tools/benchmark.py --against torch on a tiny model: both sides build, take one turn each, and the
  printed ratio is the printed img/s over each other."""
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'),
       '--config', os.path.join(ROOT, 'configs', 'base.py'),
       '--set', 'batch_size=8', '--against', 'torch', '--pairs', '1', '--steps', '1',
       '--warmup', '1', '--threads', '1'],
      capture_output=True, text=True, check=True, timeout=600)
  out = result.stdout
  pair = re.search(r'pair 1: jax ([\d.]+) img/s \(loss ([\d.]+)\) \| torch ([\d.]+) img/s \(loss ([\d.]+)\) '
                   r'\| jax / torch ([\d.]+)x', out)
  assert pair, out
  jax_ips, _, torch_ips, _, ratio = map(float, pair.groups())
  np.testing.assert_allclose(ratio, jax_ips / torch_ips, rtol=0.02, atol=0.01)
  assert re.search(rf'jax / torch: median {ratio:.2f}x \(pairs: {ratio:.2f}\)', out), out
  for side in ('jax', 'torch'):
    assert re.search(rf'^{side}: median [\d.]+ img/s \| [\d.]+ TFLOP/s = [\d.]+% of its matmul peak [\d.]+ TFLOP/s$',
                     out, re.M), out
  assert re.search(r'^torch: torch .* \(1 threads\), compile', out, re.M), out
