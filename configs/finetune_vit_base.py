"""The paper's ViT-B/16 fine-tuning recipe on ImageNet-1K (224 px), from a SimMIM-pretrained encoder.

Command:  python -m simmim_jax.main --config=configs/finetune_vit_base.py --workdir=/mnt/runs/vit_b_ft \
            --config.init_from=/mnt/runs/vit_b_800ep --config.data.data_dir=DIR_WITH_PREPARED_imagenet2012
          init_from takes a pretraining workdir, one checkpoint step, an exported .npz, or an official SimMIM
          .pth converted by tools/ (see README).
Runtime:  100 epochs = 62.5k steps at batch 2048; a fine-tuning step costs about the same as a pretraining
          step (~52 GFLOPs per image), so roughly 1/8 of the 800-epoch pretraining.
Expected: top-1 83.8 on ImageNet-1K validation after 100 epochs from the 800-epoch pretraining (83.6 reported
          by users of the released weights; docs/REFERENCE.md section 6).

Recipe (docs/REFERENCE.md section 5): AdamW (0.9, 0.999), wd 0.05, clip 5.0, batch 2048, cosine with 20 warmup epochs,
LR per 512 images base 1.25e-3, warmup and floor 2.5e-7, layer decay 0.65, drop path 0.1; mean pooling +
fc_norm + head (init x0.001); RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0
(switch 0.5), label smoothing 0.1; evaluation resizes to 256 and centre-crops 224.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.finetune_config()  # its defaults are this recipe
  c.model.dtype = 'bfloat16'
  c.checkpoint.every_steps = 2000
  c.log_every_steps = 100
  return c
