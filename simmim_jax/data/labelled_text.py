"""Labelled text for classification: JSON lines per split, a folder per label of .txt files, or a prepared tfds
dataset -> (text, label id) -> sentencepiece ids, one example per row -> numpy batches of a static shape.

Sources (data.name; every path local or a URL such as gs://, through storage.py):
- 'jsonl': data_dir/<split>.jsonl or <split>.jsonl.gz, one {"text": ..., "label": ...} object a line (the keys are
  data.text_key and data.label_key); a label is an int id or a class name;
- 'text_folder': data_dir/<split>/<label>/*.txt, one example per file (as image_folder);
- any other name: a prepared tfds dataset (the shipped medical_abstracts among them) with a text feature and a
  label feature (a ClassLabel, or int ids).
Class names are sorted (the training split's, data.split): label id i is the i-th name, saved with the run. Lines
that are not JSON, have no text, or have an unknown label are counted and left out (data.bad_images='skip'), or
stop the run with one line naming the file and line ('fail').

Rows: ids (eos appended, as pretraining closes every document) truncated to data.seq_len, padded with id 0 and
segment 0; segment 1 and positions 0.. on the real tokens, so attention and pooling never see padding. Every
process reads the whole split once (labelled sets are small) and keeps its slice; training batches are a pure
function of (seed, process, batch number), so a resumed run rebuilds the same batches.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import os
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from simmim_jax import storage
from simmim_jax.data import listing, sources, tokenizer
from simmim_jax.errors import UserError

JSONL = 'jsonl'
TEXT_FOLDER = 'text_folder'
BAD = ('not JSON', 'no text', 'unknown label')  # the reasons a line (or file) is left out


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split's good examples in source order, its labels' meaning (class names: label i is classes[i]; or int
  ids 0 .. num_classes - 1) and how many lines were left out, by reason."""
  texts: list[str]
  labels: np.ndarray  # int32
  classes: tuple[str, ...]  # () for a source of int ids without names
  num_classes: int
  by_name: bool  # the source's labels are class names (else int ids)
  skipped: dict[str, int]

  def __len__(self) -> int:
    return len(self.texts)


class _Reader:
  """Collects (text, raw label) per line or file; a bad one is counted, or raised as one line ('fail')."""

  def __init__(self, policy: str):
    if policy not in ('skip', 'fail'):
      raise UserError(f"data.bad_images must be 'skip' or 'fail', got {policy!r}.")
    self.policy, self.items, self.skipped = policy, [], collections.Counter()

  def bad(self, reason: str, where: str, detail: str) -> None:
    if self.policy == 'fail':
      raise UserError(f"{where}: {reason} ({detail}); fix it, or set data.bad_images='skip' to leave such "
                      'lines out (counted in the log).')
    self.skipped[reason] += 1

  def add(self, text, label, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
      self.bad('no text', where, f'text is {text!r:.40}')
    elif isinstance(label, bool) or not isinstance(label, (int, str)):
      self.bad('unknown label', where, f'label is {label!r:.40}: an int id or a class name')
    else:
      self.items.append((text, label, where))


def _jsonl_file(data: ml_collections.ConfigDict, split: str) -> str:
  """data_dir/<split>.jsonl or .jsonl.gz, the one that exists."""
  for suffix in ('.jsonl', '.jsonl.gz'):
    name = os.path.join(data.data_dir or '', split + suffix)
    if storage.path(name).is_file():
      return name
  raise sources.DatasetNotFoundError(f'{JSONL}: no {split}.jsonl or {split}.jsonl.gz in data.data_dir='
                                     f'{data.data_dir!r}; put one JSON object a line there ({{"{data.text_key}": '
                                     f'..., "{data.label_key}": ...}}) for each split.')


def _read_jsonl(data: ml_collections.ConfigDict, split: str, reader: _Reader) -> None:
  path = _jsonl_file(data, split)
  raw = storage.read_bytes(path)
  text = (gzip.decompress(raw) if path.endswith('.gz') else raw).decode('utf-8', errors='replace')
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue  # blank lines (a trailing newline, spacing) hold no example
    where = f'{path}:{number}'
    try:
      example = json.loads(line)
    except json.JSONDecodeError as e:
      reader.bad('not JSON', where, str(e))
      continue
    if not isinstance(example, dict):
      reader.bad('not JSON', where, f'a {type(example).__name__}, not an object')
      continue
    reader.add(example.get(data.text_key), example.get(data.label_key), where)


def _read_folder(data: ml_collections.ConfigDict, split: str, reader: _Reader) -> None:
  root = os.fspath(storage.path(data.data_dir or '', split))
  if not storage.path(root).is_dir():
    raise sources.DatasetNotFoundError(f'{TEXT_FOLDER}: no folder {root}; lay out data.data_dir as '
                                       '<split>/<label>/*.txt, one example per file.')
  for label in sorted(listing.entries(root)[0]):
    for path in (p for p in listing.walk(os.fspath(storage.path(root, label))) if p.endswith('.txt')):
      try:
        text = storage.read_bytes(path).decode('utf-8')
      except UnicodeDecodeError as e:
        reader.bad('no text', path, f'not UTF-8: {e}')
        continue
      reader.add(text.strip(), label, path)


def _read_tfds(data: ml_collections.ConfigDict, split: str, reader: _Reader) -> tuple[str, ...] | None:
  """Reads the split; returns the ClassLabel's names, or None for a label feature of int ids."""
  builder = sources.prepared_builder(data)
  features = builder.info.features
  for key in (data.text_key, data.label_key):
    if key not in features:
      raise ValueError(f'{data.name} has no feature {key!r} (it has {list(features)}); set data.text_key and '
                       'data.label_key.')
  sources.split_size(builder, split)  # a wrong split name fails here, with the splits there are
  label = features[data.label_key]
  names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else None
  ds = builder.as_dataset(split=split, shuffle_files=False)
  for number, example in enumerate(tfds.as_numpy(ds)):
    text = example[data.text_key]
    reader.add(text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text,
               int(example[data.label_key]), f'{data.name}:{split} example {number}')
  return names


def read_split(data: ml_collections.ConfigDict, split: str, train: Examples | None = None,
               num_classes: int | None = None) -> Examples:
  """A split's examples, its labels read as the training split's (`train`); None: this split is the training split
  and defines them (names sorted; int ids 0 .. num_classes - 1, by default the largest id + 1)."""
  reader = _Reader(data.get('bad_images', 'skip'))
  tfds_names = None
  if data.name == JSONL:
    _read_jsonl(data, split, reader)
  elif data.name == TEXT_FOLDER:
    _read_folder(data, split, reader)
  else:
    tfds_names = _read_tfds(data, split, reader)
  if not reader.items:
    raise ValueError(f'{data.name}:{split} has no labelled example ({dict(reader.skipped) or "it is empty"}).')
  if train is not None:
    by_name, classes, num_classes = train.by_name, train.classes, train.num_classes
  else:
    by_name = isinstance(reader.items[0][1], str)  # the first good line decides: names or int ids
    if by_name:
      classes = tuple(sorted({label for _, label, _ in reader.items if isinstance(label, str)}))
    else:
      classes = tfds_names or ()
    largest = max((label for _, label, _ in reader.items if isinstance(label, int)), default=0)
    num_classes = num_classes or len(classes) or largest + 1
  index = {name: i for i, name in enumerate(classes)} if by_name else {}
  texts, labels = [], []
  for text, label, where in reader.items:
    if by_name and isinstance(label, str) and label in index:
      labels.append(index[label])
    elif not by_name and isinstance(label, int) and 0 <= label < num_classes:
      labels.append(label)
    else:
      known = f'{len(classes)} class names' if by_name else f'ids 0..{num_classes - 1}'
      reader.bad('unknown label', where, f"label {label!r:.40} is not one of the training split's {known}")
      continue
    texts.append(text)
  return Examples(texts, np.asarray(labels, np.int32), tuple(classes), num_classes, by_name, dict(reader.skipped))


def encode(texts: Sequence[str], sp: spm.SentencePieceProcessor, seq_len: int) -> dict[str, np.ndarray]:
  """(N, seq_len) int32 tokens, segment_ids and positions: ids + eos, truncated, padded with 0 / segment 0."""
  tokens, lengths = np.zeros((len(texts), seq_len), np.int32), np.zeros((len(texts),), np.int32)
  for row, ids in enumerate(sp.encode(list(texts), num_threads=0)):
    ids = (ids + [tokenizer.EOS_ID])[:seq_len]
    tokens[row, :len(ids)], lengths[row] = ids, len(ids)
  real = np.arange(seq_len)[None, :] < lengths[:, None]
  return {'tokens': tokens, 'segment_ids': real.astype(np.int32),
          'positions': np.where(real, np.arange(seq_len)[None, :], 0).astype(np.int32)}


def train_batches(rows: dict[str, np.ndarray], labels: np.ndarray, *, batch_size: int, seed: int, index: int,
                  count: int, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of this process's equal slice (the remainder of the split dropped): epoch e is a shuffle
  seeded from (seed, process, e) cut into whole batches; batch k is a function of k alone."""
  share = len(labels) // count
  if share < batch_size:
    raise ValueError(f'Each of {count} processes has {share} training examples, fewer than its batch of '
                     f'{batch_size}; lower batch_size.')
  mine = np.arange(index * share, (index + 1) * share)
  per_epoch = share // batch_size
  step, epoch, order = start_batch, None, None
  while True:
    if step // per_epoch != epoch:
      epoch = step // per_epoch
      order = mine[np.random.default_rng([seed, index, epoch]).permutation(share)]
    picked = order[(step % per_epoch) * batch_size:][:batch_size]
    yield {**{k: v[picked] for k, v in rows.items()}, 'label': labels[picked]}
    step += 1


def eval_batches(rows: dict[str, np.ndarray], labels: np.ndarray, *, batch_size: int, index: int,
                 count: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example once over all processes, in order; each process pads its slice to the same number of batches
  with valid = 0 rows (all padding: segment 0)."""
  bounds = [(i * len(labels) // count, (i + 1) * len(labels) // count) for i in range(count)]
  start, end = bounds[index]
  num = math.ceil(max(e - s for s, e in bounds) / batch_size)
  for b in range(num):
    picked = np.arange(start + b * batch_size, start + (b + 1) * batch_size)
    valid = picked < end
    picked = np.where(valid, picked, start if end > start else 0)
    batch = {k: np.where(valid[:, None], v[picked], 0).astype(np.int32) for k, v in rows.items()}
    yield {**batch, 'label': np.where(valid, labels[picked], 0).astype(np.int32), 'valid': valid.astype(np.int32)}
