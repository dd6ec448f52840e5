"""Test set-up: 8 forced CPU devices (set before JAX is imported), quiet TensorFlow, no accelerators."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
  # timm pulls in triton (through torchvision and torch._dynamo), whose LLVM segfaults at import once TensorFlow
  # is loaded; loaded first, both work. The package itself imports only torch (no triton) for .pth files.
  import timm  # pylint: disable=unused-import
except ImportError:  # the interop tests skip without torch
  pass
