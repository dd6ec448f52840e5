"""The paper's Swin-B fine-tuning recipes on ImageNet-1K, from a SimMIM-pretrained (192 px, window 6) encoder.

Command:  python -m simmim_jax.main --config=configs/finetune_swin_base.py:224 --workdir=/mnt/runs/swin_b_ft \
            --config.init_from=/mnt/runs/swin_b_800ep --config.data.data_dir=DIR_WITH_PREPARED_imagenet2012
          The argument is the fine-tuning resolution and the pretraining length: 192 (window 6), 224 (window 7,
          the pretrained window-6 relative tables are resized as SimMIM's loader does: rel_pos_resize), with
          ',800' after 800 pretraining epochs (layer decay 0.8 instead of 0.9). Default: 224,800.
Runtime:  100 epochs = 62.5k steps at batch 2048 (~46 GFLOPs per image at 224 px).
Expected: top-1 on ImageNet-1K validation (docs/REFERENCE.md section 6): 100-epoch pretraining: 82.8 at 192 px,
          83.5 at 224 px; 800-epoch pretraining: 84.0 at 224 px (a reproduction got 82.7 / 83.5 / 83.8).

Recipe (docs/REFERENCE.md section 5): as configs/finetune_vit_base.py (AdamW, wd 0.05, batch 2048, 100 epochs,
20 warmup, cosine, base 1.25e-3 per 512, drop path 0.1, the timm augmentation and Mixup/CutMix) with layer decay 0.9
(100-epoch pretraining) or 0.8 (800); Swin keeps its final norm, mean pools and has no fc_norm.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, _, epochs = (arg or '224,800').partition(',')
  if size not in ('192', '224') or epochs not in ('', '100', '800'):
    raise ValueError(f"configs/finetune_swin_base.py takes :192 or :224, optionally ',100' or ',800'; got {arg!r}.")
  c = defaults.finetune_config()
  c.model.name = 'swin'
  c.model.variant = 'B'
  c.model.image_size = int(size)
  c.model.window_size = 6 if size == '192' else 7
  c.model.dtype = 'bfloat16'
  c.optim.layer_decay = 0.8 if epochs == '800' else 0.9
  c.checkpoint.every_steps = 2000
  c.log_every_steps = 100
  return c
