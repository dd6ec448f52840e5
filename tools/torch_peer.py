"""The PyTorch peer of the pretraining step: the same architecture in timm, SimMIM's head and loss, AdamW + clip.

  python tools/torch_peer.py --config configs/base.py --set batch_size=64 --steps 10
  python tools/torch_peer.py --config configs/simmim_vit_base.py --set batch_size=8 --set model.dtype=float32

For a side-by-side benchmark (`tools/benchmark.py --against torch`): `make_train_step(config)` returns a
callable step on a fixed synthetic batch; `time_steps(step, steps, warmup)` times it as tools/benchmark.py
times the JAX step (warm-up untimed, then `steps` steps, blocking on the last loss).

What is the same as the JAX step (one config drives both):
- encoder: the timm class and constructor arguments simmim_jax.interop.timm.timm_spec gives for the config
  (Beit for the BEiT-style ViT, VisionTransformer for the plain one, SwinTransformer / SwinTransformerV2),
  model.drop_path_rate, randomly initialised; masked tokens replaced by a learned mask token right after the
  patch embedding (ViT: before the cls token; Swin: after the patch norm), as the official SimMIM code;
- head and loss: 1x1 conv to stride^2 * 3 channels + PixelShuffle, masked L1 (sum |x - x_rec| * mask /
  (sum mask + 1e-5) / channels), on normalised-pixel-sized random images;
- mask: SimMIM's block mask (ceil(ratio * cells) of mask_patch_size cells per image), drawn in the step;
- optimizer: clip_grad_norm_(optim.clip_grad) then AdamW (b1, b2, eps, weight_decay; 1-d params and the
  encoder's no_weight_decay names exempt), one fixed learning rate (the schedule costs nothing either side);
- precision: model.dtype float32, or bfloat16 / float16 autocast around forward and loss (params float32).
What differs: the input (a fixed batch here, synthetic batches streamed to the JAX step), and the JAX step's
metrics (grad and param norms).
"""
import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# timm before anything that may load TensorFlow (triton, pulled in by timm, segfaults after TF).
import timm.models  # pylint: disable=g-import-not-at-top,unused-import
import torch  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
from torch import nn  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import timm as timm_interop  # pylint: disable=g-import-not-at-top

NO_DECAY = {'vit': ('pos_embed', 'cls_token'),  # as the JAX encoders' no_weight_decay (+ 1-d params)
            'swin': ('absolute_pos_embed', 'mask_token')}
AUTOCAST = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


class SimMIMPeer(nn.Module):
  """A timm encoder + SimMIM's mask token and pixel decoder: (images NCHW, token mask (B, h, w)) -> loss."""

  def __init__(self, encoder: nn.Module, family: str, stride: int, patch_size: int, in_chans: int = 3):
    super().__init__()
    self.encoder, self.family, self.stride, self.patch_size = encoder, family, stride, patch_size
    width = encoder.num_features if family == 'swin' else encoder.embed_dim
    embed = encoder.embed_dim
    self.mask_token = nn.Parameter(torch.zeros(1, 1, embed))
    nn.init.trunc_normal_(self.mask_token, std=0.02)
    self.decoder = nn.Sequential(nn.Conv2d(width, stride**2 * in_chans, kernel_size=1), nn.PixelShuffle(stride))

  def features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, width, H/stride, W/stride)."""
    enc = self.encoder
    if self.family == 'swin':
      x = enc.patch_embed(x)  # (B, h, w, C), normalised
      w = mask.unsqueeze(-1).type_as(x)
      x = x * (1 - w) + self.mask_token.view(1, 1, 1, -1) * w
      return enc.norm(enc.layers(x)).permute(0, 3, 1, 2)
    x = enc.patch_embed(x)  # (B, N, C)
    b, n, _ = x.shape
    w = mask.flatten(1).unsqueeze(-1).type_as(x)
    x = x * (1 - w) + self.mask_token * w
    if isinstance(enc, timm.models.beit.Beit):
      x = torch.cat((enc.cls_token.expand(b, -1, -1), x), dim=1)
      if enc.pos_embed is not None:
        x = x + enc.pos_embed
      x = enc.pos_drop(x)
      rel_pos_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
      for blk in enc.blocks:
        x = blk(x, shared_rel_pos_bias=rel_pos_bias)
    else:  # VisionTransformer: _pos_embed prepends the cls token and adds the position embedding
      x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))  # pylint: disable=protected-access
      x = enc.blocks(x)
    x = enc.norm(x)[:, 1:]
    side = int(math.isqrt(n))
    return x.transpose(1, 2).reshape(b, -1, side, side)

  def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    reconstruction = self.decoder(self.features(images, mask))
    pixel_mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)
    pixel_mask = pixel_mask.type_as(reconstruction)
    l1 = (images.float() - reconstruction.float()).abs()
    return (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / images.shape[1]


def block_mask(batch: int, cells: int, scale: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
  """SimMIM's MaskGenerator for a batch: ceil(ratio * cells^2) random cells per image, each scale x scale tokens."""
  count = math.ceil(cells * cells * ratio)
  order = torch.rand(batch, cells * cells, generator=generator).argsort(dim=1)
  mask = torch.zeros(batch, cells * cells, dtype=torch.int32)
  mask.scatter_(1, order[:, :count], 1)
  mask = mask.view(batch, cells, cells)
  return mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def build(config: Any, device: str = 'cpu') -> tuple[SimMIMPeer, torch.optim.Optimizer]:
  """The peer model (train mode) and its AdamW for a config's model and optim sections."""
  model_cfg = config.model.to_dict() if hasattr(config.model, 'to_dict') else dict(config.model)
  spec = timm_interop.timm_spec(model_cfg)
  encoder = timm_interop.build(spec, drop_path_rate=float(config.model.drop_path_rate))
  family = 'swin' if config.model.name in ('swin', 'swinv2') else 'vit'
  patch = config.mask.model_patch_size
  stride = patch * 2**(len(spec['kwargs']['depths']) - 1) if family == 'swin' else patch
  model = SimMIMPeer(encoder, family, stride, patch, config.model.in_chans).to(device).train()
  skip = NO_DECAY[family]
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim <= 1 or any(s in name for s in skip) else decay).append(p)
  o = config.optim
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': o.weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=o.base_lr * config.batch_size / 512, betas=(o.b1, o.b2), eps=o.eps)
  return model, optimizer


def make_train_step(config: Any, device: str = 'cpu', compile_model: bool = False,
                    seed: int = 0) -> Callable[[], torch.Tensor]:
  """step() -> loss (a tensor, not synced): masks drawn, forward + backward, clip, AdamW, on one fixed batch."""
  torch.manual_seed(seed)
  model, optimizer = build(config, device)
  forward = torch.compile(model) if compile_model else model
  size, chans, batch = config.model.image_size, config.model.in_chans, config.batch_size
  m = config.mask
  generator = torch.Generator().manual_seed(seed)
  images = torch.randn(batch, chans, size, size, generator=generator).to(device)
  cells, scale = size // m.mask_patch_size, m.mask_patch_size // m.model_patch_size
  dtype = AUTOCAST.get(str(config.model.dtype))
  device_type = torch.device(device).type
  params = [p for group in optimizer.param_groups for p in group['params']]

  def step() -> torch.Tensor:
    mask = block_mask(batch, cells, scale, m.mask_ratio, generator).to(device)
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
      loss = forward(images, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad)
    optimizer.step()
    return loss.detach()

  return step


def time_steps(step: Callable[[], torch.Tensor], steps: int, warmup: int, batch_size: int) -> dict[str, float]:
  """Runs `warmup` untimed steps (the first compiles, with torch.compile), then times `steps` steps; the last
  loss is read back (blocks, as the JAX timing does). Returns seconds per step, steps/s, examples/s, loss."""
  loss = None
  for _ in range(warmup):
    loss = step()
  if loss is not None:
    loss.item()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  value = loss.item()
  seconds = (time.perf_counter() - start) / steps
  return {'step_s': seconds, 'steps_per_s': 1 / seconds, 'examples_per_s': batch_size / seconds, 'loss': value}


def matmul_peak_tflops(device: str = 'cpu', dtype: torch.dtype = torch.float32, n: int = 2048,
                       seconds: float = 1.0) -> float:
  """Measured TFLOP/s of an n x n matmul on this device: the peak a % of peak is taken against."""
  a = torch.randn(n, n, device=device, dtype=dtype)
  b = torch.randn(n, n, device=device, dtype=dtype)
  (a @ b).sum().item()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    c = a @ b
    count += 1
  c.sum().item()
  return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/x.py[:arg]')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--device', default='cpu')
  parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch decides)')
  parser.add_argument('--compile', action='store_true', help='torch.compile the model (the first step compiles)')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  config = config_io.load_config(args.config, args.set)
  r = time_steps(make_train_step(config, args.device, args.compile), args.steps, args.warmup, config.batch_size)
  m = config.model
  name = f'{m.name} {m.variant} {m.image_size}px, batch {config.batch_size}, {m.dtype}'
  print(f'torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads) [{name}]\n'
        f'  {r["steps_per_s"]:.3f} steps/s | {r["examples_per_s"]:.1f} images/s | loss {r["loss"]:.4f}', flush=True)


if __name__ == '__main__':
  main()
