"""Swin and SwinV2 encoders for SimMIM, with the semantics of microsoft/Swin-Transformer; one variant table.

Parameter names follow the PyTorch state dict (docs/REFERENCE.md section 8): `layers_{s}/blocks_{j}/attn/qkv` is
`layers.{s}.blocks.{j}.attn.qkv`, `layers_{s}/downsample/reduction`, `patch_embed/proj`, `norm`, `mask_token`;
SwinV2's `attn/cpb_mlp/0` and `attn/cpb_mlp/2` are `attn.cpb_mlp.0` and `attn.cpb_mlp.2`.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simmim_jax.models import layers

# name -> (embed_dim, depths, num_heads). 'Mu' is a CPU-sized extra (3 stages, stride 16) for the tiny config.
VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    'Mu': (48, (2, 2, 2), (3, 6, 12)),
    'T': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'S': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'B': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'L': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
NORM_EPS = 1e-5  # Swin uses PyTorch's nn.LayerNorm default everywhere
MLP_RATIO = 4
SHIFT_MASK_VALUE = -100.0  # the official additive mask between regions that a cyclic shift brought together
MAX_LOGIT_SCALE = float(np.log(1.0 / 0.01))  # SwinV2 clamps the learned cosine-attention temperature at 100


def decode_variant(variant: str) -> dict[str, Any]:
  """'B' -> dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown Swin variant {variant!r}: use one of {sorted(VARIANTS)}.')
  embed_dim, depths, num_heads = VARIANTS[variant]
  return dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads)


def stage_window(resolution: tuple[int, int], window: int) -> tuple[int, int]:
  """(window, shift) of a stage: a stage not larger than the window is one unshifted window of its size."""
  if min(resolution) <= window:
    return min(resolution), 0
  return window, window // 2


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order per image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, grid: tuple[int, int]) -> jax.Array:
  """(B * nW, window * window, C) -> (B, H, W, C); the inverse of window_partition."""
  h, w = grid
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def shift_attention_mask(grid: tuple[int, int], window: int, shift: int) -> np.ndarray:
  """(nW, n, n) additive mask: 0 within a region, -100 across the regions a cyclic shift made adjacent."""
  regions = np.zeros(grid, np.float32)
  cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
    regions[hs, ws] = i
  labels = np.asarray(window_partition(regions[None, :, :, None], window))[..., 0]  # (nW, n)
  return np.where(labels[:, None, :] != labels[:, :, None], SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def log_spaced_coords(window: int, pretrained_window: int) -> np.ndarray:
  """SwinV2's (2w-1, 2w-1, 2) relative coordinates, scaled to [-8, 8] then sign * log2(1 + |x|) / 3."""
  span = np.arange(-(window - 1), window, dtype=np.float32)
  coords = np.stack(np.meshgrid(span, span, indexing='ij'), axis=-1)
  # The official code divides by (window - 1) and so gives NaN for a 1-token window; 1 keeps it finite.
  coords = coords / max((pretrained_window if pretrained_window > 0 else window) - 1, 1) * 8
  return (np.sign(coords) * np.log2(np.abs(coords) + 1.0) / np.log2(8)).astype(np.float32)


def gather_bias(table: jax.Array, window: int) -> jax.Array:
  """A ((2w-1)^2, heads) table -> (heads, n, n) bias for every token pair of a window."""
  index = layers.relative_position_index((window, window), with_cls=False).reshape(-1)
  n = window * window
  return table[index].reshape(n, n, -1).transpose(2, 0, 1)


class WindowAttention(layers.Attention):
  """Swin V1 window attention on (batch, windows, n, c): the shared attention plus a learned relative
  position table per block."""
  window: int = 7

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
    rows = (2 * self.window - 1)**2
    table = self.param('relative_position_bias_table', layers.trunc_init, (rows, self.num_heads))
    bias = gather_bias(table, self.window)  # (heads, n, n), shared by every window of every image
    if mask is None:
      return super().__call__(x, bias)
    # The shift mask (windows, 1, n, n) is its own term: it broadcasts over images and heads inside the
    # logits, and the table's gradient is summed over images and windows in one pass (no tiled bias).
    return super().__call__(x, (bias, mask[:, None]))


class ContinuousPositionBias(nn.Module):
  """SwinV2's position bias: an MLP (2 -> 512 -> heads, ReLU) on log-spaced offsets, as a (heads, n, n) table."""
  num_heads: int
  window: int
  pretrained_window: int = 0

  @nn.compact
  def __call__(self) -> jax.Array:
    coords = log_spaced_coords(self.window, self.pretrained_window).reshape(-1, 2)
    hidden = nn.relu(nn.Dense(512, kernel_init=layers.trunc_init, name='0')(coords))
    table = nn.Dense(self.num_heads, use_bias=False, kernel_init=layers.trunc_init, name='2')(hidden)
    return 16 * jax.nn.sigmoid(gather_bias(table, self.window))


class CosineWindowAttention(nn.Module):
  """SwinV2 window attention: cosine similarity x clamped learned scale, continuous bias, q/v biases."""
  num_heads: int
  window: int
  pretrained_window: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
    *lead, n, c = x.shape  # (batch, windows, n, c)
    heads = self.num_heads
    qkv = nn.Dense(3 * c, use_bias=False, dtype=self.dtype, kernel_init=layers.trunc_init, name='qkv')(x)
    q_bias = self.param('q_bias', nn.initializers.zeros, (c,))
    v_bias = self.param('v_bias', nn.initializers.zeros, (c,))
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(*lead, n, 3, heads, c // heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def unit(t: jax.Array) -> jax.Array:  # F.normalize: eps guards all-zero vectors
      t = t.astype(jnp.float32)
      return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

    logit_scale = self.param('logit_scale', nn.initializers.constant(np.log(10.0)), (heads, 1, 1))
    # cos(q, k) * scale: the per-head scale goes on the unit queries (float32), the dot runs unscaled.
    scaled_q = unit(q) * jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE)).reshape(heads, 1)
    bias = ContinuousPositionBias(heads, self.window, self.pretrained_window, name='cpb_mlp')()
    terms = (bias,) if mask is None else (bias, mask[:, None])
    # Always the XLA path: cosine logits in float32 are not a cuDNN flash attention call.
    out = layers.xla_attention(scaled_q, unit(k), v, terms, scale=1.0).reshape(*lead, n, c)
    return nn.Dense(c, dtype=self.dtype, kernel_init=layers.trunc_init, name='proj')(out)


def post_norm(name: str) -> nn.LayerNorm:
  """SwinV2's res-post-norm, in float32, initialised to zero scale (each block starts as the identity)."""
  return nn.LayerNorm(epsilon=NORM_EPS, dtype=jnp.float32, scale_init=nn.initializers.zeros, name=name)


class SwinBlock(nn.Module):
  """One (shifted) window block on a (B, H, W, C) map: pre-norm in V1, res-post-norm in V2."""
  num_heads: int
  window: int
  shift: int = 0
  v2: bool = False
  pretrained_window: int = 0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention: str = 'auto'  # model.attention (V1 only; V2's cosine attention is always XLA)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, h, w, c = x.shape
    drop = layers.DropPath(self.drop_path)
    y = x if self.v2 else layers.layer_norm(NORM_EPS, 'norm1')(x).astype(self.dtype)
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
    mask = shift_attention_mask((h, w), self.window, self.shift) if self.shift else None
    if self.v2:
      attn = CosineWindowAttention(self.num_heads, self.window, self.pretrained_window, self.dtype, name='attn')
    else:
      attn = WindowAttention(self.num_heads, kernel_init=layers.trunc_init, dtype=self.dtype,
                             implementation=self.attention, window=self.window, name='attn')
    n = self.window * self.window
    windows = window_partition(y, self.window).reshape(b, -1, n, c)  # (batch, windows, n, c): a free reshape
    y = window_reverse(attn(windows, mask).reshape(-1, n, c), self.window, (h, w))
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    mlp = layers.Mlp(MLP_RATIO * c, layers.trunc_init, dtype=self.dtype, name='mlp')
    if self.v2:
      x = x + drop(post_norm('norm1')(y).astype(self.dtype), train)
      return x + drop(post_norm('norm2')(mlp(x)).astype(self.dtype), train)
    x = x + drop(y, train)
    return x + drop(mlp(layers.layer_norm(NORM_EPS, 'norm2')(x).astype(self.dtype)), train)


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (x0, x1, x2, x3 order) -> 2C: norm then reduction (V1), reduction then norm (V2)."""
  v2: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    reduction = nn.Dense(2 * c, use_bias=False, dtype=self.dtype, kernel_init=layers.trunc_init, name='reduction')
    if self.v2:
      return layers.layer_norm(NORM_EPS, 'norm')(reduction(x)).astype(self.dtype)
    return reduction(layers.layer_norm(NORM_EPS, 'norm')(x).astype(self.dtype))


class PatchEmbed(nn.Module):
  """patch x patch conv (PyTorch default init: the official init touches only Linear and LayerNorm) + LayerNorm."""
  embed_dim: int
  patch_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    bias_init = layers.torch_bias_init(p * p * images.shape[-1])
    x = layers.PatchConv(self.embed_dim, p, layers.torch_kernel_init, bias_init, self.dtype, name='proj')(images)
    return layers.layer_norm(NORM_EPS, 'norm')(x)


class SwinStage(nn.Module):
  """`depth` blocks alternating plain and shifted windows, then patch merging unless it is the last stage."""
  depth: int
  num_heads: int
  window_size: int
  drop_paths: tuple[float, ...]
  downsample: bool
  v2: bool = False
  pretrained_window: int = 0
  dtype: Any = jnp.float32
  attention: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    grid = x.shape[1:3]
    window, shift = stage_window(grid, self.window_size)
    if grid[0] % window or grid[1] % window:
      raise ValueError(f'A Swin stage of {grid[0]}x{grid[1]} tokens cannot be tiled by {window}x{window} windows: '
                       'choose model.window_size and model.image_size so every stage divides evenly.')
    block = layers.remat(SwinBlock, self.remat, static_argnums=(2,))  # (self, x, train)
    for j in range(self.depth):
      x = block(self.num_heads, window, shift if j % 2 else 0, self.v2, self.pretrained_window,
                self.drop_paths[j], self.dtype, self.attention, name=f'blocks_{j}')(x, train)
    if self.downsample:
      x = PatchMerging(self.v2, self.dtype, name='downsample')(x)
    return x


class Swin(nn.Module):
  """Images (B, H, W, C) and a token mask (B, H/4, W/4) -> features (B, H/stride, W/stride, C_final).

  Masked tokens are replaced by the mask token after the patch embedding and its LayerNorm (as the official
  SwinTransformerForSimMIM). v2=True is SwinV2: cosine attention, continuous position bias, res-post-norm.
  """
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int = 7
  v2: bool = False
  pretrained_window_sizes: tuple[int, ...] | None = None  # SwinV2 only; None: 0 per stage (the window itself)
  drop_path_rate: float = 0.0
  patch_size: int = 4
  dtype: Any = jnp.float32
  attention: str = 'auto'  # model.attention: 'auto' | 'xla' | 'cudnn' (V1; SwinV2 runs XLA)
  remat: str = 'none'  # model.remat: 'none' | 'block' | a jax.checkpoint_policies name
  exempt_keywords: bool = False  # True: NO_DECAY_KEYWORDS get no weight decay (fine-tuning; see no_weight_decay)

  # The official no_weight_decay (+ SimMIM's mask_token) and no_weight_decay_keywords (V1: the tables; V2 adds
  # cpb_mlp and logit_scale).
  NO_DECAY_NAMES: ClassVar[tuple[str, ...]] = ('absolute_pos_embed', 'mask_token')
  NO_DECAY_KEYWORDS: ClassVar[tuple[str, ...]] = ('relative_position_bias_table', 'cpb_mlp', 'logit_scale')

  @property
  def no_weight_decay(self) -> tuple[str, ...]:
    """Names AdamW does not decay (besides 1-d params). The official pretraining DOES decay the keyword
    params: its SimMIM wrapper prefixes the keywords with 'encoder.', so no parameter name contains them.
    Fine-tuning builds the bare encoder, where they match; build_classifier sets exempt_keywords."""
    return self.NO_DECAY_NAMES + (self.NO_DECAY_KEYWORDS if self.exempt_keywords else ())

  @property
  def stride(self) -> int:
    """Pixels per output feature (the decoder's encoder_stride): 32 for four stages."""
    return self.patch_size * 2**(len(self.depths) - 1)

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    stages = len(self.depths)
    if self.v2 and self.attention == 'cudnn':
      raise ValueError("SwinV2's cosine attention runs on XLA: use model.attention 'auto' or 'xla'.")
    pretrained = self.pretrained_window_sizes or (0,) * stages
    if len(self.num_heads) != stages or len(pretrained) != stages:
      raise ValueError(f'Swin needs one num_heads and one pretrained_window_size per stage ({stages}); got '
                       f'{self.num_heads} and {pretrained}.')
    x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name='patch_embed')(images)
    if mask is not None:
      if mask.shape != x.shape[:3]:
        raise ValueError(f'mask shape {mask.shape} must be (batch, H/{self.patch_size}, W/{self.patch_size}) = '
                         f'{x.shape[:3]}.')
      mask_token = self.param('mask_token', layers.trunc_init, (1, 1, self.embed_dim))
      w = mask[..., None].astype(x.dtype)
      x = x * (1 - w) + mask_token * w
    x = x.astype(self.dtype)

    rates = np.linspace(0, self.drop_path_rate, sum(self.depths))
    for s, depth in enumerate(self.depths):
      first = sum(self.depths[:s])
      x = SwinStage(depth, self.num_heads[s], self.window_size, tuple(float(r) for r in rates[first:first + depth]),
                    downsample=s < stages - 1, v2=self.v2, pretrained_window=pretrained[s], dtype=self.dtype,
                    attention=self.attention, remat=self.remat, name=f'layers_{s}')(x, train)
    return layers.layer_norm(NORM_EPS, 'norm')(x)


def build(model: ml_collections.ConfigDict, dtype: Any) -> Swin:
  """The Swin (model.name 'swin') or SwinV2 ('swinv2') encoder of this config."""
  pretrained = model.get('pretrained_window_sizes', None)  # configs saved before the field
  return Swin(**decode_variant(model.variant), window_size=model.window_size, v2=model.name == 'swinv2',
              pretrained_window_sizes=tuple(pretrained) if pretrained else None,
              drop_path_rate=model.drop_path_rate, dtype=dtype, attention=model.get('attention', 'auto'),
              remat=model.get('remat', 'none'),
              exempt_keywords=bool(model.get('exempt_keywords_in_pretraining', False)))
