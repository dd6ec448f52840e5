"""The shipped medical abstracts (offline, CC BY-SA 3.0): files, counts, and the tfds builder that serves them."""
import collections
import gzip
import json

import ml_collections
import pytest

from simmim_jax.data import sources
from simmim_jax.data.builders import medical_abstracts


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  """One offline-prepared copy for the module (seconds)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  medical_abstracts.ensure_prepared(path)
  return path


def test_shipped_files_hold_the_readme_counts_with_no_text_in_two_splits():
  train, test = medical_abstracts.examples('train'), medical_abstracts.examples('test')
  assert (len(train), len(test)) == (2125, 532)
  assert collections.Counter(e['label'] for e in test) == {
      'cardiovascular diseases': 114, 'digestive system diseases': 47, 'general pathological conditions': 171,
      'neoplasms': 133, 'nervous system diseases': 67}
  assert not {e['text'] for e in train} & {e['text'] for e in test}
  assert all(e['text'].strip() and set(e) == {'text', 'label'} for e in train + test)
  assert (medical_abstracts.FILES / 'LICENSE').read_text().find('Attribution-ShareAlike 3.0') > 0
  with gzip.open(medical_abstracts.FILES / 'train.jsonl.gz', 'rt') as f:  # plain JSON lines inside
    assert json.loads(f.readline()) == train[0]


def test_builder_serves_every_example_with_sorted_class_ids(data_dir):
  builder = medical_abstracts.ensure_prepared(data_dir)  # prepared already: reused
  assert list(medical_abstracts.CLASSES) == sorted(medical_abstracts.CLASSES)
  assert builder.info.features['label'].names == list(medical_abstracts.CLASSES)
  for split in medical_abstracts.SPLITS:
    served = collections.Counter((ex['text'].decode(), medical_abstracts.CLASSES[ex['label']])
                                 for ex in builder.as_dataset(split=split).as_numpy_iterator())
    assert served == collections.Counter((e['text'], e['label']) for e in medical_abstracts.examples(split))


def test_data_name_reaches_it_through_sources(data_dir):
  data = ml_collections.ConfigDict({'name': medical_abstracts.NAME, 'data_dir': data_dir, 'split': 'test'})
  assert sources.num_examples(data) == 532
