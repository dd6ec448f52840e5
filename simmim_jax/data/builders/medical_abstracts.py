"""tfds builder for the medical abstracts shipped in simmim_jax/data/corpora/ (5 patient conditions,
CC BY-SA 3.0): a real labelled text dataset that needs no download."""
import gzip
import json
import pathlib

import tensorflow_datasets as tfds

from simmim_jax.data import builders

NAME = 'medical_abstracts'
FILES = pathlib.Path(__file__).resolve().parents[1] / 'corpora' / NAME  # <split>.jsonl.gz, README.md, LICENSE
SPLITS = ('train', 'test')
CLASSES = ('cardiovascular diseases', 'digestive system diseases', 'general pathological conditions',
           'neoplasms', 'nervous system diseases')  # sorted: label ids follow this order


def examples(split: str) -> list[dict[str, str]]:
  """The shipped examples of a split, in file order: {'text': ..., 'label': class name}."""
  with gzip.open(FILES / f'{split}.jsonl.gz', 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


class MedicalAbstracts(builders.OfflineBuilder):
  """2,657 abstracts of medical papers, 5 conditions: 2,125 train, 532 test (corpora/medical_abstracts/)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    """An abstract (title first) and its condition."""
    return tfds.core.DatasetInfo(
        builder=self,
        description='Medical abstracts labelled with one of 5 patient conditions (Schopf et al., NLPIR 2022), '
                    'CC BY-SA 3.0; see simmim_jax/data/corpora/medical_abstracts/README.md.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'label': tfds.features.ClassLabel(names=CLASSES)}),
        supervised_keys=('text', 'label'),
        homepage='https://github.com/sebischair/Medical-Abstracts-TC-Corpus',
        citation='Schopf, Braun, Matthes. Evaluating Unsupervised Text Classification: Zero-shot and '
                 'Similarity-based Approaches. NLPIR 2022. doi:10.1145/3582768.3582795',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Both splits come from the files inside this package; nothing is downloaded."""
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    """Yields (line index, example) in file order."""
    for i, example in enumerate(examples(split)):
      yield i, {'text': example['text'], 'label': CLASSES.index(example['label'])}


def ensure_prepared(data_dir: str | None = None) -> MedicalAbstracts:
  """Returns the builder, preparing it into data_dir (None: the tfds default) first if needed."""
  return builders.prepare_offline(MedicalAbstracts, data_dir)
