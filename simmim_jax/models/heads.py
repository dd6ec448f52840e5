"""Output heads: SimMIM's pixel decoder (1x1 conv + PixelShuffle)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from simmim_jax.models import layers


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """(B, H, W, C*r*r) -> (B, H*r, W*r, C) with PyTorch's channel order: in[c*r*r + i*r + j] -> out[h*r+i, w*r+j, c]."""
  b, h, w, crr = x.shape
  c = crr // (r * r)
  x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c)


class PixelDecoder(nn.Module):
  """Features (B, h, w, C) -> pixels (B, h*stride, w*stride, out_chans); PyTorch default conv init."""
  encoder_stride: int
  out_chans: int = 3

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    fan_in = features.shape[-1]
    x = nn.Conv(self.encoder_stride**2 * self.out_chans, (1, 1), dtype=features.dtype,
                kernel_init=layers.torch_kernel_init, bias_init=layers.torch_bias_init(fan_in),
                name='conv')(features)
    return pixel_shuffle(x, self.encoder_stride).astype(jnp.float32)


class TokenHead(nn.Module):
  """BERT's masked-LM head: dense -> GELU -> LayerNorm -> tied embedding (`decode`) + a bias per id.

  Applied to the gathered masked positions only (B, K, C), never to every position.
  """
  vocab_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, decode) -> jax.Array:
    x = nn.Dense(features.shape[-1], dtype=self.dtype, kernel_init=layers.trunc_init, name='dense')(features)
    x = layers.layer_norm(1e-12, 'norm')(nn.gelu(x, approximate=False)).astype(self.dtype)
    logits = decode(x) + self.param('bias', nn.initializers.zeros, (self.vocab_size,)).astype(self.dtype)
    return logits.astype(jnp.float32)
