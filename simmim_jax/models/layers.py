"""Building blocks shared by every encoder: initialisers, MLP, drop path, attention, the BEiT block."""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# The official BEiT/SimMIM ViT truncates its std-0.02 normal init at +-1 std (its own trunc_normal_).
# timm's trunc_normal_(std=.02) cuts at +-2 in absolute value, i.e. 100 std: a plain normal in effect.
beit_init = nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)
trunc_init = nn.initializers.normal(0.02)
# PyTorch's default Conv2d/Linear init (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init for a layer with this fan-in."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def layer_norm(eps: float = 1e-6, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm computed in float32 whatever the compute dtype (normalisations stay exact in bf16 runs)."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class DropPath(nn.Module):
  """Stochastic depth: drop the whole residual branch per example, rescale the kept ones."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(kept, x / keep, 0).astype(x.dtype)


class Mlp(nn.Module):
  """fc1 -> GELU (exact erf, as PyTorch) -> fc2."""
  hidden_dim: int
  kernel_init: Initializer = trunc_init
  fc2_init: Initializer | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=self.kernel_init, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(out_dim, dtype=self.dtype, kernel_init=self.fc2_init or self.kernel_init, name='fc2')(x)


def scaled_init(init: Initializer, scale: float) -> Initializer:
  """`init` divided by `scale` (the BEiT rule rescales attn.proj and mlp.fc2 by sqrt(2 * layer_id))."""
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) / scale


class Attention(nn.Module):
  """Multi-head self-attention with an additive bias (relative positions, window masks).

  qkv_bias: 'full' (one bias on q, k, v), 'qv' (BEiT: learned q_bias and v_bias, k bias fixed at 0) or 'none'.
  rel_pos_grid: a (h, w) token grid (plus cls) gives this attention its own relative position table, as the
  fine-tuned BEiT ViT has in every block (`attn.relative_position_bias_table`).
  """
  num_heads: int
  qkv_bias: str = 'full'
  kernel_init: Initializer = trunc_init
  proj_init: Initializer | None = None
  dtype: Dtype = jnp.float32
  rel_pos_grid: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    b, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias == 'full', dtype=self.dtype,
                   kernel_init=self.kernel_init, name='qkv')(x)
    if self.qkv_bias == 'qv':
      q_bias = self.param('q_bias', nn.initializers.zeros, (c,))
      v_bias = self.param('v_bias', nn.initializers.zeros, (c,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head_dim), 3, axis=2)
    q, k, v = (t[:, :, 0] for t in (q, k, v))  # (b, n, heads, head_dim)
    if self.rel_pos_grid is not None:
      table = self.param('relative_position_bias_table', nn.initializers.zeros,
                         (relative_table_rows(self.rel_pos_grid, True), self.num_heads))
      own = gather_relative_bias(table, self.rel_pos_grid, with_cls=True)
      bias = own if bias is None else bias + own
    if bias is not None:
      bias = jnp.broadcast_to(bias, (b, self.num_heads, n, n)).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias)  # softmax in float32 inside
    out = out.reshape(b, n, c)
    return nn.Dense(c, dtype=self.dtype, kernel_init=self.proj_init or self.kernel_init, name='proj')(out)


class Block(nn.Module):
  """Pre-norm Transformer block with optional layer scale (BEiT init 0.1) and drop path."""
  num_heads: int
  mlp_dim: int
  qkv_bias: str = 'full'
  layer_scale: float | None = None
  drop_path: float = 0.0
  norm_eps: float = 1e-6
  kernel_init: Initializer = trunc_init
  residual_init: Initializer | None = None  # for attn.proj and mlp.fc2
  dtype: Dtype = jnp.float32
  rel_pos_grid: tuple[int, int] | None = None  # a relative position table of this block's own

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = Attention(self.num_heads, self.qkv_bias, self.kernel_init, self.residual_init, self.dtype,
                  self.rel_pos_grid, name='attn')(layer_norm(self.norm_eps, 'norm1')(x).astype(self.dtype), bias)
    if self.layer_scale is not None:
      y = y * self.param('gamma_1', nn.initializers.constant(self.layer_scale), (c,))
    x = x + drop(y, train)
    y = Mlp(self.mlp_dim, self.kernel_init, self.residual_init, self.dtype,
            name='mlp')(layer_norm(self.norm_eps, 'norm2')(x).astype(self.dtype))
    if self.layer_scale is not None:
      y = y * self.param('gamma_2', nn.initializers.constant(self.layer_scale), (c,))
    return x + drop(y, train)


def relative_position_index(grid: tuple[int, int], with_cls: bool) -> np.ndarray:
  """Index into a relative-position table for every token pair of a (h, w) grid.

  The table has (2h-1)(2w-1) rows, plus 3 when a cls token is present (cls->token, token->cls, cls->cls),
  laid out as in the official BEiT/Swin code so PyTorch tables load unchanged.
  """
  h, w = grid
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += h - 1
  rel[:, :, 1] += w - 1
  index = rel[:, :, 0] * (2 * w - 1) + rel[:, :, 1]
  if not with_cls:
    return index
  n, num_rel = h * w, (2 * h - 1) * (2 * w - 1)
  full = np.zeros((n + 1, n + 1), dtype=index.dtype)
  full[1:, 1:] = index
  full[0, 1:] = num_rel
  full[1:, 0] = num_rel + 1
  full[0, 0] = num_rel + 2
  return full


def relative_table_rows(grid: tuple[int, int], with_cls: bool) -> int:
  """Rows of a relative position table: one per offset, plus 3 for the cls token."""
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + (3 if with_cls else 0)


def gather_relative_bias(table: jax.Array, grid: tuple[int, int], with_cls: bool) -> jax.Array:
  """A (rows, heads) table -> the (heads, n, n) bias for every token pair."""
  index = relative_position_index(grid, with_cls)
  return table[index.reshape(-1)].reshape(*index.shape, table.shape[-1]).transpose(2, 0, 1)


class RelativePositionBias(nn.Module):
  """A learned bias per head and relative offset, gathered to (heads, n, n); zeros at init."""
  grid: tuple[int, int]
  num_heads: int
  with_cls: bool = True

  @nn.compact
  def __call__(self) -> jax.Array:
    table = self.param('relative_position_bias_table', nn.initializers.zeros,
                       (relative_table_rows(self.grid, self.with_cls), self.num_heads))
    return gather_relative_bias(table, self.grid, self.with_cls)
