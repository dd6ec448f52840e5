"""Loading a configs/*.py file by path with `path:arg` and `a.b=value` overrides (for tools, tests and notebooks).

The main job uses ml_collections' config flags; this does the same outside absl flag parsing.
"""
import ast
import importlib.util
import os

import ml_collections

Overrides = dict[str, object] | list[str] | None  # {'a.b': v} or ['a.b=v', ...]


def load_config(spec: str, overrides: Overrides = None) -> ml_collections.ConfigDict:
  """'configs/base.py' or 'configs/simmim_vit_base.py:100', then overrides {'a.b': v} or ['a.b=v', ...]."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'Config file {path!r} not found (paths are relative to {os.getcwd()!r}).')
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(arg or None), overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
  """Sets each existing field {'a.b': v} or ['a.b=v', ...] in place (an unknown field is an error); returns config."""
  if isinstance(overrides, list):
    overrides = dict(parse_override(item) for item in overrides)
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f'Unknown config field {key!r}.')
    node[leaf] = value
  return config


def parse_override(item: str) -> tuple[str, object]:
  """'a.b=value' -> ('a.b', value): a Python literal when it parses as one, else the text."""
  key, sep, text = item.partition('=')
  if not sep:
    raise ValueError(f'Override {item!r} must look like a.b=value.')
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text  # a bare string such as model.variant=B/16
