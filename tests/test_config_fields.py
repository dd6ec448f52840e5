"""tools/config_fields.py: every field of a recipe with its value, default and the help written in defaults.py."""
import subprocess
import sys

from simmim_jax import config_io
from tools import config_fields


def test_every_field_is_listed_with_its_default_and_help():
  rows = {name: (value, default, text) for name, value, default, text in config_fields.rows('configs/base.py')}
  flat = config_fields.flatten(config_io.load_config('configs/base.py'))
  assert sorted(rows) == sorted(flat)
  assert rows['batch_size'] == (64, 2048, 'global, per optimizer step (micro-batches x accum_steps)')
  assert rows['model.dtype'][2] == 'compute dtype; params and optimizer state stay float32'
  assert rows['model.attention'][2].startswith("'auto': cuDNN flash attention")  # a comment block above the field
  assert rows['optim.warmup_fraction'][:2] == (50 / 600, None)


def test_help_follows_the_defaults_function_of_the_recipe():
  finetune = {name: text for name, _, _, text in config_fields.rows('configs/finetune_cpu.py:scratch')}
  text = {name: text for name, _, _, text in config_fields.rows('configs/text_tiny.py')}
  assert finetune['optim.base_lr'] == 'per 512 images: 5e-3 at 2048'  # finetune_config's own comment
  assert 'from random initialisation' in finetune['from_scratch']
  assert text['model.vocab_size'] == "must equal the tokenizer's piece count"
  assert 'mask.mask_patch_size' not in text
  # text classification: its own fields, the fine-tuning ones and the text model's, each with its help
  classify = {name: (default, text) for name, _, default, text in config_fields.rows('configs/text_finetune_cpu.py')}
  assert classify['pool'][1].startswith('features pooled over the real tokens')
  assert 'from random initialisation' in classify['from_scratch'][1]
  assert classify['model.vocab_size'][1] == "must equal the tokenizer's piece count"
  assert classify['optim.base_lr'] == (3.2e-4, 'per 512 rows: 2e-5 at 32') and 'mixup.prob' not in classify


def test_command_line_changed_fields_overrides_and_markdown():
  def run(*args):
    result = subprocess.run([sys.executable, 'tools/config_fields.py', *args], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()

  changed = run('configs/base.py', '--changed', '--config.total_steps=20')
  assert all(line.startswith('* ') for line in changed)
  assert any(line.split()[1] == 'total_steps' and '= 20  (default None)' in line for line in changed)
  assert not any(line.split()[1] == 'seed' for line in changed)
  table = run('configs/base.py', '--markdown', '--grep', 'warmup')
  assert table[0] == '| field | value | default | help |' and len(table) > 3
  assert table[1] == '|---|---|---|---|' and all(line.startswith('| `') for line in table[2:])
