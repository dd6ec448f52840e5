"""The embedded text default: masked token modelling on Python's own documentation, offline, CPU minutes.

Command:  python -m simmim_jax.main --config=configs/text_tiny.py --workdir=runs/text_tiny
Runtime:  about 6 minutes on 2 idle CPU cores (1000 steps of 32 rows x 128 tokens, ~3 steps/s; measured
          17 minutes wall with 5 minutes of CPU on a 2-core machine shared with other jobs). Rerunning on
          the same workdir resumes from the latest checkpoint, or says the run is finished.
Budget:   1000 steps (total_steps) of 32 rows x 128 tokens (4.1M tokens, ~38 passes over the 108k-token train
          split); warmup 5 % of the run (optim.warmup_fraction: 50 steps), kept as a share when
          --config.total_steps=N shortens it; evaluation every 250 steps. Counted in steps, it stays 1000
          steps on other text (--config.data.name=text_files ...).
Expected: held-out (validation topics) masked-token accuracy ~0.12 at the end (measured 0.116) against
          0.024 for the unigram baseline (always predicting the most frequent token, '▁the'); eval_loss ~5.2
          nats (perplexity ~185); train loss 7.65 at step 1 -> ~4.9. Printed at every evaluation (steps 250,
          500, 750, 1000) as `held-out at step N: ... accuracy ... unigram_accuracy ...`, and in metrics.jsonl.

Data: `pydoc_data.topics` (79 topics, ~465k characters, one paragraph per document), registered as the tfds
builder `pydoc_topics` and prepared locally; 71 topics train, 8 held out. A 2,048-piece unigram
sentencepiece model is trained on the train split when the run starts (deterministic, under a second).
Model: BERT 'tiny' sizes (width 128, 2 blocks), masking 15 % of tokens in spans of 1 with [MASK].
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.text_pretrain_config()
  c.batch_size = 32
  c.total_steps = 1000

  c.model.variant = 'tiny'
  c.model.vocab_size = 2048
  c.model.max_len = 128
  c.model.drop_path_rate = 0.0

  c.mask.strategy = 'mask_token'

  c.data.name = 'pydoc_topics'
  c.data.seq_len = 128

  c.optim.schedule = 'cosine'
  c.optim.base_lr = 1.6e-2  # per 512 rows: 1e-3 at batch 32
  c.optim.warmup_lr = 0.0
  c.optim.min_lr = 1.6e-4
  c.optim.warmup_fraction = 0.05  # 50 of the 1000 steps; --config.total_steps=N alone keeps the share
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.clip_grad = 1.0

  c.checkpoint.every_steps = 500
  c.eval_every_steps = 250
  return c
