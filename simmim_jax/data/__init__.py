"""Input pipelines (the only package that imports TensorFlow): tfds sources -> per-process numpy batches."""
import os

# Set before the first TensorFlow import (every module here imports it below this package). TensorFlow only
# runs the host-side input pipeline, where its oneDNN custom ops change nothing: the pipeline's batches are
# bit-identical with them on or off (decode, crop, resize, flip, erase; checked on JPEG and PNG folders and the
# digits). Left on, each of TensorFlow's two copies of its runtime (libtensorflow_framework and the profiler
# plugin) prints the oneDNN banner at import, so every run printed it twice. Level 1 hides TensorFlow's C++
# INFO lines only; its warnings and errors stay. A value the user set wins.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
