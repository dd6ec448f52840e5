"""This package's params <-> the official PyTorch SimMIM checkpoints (microsoft/SimMIM, microsoft/Swin-Transformer).

The released `.pth` files hold a state dict under 'model' (docs/REFERENCE.md section 8):
- pretrained (SimMIM wrapper): `encoder.*` (with `encoder.mask_token`) and `decoder.0.{weight,bias}`;
  ViT-BEiT has one `encoder.rel_pos_bias.relative_position_bias_table`; Swin merges patches at a stage's end
  (`encoder.layers.{s}.downsample`, stages 0..S-2).
- fine-tuned (the bare encoder class): the encoder keys without prefix, plus `head.{weight,bias}` and, for ViT
  (use_mean_pooling), `fc_norm.{weight,bias}` instead of `norm`; ViT has `blocks.{i}.attn.relative_position_bias_table`.
Buffers (`relative_position_index`, `attn_mask`, `relative_coords_table`) are derived from shapes: ignored on
import and not written on export (the official loaders load with strict=False and rebuild them).
The official ViT always has q/v biases, so the plain ViT (full qkv bias) has no official layout: use timm's.
"""
from typing import Any

import numpy as np

from simmim_jax.interop import layout


def to_official(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """Params -> the official state dict: pretrained layout when there is a decoder, else fine-tuned layout."""
  encoder, rest = layout.split_model(params)
  fam = layout.family(encoder)
  if fam == 'vit_plain':
    raise ValueError('The official SimMIM ViT has q/v biases only; a plain ViT (full qkv bias) cannot be written '
                     'in its layout. Convert it with --layout timm.')
  state = layout.encoder_to_torch(encoder, vit=fam.startswith('vit'))
  head, decoder = layout.heads_to_torch(rest)
  if decoder:
    if head:
      raise ValueError('Params with both a SimMIM decoder and a classifier head are neither official layout.')
    return {**{'encoder.' + k: v for k, v in state.items()}, **decoder}
  return {**state, **head}


def from_official(state_dict: dict[str, Any]) -> dict[str, Any]:
  """An official state dict (pretrained or fine-tuned, ViT or Swin/SwinV2) -> params for this package."""
  prefixed = any(k.startswith('encoder.') for k in state_dict)
  state = {}
  for k, v in state_dict.items():
    if prefixed and k.startswith('encoder.'):
      k = k[len('encoder.'):]
    elif prefixed and not k.startswith('decoder.'):
      raise ValueError(f'Unexpected key {k!r} in an official pretrained checkpoint (encoder.* / decoder.* only).')
    state[k] = v
  return layout.assemble(state)


def is_official(state_dict: dict[str, Any]) -> bool:
  """True for the official layouts; False for timm's (the ViT names coincide, so only Swin differs)."""
  if any(k.startswith('encoder.') for k in state_dict):
    return True
  swin = any(k.startswith('layers.') for k in state_dict)
  return not swin or 'layers.0.downsample.reduction.weight' in state_dict or 'head.weight' in state_dict
