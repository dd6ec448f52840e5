"""Prints what a text pretraining run predicts at each masked word, as Hugging Face's fill-mask pipeline.

  python tools/fill_mask.py --checkpoint runs/text_tiny --text "The [MASK] statement exits the loop."
  python tools/fill_mask.py --checkpoint runs/text_tiny/checkpoints/500 --file lines.txt --top_k 10

--checkpoint: a text pretraining workdir (latest step), a checkpoint step dir, or its export (.npz / .safetensors
without --encoder_only, the tokenizer.model beside it); local or gs://. Mark each word to predict with [MASK] or
<mask> (several per line allowed). --file: one line each (blank lines skipped). Per line, per mask: the top-k
pieces with probabilities ('▁' starts a word, as sentencepiece writes it), then the line with the best filled in.
From Python: simmim_jax.fill_mask.FillMask(checkpoint)(lines).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simmim_jax import storage  # pylint: disable=g-import-not-at-top
from simmim_jax.errors import UserError
from simmim_jax.fill_mask import FillMask


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='text pretraining workdir, step dir or .npz')
  parser.add_argument('--text', action='append', default=[], help='a line with [MASK]; repeat for more')
  parser.add_argument('--file', help='a text file: one line each')
  parser.add_argument('--top_k', type=int, default=5)
  args = parser.parse_args(argv)
  lines = list(args.text)
  if args.file:
    if not storage.path(args.file).is_file():
      parser.error(f'--file {args.file!r} does not exist.')
    lines += [line for line in storage.read_text(args.file).splitlines() if line.strip()]
  if not lines:
    parser.error('give --text "... [MASK] ..." or --file')
  try:
    fill = FillMask(args.checkpoint, top_k=args.top_k)
    results = fill(lines)
  except (UserError, FileNotFoundError) as e:
    sys.exit(f'fill_mask: {e}')
  for line, predictions in zip(lines, results):
    print(line)
    for n, p in enumerate(predictions, 1):
      ranked = '  '.join(f'{piece} {prob:.3f}' for piece, prob in zip(p.pieces, p.probabilities))
      print(f'  mask {n}: {ranked}')
    print(f'  -> {fill.filled(line, predictions)}')


if __name__ == '__main__':
  main()
