"""tools/compare_text_peers.py: the transformers peer is the project's text classifier's size (up to BERT's
token-type embedding), its pooled features ignore padding, and the tool prints the three rows it compares."""
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('sklearn')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools import compare_text_peers  # pylint: disable=g-import-not-at-top,wrong-import-position  (torch before TF)
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position

from simmim_jax import config_io  # pylint: disable=g-import-not-at-top,wrong-import-position


def recipe():
  return config_io.load_config(compare_text_peers.DEFAULT_CONFIG)


def test_peer_has_the_project_classifiers_parameters_plus_the_token_type_row():
  import jax  # pylint: disable=import-outside-toplevel
  from simmim_jax import finetune_step  # pylint: disable=import-outside-toplevel
  from simmim_jax.models.classifier import build_classifier  # pylint: disable=import-outside-toplevel
  config = recipe()
  model = build_classifier(config, 5)
  project = sum(math.prod(p.shape) for p in jax.tree.leaves(finetune_step.abstract_params(model, config)))
  peer = compare_text_peers.peer_model(config, 5)
  count = sum(p.numel() for p in peer.parameters())
  bert = peer.bert.config
  assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads, bert.intermediate_size,
          bert.vocab_size, bert.max_position_embeddings) == (128, 2, 2, 512, 2048, 128)
  # The one documented difference in size: BERT's token-type embedding (1 x width); post-norm BERT's embedding
  # LayerNorm has the size of the project's final one, and the pooler is left out.
  assert count == project + bert.type_vocab_size * bert.hidden_size, (count, project)


def test_peer_logits_ignore_padding():
  torch.manual_seed(0)
  peer = compare_text_peers.peer_model(recipe(), 5).eval()
  ids = torch.randint(4, 2048, (1, 20))
  padded = torch.cat([ids, torch.zeros(1, 108, dtype=torch.long)], 1)
  mask = (torch.arange(128) < 20).long()[None]
  with torch.no_grad():
    short = peer(ids, torch.ones_like(ids))
    long = peer(padded, mask)
    junk = peer(torch.where(mask > 0, padded, torch.randint(4, 2048, (1, 128))), mask)  # other ids under the mask
    unmasked = peer(padded, torch.ones_like(padded))  # padding attended and pooled: must differ
  torch.testing.assert_close(long, short, atol=1e-5, rtol=1e-5)
  torch.testing.assert_close(junk, short, atol=1e-5, rtol=1e-5)
  assert (unmasked - short).abs().max() > 1e-3


@pytest.mark.slow  # three trainings of 3 steps and two TF-IDF fits: ~2 minutes on 2 idle cores
def test_tool_prints_project_peer_and_tfidf():
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'compare_text_peers.py'), '--steps', '3', '--seeds', '0'],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800,
      env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  row = re.search(r'^   0 \| ([0-9.]+)\s*\| ([0-9.]+)\s*\| ([0-9.]+)\s*\| ([0-9.]+)$', result.stdout, re.M)
  assert row, result.stdout[-2000:]
  project, peer, whole, first = map(float, row.groups())
  assert 0.0 < project <= 1.0 and 0.0 < peer <= 1.0
  assert abs(whole - 0.641) < 0.005 and abs(first - 0.583) < 0.005  # the README's TF-IDF figures
  assert re.search(r'^mean \| ', result.stdout, re.M) and '| TF-IDF+LR ' in result.stdout
