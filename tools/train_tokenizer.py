"""Trains a sentencepiece tokenizer for the text configs; writes PREFIX.model and PREFIX.vocab.

  python tools/train_tokenizer.py --tfds=pydoc_topics --vocab_size=2048 --output=/tmp/spm/pydoc
  python tools/train_tokenizer.py --tfds=c4/en:3.1.0 --data_dir=DIR --vocab_size=32000 \
      --max_documents=2000000 --character_coverage=0.9995 --output=DIR/spm/c4_32k
  python tools/train_tokenizer.py --files='corpus/*.txt' --vocab_size=8000 --output=/tmp/spm/mine
  python tools/train_tokenizer.py --files='gs://bucket/corpus/*.txt' --vocab_size=8000 --output=gs://bucket/spm/mine

Ids: pad=0, eos=1, unk=2, no bos, [MASK]=3. The same input and flags give byte-identical files.
tfds sources are read in their stored order (the first --max_documents); local files line by line.
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported by a tfds source

from simmim_jax import storage  # pylint: disable=g-import-not-at-top
from simmim_jax.data import tokenizer


def texts_from_files(pattern: str):
  """Non-empty lines of the matching files (local or gs://...), in sorted file order."""
  files = storage.glob(pattern)
  if not files:
    raise SystemExit(f'--files={pattern!r} matches no file.')
  for path in files:
    with storage.path(path).open('r', encoding='utf-8') as f:
      yield from (line.strip() for line in f if line.strip())


def texts_from_tfds(name: str, data_dir: str | None, split: str, text_key: str):
  """The split's documents as stored (the embedded pydoc corpus is prepared locally first)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import sources  # pylint: disable=import-outside-toplevel
  data = ml_collections.ConfigDict({'name': name, 'data_dir': data_dir, 'text_key': text_key})
  builder = sources.prepared_builder(data)
  for example in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator():
    yield example[text_key].decode('utf-8')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--tfds', help='a prepared tfds text dataset name (e.g. pydoc_topics, c4/en:3.1.0)')
  source.add_argument('--files', help='a glob of local text files, one document per line')
  parser.add_argument('--data_dir', default=None, help='tfds data_dir')
  parser.add_argument('--split', default='train')
  parser.add_argument('--text_key', default='text')
  parser.add_argument('--max_documents', type=int, default=None, help='read at most this many documents')
  parser.add_argument('--output', required=True, help='output prefix (a path or gs://...): PREFIX.model and .vocab')
  parser.add_argument('--vocab_size', type=int, default=32000)
  parser.add_argument('--model_type', default='unigram', choices=['unigram', 'bpe', 'char', 'word'])
  parser.add_argument('--character_coverage', type=float, default=1.0,
                      help='1.0 for small alphabets; 0.9995 for large ones')
  parser.add_argument('--byte_fallback', type=int, default=1, choices=[0, 1], help='1: unknown characters become bytes')
  parser.add_argument('--input_sentence_size', type=int, default=0,
                      help='sample this many sentences (seeded, reproducible); 0 uses all')
  parser.add_argument('--num_threads', type=int, default=1)
  args = parser.parse_args()

  texts = (texts_from_files(args.files) if args.files
           else texts_from_tfds(args.tfds, args.data_dir, args.split, args.text_key))
  texts = itertools.islice(texts, args.max_documents)
  proto = tokenizer.train(texts, vocab_size=args.vocab_size, model_type=args.model_type,
                          character_coverage=args.character_coverage, byte_fallback=bool(args.byte_fallback),
                          input_sentence_size=args.input_sentence_size, num_threads=args.num_threads)
  sp = tokenizer.load(proto)
  storage.write_bytes(args.output + '.model', proto)
  storage.write_text(args.output + '.vocab', tokenizer.vocab_text(sp))
  print(f'Wrote {args.output}.model and .vocab: {sp.vocab_size()} pieces ({args.model_type}); '
        f'pad=0 eos=1 unk=2 [MASK]={sp.piece_to_id(tokenizer.MASK_PIECE)}.')


if __name__ == '__main__':
  main()
