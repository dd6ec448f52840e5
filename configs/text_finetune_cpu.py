"""Text classification on the shipped medical abstracts (5 patient conditions), offline, CPU minutes.

Command:  python -m simmim_jax.main --config=configs/text_medical_cpu.py --workdir=runs/text_medical  # pretrain
          python -m simmim_jax.main --config=configs/text_finetune_cpu.py --config.init_from=runs/text_medical \
              --workdir=runs/text_ft
          configs/text_finetune_cpu.py:scratch trains the same model from random initialisation (the baseline);
          :probe is the linear probe of the init_from encoder, :probe_scratch of a random one.
Budget:   TO MEASURE
Runtime:  TO MEASURE
Expected: TO MEASURE
"""
import os

import ml_collections

from simmim_jax import config_io, defaults

ARGS = (None, 'scratch', 'probe', 'probe_scratch')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in ARGS:
    raise ValueError(f"configs/text_finetune_cpu.py takes no argument or one of {ARGS[1:]}, got {arg!r}.")
  pretrain = config_io.load_config(os.path.join(os.path.dirname(__file__), 'text_medical_cpu.py'))
  c = defaults.text_finetune_config()
  if arg in ('scratch', 'probe_scratch'):
    c.from_scratch = True  # else init_from must be given: validate.check says so at start
  c.model = pretrain.model
  c.total_epochs = 10.0
  c.optim.base_lr = 1.6e-2  # per 512 rows: 1e-3 at batch 32
  if arg in ('probe', 'probe_scratch'):  # the head alone on frozen features: a larger rate, no weight decay
    c.task = 'linear_probe'
    c.optim.base_lr = 1.6e-1  # per 512 rows: 1e-2 at batch 32
    c.optim.weight_decay = 0.0
  c.checkpoint.every_steps = 330
  c.log_every_steps = 66
  return c
