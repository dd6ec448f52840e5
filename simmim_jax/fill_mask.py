"""What a text pretraining run predicts for masked words, as Hugging Face's `pipeline('fill-mask')` shows it.

    from simmim_jax.fill_mask import FillMask
    fill = FillMask('runs/text_tiny')                  # a workdir, a checkpoint step dir, or an exported .npz
    [[best]] = fill('The [MASK] statement exits a loop.')  # per line, per mask: a Prediction, best piece first
    best.pieces, best.probabilities, fill.filled('The [MASK] statement exits a loop.', [best])

The marker is `[MASK]` (the tokenizer's own mask piece, id 3) or `<mask>` (RoBERTa's spelling), several per
line allowed. A line is encoded as in pretraining (its sentencepiece ids and eos, positions from 0, one segment),
the masked positions get the [MASK] embedding, and the run's own masked-LM head scores the vocabulary there.
Lines are batched with padding (segment 0, never attended to) to a length rounded up to a multiple of 32, so
many lines of similar length share one compile.
"""
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simmim_jax import params_io
from simmim_jax.data import tokenizer
from simmim_jax.errors import UserError
from simmim_jax.models import text as text_models

MARKERS = ('[MASK]', '<mask>')
_LENGTH_MULTIPLE = 32  # padded lengths come in steps of this, so similar lines share a compile


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One masked position of one line: the top-k pieces (as the tokenizer spells them) and their probabilities."""
  position: int  # in the encoded line, eos excluded
  pieces: list[str]
  ids: list[int]
  probabilities: list[float]


def _tokenizer_of(checkpoint: str):
  saved = tokenizer.saved_with(checkpoint)
  if saved is not None:
    return tokenizer.load(saved)
  from simmim_jax.data import text  # pylint: disable=import-outside-toplevel  (TensorFlow only when needed)
  try:
    return text.source_tokenizer(checkpoint)
  except ValueError as e:  # its own one line: where the tokenizer should be
    raise UserError(str(e)) from None


class FillMask:
  """A text pretraining checkpoint's encoder and masked-LM head, loaded once; call it with lines."""

  def __init__(self, checkpoint: str, top_k: int = 5):
    config = params_io.load_config(checkpoint)
    if not config or config.get('model', {}).get('name') != 'text':
      raise UserError(f'{checkpoint!r} is not a text pretraining run (its config has no text model): give the '
                      'workdir of a run of configs/text_*.py, one of its checkpoint steps or its .npz export.')
    params = params_io.load_params(checkpoint)
    if 'head' not in params or 'dense' not in params['head']:
      raise UserError(f'{checkpoint!r} has no masked-LM head (an --encoder_only export or a fine-tuned '
                      'classifier): fill-mask needs the pretraining run itself, or an export without --encoder_only.')
    self.sp = _tokenizer_of(checkpoint)
    self.top_k = top_k
    model = ml_collections.ConfigDict(config['model'])
    self.max_len = model.max_len
    self.model = text_models.MaskedLM(text_models.build(model, jnp.float32))
    self.params = jax.tree.map(jnp.asarray, params)
    self._scores = jax.jit(self._probabilities)

  def _probabilities(self, params: Any, tokens, segment_ids, positions, gather) -> jax.Array:
    mask = (tokens == tokenizer.MASK_ID).astype(jnp.int32)
    logits = self.model.apply({'params': params}, tokens, segment_ids, positions, mask, gather)
    return jax.nn.softmax(logits, axis=-1)

  def encode(self, line: str, where: str = 'the line') -> list[int]:
    """The line's ids as pretraining saw them (ids, eos), each marker the [MASK] id.

    The text between markers is encoded piece by piece: a tokenizer need not keep '[MASK]' whole inside a word
    (a word or unigram model splits it as any other text), and each fragment then starts a word, as the masked
    word did.
    """
    fragments = re.split('|'.join(map(re.escape, MARKERS)), line)
    if len(fragments) == 1:
      raise UserError(f'{where} has no mask marker: write [MASK] (or <mask>) where a word is to be predicted.')
    ids: list[int] = []
    for i, fragment in enumerate(fragments):
      if i:
        ids.append(tokenizer.MASK_ID)
      if fragment.strip():
        ids += self.sp.encode(fragment.strip())
    ids.append(tokenizer.EOS_ID)
    if len(ids) > self.max_len:
      raise UserError(f'{where} is {len(ids)} pieces long, more than the model\'s max_len={self.max_len}: '
                      'shorten it.')
    return ids

  def __call__(self, lines: str | list[str], batch_size: int = 32) -> list[list[Prediction]]:
    """Per line (a str is one line), per mask in order: the top_k predictions."""
    lines = [lines] if isinstance(lines, str) else list(lines)
    encoded = [self.encode(line, f'line {i + 1}') for i, line in enumerate(lines)]
    out: list[list[Prediction]] = []
    for start in range(0, len(encoded), batch_size):
      out += self._batch(encoded[start:start + batch_size])
    return out

  def _batch(self, rows: list[list[int]]) -> list[list[Prediction]]:
    length = min(self.max_len, -(-max(map(len, rows)) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE)
    masks = [[i for i, t in enumerate(row) if t == tokenizer.MASK_ID] for row in rows]
    k = max(map(len, masks))
    tokens = np.zeros((len(rows), length), np.int32)
    segments = np.zeros_like(tokens)
    gather = np.zeros((len(rows), k), np.int32)
    for r, (row, where) in enumerate(zip(rows, masks)):
      tokens[r, :len(row)], segments[r, :len(row)] = row, 1
      gather[r, :len(where)] = where
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    probs = np.asarray(self._scores(self.params, tokens, segments, positions, gather))
    results = []
    for r, where in enumerate(masks):
      line = []
      for j, position in enumerate(where):
        best = np.argsort(-probs[r, j], kind='stable')[:self.top_k]
        line.append(Prediction(position, [self.sp.id_to_piece(int(i)) for i in best], best.tolist(),
                               probs[r, j, best].tolist()))
      results.append(line)
    return results

  def filled(self, line: str, predictions: list[Prediction]) -> str:
    """The line with each mask replaced by its best piece, decoded as text."""
    ids = self.encode(line)[:-1]
    for p in predictions:
      ids[p.position] = p.ids[0]
    return self.sp.decode(ids)
