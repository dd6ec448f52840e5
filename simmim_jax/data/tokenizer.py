"""Sentencepiece tokenizers: training (reproducible, in memory) and loading, with the project's fixed ids.

Ids follow the seqio/T5 convention: pad=0, eos=1, unk=2, no bos; [MASK] is a user-defined symbol and so
gets id 3, right after the special ids. No TensorFlow here: only the Python sentencepiece package.
"""
import hashlib
import io
from collections.abc import Iterable

import sentencepiece as spm

from simmim_jax import storage

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MASK_PIECE = '[MASK]'
MASK_ID = 3
FILE = 'tokenizer.model'  # a text run's tokenizer, saved in its workdir: it travels with the checkpoints


def train(texts: Iterable[str], *, vocab_size: int, model_type: str = 'unigram', character_coverage: float = 1.0,
          byte_fallback: bool = True, input_sentence_size: int = 0, num_threads: int = 1) -> bytes:
  """A serialized sentencepiece model trained on `texts` (one sentence/paragraph each).

  The same texts and arguments give byte-identical models: input sampling is off unless
  input_sentence_size > 0, and then it is sentencepiece's own seeded sampler.
  """
  if model_type not in ('unigram', 'bpe', 'char', 'word'):
    raise ValueError(f"model_type must be unigram, bpe, char or word, got {model_type!r}.")
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=writer, vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, byte_fallback=byte_fallback,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=input_sentence_size > 0,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, user_defined_symbols=[MASK_PIECE],
      num_threads=num_threads, minloglevel=2)
  return writer.getvalue()


def load(path_or_proto: str | bytes) -> spm.SentencePieceProcessor:
  """A processor from a .model path (local or a URL such as gs://) or serialized bytes, checked for the
  project's ids."""
  if isinstance(path_or_proto, str) and storage.is_url(path_or_proto):
    try:
      path_or_proto = storage.read_bytes(path_or_proto)  # sentencepiece itself reads local files only
    except FileNotFoundError:
      pass  # the message below names the path
  if isinstance(path_or_proto, bytes):
    sp = spm.SentencePieceProcessor(model_proto=path_or_proto)
  else:
    try:
      sp = spm.SentencePieceProcessor(model_file=path_or_proto)
    except OSError as e:
      raise FileNotFoundError(f'Cannot read the sentencepiece model {path_or_proto!r} ({e}); train one with '
                              'tools/train_tokenizer.py or set data.tokenizer to an existing .model file.') from None
  ids = (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id(), sp.piece_to_id(MASK_PIECE))
  if ids != (PAD_ID, EOS_ID, UNK_ID, -1, MASK_ID):
    raise ValueError(f'Tokenizer ids (pad, eos, unk, bos, [MASK]) are {ids}, expected (0, 1, 2, -1, 3); '
                     'train it with tools/train_tokenizer.py.')
  return sp


def vocab_text(sp: spm.SentencePieceProcessor) -> str:
  """The .vocab file sentencepiece writes beside a model: piece<TAB>score per line, in id order."""
  return ''.join(f'{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n' for i in range(sp.vocab_size()))


def fingerprint(sp: spm.SentencePieceProcessor) -> str:
  """A short hash of the serialized model (keys token caches)."""
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]


def run_folder(path: str) -> str:
  """The folder a checkpoint path's run files live in: a workdir for a workdir, its checkpoints dir or a step
  dir; the containing folder for a file (an exported .npz / .safetensors)."""
  path = storage.absolute(path).rstrip('/')
  if storage.path(path).is_file():
    return path.rsplit('/', 1)[0]
  if storage.path(path, 'state').is_dir():  # a step dir: workdir/checkpoints/<step>
    path = path.rsplit('/', 2)[0]
  elif path.endswith(('/checkpoints', '/best')):  # a fine-tuning run's best checkpoint too
    path = path.rsplit('/', 1)[0]
  return path


def saved_with(path: str) -> bytes | None:
  """The serialized tokenizer saved with a run (FILE in its workdir, or beside an export), None if there is none."""
  saved = storage.path(run_folder(path), FILE)
  return saved.read_bytes() if saved.is_file() else None
