"""A checkpoint and some images -> PNG grids of what SimMIM reconstructs, and the masked-patch L1 error.

  python tools/visualize.py --checkpoint runs/base --dataset sklearn_digits --split test --out runs/vis
  python tools/visualize.py --checkpoint /tmp/simmim_vit.npz --images photos/ cat.jpg --seed 3 --out runs/vis
  python tools/visualize.py --checkpoint runs/base --random_init --out runs/vis_untrained

--checkpoint is a workdir (latest step), a step dir, or an .npz with the decoder (tools/export_params.py without
--encoder_only); its config comes from the checkpoint or the JSON beside the .npz, unless --config names a
configs/*.py file. Images come from a tfds split (default: the config's dataset, split 'test') or from files and
folders (--images). Each PNG row: original | masked input | reconstruction | reconstruction pasted into the
visible pixels | L1 error per masked patch. The mask is drawn from --seed, so the same command redraws the same
figure. Writes <out>/reconstructions_seed<seed>.png (one row per image) and <out>/l1.json (per-image numbers);
--checkpoint and --out may be URLs (gs://...).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np

from simmim_jax import config_io, params_io, storage, visualize
from simmim_jax.data import samples


def load_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """--config (a configs/*.py file) if given, else the config stored with the checkpoint; then --set."""
  if args.config:
    return config_io.load_config(args.config, args.set)
  stored = params_io.load_config(args.checkpoint) if args.checkpoint else None
  if stored is None:
    raise SystemExit(f'No config found with --checkpoint {args.checkpoint!r} (an .npz needs its .json beside it): '
                     'pass --config configs/<the recipe it was trained with>.py.')
  return config_io.apply_overrides(ml_collections.ConfigDict(stored), args.set)


def load_images(args: argparse.Namespace, config: ml_collections.ConfigDict) -> np.ndarray:
  size = config.model.image_size
  if args.images:
    return samples.file_images(args.images, args.num_images, size, config.data.mean, config.data.std)
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.name = args.dataset or data.name
  data.split = args.split
  data.data_dir = args.data_dir if args.data_dir is not None else data.data_dir
  if data.name == 'synthetic':
    raise SystemExit("The config's dataset is 'synthetic': pass --dataset NAME or --images FILES_OR_FOLDERS.")
  return samples.split_images(data, args.num_images, size)


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', help='workdir, step dir, or .npz with encoder and decoder')
  parser.add_argument('--config', help='configs/*.py[:arg] to use instead of the stored config')
  parser.add_argument('--set', action='append', default=[], help='config override a.b=value (repeatable)')
  parser.add_argument('--random_init', action='store_true', help='random weights (the untrained baseline)')
  parser.add_argument('--dataset', help="tfds name (default: the config's data.name)")
  parser.add_argument('--split', default='test', help="tfds split, e.g. 'test' or 'validation[:64]'")
  parser.add_argument('--data_dir', default=None, help="tfds data_dir (default: the config's)")
  parser.add_argument('--images', nargs='+', help='image files and/or folders instead of a tfds split')
  parser.add_argument('--num_images', type=int, default=8)
  parser.add_argument('--seed', type=int, default=0, help='mask seed (and init seed with --random_init)')
  parser.add_argument('--mask_ratio', type=float, default=None, help="override the config's mask ratio")
  parser.add_argument('--mask_patch_size', type=int, default=None, help="override the config's mask patch size")
  parser.add_argument('--vmax', type=float, default=2.0, help='L1 at the top of the heat-map colour scale')
  parser.add_argument('--out', required=True, help='output folder')
  args = parser.parse_args(argv)
  if not args.checkpoint and not (args.random_init and args.config):
    parser.error('give --checkpoint, or --random_init with --config')
  if args.num_images < 1:
    parser.error('--num_images must be positive')

  config = load_config(args)
  if config.get('task', 'pretrain') != 'pretrain':
    parser.error(f"the checkpoint's config.task is {config.task!r}: reconstructions need a pretraining checkpoint")
  images = load_images(args, config)  # before the weights: a wrong split or path fails in seconds
  params = visualize.init_params(config, args.seed) if args.random_init else params_io.load_params(args.checkpoint)
  fig = visualize.figure(params, config, images, args.seed, mask_ratio=args.mask_ratio,
                         mask_patch_size=args.mask_patch_size, vmax=args.vmax)
  png = visualize.save_png(fig.grid, os.path.join(args.out, f'reconstructions_seed{args.seed}.png'), min_size=512,
                           title=visualize.caption(fig, args.vmax))
  result = {'mean_masked_l1': float(np.mean(fig.l1)), 'l1': fig.l1.tolist(), 'seed': args.seed,
            'checkpoint': args.checkpoint, 'random_init': args.random_init, 'png': png}
  storage.write_text(os.path.join(args.out, 'l1.json'), json.dumps(result, indent=2))
  print(f"mean masked-patch L1 over {len(images)} images: {result['mean_masked_l1']:.4f}")
  print(f'wrote {png}')
  return result


if __name__ == '__main__':
  try:
    main()
  except (FileNotFoundError, KeyError, ValueError) as e:  # a user's path, split or config: one line, no traceback
    sys.exit(f'error: {e}')
