"""The config policy (simmim_jax/defaults.py): a recipe sets only what differs from its defaults."""
import ast
import glob
import os

import pytest

from simmim_jax import config_io, defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def unconditional_fields(path: str) -> list[str]:
  """'a.b' for every `c.a.b = ...` statement at the top level of get_config (not inside an if/for)."""
  function = next(n for n in ast.parse(open(path).read()).body
                  if isinstance(n, ast.FunctionDef) and n.name == 'get_config')
  fields = []
  for statement in function.body:
    if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Attribute):
      target, parts = statement.targets[0], []
      while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
      if isinstance(target, ast.Name) and target.id == 'c':
        fields.append('.'.join(reversed(parts)))
  return fields


def lookup(config, field: str):
  for name in field.split('.'):
    config = config[name]
  return config


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_a_recipe_restates_no_default(path):
  tree = ast.parse(open(path).read())
  start = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'c')
  if isinstance(start.func, ast.Attribute) and getattr(start.func.value, 'id', '') == 'defaults':
    default = getattr(defaults, start.func.attr)()  # c = defaults.pretrain_config() etc.
  else:  # a recipe built on another (linear_probe_cpu.py on finetune_cpu.py) differs from that one
    parent = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and str(n.value).endswith('.py'))
    default = config_io.load_config(os.path.join(ROOT, 'configs', parent))
  recipe = config_io.load_config(path)
  fields = unconditional_fields(path)
  assert fields, 'the recipe sets its fields on `c` at the top level of get_config'
  restated = [f for f in fields if f in default and lookup(recipe, f) == lookup(default, f)]
  assert not restated, f'{os.path.basename(path)} restates defaults: {restated}'
