"""tfds builder for Python's own documentation topics (`pydoc_data.topics`): English prose and code that
ships with every Python, so the text default needs no download."""
import re

import tensorflow_datasets as tfds

from simmim_jax.data import builders

NAME = 'pydoc_topics'
VALIDATION_EVERY = 10  # the i-th topic (sorted by name) is held out when i % 10 == 0: 71 train, 8 validation


def paragraphs(text: str) -> list[str]:
  """A topic's blank-line separated paragraphs, stripped; the documents of this corpus."""
  return [p.strip() for p in re.split(r'\n\s*\n', text) if p.strip()]


def documents(split: str) -> list[tuple[str, int, str]]:
  """(topic, paragraph index, text) of a split; split by topic, so no topic is in both."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  held_out = split == 'validation'
  return [(name, j, p) for i, name in enumerate(sorted(topics.topics))
          if (i % VALIDATION_EVERY == 0) == held_out for j, p in enumerate(paragraphs(topics.topics[name]))]


class PydocTopics(builders.OfflineBuilder):
  """Paragraphs of the 79 pydoc topics (~465k characters); train and validation split by topic."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    """One paragraph per example, with its topic name."""
    return tfds.core.DatasetInfo(
        builder=self,
        description="Python's pydoc_data.topics: one paragraph per example; topics split 9:1 by name.",
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'topic': tfds.features.Text()}),
        homepage='https://docs.python.org/3/library/pydoc.html',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Both splits come from the running Python's standard library; nothing is downloaded."""
    del dl_manager
    return {split: self._generate_examples(split) for split in ('train', 'validation')}

  def _generate_examples(self, split: str):
    """Yields (key, example); keys keep the source order (topic, paragraph)."""
    for topic, j, text in documents(split):
      yield f'{topic}/{j:04d}', {'text': text, 'topic': topic}


def ensure_prepared(data_dir: str | None = None) -> PydocTopics:
  """Returns the builder, preparing it into data_dir (None: the tfds default) first if needed."""
  return builders.prepare_offline(PydocTopics, data_dir)
