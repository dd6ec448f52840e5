"""Linear probe of a base.py encoder on the embedded digits: frozen encoder, block-4 features (of 6),
average pooling over patch tokens, parameter-free BatchNorm, a linear head. Offline, minutes on a CPU.

Command:  python -m simmim_jax.main --config=configs/linear_probe_cpu.py --config.init_from=runs/base \
            --workdir=runs/probe
          (runs/base: a configs/base.py pretraining workdir; init_from is required, as in finetune_cpu.py);
          configs/linear_probe_cpu.py:scratch probes a random-init encoder (the baseline).
Budget:   as configs/finetune_cpu.py: 10 epochs, warmup 25/220 of the run; 220 steps of 64 images on the digits,
          N // 64 steps per epoch on N images of other data.
Runtime:  no backward pass through the encoder: about 2-3 minutes on 2 CPU cores.
Expected: 220 steps on the digits, means of seeds 0-2: held-out top-1 0.676 for the base.py encoder against
          0.434 for a random-init one (0.23 against 0.17 before issue 14's recipes); on MNIST (--steps 220) 0.468
          for a 3,000-step base.py encoder against 0.283; every seed in the README's "Fine-tuning and linear
          probing" table.

Recipe: the paper's probe (ViT-B block 8 of 12, average pooling) and MAE's BatchNorm without affine, trained
with AdamW, no weight decay; finetune_cpu.py's single view (the whole image in training and evaluation, no
crop, flip, RandAugment, erasing, Mixup or label smoothing) and its std .02 head.
"""
import os

import ml_collections

from simmim_jax import config_io


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  finetune = os.path.join(os.path.dirname(__file__), 'finetune_cpu.py')
  c = config_io.load_config(f'{finetune}:{arg}' if arg else finetune)
  c.task = 'linear_probe'
  c.probe.block = 4
  c.model.drop_path_rate = 0.0
  c.optim.base_lr = 4e-2  # per 512 images: 5e-3 at batch 64
  c.optim.warmup_lr = 4e-5
  c.optim.min_lr = 4e-5
  c.optim.weight_decay = 0.0
  return c
