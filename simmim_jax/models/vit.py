"""Vision Transformer encoder: the official SimMIM (BEiT-style) ViT and the plain ViT, one variant table."""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simmim_jax.models import layers

# name -> (width, depth, mlp_dim, num_heads). 'Mu' is a CPU-sized extra for the embedded default.
VARIANTS = {
    'Mu': (128, 6, 512, 4),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  name, _, patch = variant.partition('/')
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"Unknown ViT variant {variant!r}: use NAME/PATCH with NAME in {sorted(VARIANTS)}, e.g. 'B/16'.")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(patch))


class ViT(nn.Module):
  """Images (B, H, W, C) and a token mask (B, H/p, W/p) -> features (B, H/p, W/p, width).

  style='beit' is the official SimMIM ViT: no absolute position embedding, one relative position bias
  shared by all blocks, layer scale 0.1, q/v biases, its init rules. style='plain': a learned absolute
  position embedding and a full qkv bias. Masked patch tokens are replaced by the mask token right after
  the patch embedding, before the cls token is prepended (as the official code does).

  Fine-tuning (official and timm Beit) gives every block its own relative position table (rel_pos='per_block')
  and drops the final norm for mean pooling + fc_norm (final_norm=False); a linear probe takes the features of
  an early block by building only that many blocks (depth=k, final_norm=False).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int
  style: str = 'beit'
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  rel_pos: str = 'shared'  # beit only: one table for all blocks (pretraining) or 'per_block' (fine-tuning)
  final_norm: bool = True
  attention: str = 'auto'  # model.attention: 'auto' | 'xla' | 'cudnn' (layers.select_attention)
  remat: str = 'none'  # model.remat: 'none' | 'block' | a jax.checkpoint_policies name (layers.remat)

  # Official no-weight-decay names. The official ViT has no keyword exemptions, so its mask_token and relative
  # position tables DO get decay, in pretraining and in fine-tuning (per-block tables) alike.
  no_weight_decay: ClassVar[tuple[str, ...]] = ('pos_embed', 'cls_token')

  @property
  def stride(self) -> int:
    """Pixels per output feature (the decoder's encoder_stride)."""
    return self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    if self.style not in ('beit', 'plain'):
      raise ValueError(f"model.style must be 'beit' or 'plain', got {self.style!r}.")
    if self.rel_pos not in ('shared', 'per_block'):
      raise ValueError(f"ViT rel_pos must be 'shared' or 'per_block', got {self.rel_pos!r}.")
    beit = self.style == 'beit'
    p, c = self.patch_size, self.width
    init = layers.beit_init if beit else layers.trunc_init
    if beit:  # the official _init_weights covers the Conv2d patch embedding too: init (+-1 std), bias 0
      embed_init, embed_bias_init = init, nn.initializers.zeros
    else:  # timm's plain ViT initialises only Linear layers: PyTorch's default conv init
      embed_init, embed_bias_init = layers.torch_kernel_init, layers.torch_bias_init(p * p * images.shape[-1])
    x = layers.PatchConv(c, p, embed_init, embed_bias_init, self.dtype, name='patch_embed')(images)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, c)
    if mask is not None:
      mask_token = self.param('mask_token', init, (1, 1, c))
      w = mask.reshape(b, gh * gw, 1).astype(x.dtype)
      x = x * (1 - w) + mask_token.astype(x.dtype) * w
    # timm's plain ViT draws its cls token from normal(std=1e-6), not the std .02 of every other weight
    cls_token = self.param('cls_token', init if beit else nn.initializers.normal(1e-6), (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, c)), x], axis=1)
    bias, block_grid = None, None
    if beit and self.rel_pos == 'shared':
      bias = layers.RelativePositionBias((gh, gw), self.num_heads, name='rel_pos_bias')()
    elif beit:
      block_grid = (gh, gw)
    else:
      x = x + self.param('pos_embed', init, (1, gh * gw + 1, c)).astype(x.dtype)

    block = layers.remat(layers.Block, self.remat, static_argnums=(3,))  # (self, x, bias, train)
    for i, rate in enumerate(np.linspace(0, self.drop_path_rate, self.depth)):
      residual_init = layers.scaled_init(init, np.sqrt(2.0 * (i + 1))) if beit else None
      x = block(self.num_heads, self.mlp_dim, qkv_bias='qv' if beit else 'full',
                layer_scale=0.1 if beit else None, drop_path=float(rate), kernel_init=init,
                residual_init=residual_init, dtype=self.dtype, rel_pos_grid=block_grid,
                attention=self.attention, name=f'blocks_{i}')(x, bias, train)
    if self.final_norm:
      x = layers.layer_norm(1e-6, 'norm')(x)
    return x[:, 1:].reshape(b, gh, gw, c)
