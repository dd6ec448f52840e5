"""tfds builders for real data that ships inside installable packages, prepared offline."""
from typing import TypeVar

import tensorflow_datasets as tfds

Builder = TypeVar('Builder', bound=tfds.core.GeneratorBasedBuilder)


def prepare_offline(builder_class: type[Builder], data_dir: str | None) -> Builder:
  """The builder, prepared into data_dir (None: the tfds default) first if needed, never from the network."""
  builder = builder_class(data_dir=data_dir)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(try_download_gcs=False)  # never ask gs://tfds-data for a copy
    try:
      builder.download_and_prepare(download_config=config)
    except Exception:
      builder = builder_class(data_dir=data_dir)  # another process may have finished preparing it first
      if not builder.is_prepared():
        raise
  return builder
