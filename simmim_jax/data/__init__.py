"""Input pipelines (the only package that imports TensorFlow): tfds sources -> per-process numpy batches."""
