"""The generic JAX <-> PyTorch rules: module names, weight layouts, and which family a params tree is.

Flax `blocks_3/attn/qkv/kernel` (in, out) is PyTorch `blocks.3.attn.qkv.weight` (out, in); a conv kernel
(kh, kw, in, out) is (out, in, kh, kw); a LayerNorm `scale` is `weight`. Numbered children of other modules
(SwinV2's `cpb_mlp/0`) keep their number as a name of its own. Buffers that PyTorch stores but derives from
the shapes (relative position indices, shift masks, coordinate tables, BEiT's zero k bias) are never params.
"""
import re
from typing import Any

import numpy as np
from flax import traverse_util

BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table', 'k_bias')
_INDEXED = re.compile(r'^(blocks|layers)_(\d+)$')


def jax_to_torch(flat: dict[str, Any]) -> dict[str, np.ndarray]:
  """{'a/blocks_0/fc/kernel': (in, out)} -> {'a.blocks.0.fc.weight': (out, in)}."""
  out = {}
  for name, value in flat.items():
    *modules, leaf = name.split('/')
    modules = [_INDEXED.sub(r'\1.\2', m) for m in modules]
    value = np.asarray(value)
    if leaf == 'kernel':
      leaf, value = 'weight', value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    elif leaf == 'scale':
      leaf = 'weight'
    out['.'.join(modules + [leaf])] = value
  return out


def torch_to_jax(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of jax_to_torch; buffers are dropped."""
  out = {}
  for key, value in state_dict.items():
    *modules, leaf = key.split('.')
    if leaf in BUFFERS:
      continue
    value = np.asarray(value)
    names: list[str] = []
    for m in modules:
      if m.isdigit() and names and names[-1] in ('blocks', 'layers'):
        names[-1] = f'{names[-1]}_{m}'
      else:
        names.append(m)
    if leaf == 'weight':
      if value.ndim == 1:
        leaf = 'scale'
      elif value.ndim in (2, 4):
        leaf, value = 'kernel', value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
      else:
        raise ValueError(f'{key}: a weight of shape {value.shape} is neither a norm, a Linear nor a Conv2d.')
    out['/'.join(names + [leaf])] = value
  return out


def family(encoder_flat: dict[str, Any]) -> str:
  """'vit_plain', 'vit_beit', 'swin' or 'swinv2' from the encoder's JAX param names."""
  names = set(encoder_flat)
  if any(n.startswith('layers_0/') for n in names):
    return 'swinv2' if any(n.endswith('/attn/logit_scale') for n in names) else 'swin'
  if any(n.startswith('blocks_0/') for n in names):
    return 'vit_plain' if 'pos_embed' in names else 'vit_beit'
  raise ValueError('These params are not a ViT or Swin encoder (no blocks_0/ or layers_0/): '
                   f'found {sorted(names)[:8]}...')


def split_model(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A whole model (encoder + decoder or head), or an encoder alone -> (encoder flat, the rest flat)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  if any(n.startswith('encoder/') for n in flat):
    encoder = {n[len('encoder/'):]: v for n, v in flat.items() if n.startswith('encoder/')}
    return encoder, {n: v for n, v in flat.items() if not n.startswith('encoder/')}
  return flat, {}


def shift_downsample(state_dict: dict[str, Any], by: int) -> dict[str, Any]:
  """Moves `layers.{s}.downsample` to stage s + by: the official Swin merges at a stage's end, timm at the next
  stage's start (so official stage 0's merging is timm's `layers.1.downsample`)."""
  pattern = re.compile(r'^layers\.(\d+)\.downsample\.')
  return {pattern.sub(lambda m: f'layers.{int(m.group(1)) + by}.downsample.', k): v for k, v in state_dict.items()}


def encoder_to_torch(encoder_flat: dict[str, Any], vit: bool) -> dict[str, np.ndarray]:
  """Encoder params -> PyTorch names shared by timm and the official code (ViT's patch conv is `patch_embed.proj`)."""
  out = jax_to_torch(encoder_flat)
  if vit:
    out = {re.sub(r'^patch_embed\.(weight|bias)$', r'patch_embed.proj.\1', k): v for k, v in out.items()}
  return out


def heads_to_torch(rest_flat: dict[str, Any], swin_head: str = 'head.') -> tuple[dict[str, Any], dict[str, Any]]:
  """Params beside the encoder -> ({fc_norm.*, head.*}, {decoder.0.*}): the classifier and the SimMIM decoder
  (`decoder.0` is the official 1x1 conv; decoder.1 is its parameter-free PixelShuffle)."""
  head, decoder = {}, {}
  for k, v in jax_to_torch(rest_flat).items():
    if k.startswith('decoder.conv.'):
      decoder['decoder.0.' + k[len('decoder.conv.'):]] = v
    elif k.startswith('head.'):
      head[swin_head + k[len('head.'):]] = v
    elif k.startswith('fc_norm.'):
      head[k] = v
    else:
      raise ValueError(f'No PyTorch name for {k!r}: expected an encoder, a decoder, fc_norm or head.')
  return head, decoder


def assemble(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Official-named PyTorch tensors without the `encoder.` prefix (timm's renames undone) -> nested params
  {'encoder': ..., and 'decoder' / 'fc_norm' / 'head' when present}. Buffers are dropped."""
  vit = not any(k.startswith('layers.') for k in state_dict)
  encoder, rest = {}, {}
  for k, v in state_dict.items():
    if k.startswith('decoder.0.'):
      rest['decoder.conv.' + k[len('decoder.0.'):]] = v
    elif k.startswith(('head.', 'fc_norm.')):
      rest[k] = v
    else:
      encoder[re.sub(r'^patch_embed\.proj\.', 'patch_embed.', k) if vit else k] = v
  params = traverse_util.unflatten_dict(torch_to_jax(rest), sep='/')
  params['encoder'] = traverse_util.unflatten_dict(torch_to_jax(encoder), sep='/')
  return params
