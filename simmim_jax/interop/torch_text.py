"""The text encoder in PyTorch (imports torch and timm): loads the state dict of interop/text.py as it is.

  model = TextEncoder(**text.torch_kwargs(config['model']), with_head=True)
  model.load_state_dict(safetensors.torch.load_file('text.safetensors'))
  features = model(tokens, segment_ids, positions)            # (B, L, C)
  logits = model.logits(features)                              # masked-LM head, tied embedding
"""
import functools

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F


class MaskedLMHead(nn.Module):
  """dense -> GELU (erf) -> LayerNorm(eps 1e-12) -> tied embedding + a bias per id."""

  def __init__(self, width: int, vocab_size: int):
    super().__init__()
    self.dense = nn.Linear(width, width)
    self.norm = nn.LayerNorm(width, eps=1e-12)
    self.bias = nn.Parameter(torch.zeros(vocab_size))

  def forward(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    return self.norm(F.gelu(self.dense(features))) @ embedding.T + self.bias


class TextEncoder(nn.Module):
  """Ids, segment ids, positions (B, L) and an optional {0,1} mask -> features (B, L, width)."""

  def __init__(self, vocab_size: int, width: int, depth: int, mlp_dim: int, num_heads: int, max_len: int,
               mask_id: int = 3, with_head: bool = False):
    super().__init__()
    self.mask_id = mask_id
    self.embedding = nn.Embedding(vocab_size, width)
    self.pos_embed = nn.Parameter(torch.zeros(max_len, width))
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    self.blocks = nn.ModuleList([Block(width, num_heads, mlp_dim / width, qkv_bias=True, norm_layer=norm)
                                 for _ in range(depth)])
    self.norm = norm(width)
    self.head = MaskedLMHead(width, vocab_size) if with_head else None

  def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor, positions: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    x = self.embedding(tokens)
    if mask is not None:  # masked inputs take the [MASK] row, blended as the JAX encoder does
      w = mask[..., None].to(x.dtype)
      x = x * (1 - w) + self.embedding.weight[self.mask_id] * w
    x = x + self.pos_embed[positions]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    bias = torch.where(same, 0.0, -1e9)[:, None].to(x.dtype)  # no attention across packed segments
    for block in self.blocks:
      x = block(x, attn_mask=bias)
    return self.norm(x)

  def logits(self, features: torch.Tensor) -> torch.Tensor:
    return self.head(features, self.embedding.weight)
