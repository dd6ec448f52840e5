"""tfds builder for scikit-learn's handwritten digits: real images that need no download."""
import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from simmim_jax.data import builders

NAME = 'sklearn_digits'
TEST_EVERY = 5  # example i goes to 'test' when i % 5 == 0: 1,437 train and 360 test images


class SklearnDigits(builders.OfflineBuilder):
  """1,797 8x8 grayscale digits (UCI optdigits test set), values rescaled from 0..16 to 0..255."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    """Image (8, 8, 1) uint8 and a 10-way label."""
    return tfds.core.DatasetInfo(
        builder=self,
        description='scikit-learn load_digits: 8x8 handwritten digits, deterministic 80/20 split.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Both splits come from the copy inside the scikit-learn wheel; nothing is downloaded."""
    del dl_manager
    return {'train': self._generate_examples(test=False), 'test': self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    """Yields (index, example) for the chosen split."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    for i, (image, label) in enumerate(zip(images, digits.target)):
      if (i % TEST_EVERY == 0) == test:
        yield i, {'image': image, 'label': int(label)}


def ensure_prepared(data_dir: str | None = None) -> SklearnDigits:
  """Returns the builder, preparing it into data_dir (None: the tfds default) first if needed."""
  return builders.prepare_offline(SklearnDigits, data_dir)
