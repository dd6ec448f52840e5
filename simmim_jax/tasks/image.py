"""Images: SimMIM's masked pixel regression. Block mask on the model's patch grid, pixel decoder, L1 on the
masked pixels only; reconstruction figures during training.

Batches arrive as uint8 (B, H, W, C); ToTensor + Normalize (config.data.mean / std) run here, on the device,
inside the jitted step (simmim_jax/pixels.py). A float batch is taken as already normalised."""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from simmim_jax import losses, masking, models, pixels, sharding, synthetic, visualize
from simmim_jax.tasks.base import Arrays, DataSource, DrawFigures, Task

FIGURE_IMAGES = 8  # images per reconstruction figure
FIGURE_STREAM = 2**31 - 2  # the figures' masks come from their own key stream, apart from training's


@dataclasses.dataclass(frozen=True, eq=False)
class ImageTask(Task):
  """Images (B, H, W, C) -> pixel decoder; masked L1 on the masked patches."""
  unit = 'images'

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size, chans = self.config.model.image_size, self.config.model.in_chans
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, chans), jnp.uint8)}

  def pixels(self, images: jax.Array) -> jax.Array:
    """uint8 pixels -> the normalised float32 images the model sees and the loss regresses."""
    return pixels.normalise(images, self.config.data.mean, self.config.data.std)

  def sample(self, key: jax.Array, batch: Arrays) -> Arrays:
    m = self.config.mask
    return {'mask': masking.image_mask(key, batch['image'].shape[0], self.config.model.image_size, m.mask_patch_size,
                                       m.model_patch_size, m.mask_ratio)}

  def model_inputs(self, batch: Arrays, masks: Arrays) -> tuple[jax.Array, ...]:
    return self.pixels(batch['image']), masks['mask']

  def loss(self, params: Any, batch: Arrays, masks: Arrays, key: jax.Array) -> tuple[jax.Array, Arrays]:
    """(masked L1, aux); every example masks the same number of pixels, so micro-batches weigh 1 each."""
    images, mask = self.model_inputs(batch, masks)
    reconstruction = self.model.apply({'params': params}, images, mask, train=True, rngs={'dropout': key})
    target = images
    if self.config.loss.norm_target:
      target = losses.normalize_target(images, self.config.loss.norm_target_window)
    pixel_mask = masking.upsample(masks['mask'], self.config.mask.model_patch_size)
    return losses.masked_l1(reconstruction, target, pixel_mask), {'weight': jnp.ones((), jnp.float32)}

  def data(self) -> DataSource:
    """This process's slice of the tfds split, or of the synthetic source (one epoch per 100 steps)."""
    c = self.config
    index, count = jax.process_index(), jax.process_count()
    if c.data.name == 'synthetic':
      return DataSource(100 * c.batch_size, lambda start: synthetic.image_batches(
          c.batch_size, c.model.image_size, c.model.in_chans, c.seed, start, index, count))
    from simmim_jax.data import images, sources  # pylint: disable=import-outside-toplevel  (TensorFlow only when asked)
    num = sources.num_examples(c.data)  # fails fast if the data is missing
    return DataSource(num, lambda start: images.pretrain_batches(
        c.data, image_size=c.model.image_size, batch_size=c.batch_size // count, seed=c.seed, start_batch=start))

  def make_figures(self, mesh: Mesh, workdir: str, writer: Any) -> DrawFigures:
    """(step, params, batch) -> writes reconstructions/step_N.png and a TensorBoard image of the batch's
    first images: input | masked input | reconstruction | pasted | L1 error heat map (visualize.figure's
    grid). Every process calls it (the arrays are global); process 0 writes (writer: a metrics.Writer)."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), FIGURE_STREAM)

    def reconstruct(params, images, step):
      images = self.pixels(images[:FIGURE_IMAGES])  # the figure draws normalised images (visualize's contract)
      mask = self.sample(jax.random.fold_in(key, step), {'image': images})['mask']
      return images, mask, self.model.apply({'params': params}, images, mask, train=False)

    reconstruct = jax.jit(reconstruct, out_shardings=sharding.replicated(mesh))

    def draw(step: int, params: Any, batch: Arrays) -> None:
      originals, mask, reconstruction = jax.device_get(reconstruct(params, batch['image'], step))
      if jax.process_index() != 0:
        return
      fig = visualize.figure_from_arrays(originals, mask, reconstruction, self.config)
      visualize.save_png(fig.grid, os.path.join(workdir, 'reconstructions', f'step_{step:07d}.png'), min_size=512,
                         title=f'step {step}\n{visualize.caption(fig)}')
      writer.image(step, 'reconstruction', fig.grid)

    return draw

  def next_steps(self, workdir: str) -> list[str]:
    return [f'python tools/visualize.py --checkpoint {workdir} --split test --out {workdir}/figures  '
            '# reconstructions of held-out images',
            *super().next_steps(workdir),
            f'python -m simmim_jax.main --config=configs/finetune_cpu.py --config.init_from={workdir} '
            f'--workdir={workdir}_finetune  # or a configs/finetune_*.py recipe']


def build(config: ml_collections.ConfigDict) -> ImageTask:
  """SimMIM (encoder + pixel decoder), after the config's checks."""
  model = models.build_simmim(config.model)
  if model.encoder.patch_size != config.mask.model_patch_size:
    raise ValueError(f'mask.model_patch_size={config.mask.model_patch_size} must equal the encoder patch '
                     f'size {model.encoder.patch_size} of {config.model.name} {config.model.variant}.')
  return ImageTask(config, model)
