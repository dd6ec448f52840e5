"""Does the project's text fine-tune learn as well as its peers? Held-out top-1 on the shipped medical abstracts of
(a) simmim_jax's fine-tune trainer, (b) a Hugging Face transformers BERT of the same size trained by a plain
PyTorch loop on the same token rows, batches and steps, and (c) TF-IDF + logistic regression (scikit-learn).

  python tools/compare_text_peers.py --seeds 0,1,2                             # :scratch, 264 steps
  python tools/compare_text_peers.py --steps 20 --seeds 0                      # a quick look
  python tools/compare_text_peers.py --set optim.base_lr=8e-3 --no-peer        # one change, project side only
  python tools/compare_text_peers.py --peer-dropout 0.0 --no-project           # the peer without BERT's dropout

The project side is simmim_jax.trainers.finetune.train on the recipe as given (configs/text_finetune_cpu.py:scratch
by default), total_steps=--steps (default: the recipe's own, 264) and one evaluation at the end.
The peer is transformers.BertModel built from a BertConfig (never the hub) at the recipe's width, depth, heads,
MLP size, vocabulary and max positions, a mean over the real tokens, dropout config.head_dropout and a linear head
(normal std 0.02, as BERT's). It reads the rows the project's data code makes (simmim_jax/data/labelled.py: the
run's tokenizer, eos appended, truncated to data.seq_len, pad id 0; the attention mask is segment_ids > 0), the
project's training batches for the seed in their order, and trains with AdamW (the recipe's b1, b2, eps, weight
decay on matrices only), clip_grad_norm_(optim.clip_grad) and, at update k, the project's own schedule value
(warmup then linear decay), for the same steps. Its initial weights are its own draw (torch.manual_seed(seed)).
What differs from the project's model (simmim_jax/models/text.py): BERT is post-norm (LayerNorm after each residual
and on the embeddings) where the project is pre-norm with a final LayerNorm; BERT has a token-type embedding
(type_vocab_size=1: width more parameters) and, by default, dropout 0.1 on embeddings, attention probabilities
and residual branches (--peer-dropout; the project's encoder has none); init normal std 0.02 against truncated.
TF-IDF (sublinear tf, unigrams) + logistic regression (C=10) is fitted on the training texts, whole and cut to the
same first seq_len tokens the models see (the rows decoded back to text); it has no seed.

Measured (2026-12-08, `--seeds 0,1,2`, 2-core CPU shared with other jobs, 27 minutes in all): project 0.519 / 0.553
/ 0.545 (mean 0.539; 116-167 s a run), transformers peer 0.586 / 0.583 / 0.558 (mean 0.576; 275-507 s a run),
TF-IDF + LR 0.641 whole abstract, 0.583 on the first 128 tokens. The peer with --peer-dropout 0.0 (no encoder
dropout, as the project's): 0.570 / 0.543 at seeds 0 / 1 (project 0.519 / 0.553): most of its lead is dropout.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch and transformers' BERT (transformers imports lazily: BertModel's first use loads its generation code,
# which segfaults in LLVM after TensorFlow is loaded) before anything that loads TensorFlow, as tools/torch_peer.py.
import torch  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top
from transformers import BertConfig, BertModel  # pylint: disable=g-import-not-at-top  (loads modeling_bert now)
from torch import nn  # pylint: disable=g-import-not-at-top

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io  # pylint: disable=g-import-not-at-top
from tools.compare_with_timm import project_top1, with_seed  # pylint: disable=g-import-not-at-top  (one project side)

DEFAULT_CONFIG = 'configs/text_finetune_cpu.py:scratch'


class TextPeer(nn.Module):
  """BertModel (no pooler) -> mean over the real tokens -> dropout -> linear head: (tokens, mask) -> logits."""

  def __init__(self, bert_config: BertConfig, num_classes: int, head_dropout: float):
    super().__init__()
    self.bert = BertModel(bert_config, add_pooling_layer=False)
    self.dropout = nn.Dropout(head_dropout)
    self.head = nn.Linear(bert_config.hidden_size, num_classes)
    nn.init.normal_(self.head.weight, std=bert_config.initializer_range)
    nn.init.zeros_(self.head.bias)

  def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    features = self.bert(input_ids=tokens, attention_mask=mask).last_hidden_state
    real = mask.unsqueeze(-1).to(features.dtype)
    pooled = (features * real).sum(1) / real.sum(1).clamp(min=1.0)  # padding never counted, as the project's pool
    return self.head(self.dropout(pooled))


def bert_config(config: ml_collections.ConfigDict, dropout: float = 0.1) -> BertConfig:
  """The BertConfig of the recipe's text model: its width, depth, heads, MLP size, vocabulary and positions."""
  from simmim_jax.models import text  # pylint: disable=import-outside-toplevel
  size = text.decode_variant(config.model.variant)
  return BertConfig(
      vocab_size=config.model.vocab_size, hidden_size=size['width'], num_hidden_layers=size['depth'],
      num_attention_heads=size['num_heads'], intermediate_size=size['mlp_dim'], hidden_act='gelu',  # exact erf
      max_position_embeddings=config.model.max_len, type_vocab_size=1, layer_norm_eps=1e-6,
      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0)


def peer_model(config: ml_collections.ConfigDict, num_classes: int, dropout: float = 0.1) -> TextPeer:
  return TextPeer(bert_config(config, dropout), num_classes, float(config.head_dropout))


def recipe_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """(total steps, steps per epoch) as the fine-tune trainer resolves them."""
  from simmim_jax.defaults import resolve_steps, steps_per_epoch_of  # pylint: disable=import-outside-toplevel
  per_epoch = steps_per_epoch_of(num_examples, config.batch_size)
  return resolve_steps(config, 'total', per_epoch), per_epoch


def batch_tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
  """A project batch -> (token ids, attention mask) as int64: the mask is 1 on real tokens (segment > 0)."""
  return torch.from_numpy(batch['tokens']).long(), torch.from_numpy((batch['segment_ids'] > 0).astype(np.int64))


def peer_top1(config: ml_collections.ConfigDict, *, seed: int, steps: int | None, dropout: float = 0.1) -> float:
  """Trains the peer on the project's batches for the seed (config.seed) for the recipe's (or `steps`) steps and
  returns its top-1 on data.eval_split."""
  from simmim_jax import optim  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import labelled  # pylint: disable=import-outside-toplevel
  config = with_seed(config, seed, steps)
  data = labelled.build(config)  # the project's rows and batches, its tokenizer
  total, per_epoch = recipe_steps(config, data.num_examples)
  schedule = optim.lr_schedule(config.optim, total_steps=total, steps_per_epoch=per_epoch,
                               batch_size=config.batch_size)
  lrs = [float(schedule(k)) for k in range(total)]  # update k at the project's schedule(k)
  torch.manual_seed(seed)
  model = peer_model(config, data.num_classes, dropout).train()
  o = config.optim
  decay = [p for p in model.parameters() if p.ndim > 1]  # as the project: only 1-d params are exempt
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': o.weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}], lr=0.0, betas=(o.b1, o.b2), eps=o.eps)
  batches = data.train_batches(config.batch_size, 0)
  start = time.perf_counter()
  for step in range(total):
    batch = next(batches)
    tokens, mask = batch_tensors(batch)
    loss = F.cross_entropy(model(tokens, mask), torch.from_numpy(batch['label']).long())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
    for group in optimizer.param_groups:
      group['lr'] = lrs[step]
    optimizer.step()
    if (step + 1) % 33 == 0 or step + 1 == total:
      print(f'  peer step {step + 1}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)', flush=True)
  model.eval()
  right = count = 0
  with torch.no_grad():
    for batch in data.eval_batches(config.eval_batch_size or config.batch_size):
      tokens, mask = batch_tensors(batch)
      valid = batch['valid'] > 0
      predicted = model(tokens, mask).argmax(-1).numpy()
      right += int(((predicted == batch['label']) & valid).sum())
      count += int(valid.sum())
  return right / count


def tfidf_top1(config: ml_collections.ConfigDict) -> tuple[float, float]:
  """TF-IDF (sublinear tf, unigrams) + logistic regression (C=10): top-1 on the whole texts, and on the texts cut
  to the first data.seq_len tokens of the project's rows (decoded back, eos dropped)."""
  from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import labelled, labelled_text, tokenizer  # pylint: disable=import-outside-toplevel
  data = config.data
  train = labelled_text.read_split(data, data.split, num_classes=config.num_classes)
  test = labelled_text.read_split(data, data.eval_split, train)
  sp = labelled.run_tokenizer(config, train.texts)

  def cut(texts: list[str]) -> list[str]:
    rows = labelled_text.encode(texts, sp, data.seq_len)
    return [sp.decode([int(i) for i in row[seg > 0] if i != tokenizer.EOS_ID])
            for row, seg in zip(rows['tokens'], rows['segment_ids'])]

  def score(train_texts: list[str], test_texts: list[str]) -> float:
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    classifier = LogisticRegression(C=10, max_iter=2000).fit(vectorizer.fit_transform(train_texts), train.labels)
    return float((classifier.predict(vectorizer.transform(test_texts)) == test.labels).mean())

  return score(train.texts, test.texts), score(cut(train.texts), cut(test.texts))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='configs/x.py[:arg]')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value (both models)')
  parser.add_argument('--steps', type=int, default=None, help="both models' steps (default: the recipe's)")
  parser.add_argument('--seeds', default='0', help='comma-separated, e.g. 0,1,2')
  parser.add_argument('--peer-dropout', type=float, default=0.1, help="the peer encoder's dropout (BERT's 0.1)")
  parser.add_argument('--no-peer', action='store_true', help='leave the transformers peer out')
  parser.add_argument('--no-project', action='store_true', help='leave the project run out')
  parser.add_argument('--no-tfidf', action='store_true', help='leave TF-IDF + logistic regression out')
  parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads for the peer')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  config = config_io.load_config(args.config, args.set)
  seeds = [int(s) for s in args.seeds.split(',')]
  whole = first = None
  if not args.no_tfidf:
    whole, first = tfidf_top1(config)
    print(f'TF-IDF + logistic regression: whole text {whole:.4f}, first {config.data.seq_len} tokens {first:.4f}',
          flush=True)
  rows = []
  for seed in seeds:
    times = []
    start = time.perf_counter()
    ours = None if args.no_project else project_top1(config, seed=seed, steps=args.steps)
    times.append(time.perf_counter() - start)
    theirs = None if args.no_peer else peer_top1(config, seed=seed, steps=args.steps, dropout=args.peer_dropout)
    times.append(time.perf_counter() - start - times[0])
    rows.append((seed, ours, theirs))
    print(f'seed {seed}: project {ours} ({times[0]:.0f} s)  transformers peer {theirs} ({times[1]:.0f} s)',
          flush=True)
  fmt = lambda v: '   -  ' if v is None else f'{v:.4f}'  # pylint: disable=unnecessary-lambda-assignment
  steps = args.steps or 'recipe'
  print(f'\n{config.data.name}, {steps} steps of {config.batch_size} x {config.data.seq_len} tokens, text '
        f'{config.model.variant}; peer: transformers {transformers.__version__} BertModel, dropout '
        f'{args.peer_dropout}; TF-IDF has no seed')
  print('seed | project | transformers peer | TF-IDF+LR whole | TF-IDF+LR first tokens')
  for seed, ours, theirs in rows:
    print(f'{seed:4d} | {fmt(ours)}  | {fmt(theirs)}            | {fmt(whole)}          | {fmt(first)}')
  means = [None if any(r[i] is None for r in rows) else float(np.mean([r[i] for r in rows])) for i in (1, 2)]
  print(f'mean | {fmt(means[0])}  | {fmt(means[1])}            | {fmt(whole)}          | {fmt(first)}')
  print(f'\n| {config.data.name} ({len(seeds)} seeds) | project {fmt(means[0])} | transformers peer {fmt(means[1])} '
        f'| TF-IDF+LR {fmt(whole)} / {fmt(first)} |', flush=True)


if __name__ == '__main__':
  main()
