"""The recipe details where the official microsoft/SimMIM code differs from the obvious choice, each checked
against the official semantics written out here: weight decay of the Swin tables, LR timing, the ViT fine-tuning
head init, SimMIM's relative-table resize, the ViT patch-embedding init, and the Swin-L fine-tuning recipe."""
import math
from bisect import bisect_right

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import config_io, defaults, finetune_step, models, optim, pretrained
from simmim_jax.models.classifier import build_classifier

# ------------------------------------------------------------------------------------------------------------
# 1. Weight decay: the official rule on PyTorch names (optimizer.py get_*_param_groups)
# ------------------------------------------------------------------------------------------------------------

SWIN_NO_DECAY = {'swin': ({'absolute_pos_embed', 'mask_token'}, {'relative_position_bias_table'}),
                 'swinv2': ({'absolute_pos_embed', 'mask_token'}, {'cpb_mlp', 'logit_scale',
                                                                   'relative_position_bias_table'})}


def torch_names(params) -> dict[str, int]:
  """Flax params -> {PyTorch name: ndim}: layers_0/blocks_1/attn/qkv/kernel -> layers.0.blocks.1.attn.qkv.weight."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, 'key', k)) for k in path]
    names = [n.replace('_', '.') if n.split('_')[0] in ('layers', 'blocks') else n for n in names]
    names[-1] = {'kernel': 'weight', 'scale': 'weight'}.get(names[-1], names[-1])
    out['.'.join(names)] = leaf.ndim
  return out


def official_decays(name: str, ndim: int, skip: set[str], keywords: set[str]) -> bool:
  """get_pretrain_param_groups / get_finetune_param_groups: decay unless 1-d, a bias, skipped or a keyword hit."""
  return not (ndim == 1 or name.endswith('.bias') or name in skip or any(k in name for k in keywords))


def project_decays(params, no_decay_names) -> dict[str, bool]:
  mask = optim.decay_mask(params, no_decay_names)
  return dict(zip(torch_names(params), jax.tree.leaves(mask)))


def swin_model_config(name: str, exempt: bool = False):
  c = defaults.pretrain_config().model
  c.update(name=name, variant='Mu', image_size=32, window_size=4, exempt_keywords_in_pretraining=exempt)
  return c


@pytest.mark.parametrize('name', ['swin', 'swinv2'])
def test_swin_pretraining_decays_the_tables_as_the_official_code(name):
  model = models.build_simmim(swin_model_config(name))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1, 8, 8), jnp.int32))['params']
  ours = project_decays(params, model.encoder.no_weight_decay)
  # The SimMIM wrapper prefixes both lists with 'encoder.' (models/simmim.py): names still match, keywords never.
  skip, keywords = SWIN_NO_DECAY[name]
  theirs = {n: official_decays(n, d, {f'encoder.{s}' for s in skip}, {f'encoder.{k}' for k in keywords})
            for n, d in torch_names(params).items()}
  assert ours == theirs
  attn = 'encoder.layers.0.blocks.0.attn'
  decayed = ['relative_position_bias_table'] if name == 'swin' else ['logit_scale', 'cpb_mlp.0.weight']
  assert all(ours[f'{attn}.{n}'] for n in decayed) and not ours['encoder.mask_token']
  # The switch: the fine-tuning exemptions in pretraining too.
  exempt = models.build_simmim(swin_model_config(name, exempt=True)).encoder
  ours = project_decays(params, exempt.no_weight_decay)
  theirs = {n: official_decays(n, d, {f'encoder.{s}' for s in skip}, keywords) for n, d in torch_names(params).items()}
  assert ours == theirs


@pytest.mark.parametrize('name', ['swin', 'swinv2', 'vit'])
def test_finetuning_decay_follows_the_official_rule_on_the_bare_encoder(name):
  c = defaults.finetune_config()
  c.model.update(name=name, variant='Mu/4' if name == 'vit' else 'Mu', image_size=32, window_size=4)
  model = build_classifier(c, 10)
  params = finetune_step.abstract_params(model, c)
  ours = project_decays(params['encoder'], model.encoder.no_weight_decay)
  # The official ViT lists names only (pos_embed, cls_token): its per-block tables decay in fine-tuning.
  skip, keywords = SWIN_NO_DECAY[name] if name != 'vit' else ({'pos_embed', 'cls_token'}, set())
  theirs = {n: official_decays(n, d, skip, keywords) for n, d in torch_names(params['encoder']).items()}
  assert ours == theirs
  if name == 'vit':
    assert ours['blocks.0.attn.relative_position_bias_table']
  else:
    attn = 'layers.0.blocks.0.attn'
    assert not ours[f'{attn}.relative_position_bias_table' if name == 'swin' else f'{attn}.cpb_mlp.0.weight']


# ------------------------------------------------------------------------------------------------------------
# 2. LR timing: the official loop steps the scheduler after the optimizer
# ------------------------------------------------------------------------------------------------------------

class OfficialScheduler:
  """timm's Scheduler with SimMIM's settings (t_in_epochs=False, cycle_limit 1, no noise), one group per peak:
  built, it sets every group to warmup_lr_init (when there is a warmup); step_update(t) sets _get_lr(t)."""

  def __init__(self, kind, peaks, warmup_t, warmup_lr_init, t_initial=0, lr_min=0.0, milestones=(), gamma=0.1):
    self.kind, self.peaks, self.warmup_t, self.warmup_lr_init = kind, peaks, warmup_t, warmup_lr_init
    self.t_initial, self.lr_min, self.milestones, self.gamma = t_initial, lr_min, list(milestones), gamma
    self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in peaks] if warmup_t else [1.0 for _ in peaks]
    self.group_lrs = [warmup_lr_init for _ in peaks] if warmup_t else list(peaks)

  def _get_lr(self, t):
    if t < self.warmup_t:
      return [self.warmup_lr_init + t * s for s in self.warmup_steps]
    if self.kind == 'multistep':  # SimMIM's MultiStepLRScheduler (lr_scheduler.py)
      return [v * self.gamma**bisect_right(self.milestones, t) for v in self.peaks]
    if t >= self.t_initial:  # timm CosineLRScheduler, no warmup prefix: past the cycle limit
      return [self.lr_min for _ in self.peaks]
    return [self.lr_min + 0.5 * (v - self.lr_min) * (1 + math.cos(math.pi * t / self.t_initial)) for v in self.peaks]

  def step_update(self, num_updates):
    self.group_lrs = self._get_lr(num_updates)


def official_lrs(scheduler: OfficialScheduler, steps: int) -> np.ndarray:
  """The LR of each update of main_simmim.py / main_finetune.py: optimizer.step(), then step_update(idx)."""
  used = []
  for idx in range(steps):
    used.append(list(scheduler.group_lrs))  # optimizer.step() runs with these
    scheduler.step_update(idx)
  return np.asarray(used)


def project_lrs(config, steps_per_epoch, total, batch, scales):
  schedule = optim.lr_schedule(config.optim, total_steps=total, steps_per_epoch=steps_per_epoch, batch_size=batch)
  return np.stack([np.asarray(jax.jit(jax.vmap(lambda t: schedule(t, s)))(jnp.arange(total))) for s in scales],
                  axis=-1)


@pytest.mark.parametrize('spec,scales', [
    ('simmim_vit_base.py', (1.0,)),  # multistep x0.1 at 700 of 800 epochs
    ('simmim_swin_base.py:100', (1.0,)),  # cosine over all steps, no warmup prefix
    ('finetune_vit_base.py', (1.0, 0.65**13)),  # cosine, 20 of 100 warmup epochs, layer-decay groups
])
def test_lr_of_every_update_equals_the_official_loop(spec, scales):
  config = config_io.load_config(f'configs/{spec}')
  spe, batch = 5, 2048  # few steps per epoch: the whole schedule, every update
  epochs = int(config.total_epochs)
  total, warmup, s = epochs * spe, int(config.optim.warmup_epochs * spe), batch / 512
  o = config.optim
  scheduler = OfficialScheduler(o.schedule, [o.base_lr * s * k for k in scales], warmup, o.warmup_lr * s,
                                t_initial=total, lr_min=o.min_lr * s,
                                milestones=[int(m) * spe for m in o.milestone_epochs], gamma=o.gamma)
  theirs = official_lrs(scheduler, total)
  ours = project_lrs(config, spe, total, batch, scales)
  # float32 cosine near its floor: relative to the peak; one update late is ~1e-3 of the peak here
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7 * o.base_lr * s)
  np.testing.assert_allclose(ours[:2], o.warmup_lr * s, rtol=1e-6)  # updates 0 and 1 both at warmup_lr


def test_lr_figures_at_the_reference_size():
  """ViT-B 800 ep and Swin-B 100 ep at batch 2048, 625 steps per epoch: the figures of the official runs."""
  vit = config_io.load_config('configs/simmim_vit_base.py')
  schedule = optim.lr_schedule(vit.optim, total_steps=500_000, steps_per_epoch=625, batch_size=2048)
  assert float(schedule(1)) == pytest.approx(2.000e-6, rel=1e-6)  # f(1) = 2.064e-6 was used before
  assert float(schedule(6251)) == pytest.approx(4e-4, rel=1e-6) and float(schedule(6250)) < 4e-4
  assert float(schedule(437_500)) == pytest.approx(4e-4, rel=1e-6)  # the milestone reaches update 437_501
  assert float(schedule(437_501)) == pytest.approx(4e-5, rel=1e-6)
  swin = config_io.load_config('configs/simmim_swin_base.py:100')
  schedule = optim.lr_schedule(swin.optim, total_steps=62_500, steps_per_epoch=625, batch_size=2048)
  assert float(schedule(6250)) == pytest.approx(7.9987e-4, rel=1e-4)  # f(6249): still in warmup (not 7.814e-4)
  # Text keeps BERT/RoBERTa's timing: update k at f(k).
  assert defaults.text_pretrain_config().optim.lr_lag == 0 and defaults.finetune_config().optim.lr_lag == 1


def test_real_timm_cosine_scheduler_driven_as_the_official_loop():
  torch = pytest.importorskip('torch')
  cosine_lr = pytest.importorskip('timm.scheduler.cosine_lr')
  config = config_io.load_config('configs/finetune_swin_base.py')
  spe, batch, epochs = 3, 2048, 100
  total, s, o = epochs * spe, batch / 512, config.optim
  scales = (1.0, 0.8**12)
  weights = [torch.nn.Parameter(torch.zeros(1)) for _ in scales]
  sgd = torch.optim.SGD([{'params': [w], 'lr': o.base_lr * s * k} for w, k in zip(weights, scales)], lr=1.0)
  scheduler = cosine_lr.CosineLRScheduler(sgd, t_initial=total, lr_min=o.min_lr * s, warmup_lr_init=o.warmup_lr * s,
                                          warmup_t=int(o.warmup_epochs * spe), cycle_limit=1, t_in_epochs=False)
  theirs = []
  for idx in range(total):
    theirs.append([g['lr'] for g in sgd.param_groups])
    sgd.step()
    scheduler.step_update(idx)
  np.testing.assert_allclose(project_lrs(config, spe, total, batch, scales), np.asarray(theirs), rtol=1e-5,
                             atol=1e-7 * o.base_lr * s)


@pytest.mark.parametrize('layer_decay', [None, 0.5])
def test_the_optimizer_applies_the_lr_of_each_update(layer_decay):
  """Adam's first steps move each weight by lr (sign of a constant gradient): updates 0, 1, 2 move by
  warmup_lr, warmup_lr, f(1), through optax.adamw and through the per-group LR alike."""
  o = defaults.finetune_config().optim
  o.update(warmup_steps=4, warmup_epochs=None, base_lr=0.512, warmup_lr=0.0512, weight_decay=0.0, clip_grad=1e9)
  schedule = optim.lr_schedule(o, total_steps=100, steps_per_epoch=1, batch_size=512)
  params = {'w': jnp.zeros((3,))}
  scales = None if layer_decay is None else {'w': layer_decay}
  tx = optim.make_optimizer(o, schedule, (), scales)
  state, moves = tx.init(params), []
  for _ in range(3):
    updates, state = tx.update({'w': jnp.ones((3,))}, state, params)
    moves.append(-float(updates['w'][0]))
  peak = 0.512 * (layer_decay or 1.0)
  f1 = 0.0512 + (peak - 0.0512) / 4
  np.testing.assert_allclose(moves, [0.0512, 0.0512, f1], rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# 3. ViT fine-tuning head: timm trunc_normal_(std=.02) (absolute cut-offs +-2), then x0.001
# ------------------------------------------------------------------------------------------------------------

def test_vit_head_init_is_timm_trunc_normal_times_0001():
  c = defaults.finetune_config()
  c.model.update(variant='Mu/4', image_size=32)
  params = jax.jit(build_classifier(c, 1000).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  w, b = np.asarray(params['head']['kernel']), np.asarray(params['head']['bias'])
  # timm's cut-offs are 100 std away: in effect an untruncated normal of std 0.02 x 0.001 = 2e-5. The +-1 std
  # truncation (std 1.08e-5, |w| <= 2e-5) fails both lines.
  np.testing.assert_allclose(w.std(), 2e-5, rtol=0.02)
  assert np.abs(w).max() > 3 * 2e-5 and abs(w.mean()) < 3e-7
  np.testing.assert_array_equal(b, 0.0)  # _init_weights zeroes the bias before the x0.001
  torch = pytest.importorskip('torch')
  timm_layers = pytest.importorskip('timm.layers')
  ref = torch.empty(w.shape[1], w.shape[0])
  timm_layers.trunc_normal_(ref, std=.02)
  np.testing.assert_allclose(w.std(), float(ref.std()) * 0.001, rtol=0.02)


# ------------------------------------------------------------------------------------------------------------
# 4. Swin window change: SimMIM's geometric resize (utils.py remap_pretrained_keys_swin), float64 reference
# ------------------------------------------------------------------------------------------------------------

def official_geometric_resize(table: np.ndarray, dst_rows: int) -> np.ndarray:
  """The official algorithm: bisection for the ratio q, geometric source offsets, integer targets, and
  interp2d(kind='cubic') per head, here as RectBivariateSpline(kx=3, ky=3, s=0) (interp2d's fit on a grid)."""
  interpolate = pytest.importorskip('scipy.interpolate')
  src, dst = math.isqrt(table.shape[0]), math.isqrt(dst_rows)
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if 1 * (1.0 - q**(src // 2)) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1.0
  for i in range(src // 2):
    dis.append(cur)
    cur += q**(i + 1)
  x = [-d for d in reversed(dis)] + [0.0] + dis
  t = dst // 2.0
  dx = np.arange(-t, t + 0.1, 1.0)
  heads = []
  for h in range(table.shape[1]):
    z = table[:, h].astype(np.float32).astype(np.float64).reshape(src, src)  # z[row = y, col = x]
    # interp2d(x, y, z)(dx, dy)[r, c] is the spline at (x=dx[c], y=dy[r]): rows stay rows.
    heads.append(interpolate.RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(dx, dx).reshape(-1))
  return np.stack(heads, axis=-1)


@pytest.mark.parametrize('src,dst', [(11, 13), (23, 27), (13, 11), (27, 47)])
def test_geometric_resize_equals_the_official_algorithm(src, dst):
  table = np.random.default_rng(src).standard_normal((src * src, 4)).astype(np.float32)
  ours = pretrained.resize_relative_table(table, dst * dst, extra=0)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, official_geometric_resize(table, dst * dst), atol=2e-6)
  # ViT tables: the 3 cls rows are kept (remap_pretrained_keys_vit), the grid resized the same way.
  cls_rows = np.arange(12, dtype=np.float32).reshape(3, 4)
  vit = pretrained.resize_relative_table(np.concatenate([table, cls_rows]), dst * dst + 3, extra=3)
  np.testing.assert_array_equal(vit[:-3], ours)
  np.testing.assert_array_equal(vit[-3:], cls_rows)


def test_adapt_encoder_resizes_geometrically_by_default_and_bicubically_on_request():
  assert defaults.finetune_config().rel_pos_resize == 'geometric'
  c = defaults.pretrain_config().model
  c.update(name='swin', variant='Mu', image_size=48, window_size=3)  # 12x12 tokens: windows 3 -> 6 in stages 0-1
  model = models.build_simmim(c)
  source = jax.device_get(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 48, 48, 3)),
                                              jnp.zeros((1, 12, 12), jnp.int32))['params'])
  key = ('layers_0', 'blocks_1', 'attn', 'relative_position_bias_table')
  table = np.random.default_rng(0).standard_normal((25, 3)).astype(np.float32)
  source['encoder'][key[0]][key[1]][key[2]][key[3]] = table
  ft = defaults.finetune_config()
  ft.model.update(name='swin', variant='Mu', image_size=48, window_size=6)
  target = finetune_step.abstract_params(build_classifier(ft, 10), ft)['encoder']
  get = lambda tree: tree[key[0]][key[1]][key[2]][key[3]]
  geometric, _ = pretrained.adapt_encoder(source, target)
  np.testing.assert_allclose(get(geometric), official_geometric_resize(table, 121), atol=2e-6)
  bicubic, _ = pretrained.adapt_encoder(source, target, resize='bicubic')
  np.testing.assert_array_equal(get(bicubic), pretrained.resize_relative_table(table, 121, 0, method='bicubic'))
  assert np.abs(get(bicubic) - get(geometric)).max() > 0.1
  with pytest.raises(ValueError, match='rel_pos_resize'):
    pretrained.adapt_encoder(source, target, resize='nearest')


# ------------------------------------------------------------------------------------------------------------
# 5. ViT pretraining patch embedding: the official _init_weights (trunc-normal 0.02 cut at +-1 std, bias 0)
# ------------------------------------------------------------------------------------------------------------

def test_vit_patch_embedding_init_follows_the_official_init_weights():
  c = defaults.pretrain_config().model  # the official BEiT-style ViT, at ViT-S/16 size to keep it quick
  c.update(variant='S/16', image_size=64)
  model = models.build_simmim(c)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 4, 4), jnp.int32))
  embed = params['params']['encoder']['patch_embed']
  kernel, bias = np.asarray(embed['kernel']), np.asarray(embed['bias'])
  assert kernel.shape == (16, 16, 3, 384)
  # timm trunc_normal_(std=.02, a=-.02, b=.02): |w| <= 0.02, std 0.02 x 0.5396. PyTorch's default conv init
  # (uniform +-1/sqrt(768) = +-0.036, std 0.0208, a non-zero bias) fails every line.
  assert np.abs(kernel).max() <= 0.02 + 1e-7
  np.testing.assert_allclose(kernel.std(), 0.02 * 0.5396, rtol=0.02)
  np.testing.assert_array_equal(bias, 0.0)
  torch = pytest.importorskip('torch')
  timm_layers = pytest.importorskip('timm.layers')
  ref = torch.empty(384, 3, 16, 16)
  timm_layers.trunc_normal_(ref, std=.02, a=-.02, b=.02)
  np.testing.assert_allclose(kernel.std(), float(ref.std()), rtol=0.02)


# ------------------------------------------------------------------------------------------------------------
# The Swin-L fine-tuning recipe (simmim_finetune__swin_large__img224_window14__800ep)
# ------------------------------------------------------------------------------------------------------------

def test_swin_large_finetune_recipe_is_the_official_one():
  config = config_io.load_config('configs/finetune_swin_large.py')
  m, o = config.model, config.optim
  assert (m.name, m.variant, m.image_size, m.window_size, m.drop_path_rate) == ('swin', 'L', 224, 14, 0.2)
  assert (o.layer_decay, o.base_lr, o.warmup_lr, o.min_lr, o.weight_decay) == (0.7, 1.25e-3, 2.5e-7, 2.5e-7, 0.05)
  assert (config.total_epochs, o.warmup_epochs, o.schedule, config.batch_size) == (100, 20, 'cosine', 2048)
  assert config.rel_pos_resize == 'geometric' and o.lr_lag == 1
  pretraining = config_io.load_config('configs/simmim_swin_large.py')
  assert (pretraining.model.variant, pretraining.model.image_size, pretraining.model.window_size) == ('L', 192, 12)
