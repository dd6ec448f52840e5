"""Swin / SwinV2 encoders: shapes, parameter counts, shifted-window locality, mask invariance, norm_target.
Training checks (devices, end to end, recipes) are in test_swin_training.py."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import config_io, losses, masking, models, optim
from simmim_jax.models import swin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  return os.path.join(ROOT, 'configs', name)


def abstract_params(model: swin.Swin, size: int, with_mask: bool = True):
  """Parameter shapes of an encoder at this image size, without computing anything."""
  grid = size // model.patch_size
  mask = jnp.zeros((1, grid, grid), jnp.int32) if with_mask else None
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), mask))


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------------------
# Shapes and parameter counts
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,size,window,channels', [
    ('T', 192, 6, 768), ('T', 224, 7, 768), ('B', 192, 6, 1024), ('B', 224, 7, 1024),
    ('L', 192, 12, 1536), ('L', 224, 7, 1536)])
def test_output_shapes(variant, size, window, channels):
  # Compute in bfloat16 as the recipes do; the final norm hands float32 features to the decoder.
  model = swin.Swin(**swin.decode_variant(variant), window_size=window, dtype=jnp.bfloat16)
  assert model.stride == 32 and model.patch_size == 4
  params = abstract_params(model, size)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((2, size // 4, size // 4), jnp.int32)
  out = jax.eval_shape(lambda p, x, m: model.apply(p, x, m), params, images, mask)
  assert out.shape == (2, size // 32, size // 32, channels) and out.dtype == jnp.float32


def test_tiny_cpu_variant_has_three_stages():
  model = swin.Swin(**swin.decode_variant('Mu'), window_size=4)
  assert model.stride == 16
  out = jax.eval_shape(lambda p: model.apply(p, jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 8, 8), jnp.int32)),
                       abstract_params(model, 32))
  assert out.shape == (2, 2, 2, 192)


def reference_count(embed: int, depths, heads, size: int, window: int, v2: bool = False) -> int:
  """Parameters of the official SwinTransformer(V2) with num_classes=0, from the architecture alone.

  Per block of width C (mlp ratio 4): norm1, norm2 2C each; V1 qkv 3C^2 + 3C, V2 qkv 3C^2 + q_bias, v_bias
  2C; proj C^2 + C; fc1 4C^2 + 4C; fc2 4C^2 + C; V1 relative table (2w-1)^2 x heads with w the stage's
  window (min(window, resolution)); V2 logit_scale (heads) and cpb_mlp (2x512 + 512 + 512 x heads).
  Patch merging of C: V1 norm 2x4C + reduction 4C x 2C; V2 reduction 4C x 2C + norm 2x2C.
  Patch embedding: conv 3x4x4xC + C, its norm 2C. Final norm 2 C_final.
  """
  total = 3 * 16 * embed + embed + 2 * embed
  resolution = size // 4
  for s, (depth, h) in enumerate(zip(depths, heads)):
    c, w = embed * 2**s, min(window, resolution)
    if v2:
      block = 12 * c * c + 12 * c + h + (2 * 512 + 512 + 512 * h)
    else:
      block = 12 * c * c + 13 * c + (2 * w - 1)**2 * h
    total += depth * block
    if s < len(depths) - 1:
      total += 8 * c * c + (4 * c if v2 else 8 * c)
      resolution //= 2
  return total + 2 * embed * 2**(len(depths) - 1)


def test_reference_formula_reproduces_the_published_swin_sizes():
  # timm's swin_{tiny,small,base,large}_patch4_window7_224 (1000-class head: C_final x 1000 + 1000).
  published = {'T': 28_288_354, 'S': 49_606_258, 'B': 87_768_224, 'L': 196_532_476}
  for variant, expected in published.items():
    embed, depths, heads = swin.VARIANTS[variant]
    final = embed * 2**(len(depths) - 1)
    assert reference_count(embed, depths, heads, 224, 7) + final * 1000 + 1000 == expected


@pytest.mark.parametrize('name,variant,window,expected', [
    ('swin', 'B', 6, 86_725_304),     # Swin-B 192/6: 86,725,176 + mask token 128
    ('swin', 'L', 12, 195_159_540),   # Swin-L 192/12: 195,159,348 + mask token 192
    ('swinv2', 'B', 12, 86_893_944),  # SwinV2-B 192/12: 86,893,816 + mask token 128
])
def test_parameter_counts_equal_the_official_architecture(name, variant, window, expected):
  embed, depths, heads = swin.VARIANTS[variant]
  assert reference_count(embed, depths, heads, 192, window, v2=name == 'swinv2') + embed == expected
  model = swin.Swin(embed, depths, heads, window_size=window, v2=name == 'swinv2')
  params = abstract_params(model, 192)['params']
  assert count(params) == expected
  assert params['mask_token'].shape == (1, 1, embed)
  assert count(abstract_params(model, 192, with_mask=False)) == expected - embed  # fine-tuning: no mask token
  if name == 'swin':  # the window-size rule in the table shapes: 192 px / window 12 -> stage 4 is one 6x6 window
    assert params['layers_0']['blocks_0']['attn']['relative_position_bias_table'].shape == ((2 * window - 1)**2,
                                                                                             heads[0])
    assert params['layers_3']['blocks_0']['attn']['relative_position_bias_table'].shape == (121, heads[3])
    assert params['layers_0']['downsample']['reduction']['kernel'].shape == (4 * embed, 2 * embed)
    assert params['layers_0']['downsample']['norm']['scale'].shape == (4 * embed,)
  else:
    assert params['layers_0']['downsample']['norm']['scale'].shape == (2 * embed,)
    assert params['layers_0']['blocks_0']['attn']['logit_scale'].shape == (heads[0], 1, 1)


def test_no_weight_decay_names_reach_the_official_exemptions():
  """Fine-tuning (exempt_keywords): every official name and keyword; pretraining: the names only (the official
  SimMIM wrapper's 'encoder.' prefix keeps the keywords from matching; the full rule is checked against the
  official one in tests/test_official_recipe.py)."""
  model = swin.Swin(**swin.decode_variant('Mu'), window_size=4, v2=True, exempt_keywords=True)
  params = abstract_params(model, 32)['params']
  mask = optim.decay_mask(params, model.no_weight_decay)
  attn = mask['layers_0']['blocks_0']['attn']
  assert not mask['mask_token'] and not attn['cpb_mlp']['0']['kernel'] and not attn['logit_scale']
  assert attn['qkv']['kernel'] and attn['proj']['kernel'] and not attn['q_bias']
  v1 = swin.Swin(**swin.decode_variant('Mu'), window_size=4, exempt_keywords=True)
  v1_mask = optim.decay_mask(abstract_params(v1, 32)['params'], v1.no_weight_decay)
  assert not v1_mask['layers_0']['blocks_0']['attn']['relative_position_bias_table']
  pretraining = optim.decay_mask(params, model.clone(exempt_keywords=False).no_weight_decay)
  attn = pretraining['layers_0']['blocks_0']['attn']
  assert not pretraining['mask_token'] and attn['cpb_mlp']['0']['kernel'] and attn['logit_scale']


def test_bad_window_fails_with_a_clear_message():
  with pytest.raises(ValueError, match='cannot be tiled by 5x5 windows'):
    abstract_params(swin.Swin(**swin.decode_variant('T'), window_size=5), 192)
  with pytest.raises(ValueError, match='Unknown Swin variant'):
    swin.decode_variant('XL')


# ------------------------------------------------------------------------------------------------------------
# Blocks: a token reaches exactly the tokens of its (shifted) window; the forward equals the official one
# ------------------------------------------------------------------------------------------------------------

def randomized(params, seed: int = 2, scale: float = 0.2):
  """Every parameter redrawn from N(0, scale^2): the init's zeros and tiny weights would hide mistakes."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, p.shape) * scale for k, p in zip(keys, leaves)])


def segments(size: int, window: int, shift: int) -> np.ndarray:
  """Segment id per position along one axis: windows start at `shift` + k * window, and the wrapped-around
  part (the first `shift` positions) is a segment of its own, so shifted windows never wrap."""
  bounds = sorted({0, size, *range(shift, size, window)})
  ids = np.zeros(size, int)
  for i, start in enumerate(bounds[:-1]):
    ids[start:] = i
  return ids


@pytest.mark.parametrize('v2', [False, True])
@pytest.mark.parametrize('shift', [0, 2])
def test_perturbing_a_token_changes_only_its_window(v2, shift):
  size, window = 8, 4
  block = swin.SwinBlock(num_heads=2, window=window, shift=shift, v2=v2)
  x = jax.random.normal(jax.random.key(0), (1, size, size, 8))
  params = randomized(block.init(jax.random.key(1), x))  # every allowed interaction clearly visible
  apply = jax.jit(block.apply)
  base = apply(params, x)
  seg = segments(size, window, shift)
  for (i, j) in [(0, 0), (1, 6), (3, 3), (5, 2), (7, 7)]:
    changed = np.abs(np.asarray(apply(params, x.at[0, i, j, 0].add(5.0)) - base))[0].max(-1)
    expected = (seg[:, None] == seg[i]) & (seg[None, :] == seg[j])
    assert (changed[expected] > 1e-3).all(), (i, j)
    assert (changed[~expected] < 1e-6).all(), (i, j)


def np_layer_norm(x: np.ndarray, p) -> np.ndarray:
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(p['scale']) + np.asarray(p['bias'])


def np_dense(x: np.ndarray, p) -> np.ndarray:
  return x @ np.asarray(p['kernel']) + (np.asarray(p['bias']) if 'bias' in p else 0.0)


def np_block(p, x: np.ndarray, window: int, shift: int, heads: int, v2: bool) -> np.ndarray:
  """The official SwinTransformerBlock (V1) / SwinV2 block forward, window by window, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, h, w, c = x.shape
  n, d, a = window * window, c // heads, p['attn']
  y = x if v2 else np_layer_norm(x, p['norm1'])
  y = np.roll(y, (-shift, -shift), (1, 2))
  labels = np.zeros((h, w))  # regions of the rolled map, as the official img_mask
  if shift:
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for k, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
      labels[hs, ws] = k
  pos = np.array([(i, j) for i in range(window) for j in range(window)])
  offsets = pos[:, None] - pos[None]  # (n, n, 2): query minus key
  index = (offsets[..., 0] + window - 1) * (2 * window - 1) + offsets[..., 1] + window - 1
  if v2:
    span = np.arange(-(window - 1), window) / (window - 1) * 8
    coords = np.array([(u, v) for u in span for v in span])
    coords = np.sign(coords) * np.log2(np.abs(coords) + 1) / 3
    cpb = a['cpb_mlp']
    table = np.maximum(coords @ cpb['0']['kernel'] + cpb['0']['bias'], 0) @ cpb['2']['kernel']
    rel = 16 / (1 + np.exp(-table[index]))  # (n, n, heads)
  else:
    rel = a['relative_position_bias_table'][index]
  out = np.zeros_like(y)
  for img in range(b):
    for wi in range(h // window):
      for wj in range(w // window):
        rows, cols = slice(wi * window, (wi + 1) * window), slice(wj * window, (wj + 1) * window)
        tokens = y[img, rows, cols].reshape(n, c)
        region = labels[rows, cols].reshape(n)
        if v2:
          qkv = tokens @ a['qkv']['kernel'] + np.concatenate([a['q_bias'], np.zeros(c), a['v_bias']])
        else:
          qkv = np_dense(tokens, a['qkv'])
        q, k, v = (qkv[:, i * c:(i + 1) * c].reshape(n, heads, d) for i in range(3))
        mixed = np.zeros((n, heads, d))
        for hd in range(heads):
          if v2:
            qn = q[:, hd] / np.linalg.norm(q[:, hd], axis=-1, keepdims=True)
            kn = k[:, hd] / np.linalg.norm(k[:, hd], axis=-1, keepdims=True)
            logits = qn @ kn.T * np.exp(min(a['logit_scale'][hd, 0, 0], np.log(100)))
          else:
            logits = q[:, hd] * d**-0.5 @ k[:, hd].T
          logits = logits + rel[..., hd] + np.where(region[:, None] != region[None], -100.0, 0.0)
          probs = np.exp(logits - logits.max(-1, keepdims=True))
          mixed[:, hd] = probs / probs.sum(-1, keepdims=True) @ v[:, hd]
        out[img, rows, cols] = np_dense(mixed.reshape(n, c), a['proj']).reshape(window, window, c)
  y = np.roll(out, (shift, shift), (1, 2))

  def mlp(t):
    t = np_dense(t, p['mlp']['fc1'])
    return np_dense(0.5 * t * (1 + np.vectorize(math.erf)(t / np.sqrt(2))), p['mlp']['fc2'])

  if v2:
    x = x + np_layer_norm(y, p['norm1'])
    return x + np_layer_norm(mlp(x), p['norm2'])
  x = x + y
  return x + mlp(np_layer_norm(x, p['norm2']))


@pytest.mark.parametrize('v2', [False, True])
@pytest.mark.parametrize('shift', [0, 2])
def test_block_matches_a_numpy_reference_of_the_official_forward(v2, shift):
  block = swin.SwinBlock(num_heads=2, window=4, shift=shift, v2=v2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  params = randomized(block.init(jax.random.key(1), x))
  if v2:  # one head above the clamp at log(100), one below
    params['params']['attn']['logit_scale'] = jnp.array([6.0, 0.5]).reshape(2, 1, 1)
  expected = np_block(params['params'], np.asarray(x, np.float64), 4, shift, 2, v2)
  np.testing.assert_allclose(np.asarray(block.apply(params, x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('v2', [False, True])
def test_patch_merging_matches_the_official_order(v2):
  merge = swin.PatchMerging(v2=v2)
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
  params = randomized(merge.init(jax.random.key(1), x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
  xn = np.asarray(x, np.float64)
  cat = np.concatenate([xn[:, 0::2, 0::2], xn[:, 1::2, 0::2], xn[:, 0::2, 1::2], xn[:, 1::2, 1::2]], -1)
  expected = (np_layer_norm(np_dense(cat, p['reduction']), p['norm']) if v2
              else np_dense(np_layer_norm(cat, p['norm']), p['reduction']))
  np.testing.assert_allclose(np.asarray(merge.apply(params, x)), expected, rtol=1e-4, atol=1e-4)


def test_shift_attention_mask_matches_the_official_regions():
  mask = swin.shift_attention_mask((8, 8), 4, 2)  # 4 windows of 16 tokens
  assert mask.shape == (4, 16, 16) and set(np.unique(mask)) == {0.0, -100.0}
  assert (mask[0] == 0).all()  # the top-left window holds one region only
  # The bottom-right window holds 4 regions of 2x2 tokens: each token sees 4 of 16.
  assert ((mask[3] == 0).sum(-1) == 4).all()
  assert ((mask[1] == 0).sum(-1) == 8).all() and ((mask[2] == 0).sum(-1) == 8).all()


def test_stage_window_rule():
  assert swin.stage_window((48, 48), 6) == (6, 3)
  assert swin.stage_window((6, 6), 6) == (6, 0)
  assert swin.stage_window((12, 12), 12) == (12, 0)
  assert swin.stage_window((6, 6), 12) == (6, 0)


def test_log_spaced_coords_and_pretrained_window_from_the_config():
  coords = swin.log_spaced_coords(12, 0)
  assert coords.shape == (23, 23, 2)
  np.testing.assert_allclose(coords[0, 0], [-np.log2(9) / 3] * 2, rtol=1e-6)  # offset -11 -> -8 -> -log2(9)/3
  np.testing.assert_allclose(coords[11, 11], [0, 0])
  transferred = swin.log_spaced_coords(12, 6)  # a window-6 model fine-tuned at window 12: offsets reach 11/5 x 8
  np.testing.assert_allclose(transferred[22, 11], [np.log2(11 / 5 * 8 + 1) / 3, 0], rtol=1e-6)
  assert np.isfinite(swin.log_spaced_coords(1, 0)).all()  # one-token windows: finite (the official divides by 0)

  config = config_io.load_config(config_path('simmim_swinv2_base.py'))
  config.model.pretrained_window_sizes = (6, 6, 6, 3)
  encoder = models.build_encoder(config.model)
  assert encoder.v2 and encoder.pretrained_window_sizes == (6, 6, 6, 3) and encoder.dtype == jnp.bfloat16
  del config.model['pretrained_window_sizes']  # configs written before the field still build
  assert models.build_encoder(config.model).pretrained_window_sizes is None


# ------------------------------------------------------------------------------------------------------------
# SimMIM masking: the pixels of masked patches never reach the encoder output
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('v2', [False, True])
def test_masked_pixels_do_not_change_the_encoder_output(v2):
  # Two stages (8x8 tokens in shifted 4x4 windows, then one 4x4 window) keep the compile short.
  model = swin.Swin(16, (2, 2), (2, 4), window_size=4, v2=v2)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  mask = masking.image_mask(jax.random.key(1), 2, 32, 8, 4, 0.6)
  params = model.init(jax.random.key(2), images, mask)
  if v2:  # res-post-norms start at zero scale (blocks are identities); give them weight so attention matters
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 1.0 if 'norm1' in str(path) or 'norm2' in str(path) else p, params)
  apply = jax.jit(model.apply)
  out = apply(params, images, mask)
  pixel_mask = masking.upsample(mask, 4)
  noise = jax.random.normal(jax.random.key(3), images.shape) * 10
  np.testing.assert_array_equal(apply(params, images + noise * pixel_mask, mask), out)
  assert np.abs(apply(params, images + noise * (1 - pixel_mask), mask) - out).max() > 1e-3


# ------------------------------------------------------------------------------------------------------------
# norm_target against the official formula, with explicit windows
# ------------------------------------------------------------------------------------------------------------

def norm_target_reference(images: np.ndarray, window: int) -> np.ndarray:
  """The official norm_targets pixel by pixel: mean and unbiased variance over the real pixels of the window
  (avg_pool with count_include_pad=False), variance clamped at 0, (x - mean) / sqrt(var + 1e-6)."""
  b, h, w, c = images.shape
  r = window // 2
  out = np.zeros_like(images, dtype=np.float64)
  for n in range(b):
    for y in range(h):
      for x in range(w):
        for ch in range(c):
          patch = images[n, max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1, ch].astype(np.float64)
          count = patch.size
          mean = patch.sum() / count
          var = max((np.sum(patch**2) / count - mean**2) * count / (count - 1), 0.0)
          out[n, y, x, ch] = (images[n, y, x, ch] - mean) / np.sqrt(var + 1e-6)
  return out


def test_norm_target_matches_the_official_formula():
  images = np.random.default_rng(0).standard_normal((2, 12, 12, 3)).astype(np.float32) * 2 + 0.5
  images[1, :6, :6, 0] = 1.25  # a flat area: variance 0 there, only eps keeps it finite
  expected = norm_target_reference(images, 5)
  # atol: in the flat area E[x^2] - E[x]^2 cancels to float32 noise (~1e-7), as in the official float32 code.
  np.testing.assert_allclose(np.asarray(losses.normalize_target(jnp.asarray(images), 5)), expected,
                             rtol=1e-4, atol=5e-4)
  with pytest.raises(ValueError, match='odd'):
    losses.normalize_target(jnp.asarray(images), 4)
