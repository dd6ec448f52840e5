"""Params (a workdir or step dir, or an `.npz` / `.safetensors` from tools/export_params.py) -> PyTorch.

  python tools/convert_to_torch.py --params runs/base --out runs/base/timm
  python -c "import timm; m = timm.create_model('local-dir:runs/base/timm', pretrained=True)"
  python tools/convert_to_torch.py --params runs/base/encoder.npz --out runs/base/encoder_timm.safetensors
  python tools/convert_to_torch.py --params runs/base --out runs/base/simmim.pth.safetensors --layout official

--layout timm (default, vision models): the matching timm model (plain ViT -> VisionTransformer, BEiT-style ViT ->
Beit, Swin -> SwinTransformer, SwinV2 -> SwinTransformerV2), weights loaded with strict=True, its output equal to
this package's encoder (pretraining params: forward_features; fine-tuned ones: the classifier's logits).
  --out FOLDER (no .safetensors suffix): timm's own folder format, as timm.models.save_for_hf writes it:
      config.json (architecture, model_args, preprocessing) + model.safetensors; timm.create_model(
      'local-dir:FOLDER', pretrained=True) builds and loads it offline (and `hf-hub:` once the folder is
      uploaded). Needs timm. The architecture is the registered timm model of that size, or one of the same
      class whose arguments model_args replace (non-standard sizes such as 'Mu/4').
  --out FILE.safetensors: the bare state dict; the class and constructor arguments are printed and written
      to `<out>.timm.json`.
Either way the SimMIM parts timm has no place for (mask token, decoder) go beside it (`simmim.safetensors` in
the folder, `<out>.simmim.safetensors` beside the file), and params_io.load_params reads the folder or file
back bit-exactly, those parts included. bfloat16 params stay bfloat16.
--layout official: the official SimMIM state dict (encoder.* / decoder.*, or the fine-tuned names), one file.
The text encoder always uses the layout documented in simmim_jax/interop/text.py (module: interop/torch_text.py,
spec in `<out>.text.json`), one file. --params and --out may be URLs (gs://bucket/...).
"""
import argparse
import json
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simmim_jax import defaults, params_io, storage  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import official, timm, torch_io


def stem(path: str) -> str:
  return path.removesuffix('.safetensors')


def write_safetensors(path: str, state: dict) -> None:
  """torch_io.write_safetensors to any path, a URL too: serialised in memory, written whole."""
  from safetensors.torch import save  # pylint: disable=import-outside-toplevel
  storage.write_bytes(path, save({k: torch_io.to_tensor(v) for k, v in state.items()}))


def write_json(path: str, data: dict) -> None:
  storage.write_text(path, json.dumps(data, indent=2))


# A registered timm architecture per class, for sizes timm has no name for: model_args replace all its arguments.
FALLBACK_ARCHITECTURES = {'VisionTransformer': 'vit_base_patch16_224', 'Beit': 'beit_base_patch16_224',
                          'SwinTransformer': 'swin_base_patch4_window7_224',
                          'SwinTransformerV2': 'swinv2_base_window8_256'}


def write_timm_folder(folder: str, spec: dict[str, Any], state: dict, extras: dict, config: dict[str, Any]) -> str:
  """timm's folder format through timm's own writer (timm.models.save_for_hf): config.json + model.safetensors,
  plus the SimMIM extras as simmim.safetensors. Returns the architecture named in config.json."""
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f'The timm folder format needs timm and torch ({e}): pip install timm, or give --out a '
                     '.safetensors file for the bare state dict.') from e
  architecture = spec['name'] or FALLBACK_ARCHITECTURES[spec['class']]
  model = timm.create_model(architecture, pretrained=False, **spec['kwargs'])  # random init: never downloads
  model.load_state_dict({k: torch_io.to_tensor(v) for k, v in state.items()}, strict=True)
  dtypes = {str(v.dtype) for v in state.values()}
  if dtypes == {'bfloat16'}:
    model = model.to(torch.bfloat16)  # the weights were bfloat16: stored as such (exact both ways)
  data = config.get('data', {})
  # What this package's evaluation does: resize the short side to 256/224 of the size, centre crop, normalise.
  preprocessing = {'mean': list(data.get('mean', defaults.IMAGENET_MEAN)),
                   'std': list(data.get('std', defaults.IMAGENET_STD)),
                   'interpolation': data.get('interpolation', 'bicubic'), 'crop_pct': 224 / 256,
                   'crop_mode': 'center', 'tag': 'simmim_jax'}
  with tempfile.TemporaryDirectory() as tmp:  # timm writes local files; copied whole to `folder` (a URL too)
    timm.models.save_for_hf(model, tmp, model_config={'pretrained_cfg': preprocessing}, model_args=spec['kwargs'],
                            safe_serialization=True)
    hf_config = json.load(open(os.path.join(tmp, params_io.TIMM_CONFIG)))
    hf_config['pretrained_cfg'].pop('license', None)  # the registered architecture's, not these weights'
    write_json(os.path.join(folder, params_io.TIMM_CONFIG), hf_config)
    storage.write_bytes(os.path.join(folder, params_io.TIMM_WEIGHTS),
                        open(os.path.join(tmp, params_io.TIMM_WEIGHTS), 'rb').read())
  if extras:
    write_safetensors(os.path.join(folder, params_io.TIMM_EXTRAS), extras)
  return architecture


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--params', required=True, help='a workdir or step dir, or an .npz / .safetensors export')
  parser.add_argument('--out', required=True,
                      help='a folder (timm layout: timm\'s folder format) or a .safetensors file')
  parser.add_argument('--layout', choices=('timm', 'official'), default='timm')
  parser.add_argument('--config', default=None, help='config JSON (default: the one beside --params)')
  args = parser.parse_args(argv)
  folder = not args.out.endswith('.safetensors')
  if folder and args.layout == 'official':
    parser.error(f'--layout official writes one file: give --out a .safetensors path, got {args.out!r}')
  if folder and storage.path(args.out).is_file():
    parser.error(f'--out {args.out!r} is a file: give a folder (timm format) or a .safetensors path')

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
    if folder:
      parser.error(f'The text encoder has no timm model: give --out a .safetensors path, got {args.out!r}')
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
  if folder:
    architecture = write_timm_folder(args.out, spec, state, extras, config)
    print(f'Wrote timm folder {args.out}: config.json (architecture {architecture}, timm.models.{spec["class"]}) and '
          f'{params_io.TIMM_WEIGHTS} ({len(state)} tensors)'
          + (f'; SimMIM parts timm has no place for ({", ".join(sorted(extras))}) in {params_io.TIMM_EXTRAS}'
             if extras else ''))
    print('Load it with:')
    print(f"  import timm\n  model = timm.create_model('local-dir:{args.out}', pretrained=True)")
    return
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
