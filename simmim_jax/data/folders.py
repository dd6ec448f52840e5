"""Images straight from files: a labelled `<root>/<split>/<label>/` tree, or any folder, glob or list of files.

The index is built once per run and is the same on every process (sorted paths, a fixed permutation, the
check's verdicts shared: each process checks every P-th file), so each process reads only its own slice of
it. Files that cannot be images (zero bytes, an unknown format, a truncated JPEG/PNG, a file TensorFlow
cannot decode) are left out with a count in the log, or fail the run when data.bad_images = 'fail'; nothing
is found broken mid-run.

data_dir may be a URL (gs://bucket/photos): listing and checking go through tf.io.gfile, the file system
tf.data's tf.io.read_file reads the images with, so what is listed is what the pipeline can open.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from simmim_jax import storage
from simmim_jax.data import listing

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif')
SPLIT_NAMES = ('train', 'training', 'val', 'validation', 'valid', 'eval', 'test')  # a root holding these is split
_TAIL = 4096  # bytes read from each file's end: room for a JPEG's padding after its end marker
_ORDER_SEED = 0  # the fixed permutation of the index: classes and folders mix across the process slices
_CHECK_THREADS = 32  # the check reads two small blocks per file: bound by file-system latency, not CPU

log = logging.getLogger(__name__)


class BadImagesError(ValueError):
  """data.bad_images = 'fail' and some files are not readable images."""


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The readable images of one split, in the order every process slices."""
  paths: tuple[str, ...]
  labels: np.ndarray  # int32 per path; -1 for unlabelled images
  classes: tuple[str, ...]  # label names (index = label); () when unlabelled
  skipped: tuple[tuple[str, str], ...]  # (path, reason) of the image-named files left out
  ignored: int  # files without an image extension (notes, sidecars), never read
  layout: str  # what was read, for the log

  def __len__(self) -> int:
    return len(self.paths)


def _is_glob(spec: str) -> bool:
  return any(c in spec for c in '*?[')


def _isdir(path: str) -> bool:
  return storage.path(path).is_dir()  # epath: os locally, tf.io.gfile at a URL (TensorFlow is loaded here)


def _isfile(path: str) -> bool:
  return storage.path(path).is_file()


def _join(folder: str, name: str) -> str:
  return os.fspath(storage.path(folder, name))


def _is_image_name(path: str) -> bool:
  return path.lower().endswith(EXTENSIONS)


def _labelled_split(root: str, split: str) -> str | None:
  """root/split when it holds only label folders (the ImageNet layout), else None."""
  split_dir = _join(root, split)
  if not _isdir(split_dir):
    return None
  subs, files = listing.entries(split_dir)
  return split_dir if subs and not files else None


def _classes(root: str) -> tuple[str, ...]:
  """Label names over every split folder of root, sorted (train and validation share one numbering)."""
  names = set()
  for split in listing.entries(root)[0]:
    if split_dir := _labelled_split(root, split):
      names.update(listing.entries(split_dir)[0])
  return tuple(sorted(names))


def _list(spec: str) -> list[str]:
  """The image files one entry of data_dir names: a folder, a glob, a .txt list of paths, or a file."""
  path = storage.absolute(spec)
  if _is_glob(path):
    found = storage.glob(path)  # '**' (any depth) on local paths only
    return [f for p in found for f in ([p] if _isfile(p) else listing.walk(p))]
  if _isdir(path):
    return listing.walk(path)
  if path.endswith(('.txt', '.lst')) and _isfile(path):
    base = path.rsplit('/', 1)[0] if storage.is_url(path) else os.path.dirname(path)
    lines = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    # One path per line: absolute, a URL, or relative to the list's folder.
    return [line if storage.is_url(line) else storage.absolute(_join(base, os.path.expanduser(line)))
            for line in lines]
  if _isfile(path):
    return [path]
  raise FileNotFoundError(f'{spec!r} is neither a folder, a glob that matches, a .txt list nor a file.')


def _sniff(head: bytes) -> str | None:
  """The format from the first bytes, or None."""
  if head.startswith(b'\xff\xd8\xff'):
    return 'jpeg'
  if head.startswith(b'\x89PNG\r\n\x1a\n'):
    return 'png'
  if head.startswith(b'BM'):
    return 'bmp'
  if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
    return 'webp'
  if head[:6] in (b'GIF87a', b'GIF89a'):
    return 'gif'
  return None


def _looks_complete(kind: str, head: bytes, tail: bytes, size: int) -> bool:
  """The cheap structural check: does the file end where its format says it does?"""
  if kind == 'jpeg':
    return b'\xff\xd9' in tail  # end-of-image marker (some writers pad after it)
  if kind == 'png':
    return b'IEND\xaeB`\x82' in tail[-64:]
  if kind == 'bmp':
    return len(head) >= 6 and struct.unpack('<I', head[2:6])[0] <= size
  if kind == 'webp':
    return struct.unpack('<I', head[4:8])[0] + 8 <= size
  return tail.endswith(b';')  # gif trailer


def _decodes(path: str) -> bool:
  """The definitive check, for files the cheap one doubts: a full decode by the pipeline's decoder."""
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return bool(image.shape[0] and image.shape[1])
  except (tf.errors.OpError, ValueError):
    return False


def check(path: str) -> str | None:
  """Why the file cannot be used as an image, or None when it can."""
  url = storage.is_url(path)
  try:
    size = tf.io.gfile.stat(path).length if url else os.path.getsize(path)
    if size == 0:
      return 'empty file'
    with tf.io.gfile.GFile(path, 'rb') if url else open(path, 'rb') as f:
      head = f.read(32)
      f.seek(max(size - _TAIL, 0))
      tail = f.read(_TAIL)
  except OSError as e:
    return f'unreadable ({e.strerror or e})'
  except tf.errors.OpError as e:
    return f'unreadable ({e.message})'
  kind = _sniff(head)
  if kind is None:
    return 'not an image (unknown format)'
  if not _looks_complete(kind, head, tail, size) and not _decodes(path):
    return f'corrupt or truncated {kind}'
  return None


def _check_all(paths: Sequence[str], layout: str) -> list[str | None]:
  """check() of every path. With several processes each checks every P-th file and the verdicts are gathered:
  the start-up check of a large bucket takes 1/P of the time, and every process holds the same verdicts (a
  transient read error on one process must not give the processes different indices to slice)."""
  count, index = jax.process_count(), jax.process_index()
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    mine = list(pool.map(check, paths[index::count], chunksize=64))
  if count == 1:
    return mine
  return _gather_verdicts(paths, mine, count, layout)


def _gather_verdicts(paths: Sequence[str], mine: list[str | None], count: int, layout: str) -> list[str | None]:
  """Every process's verdicts (process k checked paths k, k + count, ...) in path order, on every process."""
  # The reasons travel as JSON bytes padded to the longest process's: a collective moves equal-shaped arrays.
  payload = json.dumps({j: reason for j, reason in enumerate(mine) if reason}).encode()
  # int32 (JAX's default integer): 3 bytes of the listing's digest tell the processes' listings apart.
  listing = int.from_bytes(hashlib.sha256('\n'.join(paths).encode()).digest()[:3], 'little')
  heads = multihost_utils.process_allgather(np.array([len(payload), listing], np.int32)).reshape(count, 2)
  if len(set(heads[:, 1].tolist())) > 1:
    raise FileNotFoundError(f'the processes listed different files in {layout} (is something still adding or '
                            'removing files there?); start the run again once the folder is complete.')
  padded = np.zeros(int(heads[:, 0].max()), np.uint8)
  padded[:len(payload)] = np.frombuffer(payload, np.uint8)
  gathered = multihost_utils.process_allgather(padded).reshape(count, -1)
  verdicts: list[str | None] = [None] * len(paths)
  for k in range(count):
    for j, reason in json.loads(gathered[k, :heads[k, 0]].tobytes()).items():
      verdicts[k + count * int(j)] = reason
  return verdicts


def _find(data_dir: str, split: str) -> tuple[list[str], list[int], tuple[str, ...], str]:
  """(paths, labels, classes, layout) before the check."""
  specs = [s.strip() for s in str(data_dir).split(',') if s.strip()]
  if not specs:
    raise FileNotFoundError('image_folder needs data.data_dir: a folder, a glob or a list of files.')
  if len(specs) == 1 and _isdir(root := storage.absolute(specs[0])):
    split_dir = _labelled_split(root, split)
    if split_dir:
      classes = _classes(root)
      paths, labels = [], []
      for label in sorted(listing.entries(split_dir)[0]):
        if label in classes:
          found = listing.walk(_join(split_dir, label))
          paths += found
          labels += [classes.index(label)] * len(found)
      return paths, labels, classes, f'{split_dir}/<label>/ ({len(classes)} classes)'
    if _isdir(_join(root, split)):  # root/split holds images, no label level
      root = _join(root, split)
    elif splits := sorted(set(listing.entries(root)[0]) & set(SPLIT_NAMES)):
      # Reading the whole root would mix the splits (test images in training): ask for one of them.
      raise FileNotFoundError(f'{root} has split folders {", ".join(splits)} but no {split!r}: set data.split '
                              '(data.eval_split for evaluation) to one of them, or data_dir to the folder to read.')
    paths = listing.walk(root)
    return paths, [-1] * len(paths), (), f'{root} (unlabelled, recursive)'
  paths = sorted({storage.absolute(p) for spec in specs for p in _list(spec)})
  return paths, [-1] * len(paths), (), f'{len(specs)} path pattern(s) {specs[:3]} (unlabelled)'


@functools.lru_cache(maxsize=8)
def folder_index(data_dir: str, split: str, bad_images: str = 'skip') -> FolderIndex:
  """The checked, permuted index of data_dir's images for `split`; the same on every process."""
  if bad_images not in ('skip', 'fail'):
    raise ValueError(f"data.bad_images must be 'skip' or 'fail', got {bad_images!r}.")
  found, labels, classes, layout = _find(data_dir, split)
  named = [_is_image_name(p) for p in found]
  paths = [p for p, n in zip(found, named) if n]
  labels = [l for l, n in zip(labels, named) if n]
  ignored = len(found) - len(paths)
  reasons = _check_all(paths, layout)
  skipped = tuple((p, r) for p, r in zip(paths, reasons) if r)
  if ignored:
    print(f'image_folder: ignored {ignored} files without an image extension ({", ".join(EXTENSIONS)}) in '
          f'{layout}.', flush=True)
  if skipped:
    listed = '; '.join(f'{p}: {r}' for p, r in skipped[:10]) + (' ...' if len(skipped) > 10 else '')
    if bad_images == 'fail':
      raise BadImagesError(f'{len(skipped)} of {len(paths)} files in {layout} are not readable images '
                           f"(data.bad_images='fail'): {listed}")
    message = (f'image_folder: skipped {len(skipped)} of {len(paths)} files in {layout} that are not readable '
               f'images: {listed}')
    log.warning(message)
    print(message, flush=True)  # the run's console log, whatever the logging set-up
  keep = np.array([r is None for r in reasons], bool)
  good = np.array(paths, dtype=object)[keep]
  good_labels = np.asarray(labels, np.int32)[keep]
  if not len(good):
    raise FileNotFoundError(f'No readable images ({", ".join(EXTENSIONS)}) in {layout}.')
  order = np.random.default_rng(_ORDER_SEED).permutation(len(good))
  return FolderIndex(tuple(good[order]), good_labels[order], classes, skipped, ignored, layout)


def is_labelled(data_dir: str, split: str) -> bool:
  """Whether data_dir is one folder with a <split>/<label>/ level."""
  return _isdir(data_dir) and _labelled_split(data_dir, split) is not None
