"""tfds builders for real data that ships inside installable packages, prepared offline."""
import time
from typing import TypeVar

import jax
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

Builder = TypeVar('Builder', bound=tfds.core.GeneratorBasedBuilder)


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose data comes from an installed package: prepare_offline says what happens in its own words
  (tfds would announce a 'download' of 'Unknown size' and then that it 'downloaded' it: nothing is)."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """builder.is_prepared() without its warning for a version folder that does not exist yet (tfds logs
  'Variant folder ... has no dataset_info.json' for a dataset that simply is not prepared); a folder that is
  there but incomplete still gets tfds's warning."""
  return (builder.data_path / 'dataset_info.json').exists() and builder.is_prepared()


def prepare_offline(builder_class: type[Builder], data_dir: str | None) -> Builder:
  """The builder, prepared into data_dir (None: the tfds default) first if needed, never from the network:
  one line before and one after, no progress bars (a few seconds of work)."""
  builder = builder_class(data_dir=data_dir)
  if not is_prepared(builder):
    config = tfds.download.DownloadConfig(try_download_gcs=False)  # never ask gs://tfds-data for a copy
    say = jax.process_index() == 0
    if say:
      print(f'Preparing {builder.name} (shipped with an installed package, nothing to download) in '
            f'{builder.data_dir}: once, seconds...', flush=True)
    start, bars = time.perf_counter(), tqdm_utils._active  # pylint: disable=protected-access
    tfds.display_progress_bar(False)  # tqdm bars of tfds's split generation and shuffling
    try:
      builder.download_and_prepare(download_config=config)
    except Exception:
      builder = builder_class(data_dir=data_dir)  # another process may have finished preparing it first
      if not is_prepared(builder):
        raise
    finally:
      tfds.display_progress_bar(bars)
    if say:
      print(f'Prepared {builder.name} in {time.perf_counter() - start:.0f} s.', flush=True)
  return builder
