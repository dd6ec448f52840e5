"""A few evaluation images for figures: the first N of a tfds split, a folder, or files -> normalised arrays.

No augmentation: each image is centre-cropped to a square and resized (PIL bilinear), so a figure shows the
same pixels every time. TensorFlow is imported only to read a tfds split; folders and files need only PIL, and
may be local or URLs (gs://bucket/photos: read through simmim_jax.storage).
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from simmim_jax import storage
from simmim_jax.data import listing

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def prepare(image: np.ndarray | Image.Image, image_size: int, mean: Sequence[float],
            std: Sequence[float]) -> np.ndarray:
  """uint8 (H, W[, C]) or a PIL image -> (S, S, 3) float32, normalised as the training input."""
  if not isinstance(image, Image.Image):
    image = np.asarray(image)
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  image = image.convert('RGB')
  side = min(image.size)
  left, top = (image.width - side) // 2, (image.height - side) // 2
  image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BILINEAR)
  return ((np.asarray(image, np.float32) / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def image_files(paths: Sequence[str]) -> list[str]:
  """Files as given, and each folder's image files (sorted, recursively); local or URLs; fails on anything else."""
  found = []
  for given in paths:
    path = storage.path(given)
    if path.is_dir():
      found += [f for f in listing.walk(os.fspath(path)) if f.lower().endswith(EXTENSIONS)]
    elif path.is_file():
      found.append(os.fspath(path))
    else:
      raise FileNotFoundError(f'{given!r} is neither an image file nor a folder.')
  if not found:
    raise FileNotFoundError(f'No images ({", ".join(EXTENSIONS)}) found in {list(paths)}.')
  return found


def file_images(paths: Sequence[str], num_images: int, image_size: int, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
  """The first num_images of the given files / folders: (N, S, S, 3) float32."""
  images = []
  for path in image_files(paths)[:num_images]:
    try:
      with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
        images.append(prepare(image, image_size, mean, std))
    except OSError as e:
      raise ValueError(f'Could not read {path!r} as an image: {e}') from None
  return np.stack(images)


def split_images(data: ml_collections.ConfigDict, num_images: int, image_size: int) -> np.ndarray:
  """The first num_images of data.name:data.split (prepared tfds, sklearn_digits, image_folder): (N, S, S, 3)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import sources  # pylint: disable=import-outside-toplevel  (imports TensorFlow)

  if data.name == sources.IMAGE_FOLDER:  # labelled or not: the checked files, in path order
    paths = sorted(sources.folder_index(data).paths)
    if len(paths) < num_images:
      raise ValueError(f'{data.data_dir} has {len(paths)} images, fewer than the {num_images} asked for.')
    return file_images(paths[:num_images], num_images, image_size, data.mean, data.std)
  builder = sources.prepared_builder(data)
  available = sources.split_size(builder, data.split)
  if available < num_images:
    raise ValueError(f'{data.name}:{data.split} has {available} images, fewer than the {num_images} asked for.')
  ds = builder.as_dataset(split=data.split, shuffle_files=False).take(num_images)
  return np.stack([prepare(ex['image'], image_size, data.mean, data.std) for ex in tfds.as_numpy(ds)])
