"""ViT encoder and pixel decoder: mask-token blending, sizes, PyTorch-compatible layouts, init rules."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simmim_jax import defaults, masking, models
from simmim_jax.models import heads, layers, vit


def small_vit(style: str) -> ml_collections.ConfigDict:
  c = defaults.pretrain_config().model
  c.update(variant='Mu/4', image_size=32, style=style, drop_path_rate=0.0)
  return c


@pytest.mark.parametrize('style', ['beit', 'plain'])
def test_pixels_inside_masked_patches_do_not_change_the_encoder_output(style):
  encoder = models.build_encoder(small_vit(style))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  mask = masking.image_mask(jax.random.key(0), 2, 32, 8, 4, 0.6)
  params = encoder.init(jax.random.key(1), images, mask)
  pixel_mask = np.asarray(masking.upsample(mask, 4))
  changed = np.where(pixel_mask > 0, rng.standard_normal(images.shape).astype(np.float32) * 5, images)
  out = encoder.apply(params, images, mask)
  np.testing.assert_array_equal(out, encoder.apply(params, changed, mask))
  # ...while visible pixels do matter, and without the mask the masked pixels matter too.
  assert not np.allclose(out, encoder.apply(params, np.where(pixel_mask > 0, images, images + 1), mask))
  assert not np.allclose(encoder.apply(params, images, None), encoder.apply(params, changed, None))


def vit_encoder_params_by_hand(width, depth, mlp, heads_, patch, grid, beit):
  """The official SimMIM ViT's parameter count (docs/REFERENCE.md section 8 shapes), or the plain ViT's."""
  block = (width * 3 * width + (2 * width if beit else 3 * width)  # qkv (+ q/v biases or full bias)
           + width * width + width                                   # attn.proj
           + width * mlp + mlp + mlp * width + width                 # mlp.fc1, fc2
           + 4 * width                                               # norm1, norm2
           + (2 * width if beit else 0))                             # gamma_1, gamma_2
  embed = width * 3 * patch * patch + width                          # patch_embed.proj
  tokens = 2 * width                                                 # cls_token, mask_token
  position = ((2 * grid - 1)**2 + 3) * heads_ if beit else (grid * grid + 1) * width
  return depth * block + embed + tokens + position + 2 * width       # final norm


@pytest.mark.parametrize('style', ['beit', 'plain'])
def test_vit_b16_parameter_count(style):
  c = defaults.pretrain_config().model
  c.style = style
  model = models.build_simmim(c)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 14, 14), jnp.int32))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  encoder = count(shapes['params']['encoder'])
  assert encoder == vit_encoder_params_by_hand(768, 12, 3072, 12, 16, 14, style == 'beit')
  if style == 'beit':
    assert encoder == 85_666_128  # 12 x 7,088,640 per block + 590,592 embed + 1,536 tokens + 732 x 12 + 1,536
    table = shapes['params']['encoder']['rel_pos_bias']['relative_position_bias_table']
    assert table.shape == (732, 12)
  # Decoder: 1x1 conv 768 -> 16*16*3 with bias.
  assert count(shapes['params']['decoder']) == 768 * 768 + 768


def test_variant_table_and_errors():
  assert vit.decode_variant('L/14') == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)
  with pytest.raises(ValueError, match='Unknown ViT variant'):
    vit.decode_variant('XL/16')


def test_pixel_shuffle_matches_pytorch_order():
  r, c = 2, 3
  x = np.arange(1 * 2 * 2 * c * r * r, dtype=np.float32).reshape(1, 2, 2, c * r * r)
  out = np.asarray(heads.pixel_shuffle(jnp.asarray(x), r))
  for h, w, ch, i, j in itertools.product(range(2), range(2), range(c), range(r), range(r)):
    assert out[0, h * r + i, w * r + j, ch] == x[0, h, w, ch * r * r + i * r + j]


def test_relative_position_index_matches_beit_definition():
  h, w = 3, 4
  index = layers.relative_position_index((h, w), with_cls=True)
  n, num_rel = h * w, (2 * h - 1) * (2 * w - 1)
  coords = [(i, j) for i in range(h) for j in range(w)]
  for a, b in itertools.product(range(n), range(n)):
    (ya, xa), (yb, xb) = coords[a], coords[b]
    assert index[a + 1, b + 1] == (ya - yb + h - 1) * (2 * w - 1) + (xa - xb + w - 1)
  assert (index[0, 1:] == num_rel).all() and (index[1:, 0] == num_rel + 1).all() and index[0, 0] == num_rel + 2


def test_beit_init_rules():
  c = defaults.pretrain_config().model
  c.update(variant='S/16', image_size=64)
  params = models.build_encoder(c).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 4, 4), jnp.int32))
  p = params['params']
  qkv = np.asarray(p['blocks_0']['attn']['qkv']['kernel'])
  # Truncated at +-1 std of 0.02: |w| <= 0.02 and std = 0.02 * 0.5396 (the +-1 truncated normal).
  assert np.abs(qkv).max() <= 0.02 + 1e-7
  np.testing.assert_allclose(qkv.std(), 0.02 * 0.5396, rtol=0.02)
  # attn.proj and mlp.fc2 of block i (from 1) are divided by sqrt(2 i).
  for i in (0, 5, 11):
    fc2 = np.asarray(p[f'blocks_{i}']['mlp']['fc2']['kernel'])
    np.testing.assert_allclose(fc2.std(), 0.02 * 0.5396 / np.sqrt(2 * (i + 1)), rtol=0.03)
  np.testing.assert_array_equal(p['blocks_3']['gamma_1'], np.float32(0.1))
  np.testing.assert_array_equal(p['blocks_3']['attn']['q_bias'], 0.0)
  assert 'bias' not in p['blocks_3']['attn']['qkv']



def test_plain_init_follows_timms_vision_transformer():
  """style='plain' draws every parameter as timm's VisionTransformer does (its init='' rules: std .02 Linear
  weights and position embedding, PyTorch's conv default for the patch embedding, cls token std 1e-6): mean and
  std of each kind of tensor against the same tensor of a timm model built at base.py's size."""
  torch = pytest.importorskip('torch')
  timm_vit = pytest.importorskip('timm.models.vision_transformer')
  p = models.build_encoder(small_vit('plain')).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  torch.manual_seed(0)
  t = dict(timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                                      num_classes=0).named_parameters())
  pairs = {'cls_token': p['cls_token'], 'pos_embed': p['pos_embed'],
           'patch_embed.proj.weight': p['patch_embed']['kernel'], 'patch_embed.proj.bias': p['patch_embed']['bias'],
           'blocks.5.attn.qkv.weight': p['blocks_5']['attn']['qkv']['kernel'],
           'blocks.5.attn.qkv.bias': p['blocks_5']['attn']['qkv']['bias'],
           'blocks.3.mlp.fc2.weight': p['blocks_3']['mlp']['fc2']['kernel'],
           'blocks.0.norm1.weight': p['blocks_0']['norm1']['scale']}
  for name, ours in pairs.items():
    ours, theirs = np.asarray(ours), t[name].detach().numpy()
    assert ours.size == theirs.size, name
    np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.25 if ours.size <= 128 else 0.05, atol=1e-9,
                               err_msg=name)
    np.testing.assert_allclose(ours.mean(), theirs.mean(), atol=4 * theirs.std() / np.sqrt(theirs.size) + 1e-9,
                               err_msg=name)

@pytest.mark.parametrize('patch,shape', [(16, (2, 48, 40, 3)), (4, (2, 34, 33, 3)), (4, (2, 17, 16, 16)),
                                         (1, (2, 7, 7, 12)), (1, (2, 3, 3, 256))])
def test_patch_conv_is_the_strided_conv(patch, shape):
  """layers.PatchConv (patches @ kernel from 256 inputs per patch and for 1x1, a conv below) has nn.Conv's
  parameters and init and gives its outputs; the image remainder a 'VALID' conv drops (34 = 8 x 4 + 2) is
  dropped too."""
  x = jax.random.normal(jax.random.key(0), shape)
  bias_init = layers.torch_bias_init(patch * patch * shape[-1])
  conv = nn.Conv(8, (patch, patch), strides=(patch, patch), padding='VALID', kernel_init=layers.torch_kernel_init,
                 bias_init=bias_init)
  ours = layers.PatchConv(8, patch, layers.torch_kernel_init, bias_init)
  params = conv.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), params)
  np.testing.assert_allclose(ours.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
