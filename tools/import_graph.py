"""Import cycles in simmim_jax: `python tools/import_graph.py [--edges]` prints each elementary cycle and the count.

Function-level imports count as module-level ones: a local import hides a cycle until call time, it does not
remove it.
"""
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules(package: str = 'simmim_jax') -> dict[str, pathlib.Path]:
  """{dotted module name: path} of every .py file in the package."""
  paths = sorted((ROOT / package).rglob('*.py'))
  return {'.'.join(p.relative_to(ROOT).with_suffix('').parts).removesuffix('.__init__'): p for p in paths}


def graph(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """{importer: modules of the package it imports}; `from a import b` counts a.b when that is a module."""
  edges = {m: set() for m in mods}
  for mod, path in mods.items():
    package = (mod if path.name == '__init__.py' else mod.rpartition('.')[0]).split('.')
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = package[:len(package) - node.level + 1] if node.level else []  # relative imports
        base = '.'.join(base + ([node.module] if node.module else []))
        targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in mods else base for a in node.names]
      else:
        continue
      edges[mod] |= {t for t in targets if t in mods and t != mod}
  return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Elementary cycles, each once, starting at its smallest module name."""
  found = []

  def walk(start: str, path: list[str]) -> None:
    for nxt in sorted(edges[path[-1]]):
      if nxt == start:
        found.append(path + [start])
      elif nxt > start and nxt not in path:
        walk(start, path + [nxt])

  for start in sorted(edges):
    walk(start, [start])
  return found


if __name__ == '__main__':
  edges = graph(modules())
  if '--edges' in sys.argv[1:]:
    print('\n'.join(f'{a} -> {b}' for a in sorted(edges) for b in sorted(edges[a])))
  found = cycles(edges)
  print('\n'.join(' -> '.join(c) for c in found))
  print(f'{len(found)} import cycles among {len(edges)} modules')
