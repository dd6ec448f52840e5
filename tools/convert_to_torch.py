"""Params (`.npz` from tools/export_params.py, or a checkpoint) -> a PyTorch state dict as safetensors.

  python tools/convert_to_torch.py --params /tmp/simmim_vit.npz --out /tmp/simmim_vit.safetensors
  python tools/convert_to_torch.py --params /tmp/workdir --out /tmp/simmim.pth.safetensors --layout official

--layout timm (default, vision): the state dict of the matching timm model (plain ViT -> VisionTransformer,
BEiT-style ViT -> Beit, Swin -> SwinTransformer, SwinV2 -> SwinTransformerV2); loads with strict=True. Its
class and constructor arguments are printed and written to `<out>.timm.json`; the SimMIM parts timm has
no place for (mask token, decoder) go to `<out>.simmim.safetensors`.
--layout official: the official SimMIM state dict (encoder.* / decoder.*, or the fine-tuned names).
The text encoder always uses the layout documented in simmim_jax/interop/text.py (module: interop/torch_text.py,
spec in `<out>.text.json`). --params and --out may be URLs (gs://bucket/...).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simmim_jax import params_io, storage  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import official, timm, torch_io


def stem(path: str) -> str:
  return path.removesuffix('.safetensors')


def write_safetensors(path: str, state: dict) -> None:
  """torch_io.write_safetensors to any path, a URL too: serialised in memory, written whole."""
  from safetensors.torch import save  # pylint: disable=import-outside-toplevel
  storage.write_bytes(path, save({k: torch_io.to_tensor(v) for k, v in state.items()}))


def write_json(path: str, data: dict) -> None:
  storage.write_text(path, json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--params', required=True, help='.npz from export_params.py, or a workdir/step dir')
  parser.add_argument('--out', required=True, help='output .safetensors path')
  parser.add_argument('--layout', choices=('timm', 'official'), default='timm')
  parser.add_argument('--config', default=None, help='config JSON (default: the one beside --params)')
  args = parser.parse_args(argv)
  if not args.out.endswith('.safetensors'):
    parser.error(f'--out must end in .safetensors, got {args.out!r}')

  params = params_io.load_params(args.params)
  if args.config:
    config = json.loads(storage.read_text(args.config))
  else:
    config = params_io.load_config(args.params)
  if not config or 'model' not in config:
    parser.error(f'No config with a model section beside {args.params}: pass --config (a config.json of the run).')
  if config.get('task') == 'linear_probe':
    parser.error('A linear-probe checkpoint is a probe (parameter-free BatchNorm, possibly a truncated ViT) on a frozen '
                 'encoder, which no timm model holds: convert the pretrained checkpoint it was trained from.')
  model = config['model']

  if model['name'] == 'text':
    from simmim_jax.interop import text  # pylint: disable=import-outside-toplevel
    state = text.to_torch(params)
    spec = {'class': 'simmim_jax.interop.torch_text.TextEncoder',
            'kwargs': dict(text.torch_kwargs(model), with_head=any(k.startswith('head.') for k in state))}
    write_safetensors(args.out, state)
    write_json(stem(args.out) + '.text.json', spec)
    print(f'Wrote {len(state)} tensors to {args.out} (text layout: see simmim_jax/interop/text.py)')
    print(f'Build and load it with:\n  from simmim_jax.interop import torch_text\n'
          f'  model = torch_text.TextEncoder(**{spec["kwargs"]!r})\n'
          f'  model.load_state_dict(safetensors.torch.load_file({args.out!r}))')
    return
  if args.layout == 'official':
    state = official.to_official(params)
    write_safetensors(args.out, state)
    print(f'Wrote {len(state)} tensors to {args.out} (official SimMIM layout)')
    return

  state, extras = timm.to_timm(params)
  spec = timm.timm_spec(model, params)
  write_safetensors(args.out, state)
  write_json(stem(args.out) + '.timm.json', spec)
  print(f'Wrote {len(state)} tensors to {args.out} for timm.models.{spec["class"]}'
        + (f' (registered architecture: {spec["name"]})' if spec['name'] else ''))
  if extras:
    write_safetensors(stem(args.out) + torch_io.SIDECAR, extras)
    print(f'SimMIM parts timm has no place for ({", ".join(sorted(extras))}) -> {stem(args.out)}{torch_io.SIDECAR}')
  print('Build and load it with:')
  print('  import timm, safetensors.torch')
  print(f'  model = timm.models.{spec["class"]}(**{spec["kwargs"]!r})')
  print(f'  model.load_state_dict(safetensors.torch.load_file({args.out!r}))')


if __name__ == '__main__':
  main()
