"""A pretraining or fine-tuning checkpoint -> params with `/`-joined names, as `.npz` or `.safetensors`, + config.

  python tools/export_params.py --checkpoint runs/base --out runs/base/encoder.npz --encoder_only
  python tools/export_params.py --checkpoint runs/base --out runs/base/encoder.safetensors --encoder_only
  python tools/export_params.py --checkpoint runs/base/checkpoints/400 --out all.safetensors --dtype bfloat16

--checkpoint is a workdir (latest step), its checkpoints dir (with --step) or one step dir; it and --out may be
URLs (gs://bucket/run, gs://bucket/out.npz). --out's suffix picks the format:
  .npz: one array per parameter and nothing else (np.load reads it); the config, and the dtype of any bfloat16
        array (stored as its uint16 bits: NumPy has no bfloat16), go to `<out>.json` beside it;
  .safetensors: one file, every dtype stored as itself (bfloat16 too), the config as JSON in its metadata.
Read either back with simmim_jax.params_io.load_params / load_config: bit-exact, bfloat16 included. A text run's
tokenizer (workdir/tokenizer.model) is copied beside --out, where init_from finds it.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # pylint: disable=g-import-not-at-top
import numpy as np
from flax import traverse_util

from simmim_jax import params_io, storage
from simmim_jax.data import tokenizer


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='workdir, checkpoints dir or step dir')
  parser.add_argument('--out', required=True, help='output .npz or .safetensors path')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  parser.add_argument('--encoder_only', action='store_true', help="export params['encoder'] alone")
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                      help='cast floating params (default: keep the stored dtypes)')
  args = parser.parse_args(argv)
  if not args.out.endswith(('.npz', '.safetensors')):
    parser.error(f'--out must end in .npz or .safetensors, got {args.out!r}')

  params = params_io.load_params(args.checkpoint, 'encoder' if args.encoder_only else None, step=args.step)
  config = params_io.load_config(args.checkpoint, step=args.step)
  if args.dtype:
    dtype = np.float32 if args.dtype == 'float32' else ml_dtypes.bfloat16
    flat = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16 else v
            for k, v in traverse_util.flatten_dict(params, sep='/').items()}
    params = traverse_util.unflatten_dict(flat, sep='/')
  export_config = dict(config or {})
  export_config['export'] = {'source': storage.absolute(args.checkpoint), 'step': args.step,
                             'encoder_only': args.encoder_only, 'dtype': args.dtype}
  flat = traverse_util.flatten_dict(params, sep='/')
  count = sum(int(np.prod(v.shape)) for v in flat.values())
  if args.out.endswith('.npz'):
    params_io.save_npz(args.out, params, export_config)
    where = f'config: {params_io.config_path(args.out)}'
  else:
    params_io.save_safetensors(args.out, params, export_config)
    where = 'config in its metadata'
  saved = tokenizer.saved_with(args.checkpoint)  # a text run's tokenizer travels with its weights
  if saved is not None:
    storage.write_bytes(os.path.join(os.path.dirname(storage.absolute(args.out)), tokenizer.FILE), saved)
    where += f'; its tokenizer: {tokenizer.FILE} beside it'
  print(f'Wrote {len(flat)} arrays, {count:,} parameters to {args.out} ({where})')


if __name__ == '__main__':
  main()
