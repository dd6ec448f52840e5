"""Text encoder for masked modelling of sentencepiece ids: a pre-norm Transformer on the shared layers.

Packed rows: attention is masked across segments (an additive bias, -1e9 where segment ids differ) and the
learned absolute positions restart at 0 in every segment. Masked inputs have their embedding replaced by
the [MASK] row of the (tied) token embedding, as the image encoders blend in their mask token.

Parameter layout (Flax names, `/`-joined as in the .npz export; C width, M mlp_dim, V vocab, H heads):
  encoder/embedding/embedding          (V, C)   token embedding; also the output layer (tied)
  encoder/pos_embed                    (max_len, C)
  encoder/blocks_{i}/norm1/{scale,bias}          (C,)      pre-attention LayerNorm, eps 1e-6
  encoder/blocks_{i}/attn/qkv/{kernel,bias}      (C, 3C), (3C,)  x @ kernel; outputs [q | k | v], each (H, C/H)
  encoder/blocks_{i}/attn/proj/{kernel,bias}     (C, C), (C,)
  encoder/blocks_{i}/norm2/{scale,bias}          (C,)
  encoder/blocks_{i}/mlp/fc1/{kernel,bias}       (C, M), (M,)   exact-erf GELU between fc1 and fc2
  encoder/blocks_{i}/mlp/fc2/{kernel,bias}       (M, C), (C,)
  encoder/norm/{scale,bias}                      (C,)      final LayerNorm
  head/dense/{kernel,bias}, head/norm/{scale,bias}, head/bias (V,)   the masked-LM head (pretraining only)
  head/{kernel,bias}                             (C, classes), (classes,)   TextClassifier's head (fine-tuning)
Dense kernels are (in, out): a PyTorch nn.Linear weight is the transpose.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simmim_jax.models import heads, layers

# name -> (width, depth, mlp_dim, num_heads): the BERT sizes (Turc et al. 2019 for the small ones).
VARIANTS = {
    'tiny': (128, 2, 512, 2),
    'mini': (256, 4, 1024, 4),
    'small': (512, 4, 2048, 8),
    'medium': (512, 8, 2048, 8),
    'base': (768, 12, 3072, 12),
    'large': (1024, 24, 4096, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
  """'base' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12)."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown text variant {variant!r}: use one of {list(VARIANTS)}.')
  return dict(zip(('width', 'depth', 'mlp_dim', 'num_heads'), VARIANTS[variant]))


def segment_bias(segment_ids: jax.Array) -> jax.Array:
  """(B, L) segment ids -> (B, 1, L, L) additive attention bias: 0 within a segment, -1e9 across."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return jnp.where(same, 0.0, -1e9)[:, None].astype(jnp.float32)


class TextEncoder(nn.Module):
  """Ids, segment ids, positions (B, L) and a {0,1} mask -> features (B, L, width)."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  mask_id: int = 3
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention: str = 'auto'  # model.attention (layers.select_attention)
  remat: str = 'none'  # model.remat (layers.remat)

  no_weight_decay: ClassVar[tuple[str, ...]] = ()  # as BERT: only norms and biases (1-d) are exempt

  def setup(self):
    self.embedding = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, embedding_init=layers.trunc_init)
    self.pos_embed = self.param('pos_embed', layers.trunc_init, (self.max_len, self.width))
    block = layers.remat(layers.Block, self.remat, static_argnums=(3,))  # (self, x, bias, train)
    self.blocks = [block(self.num_heads, self.mlp_dim, drop_path=float(rate), dtype=self.dtype,
                         attention=self.attention)
                   for rate in np.linspace(0, self.drop_path_rate, self.depth)]
    self.norm = layers.layer_norm(1e-6)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
               mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    x = self.embedding(tokens)
    if mask is not None:
      w = mask[..., None].astype(x.dtype)
      x = x * (1 - w) + self.embedding(jnp.asarray(self.mask_id)) * w
    x = x + jnp.take(self.pos_embed, positions, axis=0).astype(x.dtype)
    bias = segment_bias(segment_ids)
    for block in self.blocks:
      x = block(x, bias, train)
    return self.norm(x)

  def attend(self, x: jax.Array) -> jax.Array:
    """Features -> logits over the vocabulary with the tied token embedding."""
    return self.embedding.attend(x)


class MaskedLM(nn.Module):
  """Encoder + token head on the gathered masked positions: (B, L) inputs, (B, K) positions -> (B, K, V)."""
  encoder: TextEncoder

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array, mask: jax.Array,
               gather: jax.Array, train: bool = False) -> jax.Array:
    features = self.encoder(tokens, segment_ids, positions, mask, train=train)
    # Gather first: the vocabulary projection runs on K masked positions per row, not all L.
    picked = jnp.take_along_axis(features, gather[..., None], axis=1)
    return heads.TokenHead(self.encoder.vocab_size, self.encoder.dtype, name='head')(picked, self.encoder.attend)


POOLS = ('mean', 'first')


class TextClassifier(nn.Module):
  """Rows of ids, segment ids, positions (B, L) -> logits (B, num_classes) in float32: the encoder's features
  averaged over the real tokens (segment id > 0: padding never counted) or the first token's, dropout, a linear
  head. frozen=True is the linear probe, as models/classifier.Classifier: the encoder in inference mode under
  stop_gradient, and an optional parameter-free BatchNorm before the head."""
  encoder: TextEncoder
  num_classes: int
  pool: str = 'mean'
  dropout: float = 0.0
  head_init: Any = layers.trunc_init
  frozen: bool = False
  batch_norm: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
               train: bool = False) -> jax.Array:
    features = self.encoder(tokens, segment_ids, positions, train=train and not self.frozen)
    if self.frozen:
      features = jax.lax.stop_gradient(features)
    features = features.astype(jnp.float32)
    if self.pool == 'first':
      x = features[:, 0]
    else:
      real = (segment_ids > 0).astype(jnp.float32)[..., None]
      x = jnp.sum(features * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False, use_scale=False,
                       name='bn')(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=self.head_init, name='head')(x)


def build(model, dtype) -> TextEncoder:
  """The encoder for a config.model with name 'text'."""
  return TextEncoder(**decode_variant(model.variant), vocab_size=model.vocab_size, max_len=model.max_len,
                     mask_id=model.mask_id, drop_path_rate=model.drop_path_rate, dtype=dtype,
                     attention=model.get('attention', 'auto'), remat=model.get('remat', 'none'))
