"""BERT-base-size masked token modelling on C4 (English) with a RoBERTa-like recipe.

Command:  python tools/train_tokenizer.py --tfds=c4/en:3.1.0 --data_dir=DIR --vocab_size=32000 \
              --max_documents=2000000 --character_coverage=0.9995 --output=DIR/spm/c4_32k
          python -m simmim_jax.main --config=configs/text_base.py --workdir=WORKDIR \
              --config.data.data_dir=DIR --config.data.tokenizer=DIR/spm/c4_32k.model \
              --config.data.cache_dir=DIR/token_cache
          (c4 must be prepared first: `tfds build c4/en:3.1.0 --data_dir=DIR`; nothing is downloaded at run time.)
Runtime:  500k steps of 8,192 rows x 512 tokens (2.1T tokens; RoBERTa's budget). A step costs ~2.4 PFLOP
          (6 x 85M non-embedding params x 4.2M tokens, plus attention): at 40 % MFU about 4 days on a TPU
          v4-64 pod slice (32 chips), or about 4-5 days on 8 H100s. Each process tokenises its slice of C4
          once (data.cache_dir keeps it across restarts).
Memory:   (tools/aot_check.py --plan, compiled for TPUs from a CPU host) 128 rows per chip per micro-step fit a
          v4 chip (30.68 of 32 GiB), so batch 8192 needs --config.optim.accum_steps=2 on v4-64 (256 rows per
          chip), 16 on v4-8; v5e-16 4 (15.04 of 16), v5p-8 8, v6e-8 8. On GPUs choose it the same way
          (--topology h100x8 in an environment with JAX's CUDA plugin).
Expected: held-out (C4 validation) masked-token loss ~1.5-1.8 nats (perplexity ~4.5-6), accuracy ~0.6-0.65,
          as RoBERTa-base-like models reach (the Flax MLM example: loss 1.78, accuracy 0.64); downstream
          after fine-tuning about BERT-base level (MNLI ~84, SST-2 ~92). Not run here: needs an accelerator pod.

Recipe (RoBERTa-base): batch 8k, 500k steps, peak LR 6e-4 after 24k warmup steps, AdamW betas (0.9, 0.98),
eps 1e-6, weight decay 0.01, BERT 80/10/10 masking of 15 % of tokens, full-length packed rows (documents
concatenated, attention masked between them), linear decay to 0 after warmup. Differences, by design of this
codebase: drop path 0.1 in place of dropout 0.1, pre-norm blocks, gradient clipping at 1.0.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.text_pretrain_config()
  c.batch_size = 8192
  c.total_steps = 500_000

  c.model.dtype = 'bfloat16'


  c.data.name = 'c4/en:3.1.0'

  c.optim.schedule = 'linear'
  c.optim.base_lr = 6e-4 * 512 / 8192  # per 512 rows: 6e-4 at batch 8192
  c.optim.warmup_lr = 0.0
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 24_000
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.clip_grad = 1.0

  # mesh.fsdp stays 1: 110M params fit every chip; raise it (e.g. 8) to shard params and optimizer state.

  c.checkpoint.every_steps = 5000
  c.log_every_steps = 100
  c.eval_batches = 20  # 164k held-out rows' worth of masked tokens per evaluation
  return c
