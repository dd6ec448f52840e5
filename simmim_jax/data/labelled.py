"""What the fine-tune trainer reads, whatever the modality: labelled images (classification.py) or labelled
text (labelled_text.py), behind one interface built once per run, with every check done at set-up."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from simmim_jax.data import classification, labelled_text, sources, text, tokenizer

Batches = Iterator[dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Labelled:
  """One run's labelled data, this process's view."""
  num_classes: int
  num_examples: int  # training examples per epoch, all processes
  eval_examples: int  # examples of data.eval_split, all processes
  train_batches: Callable[[int, int], Batches]  # (per-process batch size, start batch) -> endless batches
  eval_batches: Callable[[int], Batches]  # per-process batch size -> every example once, padding valid = 0
  unit: str = 'images'  # what batch_size counts, for the start line
  classes: tuple[str, ...] = ()  # class names in label order, saved with the run; () for int ids
  tokenizer: bytes | None = None  # text: the serialized sentencepiece model, saved with the run
  notes: tuple[str, ...] = ()  # lines for the log (bad inputs left out)


def build(config: ml_collections.ConfigDict) -> Labelled:
  """The labelled data of a fine-tuning or linear-probe config; fails fast if it is missing."""
  return _text(config) if config.model.name == 'text' else _images(config)


def _images(config: ml_collections.ConfigDict) -> Labelled:
  data, size = config.data, config.model.image_size
  return Labelled(
      num_classes=config.num_classes or classification.num_classes(data),
      num_examples=sources.num_examples(data), eval_examples=classification.split_examples(data, data.eval_split),
      train_batches=lambda local, start: classification.train_batches(
          data, image_size=size, batch_size=local, seed=config.seed, start_batch=start),
      eval_batches=lambda local: classification.eval_batches(data, image_size=size, batch_size=local,
                                                             split=data.eval_split))


def run_tokenizer(config: ml_collections.ConfigDict, train_texts: list[str]):
  """init_from's own tokenizer (it travels with the checkpoint); else data.tokenizer; else, for an embedded corpus,
  the one its pretraining trains; else one trained on the training texts (deterministic, seconds)."""
  data, vocab_size = config.data, config.model.vocab_size
  if config.get('init_from') or data.get('tokenizer') or data.name in text.EMBEDDED_TEXTS:
    sp = text.load_tokenizer(data, vocab_size, config.get('init_from'))
  else:
    sp = tokenizer.load(tokenizer.train(train_texts, vocab_size=vocab_size))
  if sp.vocab_size() != vocab_size:
    raise ValueError(f'The tokenizer has {sp.vocab_size()} pieces but model.vocab_size={vocab_size}; set '
                     '--config.model.vocab_size to match (to the pretraining run\'s with init_from).')
  return sp


def _text(config: ml_collections.ConfigDict) -> Labelled:
  data, seq_len = config.data, config.data.seq_len
  index, count = jax.process_index(), jax.process_count()
  train = labelled_text.read_split(data, data.split, num_classes=config.num_classes)
  held_out = labelled_text.read_split(data, data.eval_split, train)
  sp = run_tokenizer(config, train.texts)
  train_rows, eval_rows = labelled_text.encode(train.texts, sp, seq_len), labelled_text.encode(held_out.texts, sp,
                                                                                               seq_len)
  notes = tuple(f'{data.name}:{split}: left out {sum(ex.skipped.values())} bad lines ('
                + ', '.join(f'{n} {reason}' for reason, n in ex.skipped.items()) + ')'
                for split, ex in ((data.split, train), (data.eval_split, held_out)) if ex.skipped)
  truncated = float(np.mean(train_rows['segment_ids'][:, -1] > 0))
  notes += (f'{data.name}:{data.split}: {len(train)} examples, {truncated:.0%} truncated to seq_len {seq_len}.',)
  return Labelled(
      num_classes=train.num_classes, num_examples=len(train) // count * count, eval_examples=len(held_out),
      train_batches=lambda local, start: labelled_text.train_batches(
          train_rows, train.labels, batch_size=local, seed=config.seed, index=index, count=count, start_batch=start),
      eval_batches=lambda local: labelled_text.eval_batches(eval_rows, held_out.labels, batch_size=local,
                                                            index=index, count=count),
      unit='rows', classes=train.classes, tokenizer=sp.serialized_model_proto(), notes=notes)
