"""Lists a recipe's config fields: each one's value, its default, and its help (the comment in defaults.py).

  python tools/config_fields.py configs/base.py                 # every field
  python tools/config_fields.py configs/finetune_cpu.py:scratch --changed   # what the recipe sets
  python tools/config_fields.py configs/base.py --grep optim    # fields whose name or help mention 'optim'
  python tools/config_fields.py configs/base.py --markdown      # a Markdown table (name | value | default | help)

A field's help is the comment on its line in simmim_jax/defaults.py, or the comment lines right above it (read
with tokenize, so the file stays the one place they are written). The default is the value of the defaults.py
function the recipe starts from (pretrain_config, finetune_config, text_pretrain_config or text_finetune_config,
chosen by task and model.name); `*` marks a value the recipe (or an override) changes. Override fields as in the main job:
  python tools/config_fields.py configs/base.py --config.total_steps=20
`python -m simmim_jax.main --config=... --print_config` prints the resolved config alone.
"""
import argparse
import ast
import io
import os
import sys
import tokenize
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io, defaults  # pylint: disable=g-import-not-at-top

FUNCTIONS = ('pretrain_config', 'finetune_config', 'text_pretrain_config', 'text_finetune_config')
# Where each function's fields come from (their comments, earlier ones first; the function's own win).
PARENTS = {'finetune_config': ('pretrain_config',), 'text_pretrain_config': ('pretrain_config',),
           'text_finetune_config': ('pretrain_config', 'finetune_config', 'text_pretrain_config')}


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """(comment at the end of line n, comment that is a whole line n), 1-based, '#' and spaces stripped."""
  trailing, whole = {}, {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      text = token.string.lstrip('#').strip()
      line = token.line[:token.start[1]]
      (whole if not line.strip() else trailing)[token.start[0]] = text
  return trailing, whole


def _target(node: ast.expr) -> str | None:
  """'a.b' for the assignment target c.a.b; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return '.'.join(reversed(parts)) if isinstance(node, ast.Name) and node.id == 'c' and parts else None


def field_help(path: str = defaults.__file__) -> tuple[dict[str, dict[str, str]], list[str]]:
  """({defaults function: {field: help}}, every field in the order defaults.py sets it): each function's own
  comments, over those of the one it starts from."""
  source = open(path, encoding='utf-8').read()
  trailing, whole = _comments(source)
  own: dict[str, dict[str, str]] = {}
  order: list[str] = []
  for function in ast.parse(source).body:
    if not isinstance(function, ast.FunctionDef) or function.name not in FUNCTIONS:
      continue
    helps = own.setdefault(function.name, {})
    for node in ast.walk(function):
      if not isinstance(node, ast.Assign) or (name := _target(node.targets[0])) is None:
        continue
      if name not in order:
        order.append(name)
      above, line = [], node.lineno - 1
      while line in whole:  # the block of whole-line comments right above the assignment
        above.insert(0, whole[line])
        line -= 1
      text = ' '.join(above + ([trailing[node.end_lineno]] if node.end_lineno in trailing else []))
      if text:
        helps[name] = text
  helps = {name: {k: v for parent in (*PARENTS.get(name, ()), name) for k, v in own.get(parent, {}).items()}
           for name in FUNCTIONS}
  return helps, order


def defaults_for(config: ml_collections.ConfigDict) -> str:
  """The defaults.py function a config starts from."""
  if config.get('task') in ('finetune', 'linear_probe'):
    return 'text_finetune_config' if config.model.get('name') == 'text' else 'finetune_config'
  return 'text_pretrain_config' if config.model.get('name') == 'text' else 'pretrain_config'


def flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """'a.b' -> value for every leaf field (an empty section stays a field)."""
  out = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def rows(spec: str, overrides: list[str] | None = None) -> list[tuple[str, Any, Any, str]]:
  """(field, value, default, help) for every field of a recipe (with `a.b=value` overrides), in the order
  defaults.py sets them (fields it does not know last)."""
  config = config_io.load_config(spec, overrides or None)
  base = defaults_for(config)
  default = flatten(getattr(defaults, base)())
  helps, order = field_help()
  values = flatten(config)
  order = [name for name in order if name in values] + sorted(name for name in values if name not in order)
  return [(name, values[name], default.get(name, '(none)'), helps[base].get(name, '')) for name in order]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('config', help='a configs/*.py file, optionally with :arg')
  parser.add_argument('--changed', action='store_true', help='only the fields whose value differs from the default')
  parser.add_argument('--grep', default=None, help='only the fields whose name or help contain this text')
  parser.add_argument('--markdown', action='store_true', help='a Markdown table')
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for flag in rest:
    if not flag.startswith('--config.') or '=' not in flag:
      parser.error(f'unrecognised argument {flag!r}: overrides look like --config.total_steps=20')
    overrides.append(flag.removeprefix('--config.'))
  table = rows(args.config, overrides)
  if args.changed:
    table = [row for row in table if row[1] != row[2]]
  if args.grep:
    needle = args.grep.lower()
    table = [row for row in table if needle in row[0].lower() or needle in row[3].lower()]
  if args.markdown:
    print('| field | value | default | help |\n|---|---|---|---|')
    for name, value, default, text in table:
      print(f'| `{name}` | `{value!r}` | `{default!r}` | {text.replace("|", "/")} |')
    return
  width = max((len(row[0]) for row in table), default=0)
  for name, value, default, text in table:
    changed = value != default
    line = f'{"*" if changed else " "} {name:<{width}} = {value!r}'
    if changed:
      line += f'  (default {default!r})'
    print(line + (f'  # {text}' if text else ''))


if __name__ == '__main__':
  main()
