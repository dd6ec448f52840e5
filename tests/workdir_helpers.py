"""What several end-to-end tests check about a workdir."""
import hashlib
import os


def snapshot(folder) -> dict[str, str]:
  """relative path -> sha256 of every file under folder."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  return out
