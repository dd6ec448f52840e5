"""Times the image input pipeline alone (decode + augment + batch on this host), beside the train step.

  python tools/pipeline_benchmark.py --config configs/simmim_vit_base.py --jpegs 256 --jpeg_size 500x375
  python tools/pipeline_benchmark.py --config configs/simmim_vit_base.py --set data.data_dir=DIR   # its dataset
  taskset -c 0 python tools/pipeline_benchmark.py --config configs/simmim_swin_base.py --jpegs 256 --decode full
  python tools/pipeline_benchmark.py --config configs/base.py --step        # + the train step's consumption

Runs the config's real pipeline (data.name: a tfds dataset, image_folder, sklearn_digits) or, with --jpegs N,
an image_folder of N synthetic JPEGs it writes itself (fixed seed, --jpeg_size, --quality) into --jpeg_dir.
Prints images/s in total and per core (the cores this process may run on: taskset / cgroups) and per CPU-second
of this process (the cost, robust to other work on the same cores; with the 1-minute load beside), the bytes of
one batch as it goes to the device, and with --step the train step's images/s for the same config (synthetic
input, this machine's devices), so a user sees how many host cores feed one step: cores = step / per core.

--decode full runs the previous pipeline instead (whole-image decode, crop, resize, host normalisation to
float32): the baseline the crop decode and uint8 batches are measured against. --task finetune times the
fine-tuning train transform (RandAugment, erasing box) instead of SimMIM's.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top


def write_jpegs(folder: str, count: int, width: int, height: int, quality: int = 90, seed: int = 0) -> str:
  """count photo-like JPEGs (smooth colour fields + noise, so they compress like photos), written once."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    path = os.path.join(folder, f'{i:06d}.jpg')
    small = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3)).astype(np.uint8)
    noise = rng.integers(-10, 11, (height, width, 3))
    if os.path.exists(path):
      continue
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.int16) + noise
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, 'JPEG', quality=quality)
  return folder


def full_decode_transform(data, image_size: int):
  """The previous pretraining transform: decode the whole image, crop, resize, flip, normalise to float32."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import images  # pylint: disable=import-outside-toplevel

  def transform(key, encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    shape = tf.shape(image)
    y, x, h, w = images.random_resized_crop_window(crop_key, shape[0], shape[1], data.crop_scale, data.crop_ratio)
    image = tf.image.resize(image[y:y + h, x:x + w], [image_size, image_size], 'bilinear', antialias=True)
    if data.flip:
      image = tf.where(tf.random.stateless_uniform([], flip_key) < 0.5, image[:, ::-1], image)
    return (image / 255.0 - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)

  return transform


def pipeline(config, batch_size: int, decode: str, task: str):
  """The endless batches of this config's pipeline on this host (process 0 of 1)."""
  from simmim_jax.data import classification, images, sources  # pylint: disable=import-outside-toplevel
  size = config.model.image_size
  if decode == 'full':
    return sources.keyed_batches(config.data, full_decode_transform(config.data, size), batch_size=batch_size,
                                 seed=0, process_index=0, process_count=1)
  make = classification.train_batches if task == 'finetune' else images.pretrain_batches
  return make(config.data, image_size=size, batch_size=batch_size, seed=0, process_index=0, process_count=1)


def time_pipeline(batches, batch_size: int, seconds: float, warmup: int) -> tuple[float, float, int]:
  """(images/s over `seconds` after `warmup` batches, images per CPU-second, bytes of one batch).

  Images per CPU-second divides by the CPU time of this process's threads alone: on cores shared with other
  work (a loaded machine) it still measures the pipeline's cost, where images/s measures the share it got."""
  for _ in range(warmup):
    batch = next(batches)
  count, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    batch = next(batches)
    count += batch_size
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  return count / wall, count / cpu, sum(v.nbytes for v in batch.values())


def time_step(config, steps: int = 5) -> float:
  """images/s of the jitted pretraining step on synthetic uint8 input (this machine's devices)."""
  import jax  # pylint: disable=import-outside-toplevel
  from simmim_jax import feed, pretrain_step, sharding, tasks  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()
  config.data.name = 'synthetic'
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, 10**6, 1000)
  state, step = s.init(), pretrain_step.make_train_step(task, s)
  batches = feed.prefetch(task.data().batches(0), sharding.batch_sharding(mesh))
  for _ in range(2):  # compile + one warm step
    state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  return config.batch_size * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/x.py[:arg]')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value')
  parser.add_argument('--jpegs', type=int, default=0, help='write and read this many synthetic JPEGs instead')
  parser.add_argument('--jpeg_size', default='500x375', help='WIDTHxHEIGHT of the synthetic JPEGs')
  parser.add_argument('--quality', type=int, default=90)
  parser.add_argument('--jpeg_dir', default='/tmp/simmim_pipeline_jpegs', help='where the JPEGs are written')
  parser.add_argument('--image_size', type=int, default=None, help='crop size (default: model.image_size)')
  parser.add_argument('--batch_size', type=int, default=128, help='per-host batch of the timed pipeline')
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--warmup', type=int, default=4, help='untimed batches first (tracing, autotune)')
  parser.add_argument('--decode', choices=('crop', 'full'), default='crop', help='full: the previous pipeline')
  parser.add_argument('--task', choices=('pretrain', 'finetune'), default='pretrain')
  parser.add_argument('--step', action='store_true', help="also time the train step's consumption")
  args = parser.parse_args(argv)

  from simmim_jax import config_io  # pylint: disable=import-outside-toplevel
  overrides = list(args.set)
  if args.jpegs:
    width, height = (int(v) for v in args.jpeg_size.lower().split('x'))
    root = os.path.join(args.jpeg_dir, f'{width}x{height}_q{args.quality}_{args.jpegs}')
    # <root>/train/<one label>/: the labelled layout, so the fine-tuning transform (which needs labels) reads it too.
    write_jpegs(os.path.join(root, 'train', 'synthetic'), args.jpegs, width, height, args.quality)
    overrides += ['data.name=image_folder', f'data.data_dir={root}', 'data.split=train']
  if args.image_size:
    overrides.append(f'model.image_size={args.image_size}')
  config = config_io.load_config(args.config, overrides)
  if args.task == 'finetune':  # a pretraining config gets the fine-tuning transform's fields (timm's defaults)
    from simmim_jax import defaults  # pylint: disable=import-outside-toplevel
    with config.data.unlocked():
      for key in ('interpolation', 'rand_augment', 'random_erasing'):
        if key not in config.data:
          config.data[key] = defaults.finetune_config().data[key]
  config.data.shuffle_buffer = min(config.data.shuffle_buffer, 1024)  # timing, not mixing
  cores = len(os.sched_getaffinity(0))
  rate, cpu_rate, nbytes = time_pipeline(pipeline(config, args.batch_size, args.decode, args.task), args.batch_size,
                                         args.seconds, args.warmup)
  result = {'images_per_s': rate, 'per_core': rate / cores, 'per_cpu_second': cpu_rate, 'cores': cores,
            'batch_bytes': nbytes, 'load': os.getloadavg()[0]}
  print(f'pipeline [{args.task}, decode {args.decode}, {config.data.name}, {config.model.image_size}px, batch '
        f'{args.batch_size}]: {rate:,.1f} images/s on {cores} cores = {rate / cores:,.1f} images/s per core '
        f'({cpu_rate:,.1f} per CPU-second of this process; 1-min load {result["load"]:.2f}); '
        f'{nbytes:,} bytes per batch to the device ({nbytes // args.batch_size:,} per image)', flush=True)
  if args.step:
    step_rate = time_step(config)
    result['step_images_per_s'] = step_rate
    print(f'train step [{config.model.name} {config.model.variant}, batch {config.batch_size}]: {step_rate:,.1f} '
          f'images/s on this machine\'s devices; feeding it takes {step_rate / (rate / cores):,.1f} host cores at '
          f'{rate / cores:,.1f} images/s per core', flush=True)
  return result


if __name__ == '__main__':
  main()
