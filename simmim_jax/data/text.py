"""Text pipelines: documents (a tfds dataset, the embedded pydoc corpus, or local text files) -> this
process's slice -> sentencepiece ids, tokenised once and cached -> packed fixed-length rows -> numpy batches.

Packing: an epoch concatenates this process's documents (each followed by eos) in an order shuffled from
(seed, process, epoch) and cuts the stream into rows of seq_len; the tail shorter than a batch is dropped.
`segment_ids` number the document pieces inside a row from 1 (0 would be padding, which this packing never
needs) and `positions` restart at 0 in each piece, so the encoder attends within a piece only.
Why once-and-cache: the ids of every document are known up front, so row r of epoch e is found by a binary
search in the epoch's cumulative lengths; resuming at batch k re-tokenises nothing and replays nothing.
Measured on the embedded corpus (tools/benchmark.py --text_pipeline, 2 shared CPU cores): per-document
sentencepiece calls 4.4M tokens/s, batched calls 4.3M (no gain here), serving packed rows from the cache
35M tokens/s, against ~12k tokens/s for the tiny model's train step. None of it needs TensorFlow beyond
reading the tfds source once. Ids are stored as uint16 when the vocabulary allows (half the memory), and a
data.cache_dir copy is memory-mapped, so a large slice (C4 on many hosts) need not fit in RAM (a cache_dir or
text_files data_dir on gs:// is read whole instead).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
from collections.abc import Iterator

import ml_collections
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from simmim_jax import params_io, storage
from simmim_jax.errors import UserError
from simmim_jax.data import sources, tokenizer
from simmim_jax.data.builders import medical_abstracts, pydoc_topics

TEXT_FILES = 'text_files'  # data_dir/<split>/*.txt, one document per non-empty line
# The embedded corpora's training texts, in their fixed order: a run with no data.tokenizer trains one on them.
EMBEDDED_TEXTS = {pydoc_topics.NAME: lambda: [text for _, _, text in pydoc_topics.documents('train')],
                  medical_abstracts.NAME: lambda: [e['text'] for e in medical_abstracts.examples('train')]}


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
  """Documents as one flat id array: document d is tokens[offsets[d]:offsets[d + 1]] (eos included)."""
  tokens: np.ndarray  # uint16 (vocabularies up to 65,536) or int32
  offsets: np.ndarray  # int64, num_documents + 1

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1


def load_tokenizer(data: ml_collections.ConfigDict, vocab_size: int,
                   init_from: str | None = None) -> spm.SentencePieceProcessor:
  """data.tokenizer (a .model file); for an embedded corpus with none set, one trained on its train split.
  With init_from (continued pretraining), the source's own, which data.tokenizer may only repeat."""
  if init_from:
    source = source_tokenizer(init_from)
    if data.get('tokenizer'):
      own = load_tokenizer(data, vocab_size)
      if tokenizer.fingerprint(own) != tokenizer.fingerprint(source):
        raise UserError(f'data.tokenizer={data.tokenizer!r} is not the tokenizer init_from={init_from!r} was trained '
                         f'with ({own.vocab_size()} vs {source.vocab_size()} pieces, fingerprints '
                         f'{tokenizer.fingerprint(own)} vs {tokenizer.fingerprint(source)}): the embeddings are '
                         "indexed by the source's pieces; unset data.tokenizer to tokenise with the source's own.")
    return source
  if data.get('tokenizer'):
    return tokenizer.load(data.tokenizer if storage.is_url(data.tokenizer) else os.path.expanduser(data.tokenizer))
  if data.name not in EMBEDDED_TEXTS:
    if data.name == TEXT_FILES:  # local or gs:// files: the tool reads them by glob, not through tfds
      source = f"--files='{os.path.join(data.data_dir or 'DATA_DIR', data.split, '*.txt')}'"
    else:
      source = f'--tfds={data.name}' + (f' --data_dir={data.data_dir}' if data.data_dir else '')
    raise ValueError(f'Set data.tokenizer to a sentencepiece .model for {data.name!r}; train one with '
                     f'`python tools/train_tokenizer.py {source} --vocab_size={vocab_size} --output=PREFIX`, then '
                     f'pass --config.data.tokenizer=PREFIX.model (model.vocab_size must equal its piece count).')
  # Deterministic and under a second: cheaper than shipping a file, and always matches model.vocab_size.
  return tokenizer.load(tokenizer.train(EMBEDDED_TEXTS[data.name](), vocab_size=vocab_size))


def source_tokenizer(init_from: str) -> spm.SentencePieceProcessor:
  """The tokenizer a checkpoint was trained with: the one saved with it, else the one its config names (or, for
  the embedded corpus, trains again: deterministic)."""
  saved = tokenizer.saved_with(init_from)
  if saved is not None:
    return tokenizer.load(saved)
  config = params_io.load_config(init_from)
  if not config or 'data' not in config or 'vocab_size' not in config.get('model', {}):
    raise ValueError(f'init_from={init_from!r} carries no tokenizer (no {tokenizer.FILE} beside it, no text config): '
                     f'copy the .model it was trained with there as {tokenizer.FILE}, or set data.tokenizer to it.')
  data = ml_collections.ConfigDict(config['data'])
  return load_tokenizer(data, config['model']['vocab_size'], config.get('init_from'))


def read_documents(data: ml_collections.ConfigDict, split: str, index: int, count: int) -> list[str]:
  """This process's equal share of the split's documents, in the source's fixed order."""
  if data.name == TEXT_FILES:
    files = storage.glob(os.path.join(data.data_dir or '', split, '*.txt'))
    if not files:
      raise sources.DatasetNotFoundError(f'text_files found no {data.data_dir}/{split}/*.txt; set data.data_dir to a '
                                         'folder with one sub-folder of .txt files (one document per line) per split.')
    docs = [line.strip() for f in files for line in storage.read_text(f).splitlines() if line.strip()]
    share = len(docs) // count
    return docs[index * share:(index + 1) * share]
  builder = sources.prepared_builder(data)
  if data.text_key not in builder.info.features:
    raise ValueError(f'{data.name} has no feature {data.text_key!r} (it has {list(builder.info.features)}); '
                     'set data.text_key.')
  sources.split_size(builder, split)  # a wrong split name fails here, with the splits there are
  sub = tfds.even_splits(split, n=count, drop_remainder=True)[index]
  ds = builder.as_dataset(split=sub, shuffle_files=False)
  return [ex[data.text_key].decode('utf-8') for ex in tfds.as_numpy(ds)]


def tokenize(docs: list[str], sp: spm.SentencePieceProcessor, chunk: int = 4096) -> TokenCorpus:
  """Batched sentencepiece calls (its own threads) over chunks of documents; eos closes every document."""
  dtype = np.uint16 if sp.vocab_size() <= 2**16 else np.int32
  pieces = []
  for i in range(0, len(docs), chunk):
    pieces += [np.asarray(ids + [tokenizer.EOS_ID], dtype) for ids in sp.encode(docs[i:i + chunk], num_threads=0)]
  lengths = np.array([len(p) for p in pieces], np.int64)
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
  return TokenCorpus(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def load_corpus(data: ml_collections.ConfigDict, split: str, sp: spm.SentencePieceProcessor,
                index: int, count: int) -> TokenCorpus:
  """The tokenised slice, from data.cache_dir when cached there before (keyed by source and tokenizer)."""
  key = f'{data.name}|{data.data_dir}|{data.get("text_key")}|{split}|{index}/{count}|{tokenizer.fingerprint(sp)}'
  path = None
  if data.get('cache_dir'):
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f'{data.name.replace("/", "_")}-{split}-{index}of{count}-{digest}'
    path = storage.absolute(os.path.join(data.cache_dir, name))
    if storage.path(path, 'offsets.npy').exists():  # written last (in the same rename locally)
      return _read_cache(path)
  corpus = tokenize(read_documents(data, split, index, count), sp)
  if path:
    _write_cache(path, corpus)
  return corpus


def _read_cache(path: str) -> TokenCorpus:
  """Memory-mapped from a local cache; read whole from a URL."""
  if storage.is_url(path):
    return TokenCorpus(*(np.load(io.BytesIO(storage.read_bytes(f'{path}/{k}.npy'))) for k in ('tokens', 'offsets')))
  return TokenCorpus(*(np.load(os.path.join(path, f'{k}.npy'), mmap_mode='r') for k in ('tokens', 'offsets')))


def _write_cache(path: str, corpus: TokenCorpus) -> None:
  """A reader never sees half a cache: locally the folder appears by one rename; at a URL (no rename, but each
  object upload is atomic) offsets.npy, which readers look for, is written after tokens.npy."""
  if storage.is_url(path):
    for name, array in (('tokens', corpus.tokens), ('offsets', corpus.offsets)):
      buffer = io.BytesIO()
      np.save(buffer, array)
      storage.write_bytes(f'{path}/{name}.npy', buffer.getvalue())
    return
  tmp = f'{path}.tmp{os.getpid()}'
  os.makedirs(tmp, exist_ok=True)
  np.save(os.path.join(tmp, 'tokens.npy'), corpus.tokens)
  np.save(os.path.join(tmp, 'offsets.npy'), corpus.offsets)
  try:
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache
  except OSError:  # another run of the same slice finished first; its copy is identical
    shutil.rmtree(tmp, ignore_errors=True)


def pack(corpus: TokenCorpus, order: np.ndarray, ends: np.ndarray, start: int, num_rows: int,
         seq_len: int) -> dict[str, np.ndarray]:
  """Rows [start, start + num_rows) of the stream that concatenates documents `order`.

  ends[k] is the stream offset where the k-th document of `order` ends. Returns int32 (num_rows, seq_len)
  arrays: tokens, segment_ids (1.. per row, one per document piece) and positions (0.. per piece).
  """
  t = start * seq_len + np.arange(num_rows * seq_len)
  k = np.searchsorted(ends, t, side='right')  # which document of the stream holds stream position t
  doc_start = np.where(k > 0, ends[np.maximum(k - 1, 0)], 0)
  tokens = corpus.tokens[corpus.offsets[order[k]] + (t - doc_start)]
  k = k.reshape(num_rows, seq_len)
  new = np.ones(k.shape, bool)
  new[:, 1:] = k[:, 1:] != k[:, :-1]
  idx = np.arange(seq_len)
  positions = idx - np.maximum.accumulate(np.where(new, idx, 0), axis=1)
  return {'tokens': tokens.reshape(num_rows, seq_len).astype(np.int32),
          'segment_ids': np.cumsum(new, axis=1).astype(np.int32), 'positions': positions.astype(np.int32)}


def epoch_order(corpus: TokenCorpus, seed: int, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """(document order, cumulative stream ends) of an epoch, a pure function of (seed, process, epoch)."""
  order = np.random.default_rng([seed, index, epoch]).permutation(corpus.num_documents)
  return order, np.cumsum(np.diff(corpus.offsets)[order])


def batches_per_epoch(corpus: TokenCorpus, seq_len: int, batch_size: int) -> int:
  """Whole batches of packed rows in one epoch of this corpus."""
  return int(len(corpus.tokens) // seq_len // batch_size)


def packed_batches(corpus: TokenCorpus, *, seq_len: int, batch_size: int, seed: int, index: int = 0,
                   start_batch: int = 0, num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches start_batch, start_batch + 1, ... (endless unless num_batches) of packed rows."""
  per_epoch = batches_per_epoch(corpus, seq_len, batch_size)
  if per_epoch == 0:
    raise ValueError(f'This process has {len(corpus.tokens)} tokens, fewer than one batch of {batch_size} rows '
                     f'x {seq_len}; lower batch_size or data.seq_len, or use more data.')
  epoch, order, ends = None, None, None
  step = start_batch
  while num_batches is None or step < start_batch + num_batches:
    if step // per_epoch != epoch:
      epoch = step // per_epoch
      order, ends = epoch_order(corpus, seed, index, epoch)
    yield pack(corpus, order, ends, (step % per_epoch) * batch_size, batch_size, seq_len)
    step += 1


def unigram_mode(corpus: TokenCorpus) -> int:
  """The most frequent id: the unigram baseline predicts it at every masked position."""
  return int(np.argmax(np.bincount(corpus.tokens)))
