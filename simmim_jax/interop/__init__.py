"""Weights to and from PyTorch: timm models, the official SimMIM checkpoints, and the text encoder's own layout.

Everything here maps NumPy arrays (names and memory layouts) and needs no torch; only reading `.pth` files
and writing safetensors (torch_io) import torch, lazily. Modules: layout (the generic JAX <-> PyTorch rules),
timm (timm VisionTransformer / Beit / SwinTransformer / SwinTransformerV2), official (microsoft/SimMIM and
Swin-Transformer `.pth` layouts), text (the text encoder's own documented layout), torch_text (that text
encoder as a PyTorch module; imports torch), torch_io (files, and import of any of these into params here).
"""
