"""LR schedules (official per-iteration semantics), LR scaling, weight-decay rules, AdamW + clipping.

The schedule tests here check the shape f(t) (optim.lr_lag=0); the official timing, update k at f(k - 1),
is checked against a hand-written official loop in tests/test_official_recipe.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simmim_jax import defaults, models, optim
from simmim_jax.errors import UserError


def timm_cosine(t, base, warmup_lr, min_lr, warmup_t, t_initial, warmup_prefix):
  """timm CosineLRScheduler._get_lr with cycle_limit 1, written out as the reference describes."""
  if t < warmup_t:
    return warmup_lr + t * (base - warmup_lr) / warmup_t
  if warmup_prefix:
    t = t - warmup_t
  if t >= t_initial:
    return min_lr
  return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def test_cosine_matches_timm_semantics_and_scales_by_batch():
  o = defaults.pretrain_config().optim
  o.update(schedule='cosine', base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=10.0, lr_lag=0)
  spe, total, batch = 7, 700, 2048
  schedule = optim.lr_schedule(o, total_steps=total, steps_per_epoch=spe, batch_size=batch)
  s = batch / 512
  for t in [0, 1, 35, 69, 70, 71, 300, 699]:
    want = timm_cosine(t, 2e-4 * s, 1e-6 * s, 1e-5 * s, 70, total, False)
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5)
  # No warmup prefix: right after warmup the LR sits below base (the documented dip).
  assert float(schedule(70)) < 2e-4 * s
  o.warmup_prefix = True
  schedule = optim.lr_schedule(o, total_steps=total, steps_per_epoch=spe, batch_size=batch)
  for t in [0, 70, 71, 400, 699]:
    np.testing.assert_allclose(float(schedule(t)), timm_cosine(t, 2e-4 * s, 1e-6 * s, 1e-5 * s, 70, total - 70, True),
                               rtol=1e-5)


def test_multistep_with_warmup():
  o = defaults.pretrain_config().optim  # the ViT-B recipe: 1e-4, warmup 5e-7 for 10 epochs, x0.1 at 700
  o.lr_lag = 0
  spe = 3
  schedule = optim.lr_schedule(o, total_steps=800 * spe, steps_per_epoch=spe, batch_size=512)
  np.testing.assert_allclose(float(schedule(0)), 5e-7, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(15)), 5e-7 + 15 * (1e-4 - 5e-7) / 30, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(30)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(700 * spe - 1)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(700 * spe)), 1e-5, rtol=1e-5)
  o.milestone_steps = (40, 50)
  schedule = optim.lr_schedule(o, total_steps=100, steps_per_epoch=spe, batch_size=1024)
  np.testing.assert_allclose([float(schedule(t)) for t in (39, 40, 50)], [2e-4, 2e-5, 2e-6], rtol=1e-5)


def test_linear_decay_after_warmup():
  o = defaults.pretrain_config().optim
  o.update(schedule='linear', base_lr=1e-3, warmup_lr=0.0, min_lr=1e-4, warmup_steps=10, warmup_epochs=None, lr_lag=0)
  schedule = optim.lr_schedule(o, total_steps=110, steps_per_epoch=1, batch_size=512)
  want = lambda t: t / 10 * 1e-3 if t < 10 else 1e-3 + (1e-4 - 1e-3) * (t - 10) / 100
  for t in (0, 5, 10, 35, 60, 109, 110, 200):
    np.testing.assert_allclose(float(schedule(t)), want(min(t, 110)), rtol=1e-5, atol=1e-12)


def test_no_decay_rules_follow_the_official_code():
  c = defaults.pretrain_config().model
  c.update(variant='Mu/4', image_size=32)
  model = models.build_simmim(c)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8, 8), jnp.int32))
  mask = optim.decay_mask(params['params'], model.encoder.no_weight_decay)
  enc = mask['encoder']
  assert enc['blocks_0']['attn']['qkv']['kernel'] and enc['blocks_0']['mlp']['fc1']['kernel']
  assert not enc['blocks_0']['attn']['q_bias'] and not enc['blocks_0']['gamma_1'] and not enc['norm']['scale']
  assert not enc['blocks_0']['mlp']['fc1']['bias'] and not enc['cls_token']
  # The official ViT quirk: mask_token and the shared relative-position table DO get weight decay.
  assert enc['mask_token'] and enc['rel_pos_bias']['relative_position_bias_table']
  assert mask['decoder']['conv']['kernel'] and not mask['decoder']['conv']['bias']


def test_adamw_step_and_clipping_by_hand():
  o = defaults.pretrain_config().optim
  o.update(schedule='cosine', warmup_steps=0, base_lr=512e-3, min_lr=512e-3, weight_decay=0.5, clip_grad=1.0)
  schedule = optim.lr_schedule(o, total_steps=10, steps_per_epoch=1, batch_size=512)  # constant 0.512
  tx = optim.make_optimizer(o, schedule, no_decay_names=())
  params = {'w': jnp.full((2, 2), 2.0), 'b': jnp.ones((2,))}
  grads = {'w': jnp.full((2, 2), 3.0), 'b': jnp.full((2,), 4.0)}  # global norm sqrt(4*9 + 2*16) = sqrt(68)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # First Adam step: m_hat / sqrt(v_hat) = sign(g) (clipping scales g but not the sign); decay only on w.
  lr = 0.512
  np.testing.assert_allclose(new['w'], 2.0 - lr * (1.0 + 0.5 * 2.0), rtol=1e-5)
  np.testing.assert_allclose(new['b'], 1.0 - lr * 1.0, rtol=1e-5)


@pytest.mark.parametrize('clip_grad', [0.0, None])
def test_clip_grad_zero_or_none_is_no_clipping(clip_grad):
  """The official `if config.TRAIN.CLIP_GRAD:` clips nothing at 0 (optax's clip at 0 would zero every gradient).
  Two steps, the second gradient 10x the first: clipping at 1 changes Adam's second update, no clipping does not."""
  o = defaults.pretrain_config().optim
  o.update(schedule='cosine', warmup_steps=0, base_lr=512e-3, min_lr=512e-3, weight_decay=0.0)
  schedule = optim.lr_schedule(o, total_steps=10, steps_per_epoch=1, batch_size=512)
  grads = (jnp.array([0.3, 0.4, 0.0]), jnp.array([3.0, 4.0, 0.0]))  # norms 0.5, then 5 (clipped to 1 at clip 1)

  def two_steps(clip):
    o.clip_grad = clip
    tx = optim.make_optimizer(o, schedule, no_decay_names=())
    params = {'w': jnp.zeros((3,))}
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update({'w': g}, state, params)
      params = optax.apply_updates(params, updates)
    return params['w']

  plain = optax.adam(0.512, b1=o.b1, b2=o.b2, eps=o.eps)
  params = {'w': jnp.zeros((3,))}
  state = plain.init(params)
  for g in grads:
    updates, state = plain.update({'w': g}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(two_steps(clip_grad), params['w'], rtol=1e-6)
  # clipping changes the second step's m / sqrt(v): the check above would see it
  assert not np.allclose(two_steps(1.0), params['w'], rtol=1e-3)


def test_negative_clip_grad_is_refused():
  from simmim_jax import config_io, validate  # pylint: disable=import-outside-toplevel
  config = config_io.load_config('configs/finetune_cpu.py:scratch', ['optim.clip_grad=-1.0'])
  with pytest.raises(UserError, match='clip_grad'):
    validate.check(config)


def test_warmup_fraction_follows_a_shortened_run():
  o = defaults.pretrain_config().optim
  o.update(schedule='cosine', base_lr=1e-3, warmup_lr=0.0, min_lr=0.0, warmup_fraction=50 / 600, lr_lag=0)
  assert optim.warmup_steps(o, 600, 22) == 50  # configs/base.py as written
  assert optim.warmup_steps(o, 20, 22) == 2  # --config.total_steps=20 alone
  schedule = optim.lr_schedule(o, total_steps=20, steps_per_epoch=22, batch_size=512)
  want = [0.0, 5e-4, timm_cosine(2, 1e-3, 0, 0, 2, 20, False)]
  np.testing.assert_allclose([float(schedule(t)) for t in (0, 1, 2)], want, rtol=1e-5)
  o.warmup_steps = 7  # explicit steps win over the fraction
  assert optim.warmup_steps(o, 20, 22) == 7
  o.update(warmup_steps=None, warmup_fraction=1.0)
  with pytest.raises(UserError, match=r'optim.warmup_fraction=1.0 must be in \[0, 1\)'):
    optim.warmup_steps(o, 20, 22)


def test_warmup_in_epochs_stays_exact_and_is_clamped_only_past_the_run():
  o = defaults.pretrain_config().optim  # the paper: 10 warmup epochs
  said = []
  assert optim.warmup_steps(o, 800 * 625, 625, say=said.append) == 6250 and not said
  assert optim.warmup_steps(o, 100, 625, say=said.append) == 10  # a smoke test of the paper recipe
  assert said == ['optim.warmup_epochs=10.0 is 6250 steps, not below total_steps=100: warming up over the first 10 '
                  'steps instead (set optim.warmup_fraction or warmup_steps to choose).']


def test_cpu_recipes_keep_their_warmup_and_scale_it_with_the_budget():
  from simmim_jax import config_io  # pylint: disable=import-outside-toplevel
  for spec, steps_per_epoch, warmup in [('base.py', 22, 50), ('swin_tiny_cpu.py', 22, 50), ('text_tiny.py', 1, 50),
                                        ('finetune_cpu.py:scratch', 22, 25), ('linear_probe_cpu.py:scratch', 22, 25)]:
    config = config_io.load_config(f'configs/{spec}')
    total = defaults.resolve_steps(config, 'total', steps_per_epoch)
    assert optim.warmup_steps(config.optim, total, steps_per_epoch) == warmup, spec
    assert 0 < optim.warmup_steps(config.optim, 20, steps_per_epoch) < 20, spec
