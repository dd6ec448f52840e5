"""model.remat: the same loss and gradients with and without activation checkpointing (ViT, Swin, SwinV2, text),
the same parameter tree, and less compiled temp memory (tools/remat_memory.py, slow)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import defaults, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('none', 'block', 'dots_with_no_batch_dims_saveable')


def image_model(name: str, remat: str):
  c = defaults.pretrain_config().model
  if name in ('vit', 'vit_plain'):
    c.update(variant='Mu/4', image_size=32, style='plain' if name == 'vit_plain' else 'beit')
  else:  # two stages: 8x8 tokens in shifted 4x4 windows, then one 4x4 window
    c.update(name=name, variant='Mu', image_size=32, window_size=4)
  c.update(drop_path_rate=0.2, remat=remat)  # drop path draws from the rng inside the rematted blocks
  model = models.build_simmim(c)
  if name != 'vit' and name != 'vit_plain':
    model = model.clone(encoder=model.encoder.clone(depths=(2, 2), num_heads=(2, 4)))
  return model


def image_loss(model):
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  grid = 32 // model.encoder.patch_size
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (2, grid, grid)).astype(jnp.int32)
  params = model.init(jax.random.key(2), images, mask)

  def loss(p):
    out = model.apply(p, images, mask, train=True, rngs={'dropout': jax.random.key(3)})
    return jnp.mean(jnp.abs(out - jax.image.resize(images, out.shape, 'nearest')))

  return loss, params


def text_loss(remat: str):
  c = defaults.text_pretrain_config().model
  c.update(variant='tiny', vocab_size=64, max_len=16, drop_path_rate=0.2, remat=remat)
  model = models.build_masked_lm(c)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 4, 64)
  segments = jnp.asarray([[1] * 9 + [2] * 7, [1] * 16])
  positions = jnp.asarray([list(range(9)) + list(range(7)), list(range(16))])
  mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 16)).astype(jnp.int32)
  gather = jnp.asarray([[0, 3, 10], [2, 5, 15]])
  inputs = (tokens, segments, positions, mask, gather)
  params = model.init(jax.random.key(2), *inputs)

  def loss(p):
    logits = model.apply(p, *inputs, train=True, rngs={'dropout': jax.random.key(3)})
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  return loss, params


def loss_fn(name: str, remat: str):
  return text_loss(remat) if name == 'text' else image_loss(image_model(name, remat))


# ViT and Swin (blocks inside stages) in the default suite; the other families wrap their blocks the same way.
@pytest.mark.parametrize('name', ['vit', *(pytest.param(n, marks=pytest.mark.slow) for n in ('vit_plain', 'swinv2',
                                                                                           'text')), 'swin'])
def test_remat_gives_the_same_loss_and_gradients(name):
  results = {}
  for mode in MODES:
    loss, params = loss_fn(name, mode)
    results[mode] = jax.jit(jax.value_and_grad(loss))(params)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert ('remat' in jaxpr) == (mode != 'none'), mode  # the blocks really are checkpointed
  base_loss, base_grads = results['none']
  for mode in MODES[1:]:
    mode_loss, mode_grads = results[mode]
    np.testing.assert_allclose(mode_loss, base_loss, rtol=1e-6)
    assert jax.tree.structure(mode_grads) == jax.tree.structure(base_grads)  # the same parameter names
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), mode_grads, base_grads)


def test_unknown_remat_mode_fails_with_the_choices():
  c = defaults.pretrain_config().model
  c.remat = 'save_only_these_names'  # a policy factory, not a policy
  with pytest.raises(ValueError, match='model.remat must be one of'):
    models.build_encoder(c)


@pytest.mark.slow
def test_remat_lowers_compiled_temp_memory():
  """tools/remat_memory.py on the embedded default (8 CPU devices, XLA:CPU's barrier-dropping CSE off)."""
  out = subprocess.run([sys.executable, 'tools/remat_memory.py', '--config', 'configs/base.py',
                        '--per_device_batch', '16', '--remat', 'none,block'], cwd=ROOT, capture_output=True,
                       text=True, check=True, env={**os.environ, 'XLA_FLAGS': ''}).stdout
  temps = [float(m.replace(',', '')) for m in re.findall(r'^\| vit [^|]+\| \w+ \| 16 \| ([\d,.]+) \|', out, re.M)]
  assert len(temps) == 2, out
  assert temps[1] < 0.6 * temps[0], out
