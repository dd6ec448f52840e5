"""A tiny Swin on the embedded digits: the Swin path of SimMIM end to end, offline, minutes on a laptop CPU.

Command:  python -m simmim_jax.main --config=configs/swin_tiny_cpu.py --workdir=runs/swin_tiny
          (--config=configs/swin_tiny_cpu.py:swinv2 runs the SwinV2 encoder with norm_target instead)
Runtime:  about 1.5-2.5 minutes on 2 CPU cores (600 steps of 64 images, ~600 images/s after ~20 s of
          compilation on an otherwise idle machine).
Budget:   as configs/base.py: 600 steps (total_steps) of 64 images on any data, warmup 1/12 of the run
          (optim.warmup_fraction), kept as a share when --config.total_steps=N shortens it.
Expected: the masked L1 loss falls from 1.44 at step 1 (0.74 at step 50) to ~0.43 at step 600 (swinv2, which
          regresses locally normalised pixels: 0.62 -> ~0.23); workdir gets checkpoints/, tensorboard/,
          metrics.jsonl, config.json and reconstructions/step_0000600.png.

Data: as configs/base.py (scikit-learn's handwritten digits upsampled to 32x32 RGB). Model: Swin 'Mu' (embed 48,
depths 2-2-2, heads 3-6-12, window 4): stage resolutions 8, 4, 2 tokens, so stage 1 alternates plain and
shifted windows and the later stages are single unshifted windows; encoder_stride 16.
"""
import ml_collections

from simmim_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = defaults.pretrain_config()
  c.batch_size = 64
  c.total_steps = 600

  c.model.name = arg or 'swin'
  if c.model.name not in ('swin', 'swinv2'):
    raise ValueError(f"configs/swin_tiny_cpu.py takes 'swin' or 'swinv2', got {arg!r}.")
  c.model.variant = 'Mu'
  c.model.image_size = 32
  c.model.window_size = 4
  c.model.drop_path_rate = 0.0
  c.loss.norm_target = c.model.name == 'swinv2'
  c.loss.norm_target_window = 7  # the recipe's 47 px on 192 px images is ~1/4 of the side; 7 on 32 px

  c.mask.mask_patch_size = 8  # 4x4 cells of 2x2 tokens; 10 of 16 masked (ceil(0.6 * 16))
  c.mask.model_patch_size = 4

  c.data.name = 'sklearn_digits'
  c.data.shuffle_buffer = 2048

  c.optim.schedule = 'cosine'
  c.optim.base_lr = 1.6e-2  # per 512 images: 2e-3 at batch 64
  c.optim.warmup_lr = 1.6e-5
  c.optim.min_lr = 1.6e-4
  c.optim.warmup_fraction = 50 / 600  # 50 of the 600 steps; --config.total_steps=N alone keeps the share

  c.checkpoint.every_steps = 200
  c.image_every_steps = 200
  return c
