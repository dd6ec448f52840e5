"""Fine-tune a base.py encoder on the embedded digits (held-out test split), offline, minutes on a CPU.

Command:  python -m simmim_jax.main --config=configs/base.py --workdir=runs/base        # pretrain first
          python -m simmim_jax.main --config=configs/finetune_cpu.py --config.init_from=runs/base --workdir=runs/ft
          init_from is required (the run stops at once with one line without it): a pretraining workdir, a
          checkpoint step, an exported .npz / .safetensors or a timm folder. configs/finetune_cpu.py:scratch
          trains the same model from random initialisation instead (the baseline; from_scratch=True).
Budget:   10 epochs (total_epochs; warmup 20 % of the run, optim.warmup_fraction). On the digits (1,437
          training images, batch 64) an epoch is 22 steps: 220 steps, 44 of warmup, evaluation of the 360 test
          digits after every epoch, a checkpoint every 110 steps, a log line every 22. On other data
          (--config.data.name=image_folder --config.data.data_dir=DIR) an epoch is N // 64 steps for N training
          images: 10,000 images make 1,560 steps, still evaluated every epoch, while checkpoint.every_steps and
          log_every_steps stay in steps. --config.total_steps=N (or total_epochs) alone changes the length; the
          warmup keeps its share.
Runtime:  the 220 steps plus 10 evaluations take about 3-5 minutes on 2 CPU cores.
Expected: held-out top-1 0.58 from the 600-step base.py encoder against 0.48 from scratch with the same
          budget (means of 3 seeds; README "Fine-tuning and linear probing").

Recipe: the official fine-tuning model and optimizer (docs/REFERENCE.md section 5) at CPU scale: mean pooling + fc_norm
+ head (init x0.001), layer-wise LR decay, AdamW, cosine with warmup, random erasing 0.25, label smoothing 0.1.
The augmentation is lighter than ImageNet's, for 1,437 8x8 digits and a 10-epoch budget: no horizontal flip
(a mirrored digit is another symbol), crops keep >= 70 % of the digit (timm's 8 % leaves 2x2 of its pixels),
and RandAugment and Mixup/CutMix are off (with them, 15 epochs reached ~40 % top-1; the pipeline also costs
~25 ms per image on a CPU). configs/finetune_vit_base.py has the full recipe; the tests run it here too.
"""
import os

import ml_collections

from simmim_jax import config_io, defaults

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, 'scratch'):
    raise ValueError(f"configs/finetune_cpu.py takes no argument or ':scratch', got {arg!r}.")
  pretrain = config_io.load_config(os.path.join(os.path.dirname(__file__), 'base.py'))
  c = defaults.finetune_config()
  if arg == 'scratch':
    c.from_scratch = True  # else init_from must be given: validate.check says so at start
  c.batch_size = 64
  c.total_epochs = 10.0
  c.model = pretrain.model
  c.data.name = pretrain.data.name
  c.data.shuffle_buffer = pretrain.data.shuffle_buffer
  c.data.eval_split = 'test'
  c.data.crop_scale = (0.7, 1.0)
  c.data.flip = False
  c.data.rand_augment = ''
  c.mixup.mixup_alpha = 0.0
  c.mixup.cutmix_alpha = 0.0

  c.optim.base_lr = 1.6e-2  # per 512 images: 2e-3 at batch 64
  c.optim.warmup_lr = 8e-6
  c.optim.min_lr = 8e-6
  c.optim.warmup_fraction = 0.2  # 2 of the 10 epochs (44 of 220 steps on the digits); any budget keeps the share
  c.optim.layer_decay = 0.75

  c.checkpoint.every_steps = 110
  c.log_every_steps = 22
  return c
