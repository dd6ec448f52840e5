"""The paper's Swin-L fine-tuning recipe on ImageNet-1K (224 px, window 14), from the SimMIM-pretrained
Swin-L (configs/simmim_swin_large.py: 192 px, window 12, 800 epochs).

Command:  python -m simmim_jax.main --config=configs/finetune_swin_large.py --workdir=/mnt/runs/swin_l_ft \
            --config.init_from=/mnt/runs/swin_l_800ep --config.data.data_dir=DIR_WITH_PREPARED_imagenet2012
          The pretrained relative position tables are resized as SimMIM's loader does
          (config.rel_pos_resize='geometric'): 23x23 -> 27x27 in stages 1-3 (window 12 -> 14), 11x11 -> 13x13
          in stage 4 (one 6x6 window at 192 px -> one 7x7 window at 224 px).
Runtime:  100 epochs = 62.5k steps at batch 2048. A step costs ~220 GFLOPs per image (forward 73.1 GFLOPs
          at 224 px, window 14, as XLA counts it, x3), ~2.8e19 FLOPs in all: about 5 h on 8 H100s in bfloat16
          at 20 % MFU. An estimate from model FLOPs, not a measured run. 197M parameters.
          Memory (tools/aot_check.py, compiled for TPUs): batch 2048 fits a v5p-8 (93.75 of 95 GiB per chip) but
          not a v5e-16 at 128 per chip, not even with model.remat=block (16.58 G temporaries of 15.75), nor a v4-8
          at 512 per chip (block: 45.85 G of 30.75): on v4 and v5e it needs more chips (fewer images per chip).
          For v6e-8 libtpu 0.0.42.1 fails to compile it (INTERNAL: LLO_CHECK failure), remat none and block.
Expected: top-1 85.4 on ImageNet-1K validation (docs/REFERENCE.md section 6; 84.8 in an independent reproduction).

Recipe (docs/REFERENCE.md section 5, the official simmim_finetune__swin_large__img224_window14__800ep): as
configs/finetune_swin_base.py (AdamW, wd 0.05, clip 5.0, batch 2048, 100 epochs, 20 warmup, cosine, base
1.25e-3, warmup and floor 2.5e-7 per 512, the timm augmentation and Mixup/CutMix) with layer decay 0.7 and
drop path 0.2.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.finetune_config()
  c.model.name = 'swin'
  c.model.variant = 'L'
  c.model.window_size = 14  # stages of 56, 28, 14, 7 tokens: stage 3 is one window, stage 4 one 7x7 window
  c.model.drop_path_rate = 0.2
  c.model.dtype = 'bfloat16'
  c.optim.layer_decay = 0.7
  c.checkpoint.every_steps = 2000
  c.log_every_steps = 100
  return c
