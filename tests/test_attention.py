"""Attention: the XLA path (bias added to float32 logits, never broadcast to the batch; float32 softmax) against
a float64 NumPy reference and against the previous implementation (a batch-broadcast bias into
jax.nn.dot_product_attention, a tiled Swin window bias); model.attention's selection on CPU, and the cuDNN
call's layout (flattened batch, padding to an even length) run through the XLA kernel."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import defaults, models
from simmim_jax.models import layers, swin


def np_attention(q, k, v, bias_terms=()) -> np.ndarray:
  """softmax(q k^T / sqrt(d) + sum(bias)) v in float64, q/k/v (..., n, heads, d)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum('...qhd,...khd->...hqk', q, k) / np.sqrt(q.shape[-1])
  for t in bias_terms:
    logits = logits + np.asarray(t, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('...hqk,...khd->...qhd', probs, v)


def qkv(shape, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, shape, dtype) for key in keys)


def previous_attention(q, k, v, bias):
  """The implementation before: the bias broadcast to (B, heads, n, n), then jax.nn.dot_product_attention."""
  b, n, h, _ = q.shape
  return jax.nn.dot_product_attention(q, k, v, bias=jnp.broadcast_to(bias, (b, h, n, n)).astype(q.dtype))


CASES = {
    # name: (q shape, bias term shapes)
    'vit': ((2, 7, 3, 8), [(3, 7, 7)]),
    'swin_shifted': ((2, 4, 9, 2, 8), [(2, 9, 9), (4, 1, 9, 9)]),  # (batch, windows, n, heads, d)
    'swin_window_table': ((2, 4, 9, 2, 8), [(4, 2, 9, 9)]),
    'text_segments': ((2, 6, 2, 8), [(2, 1, 6, 6)]),
    'none': ((2, 5, 2, 8), []),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_xla_attention_matches_a_float64_reference(case):
  shape, bias_shapes = CASES[case]
  q, k, v = qkv(shape)
  terms = tuple(jax.random.normal(jax.random.key(10 + i), s) * 3 for i, s in enumerate(bias_shapes))
  out = layers.xla_attention(q, k, v, terms or None)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, terms), rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_previous_broadcast_bias_implementation():
  q, k, v = qkv((3, 11, 2, 8))
  bias = jax.random.normal(jax.random.key(5), (2, 11, 11))
  w = jax.random.normal(jax.random.key(6), q.shape)

  def loss(fn, q, k, v, bias):
    return jnp.sum(fn(q, k, v, bias) * w)

  new = jax.grad(functools.partial(loss, layers.xla_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  old = jax.grad(functools.partial(loss, previous_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for a, b in zip(new, old):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_shared_bias_gradient_is_the_sum_over_the_leading_dims():
  logits = jax.random.normal(jax.random.key(0), (3, 4, 2, 5, 5))
  bias = jax.random.normal(jax.random.key(1), (4, 2, 5, 5))
  w = jax.random.normal(jax.random.key(2), logits.shape)
  for fn in (jnp.add, layers.add_shared_bias):
    np.testing.assert_array_equal(fn(logits, bias), logits + bias)
  ours = jax.grad(lambda l, b: jnp.sum(layers.add_shared_bias(l, b) * w), argnums=(0, 1))(logits, bias)
  plain = jax.grad(lambda l, b: jnp.sum((l + b) * w), argnums=(0, 1))(logits, bias)
  np.testing.assert_array_equal(ours[0], plain[0])
  np.testing.assert_allclose(ours[1], plain[1], rtol=1e-6, atol=1e-6)


def test_bfloat16_inputs_keep_float32_logits_and_softmax():
  q, k, v = qkv((2, 16, 2, 32), dtype=jnp.bfloat16)
  bias = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16)) * 4, jnp.float32)
  out = layers.xla_attention(q * 4, k, v, bias)  # sharp softmax: float32 logits matter
  assert out.dtype == jnp.bfloat16
  expected = np_attention(q * 4, k, v, (bias,))  # the same bf16 inputs, float64 after
  # Only the probabilities' and the output's bf16 rounding remain (2^-8 relative each).
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


def test_swin_window_attention_equals_the_previous_tiled_bias():
  attn = swin.WindowAttention(num_heads=2, window=3, implementation='xla')
  x = jax.random.normal(jax.random.key(0), (2, 4, 9, 8))  # (batch, windows, n, c)
  mask = swin.shift_attention_mask((6, 6), 3, 1)  # (4, 9, 9)
  params = attn.init(jax.random.key(1), x, mask)
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape) * 0.3, params)

  def previous(params, x):  # the old WindowAttention: (B * nW, n, c) and a bias tiled over the images
    p = params['params']
    qkv_ = (x.reshape(8, 9, 8) @ p['qkv']['kernel'] + p['qkv']['bias']).reshape(8, 9, 3, 2, 4)
    bias = swin.gather_bias(p['relative_position_bias_table'], 3)
    bias = jnp.tile(bias[None] + mask[:, None], (2, 1, 1, 1))
    out = jax.nn.dot_product_attention(qkv_[:, :, 0], qkv_[:, :, 1], qkv_[:, :, 2], bias=bias).reshape(8, 9, 8)
    return (out @ p['proj']['kernel'] + p['proj']['bias']).reshape(2, 4, 9, 8)

  np.testing.assert_allclose(attn.apply(params, x, mask), previous(params, x), rtol=1e-5, atol=1e-5)
  w = jax.random.normal(jax.random.key(3), x.shape)
  g_new = jax.grad(lambda p: jnp.sum(attn.apply(p, x, mask) * w))(params)
  g_old = jax.grad(lambda p: jnp.sum(previous(p, x) * w))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_new, g_old)


# ------------------------------------------------------------------------------------------------------------
# model.attention: selection, and the cuDNN call's layout through the XLA kernel
# ------------------------------------------------------------------------------------------------------------

def test_selection_rules():
  bias = jnp.zeros((12, 197, 197))
  select = functools.partial(layers.select_attention, head_dim=64, lead=(8,), bias=bias)
  assert select('auto', jnp.bfloat16, platform='cuda') == ('cudnn', 'applies')
  assert select('cudnn', jnp.float16, platform='cuda')[0] == 'cudnn'
  assert select('xla', jnp.bfloat16, platform='cuda') == ('xla', 'requested')
  choice, why = select('auto', jnp.bfloat16, platform='cpu')
  assert choice == 'xla' and 'NVIDIA GPU' in why
  assert 'bfloat16/float16' in select('auto', jnp.float32, platform='cuda')[1]
  assert select('auto', jnp.bfloat16, platform='rocm')[0] == 'xla'
  for head_dim in (12, 160):  # not a multiple of 8; above 128
    assert 'head dim' in layers.select_attention('auto', jnp.bfloat16, head_dim, (8,), bias, platform='cuda')[1]
  # A per-window bias (Swin's shifted blocks) has no broadcasting form over one flat batch dim: XLA.
  window_terms = (jnp.zeros((4, 36, 36)), jnp.zeros((16, 1, 36, 36)))
  assert layers.select_attention('auto', jnp.bfloat16, 32, (8, 16), window_terms, platform='cuda')[0] == 'xla'
  assert layers.select_attention('auto', jnp.bfloat16, 32, (8, 16), jnp.zeros((4, 36, 36)),
                                 platform='cuda')[0] == 'cudnn'  # Swin's unshifted blocks
  assert 'per-example' in layers.select_attention('auto', jnp.bfloat16, 64, (8,), jnp.zeros((8, 1, 64, 64)),
                                                  platform='cuda')[1]  # text segments: XLA
  with pytest.raises(ValueError, match="'cudnn' cannot be used here: .*per-window"):
    layers.select_attention('cudnn', jnp.bfloat16, 32, (8, 16), window_terms, platform='cuda')
  with pytest.raises(ValueError, match="'cudnn' cannot be used here: .*NVIDIA GPU"):
    select('cudnn', jnp.bfloat16)  # this CPU
  with pytest.raises(ValueError, match='model.attention must be one of'):
    select('flash', jnp.bfloat16)


@pytest.mark.parametrize('shape,bias_shapes', [
    ((2, 7, 2, 8), [(2, 7, 7)]),  # odd length under a bias: padded to 8
    ((2, 8, 2, 8), [(2, 8, 8)]),
    ((2, 7, 2, 8), []),  # no bias: no padding
    ((2, 6, 2, 8), [(2, 1, 6, 6)]),  # text segments (per example)
    ((2, 3, 9, 2, 8), [(2, 9, 9)]),  # Swin's unshifted windows: batch and windows flattened
])
def test_cudnn_call_layout_gives_the_xla_results(shape, bias_shapes):
  """flash_attention reshapes and pads exactly as for cuDNN; with implementation='xla' it must give the
  XLA path's values and gradients (the bias's too) on any backend."""
  q, k, v = qkv(shape)
  terms = tuple(jax.random.normal(jax.random.key(10 + i), s) for i, s in enumerate(bias_shapes))
  w = jax.random.normal(jax.random.key(4), q.shape)
  flash = functools.partial(layers.flash_attention, implementation='xla')

  def loss(fn, q, k, v, terms):
    return jnp.sum(fn(q, k, v, terms or None) * w)

  np.testing.assert_allclose(flash(q, k, v, terms or None), layers.xla_attention(q, k, v, terms or None),
                             rtol=1e-5, atol=1e-6)
  ours = jax.grad(functools.partial(loss, flash), argnums=(0, 1, 2, 3))(q, k, v, terms)
  xla = jax.grad(functools.partial(loss, layers.xla_attention), argnums=(0, 1, 2, 3))(q, k, v, terms)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, xla)


def small_vit(attention: str):
  c = defaults.pretrain_config().model
  c.update(variant='Mu/4', image_size=32, drop_path_rate=0.1, attention=attention)  # 64 patches + cls: odd
  return models.build_simmim(c)


def vit_loss_and_grads(model):
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (2, 8, 8)).astype(jnp.int32)
  params = model.init(jax.random.key(2), images, mask)
  # The zero-initialised relative position table would hide a wrong bias path: give it values.
  table = params['params']['encoder']['rel_pos_bias']['relative_position_bias_table']
  params['params']['encoder']['rel_pos_bias']['relative_position_bias_table'] = jax.random.normal(
      jax.random.key(3), table.shape)

  def loss(p):
    out = model.apply(p, images, mask, train=True, rngs={'dropout': jax.random.key(4)})
    return jnp.mean(jnp.abs(out - images))

  return jax.jit(jax.value_and_grad(loss))(params)


def test_auto_falls_back_to_xla_on_cpu_and_the_cudnn_layout_agrees(monkeypatch):
  loss_xla, grads_xla = vit_loss_and_grads(small_vit('xla'))
  loss_auto, grads_auto = vit_loss_and_grads(small_vit('auto'))  # CPU: the XLA path, the same program
  np.testing.assert_array_equal(loss_auto, loss_xla)
  jax.tree.map(np.testing.assert_array_equal, grads_auto, grads_xla)
  # Where 'auto' picks cuDNN, the call is flash_attention: run it (padding 65 -> 66 tokens) on the XLA kernel.
  monkeypatch.setattr(layers, 'select_attention', lambda *args, **kwargs: ('cudnn', 'test'))
  monkeypatch.setattr(layers, 'flash_attention', functools.partial(layers.flash_attention, implementation='xla'))
  loss_flash, grads_flash = vit_loss_and_grads(small_vit('auto'))
  np.testing.assert_allclose(loss_flash, loss_xla, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads_flash, grads_xla)


def test_unusable_attention_settings_fail_at_build_or_trace():
  c = defaults.pretrain_config().model
  c.update(variant='Mu/4', image_size=32, attention='flash')
  with pytest.raises(ValueError, match='model.attention must be one of'):
    models.build_encoder(c)
  with pytest.raises(ValueError, match="'cudnn' cannot be used here"):  # this CPU
    jax.eval_shape(small_vit('cudnn').init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                   jnp.zeros((1, 8, 8), jnp.int32))
  v2 = swin.Swin(16, (2,), (2,), window_size=4, v2=True, attention='cudnn')
  with pytest.raises(ValueError, match="SwinV2's cosine attention runs on XLA"):
    jax.eval_shape(v2.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
