"""The text encoder <-> a documented PyTorch layout (no torch needed here; the module is in torch_text.py).

The encoder is pre-norm (not BERT's post-norm), so the layout follows timm's ViT Block names rather than
Hugging Face BERT's, whose modules would compute something else. V vocab, C width, M mlp_dim, L max_len:
  embedding.weight                      (V, C)   nn.Embedding; [MASK] is row model.mask_id; tied to the output
  pos_embed                             (L, C)   learned absolute positions (restart at 0 in each packed segment)
  blocks.{i}.norm1.{weight,bias}        (C,)     LayerNorm eps 1e-6
  blocks.{i}.attn.qkv.{weight,bias}     (3C, C), (3C,)   outputs [q | k | v], heads contiguous within each
  blocks.{i}.attn.proj.{weight,bias}    (C, C), (C,)
  blocks.{i}.norm2.{weight,bias}        (C,)
  blocks.{i}.mlp.fc1.{weight,bias}      (M, C), (M,)     exact-erf GELU
  blocks.{i}.mlp.fc2.{weight,bias}      (C, M), (C,)
  norm.{weight,bias}                    (C,)     final LayerNorm eps 1e-6
  head.dense.{weight,bias}, head.norm.{weight,bias} (eps 1e-12), head.bias (V,)   masked-LM head (pretraining)
Each `blocks.{i}` loads into timm.models.vision_transformer.Block(C, heads, M / C, qkv_bias=True,
norm_layer=LayerNorm(eps=1e-6)); attention between packed segments is blocked by an additive mask (-1e9).
simmim_jax.interop.torch_text.TextEncoder is that model, ready to load this state dict.
"""
from typing import Any

import numpy as np
from flax import traverse_util

from simmim_jax.interop import layout

EMBEDDING = 'embedding/embedding'


def to_torch(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """Text params (MaskedLM {'encoder', 'head'} or the encoder alone) -> the layout above."""
  encoder, rest = layout.split_model(params)
  if EMBEDDING not in encoder:
    raise ValueError(f'Not text encoder params (no {EMBEDDING!r}): found {sorted(encoder)[:6]}...')
  encoder = dict(encoder)
  embedding = np.asarray(encoder.pop(EMBEDDING))  # (V, C) as nn.Embedding: no transpose
  unknown = [k for k in rest if not k.startswith('head/')]
  if unknown:
    raise ValueError(f'No text layout name for {unknown}: expected the encoder and the masked-LM head.')
  return {'embedding.weight': embedding, **layout.jax_to_torch(encoder), **layout.jax_to_torch(rest)}


def from_torch(state_dict: dict[str, Any]) -> dict[str, Any]:
  """The layout above -> params {'encoder': ..., 'head': ... when present}."""
  state = dict(state_dict)
  embedding = np.asarray(state.pop('embedding.weight'))
  head = {k: v for k, v in state.items() if k.startswith('head.')}
  encoder = layout.torch_to_jax({k: v for k, v in state.items() if not k.startswith('head.')})
  encoder[EMBEDDING] = embedding
  params = {'encoder': traverse_util.unflatten_dict(encoder, sep='/')}
  if head:
    params.update(traverse_util.unflatten_dict(layout.torch_to_jax(head), sep='/'))
  return params


def torch_kwargs(model: dict[str, Any]) -> dict[str, Any]:
  """Constructor arguments of torch_text.TextEncoder for a config's `model` section."""
  from simmim_jax.models import text  # pylint: disable=import-outside-toplevel
  return dict(text.decode_variant(model['variant']), vocab_size=model['vocab_size'], max_len=model['max_len'],
              mask_id=model['mask_id'])
