"""tfds sources for every pipeline: the prepared builder, split sizes, and keyed per-process batches.

Batches from keyed_batches are a pure function of (seed, process, batch number): epoch e is a shuffle seeded
from (seed, process, e), and each example's transform gets a stateless key from (epoch, index within the
epoch). So resuming at batch k rebuilds exactly the batches k, k+1, ... without decoding the examples before
it. Each epoch drops its last partial batch, so batches never straddle two epochs.

image_folder reads files listed by data/folders.py instead of a tfds builder; every pipeline here runs on a
private thread pool sized to the host (data.threads) with autotuned parallel maps, and reads tfrecord shards
or files in parallel.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simmim_jax.data import builders, folders
from simmim_jax.data.builders import digits, medical_abstracts, mnist, pydoc_topics

try:
  # The accelerators belong to JAX; TensorFlow only runs the host-side input pipeline.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices elsewhere; nothing left to hide.
  pass

IMAGE_FOLDER = 'image_folder'  # <data_dir>/<split>/<label>/*.jpg, or any folder / glob / list (data/folders.py)
# Real datasets shipped inside installed packages: prepared locally, so they never need a download.
_EMBEDDED = {digits.NAME: digits.ensure_prepared, mnist.NAME: mnist.ensure_prepared,
             pydoc_topics.NAME: pydoc_topics.ensure_prepared, medical_abstracts.NAME: medical_abstracts.ensure_prepared}


class DatasetNotFoundError(ValueError):
  """The configured dataset is unknown or not prepared under data_dir."""


def prepared_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for data.name (images or text); never downloads."""
  if data.name in _EMBEDDED:
    return _EMBEDDED[data.name](data.data_dir)
  if data.name == IMAGE_FOLDER:
    # Only the labelled layout has a tfds builder; the pipelines here read image_folder through folder_index.
    if not data.data_dir or not folders.is_labelled(os.path.expanduser(data.data_dir), data.split):
      raise DatasetNotFoundError(
          f'{IMAGE_FOLDER} as a tfds builder needs data.data_dir laid out as <data_dir>/<split>/<label>/*.jpg; '
          f'got data_dir={data.data_dir!r}, split={data.split!r}.')
    return tfds.ImageFolder(os.path.expanduser(data.data_dir))
  where = os.path.expanduser(data.data_dir) if data.data_dir else tfds.core.constants.DATA_DIR
  offline = (f'Without tfds: data.name={digits.NAME}, {mnist.NAME} or {IMAGE_FOLDER} for images, '
             f'{pydoc_topics.NAME} or text_files for text, {medical_abstracts.NAME} for labelled text.')
  try:
    builder = tfds.builder(data.name, data_dir=data.data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is neither a registered tfds dataset nor prepared under '
        f'data_dir={where}. Check data.name. {offline}') from None
  if not builders.is_prepared(builder):  # tfds's own check would first warn about the missing folder
    hint = (f' {data.name} needs files you fetch yourself: put them in {where}/downloads/manual first.'
            if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else '')
    # Loading would start a download (minutes of DNS retries offline), so stop here instead.
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is not prepared under data_dir={where}.{hint} Prepare it with '
        f'`tfds build {data.name} --data_dir={where}` (or copy a prepared {where}/{data.name} '
        f'folder there), or set data.data_dir to where it is. {offline}')
  return builder


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a split or sub-split ('train', 'train[:10%]'), with a clear error for a wrong split name."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Split {split!r} not available for {builder.name}; it has '
                     f'{list(builder.info.splits.keys())}. ({e})') from None


def folder_index(data: ml_collections.ConfigDict, split: str | None = None) -> folders.FolderIndex:
  """The checked index of an image_folder split (data/folders.py), with DatasetNotFoundError for no images."""
  if not data.data_dir:
    raise DatasetNotFoundError(f'{IMAGE_FOLDER} needs data.data_dir: a folder (<split>/<label>/ or any images, '
                               'recursive), a glob, or a comma-separated list of those and .txt file lists.')
  try:
    return folders.folder_index(str(data.data_dir), split or data.split, data.get('bad_images', 'skip'))
  except FileNotFoundError as e:
    raise DatasetNotFoundError(f'{IMAGE_FOLDER}: {e}') from None


def num_examples(data: ml_collections.ConfigDict) -> int:
  """Examples in data.split, all processes together."""
  if data.name == IMAGE_FOLDER:
    return len(folder_index(data))
  return split_size(prepared_builder(data), data.split)


def host_threads(data: ml_collections.ConfigDict) -> int:
  """Threads for the input pipeline: data.threads, or every core this process may run on (taskset, cgroups)."""
  return data.get('threads') or len(os.sched_getaffinity(0))


def with_options(ds: tf.data.Dataset, data: ml_collections.ConfigDict) -> tf.data.Dataset:
  """A private thread pool sized to the host (not TF's global one, shared with anything else in the
  process), autotuned parallelism and buffers, and the order kept (batches are a function of the key)."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = host_threads(data)
  options.autotune.enabled = True
  options.deterministic = True
  return ds.with_options(options)


def read_config() -> tfds.ReadConfig:
  """tfrecord shards read in parallel (an autotuned interleave over files, tfds's default cycle of 16, so the
  example order is tfds's); no prefetch inside, the pipeline prefetches whole batches at its end."""
  return tfds.ReadConfig(num_parallel_calls_for_interleave_files=tf.data.AUTOTUNE, skip_prefetch=True)


def read_files(ds: tf.data.Dataset) -> tf.data.Dataset:
  """(path, label) -> {'image': encoded bytes, 'label'}: files read in parallel, in order."""
  return ds.map(lambda path, label: {'image': tf.io.read_file(path), 'label': label},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _process_slice(data: ml_collections.ConfigDict, index: int, count: int) -> tuple[tf.data.Dataset, int, bool]:
  """This process's equal-size slice of the split, images left encoded; its size; whether the elements are
  still file paths ((path, label): read them after the shuffle, so only this slice's kept files are read)."""
  if data.name == IMAGE_FOLDER:  # slice the list itself: other processes' files are never opened
    found = folder_index(data)
    size = len(found) // count
    rows = slice(index * size, (index + 1) * size)
    return tf.data.Dataset.from_tensor_slices((list(found.paths[rows]), found.labels[rows])), size, True
  builder = prepared_builder(data)
  decoders = {'image': tfds.decode.SkipDecoding()}  # decode later, only what is not skipped
  sub = tfds.even_splits(data.split, n=count, drop_remainder=True)[index]
  ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders, read_config=read_config())
  return ds.map(lambda ex: (ex['image'], ex.get('label', -1))), split_size(builder, sub), False


Transform = Callable[[tf.Tensor, tf.Tensor], tf.Tensor | dict[str, tf.Tensor]]


def keyed_batches(data: ml_collections.ConfigDict, transform: Transform, *, batch_size: int, seed: int,
                  start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of transform(example key, encoded image) (a tensor: 'image'; or a dict of features) and
  labels: the scheme in the module doc."""
  return iter(tfds.as_numpy(keyed_dataset(data, transform, batch_size=batch_size, seed=seed,
                                          start_batch=start_batch, process_index=process_index,
                                          process_count=process_count)))


def keyed_dataset(data: ml_collections.ConfigDict, transform: Transform, *, batch_size: int, seed: int,
                  start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
  """keyed_batches' tf.data pipeline, with its options (thread pool, autotune, determinism)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  source, size, paths = _process_slice(data, index, count)
  epoch_batches = size // batch_size
  if epoch_batches == 0:
    raise ValueError(f'Process slice of {data.name}:{data.split} has {size} examples, fewer than '
                     f'the per-process batch size {batch_size}.')
  first_epoch, skip_batches = divmod(start_batch, epoch_batches)
  process_key = tf.constant([seed, index], tf.int64)

  def epoch_key(epoch: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(process_key, epoch)

  def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
    # -1 is no example index, so the shuffle seed never equals an example's key.
    shuffle_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(epoch_key(epoch), -1), minval=None,
        maxval=None, dtype=tf.int64)
    ds = source.shuffle(data.shuffle_buffer, seed=shuffle_seed).take(epoch_batches * batch_size)
    return ds.enumerate().map(lambda i, ex: (epoch, i, *ex))

  def prepare(epoch, i, item, label) -> dict[str, tf.Tensor]:
    key = tf.random.experimental.stateless_fold_in(epoch_key(epoch), i)
    encoded = tf.io.read_file(item) if paths else item
    out = transform(key, encoded)
    out = out if isinstance(out, dict) else {'image': out}
    return {**out, 'label': tf.cast(label, tf.int32)}

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  ds = ds.skip(skip_batches * batch_size)  # still encoded (or paths): skipping costs reading, not decoding
  # One parallel map reads (image_folder) and decodes: the files of a batch are read concurrently.
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(data.prefetch)
  return with_options(ds, data)
