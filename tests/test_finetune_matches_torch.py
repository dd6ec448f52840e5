"""The fine-tuning step is the peer's algorithm (issue 14): from the same initial weights and on the same batches,
the project's jitted step (finetune_step.make_train_step, as the trainer builds it) and timm's VisionTransformer
trained by torch.optim.AdamW (1-d parameters and the position embedding exempt from decay, global-norm clipping,
the project's learning rate per step) give the same loss at every step and the same weights after them."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('timm')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position

from simmim_jax import config_io, finetune_step, optim, sharding  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import timm as timm_interop  # pylint: disable=g-import-not-at-top
from simmim_jax.models.classifier import build_classifier  # pylint: disable=g-import-not-at-top

STEPS, BATCH, CLASSES = 12, 16, 10


def test_same_init_same_batches_same_training():
  torch.set_num_threads(1)
  config = config_io.load_config('configs/finetune_cpu.py:scratch', {
      'batch_size': BATCH, 'optim.base_lr': 0.05, 'optim.clip_grad': 1.0, 'optim.weight_decay': 5.0})  # big steps, clipped, decayed
  model = build_classifier(config, CLASSES)
  schedule = optim.lr_schedule(config.optim, total_steps=40, steps_per_epoch=4, batch_size=BATCH)
  tx = finetune_step.make_optimizer(model, config, schedule, finetune_step.abstract_params(model, config))
  mesh = sharding.make_mesh(config.mesh)
  init, _, shardings = finetune_step.abstract_state(model, tx, config, mesh)
  state = init()
  params = jax.tree.map(np.array, state.params)  # a host copy: the step donates the state's buffers
  step = finetune_step.make_train_step(model, tx, schedule, config, mesh, CLASSES, shardings)

  state_dict, _ = timm_interop.to_timm(params)
  peer = timm_interop.build(timm_interop.timm_spec(config.model.to_dict(), params))
  peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
  no_decay = ('pos_embed', 'cls_token')  # the ViT's official exemptions; 1-d parameters are exempt too
  decay = [p for n, p in peer.named_parameters() if p.ndim > 1 and not any(s in n for s in no_decay)]
  rest = [p for n, p in peer.named_parameters() if not any(p is q for q in decay)]
  adamw = torch.optim.AdamW([{'params': decay, 'weight_decay': config.optim.weight_decay},
                             {'params': rest, 'weight_decay': 0.0}], betas=(config.optim.b1, config.optim.b2),
                            eps=config.optim.eps)
  mean, std = np.array(config.data.mean, np.float32), np.array(config.data.std, np.float32)

  rng = np.random.default_rng(0)  # two batches of noise with random labels, alternated: the model memorises them
  batches = [(rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8), rng.integers(0, CLASSES, BATCH).astype(np.int32))
             for _ in range(2)]
  ours, theirs, clipped = [], [], 0
  for k in range(STEPS):
    images, labels = batches[k % 2]
    state, metrics = step(state, {'image': images, 'label': labels})
    ours.append(float(metrics['loss']))
    x = torch.from_numpy((images.astype(np.float32) / 255.0 - mean) / std).permute(0, 3, 1, 2)
    loss = F.cross_entropy(peer(x), torch.from_numpy(labels).long())
    adamw.zero_grad()
    loss.backward()
    clipped += float(torch.nn.utils.clip_grad_norm_(peer.parameters(), config.optim.clip_grad)) > config.optim.clip_grad
    for group in adamw.param_groups:
      group['lr'] = float(schedule(k))
    adamw.step()
    theirs.append(loss.item())
  assert clipped > 0  # the clipping path is exercised, not only the plain AdamW update
  assert ours[-2] < ours[0] - 0.2  # it learns (the first batch's loss falls), so a wrong update would show
  np.testing.assert_allclose(ours, theirs, rtol=2e-4)
  final, _ = timm_interop.to_timm(jax.tree.map(np.asarray, state.params))
  for name, value in peer.state_dict().items():
    np.testing.assert_allclose(final[name], value.numpy(), rtol=2e-3, atol=2e-5, err_msg=name)
