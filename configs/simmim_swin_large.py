"""The paper's Swin-L SimMIM recipe on ImageNet-1K (192 px, window 12, 800 epochs, mask 32 px at ratio 0.6).

Command:  python -m simmim_jax.main --config=configs/simmim_swin_large.py --workdir=/mnt/runs/swin_l_800ep \
            --config.data.data_dir=DIR_WITH_PREPARED_imagenet2012
          (add --config.mesh.fsdp=N to shard parameters and optimizer state when memory is tight)
Runtime:  500k steps at batch 2048 (625 per epoch). A step costs ~160 GFLOPs per image (forward 53.3 GFLOPs
          as XLA counts it, x3), ~1.6e20 FLOPs in all: about 29 h on 8 H100s in bfloat16 at 20 % MFU.
          An estimate from model FLOPs, not a measured run; the reference used 16 V100s.
Expected: fine-tuned ImageNet-1K top-1 85.4 at 224 px (docs/REFERENCE.md section 6; 84.8 in an independent
          reproduction).

Recipe (docs/REFERENCE.md section 4): AdamW (0.9, 0.999), eps 1e-8, wd 0.05, clip 5.0, batch 2048, drop path 0.0;
LR per 512 images: base 1e-4, warmup 5e-7 for 10 epochs, multistep x0.1 at epoch 700.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.pretrain_config()
  c.total_epochs = 800.0

  c.model.name = 'swin'
  c.model.variant = 'L'
  c.model.image_size = 192
  c.model.window_size = 12  # stages of 48, 24, 12, 6 tokens: stage 3 is one window, stage 4 one 6x6 window
  c.model.drop_path_rate = 0.0
  c.model.dtype = 'bfloat16'

  c.mask.model_patch_size = 4

  c.checkpoint.every_steps = 2000
  c.log_every_steps = 100
  return c
