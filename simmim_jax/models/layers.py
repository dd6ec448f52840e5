"""Building blocks shared by every encoder: initialisers, MLP, drop path, attention (XLA or cuDNN), remat,
the BEiT block."""
import functools
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


MATMUL_MIN_INPUTS = 256  # PatchConv: patches (p > 1) with fewer inputs (p * p * channels) stay a conv


class PatchConv(nn.Module):
  """A patch x patch conv with stride patch ('VALID'), as patches @ kernel where that is faster: nn.Conv's parameters
  ('kernel' (p, p, in, out), 'bias': same names, shapes, init, so checkpoints and exports are unchanged).

  Why: on XLA:CPU a 16x16 patch conv and its kernel gradient run 1.5x faster as one matmul (measured: ViT
  224 px, batch 32 and 8), a 1x1 conv (SimMIM's decoder) 1.5-2.4x; a 4x4 patch of 3 channels (48 inputs:
  Swin, 'Mu/4') runs 1.5-1.75x faster as the conv, so patches of fewer than MATMUL_MIN_INPUTS inputs stay one.
  """
  features: int
  patch_size: int
  kernel_init: Initializer = torch_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, c = x.shape
    kernel = self.param('kernel', self.kernel_init, (p, p, c, self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    gh, gw = h // p, w // p  # 'VALID': a remainder row/column is dropped, as the conv drops it
    x = x[:, :gh * p, :gw * p].astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if p > 1 and p * p * c < MATMUL_MIN_INPUTS:
      y = jax.lax.conv_general_dilated(x, kernel, (p, p), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:  # (B, gh, p, gw, p, C) -> (B, gh, gw, p * p * C) in the kernel's (kh, kw, in) order
      x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh, gw, p * p * c)
      y = jnp.dot(x, kernel.reshape(p * p * c, self.features))
    return y + bias.astype(self.dtype)


def scaled_init(init: Initializer, scale: float) -> Initializer:
  """`init` divided by `scale` (the BEiT rule rescales attn.proj and mlp.fc2 by sqrt(2 * layer_id))."""
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) / scale


ATTENTION_CHOICES = ('auto', 'xla', 'cudnn')
# jax.checkpoint policies a config may name (the ones that take no arguments); 'block' recomputes everything.
REMAT_POLICIES = ('nothing_saveable', 'everything_saveable', 'dots_saveable', 'checkpoint_dots',
                  'dots_with_no_batch_dims_saveable', 'checkpoint_dots_with_no_batch_dims')
REMAT_CHOICES = ('none', 'block') + REMAT_POLICIES
CUDNN_PAD_BIAS = -1e9  # the bias of the key a cuDNN call pads in: exp(-1e9 - max) is exactly 0


def add_shared_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
  """logits (..., *bias.shape) + bias, the bias broadcast over the leading dims.

  Same numbers as `+`; only the bias gradient differs in how it is summed: over the leading (batch) dims by a
  dot with ones. XLA:CPU's YNNPACK reduce over a major dim runs ~80x slower than that dot (measured on
  (32, 3, 197, 197): 38 ms vs 0.3 ms); it was ~18 % of a ViT-Ti attention step.
  """
  return _add_shared_bias(bias.ndim, logits, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _add_shared_bias(ndim: int, logits: jax.Array, bias: jax.Array) -> jax.Array:
  del ndim
  return logits + bias


def _add_shared_bias_fwd(ndim: int, logits: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  del ndim
  return logits + bias, jnp.zeros((0,), bias.dtype)  # the residual carries only the bias dtype


def _add_shared_bias_bwd(ndim: int, res: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  shape = g.shape[g.ndim - ndim:]
  rows = g.size // int(np.prod(shape))
  # HIGHEST: a GPU would otherwise sum float32 gradients at TF32 precision.
  summed = jnp.dot(jnp.ones((rows,), g.dtype), g.reshape(rows, -1), precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  return g, summed.reshape(shape).astype(res.dtype)


_add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


Bias = jax.Array | tuple[jax.Array, ...] | None  # one additive bias, or terms added one by one


def bias_terms(bias: Bias) -> tuple[jax.Array, ...]:
  """The additive bias terms of an attention call."""
  if bias is None:
    return ()
  return tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Bias = None,
                  scale: float | None = None) -> jax.Array:
  """softmax(q k^T * scale + bias) v for q, k, v of shape (..., n, heads, head_dim), any leading dims.

  Logits come out of the dot in float32 (bf16 inputs too) and the softmax runs in float32. Each bias term is
  added to the logits where they are made, never broadcast to the batch first: (heads, n, n) or a term with
  leading dims that match q's trailing leading dims ((windows, heads, n, n)) gets its gradient summed by
  add_shared_bias; any other broadcasting term ((windows, 1, n, n) shift masks, (batch, 1, n, n) text
  segments) is a plain add.
  """
  scale = q.shape[-1]**-0.5 if scale is None else scale
  logits = jnp.einsum('...qhd,...khd->...hqk', q, k, preferred_element_type=jnp.float32) * scale
  for term in bias_terms(bias):
    term = jnp.asarray(term, jnp.float32)
    shared = term.ndim < logits.ndim and term.shape == logits.shape[logits.ndim - term.ndim:]
    logits = add_shared_bias(logits, term) if shared else logits + term
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('...hqk,...khd->...qhd', probs, v)


def _gpu_platform() -> str:
  """'cuda', 'rocm' or the backend name ('cpu', 'tpu'): cuDNN exists only on the first."""
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend
  version = str(getattr(jax.devices()[0].client, 'platform_version', '')).lower()
  return 'rocm' if 'rocm' in version else 'cuda'


def cudnn_bias_shape(bias: Bias, lead: tuple[int, ...]) -> tuple[int, ...] | None:
  """The 4-d shape the summed bias takes in a cuDNN call on (prod(lead), n, heads, d); None if there is no
  bias, or if it does not broadcast over that flat batch (a per-window bias: windows and images share it)."""
  terms = bias_terms(bias)
  if not terms:
    return None
  shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in terms))
  if len(shape) <= 3:
    return (1,) * (4 - len(shape)) + tuple(shape)
  if len(shape) == 4 and len(lead) == 1:
    return tuple(shape)
  return None


def select_attention(requested: str, dtype: Any, head_dim: int, lead: tuple[int, ...], bias: Bias = None,
                     platform: str | None = None) -> tuple[str, str]:
  """('cudnn' | 'xla', why) for model.attention = requested: 'auto' takes cuDNN flash attention wherever it
  applies and XLA elsewhere; 'cudnn' raises where it does not apply; 'xla' is always XLA."""
  if requested not in ATTENTION_CHOICES:
    raise ValueError(f'model.attention must be one of {ATTENTION_CHOICES}, got {requested!r}.')
  if requested == 'xla':
    return 'xla', 'requested'
  platform = platform or _gpu_platform()
  reason = None
  if platform != 'cuda':
    reason = f'cuDNN attention needs an NVIDIA GPU (backend: {platform})'
  elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    reason = f'cuDNN flash attention takes bfloat16/float16 inputs, not {jnp.dtype(dtype).name}'
  elif head_dim % 8 or head_dim > 128:
    reason = f'cuDNN flash attention needs a head dim that is a multiple of 8 and <= 128, got {head_dim}'
  elif bias_terms(bias) and cudnn_bias_shape(bias, lead) is None:
    shapes = [tuple(jnp.shape(t)) for t in bias_terms(bias)]
    reason = f'a bias of shapes {shapes} does not broadcast over one flat batch dim (per-window bias)'
  elif bias_terms(bias) and cudnn_bias_shape(bias, lead)[0] != 1:
    # JAX always asks cuDNN for the bias gradient, which cuDNN gives for a bias shared by the batch only.
    reason = 'a per-example bias (text segments): cuDNN computes the bias gradient for a batch-shared bias only'
  if reason is None:
    return 'cudnn', 'applies'
  if requested == 'cudnn':
    raise ValueError(f"model.attention='cudnn' cannot be used here: {reason}. Use 'auto' or 'xla'.")
  return 'xla', reason


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Bias = None,
                    implementation: str = 'cudnn') -> jax.Array:
  """jax.nn.dot_product_attention on (..., n, heads, d) with the leading dims flattened into one batch dim.

  cuDNN rejects a biased training call on an odd sequence (ViT's 196 patches + cls = 197): one key is padded
  in with bias CUDNN_PAD_BIAS (it gets no weight) and one query row, sliced off again. implementation='xla'
  runs the same padding on any backend (tests).
  """
  lead, (n, heads, d) = q.shape[:-3], q.shape[-3:]
  q, k, v = (t.reshape(-1, n, heads, d) for t in (q, k, v))
  shape, terms, bias = cudnn_bias_shape(bias, lead), bias_terms(bias), None
  if shape is not None:
    bias = sum(jnp.asarray(t, jnp.float32) for t in terms).reshape(shape).astype(q.dtype)
    if n % 2:
      pad = ((0, 0), (0, 1), (0, 0), (0, 0))
      q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 1)))
      bias = bias.at[..., -1].set(jnp.asarray(CUDNN_PAD_BIAS, bias.dtype))
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  return out[:, :n].reshape(*lead, n, heads, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: Bias = None, implementation: str = 'auto') -> jax.Array:
  """Scaled dot-product attention on (..., n, heads, d) through the implementation model.attention selects."""
  choice, _ = select_attention(implementation, q.dtype, q.shape[-1], q.shape[:-3], bias)
  if choice == 'cudnn':
    return flash_attention(q, k, v, bias)
  return xla_attention(q, k, v, bias)


def remat(module: type[nn.Module], mode: str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
  """`module` as is ('none'), recomputed in the backward pass ('block'), or saving what a named
  jax.checkpoint_policies policy saves. static_argnums counts self as 0 (the `train` flag is static)."""
  if mode not in REMAT_CHOICES:
    raise ValueError(f'model.remat must be one of {REMAT_CHOICES}, got {mode!r}.')
  if mode == 'none':
    return module
  policy = None if mode == 'block' else getattr(jax.checkpoint_policies, mode)
  return nn.remat(module, static_argnums=static_argnums, policy=policy)


class Attention(nn.Module):
  """Multi-head self-attention with an additive bias (relative positions, window masks).

  x is (..., n, c): any leading dims (Swin passes (batch, windows, n, c), its bias (windows, heads, n, n)).
  qkv_bias: 'full' (one bias on q, k, v), 'qv' (BEiT: learned q_bias and v_bias, k bias fixed at 0) or 'none'.
  rel_pos_grid: a (h, w) token grid (plus cls) gives this attention its own relative position table, as the
  fine-tuned BEiT ViT has in every block (`attn.relative_position_bias_table`).
  implementation: model.attention ('auto' | 'xla' | 'cudnn'), see select_attention.
  """
  num_heads: int
  qkv_bias: str = 'full'
  kernel_init: Initializer = trunc_init
  proj_init: Initializer | None = None
  dtype: Dtype = jnp.float32
  rel_pos_grid: tuple[int, int] | None = None
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, bias: Bias = None) -> jax.Array:
    *lead, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias == 'full', dtype=self.dtype,
                   kernel_init=self.kernel_init, name='qkv')(x)
    if self.qkv_bias == 'qv':
      q_bias = self.param('q_bias', nn.initializers.zeros, (c,))
      v_bias = self.param('v_bias', nn.initializers.zeros, (c,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(*lead, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (..., n, heads, head_dim)
    if self.rel_pos_grid is not None:
      table = self.param('relative_position_bias_table', nn.initializers.zeros,
                         (relative_table_rows(self.rel_pos_grid, True), self.num_heads))
      own = gather_relative_bias(table, self.rel_pos_grid, with_cls=True)
      bias = bias_terms(bias) + (own,)
    out = attend(q, k, v, bias, self.implementation).reshape(*lead, n, c)
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
  attention: str = 'auto'  # model.attention

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = Attention(self.num_heads, self.qkv_bias, self.kernel_init, self.residual_init, self.dtype,
                  self.rel_pos_grid, self.attention,
                  name='attn')(layer_norm(self.norm_eps, 'norm1')(x).astype(self.dtype), bias)
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
