"""Persistence: safetensors + JSON only, never unpickled. Model folders (``checkpoint``, ``pretrained``), masks,
optimizer state, atomic writes into directories that own only what they wrote, and Hugging Face configs built
without running code a folder names."""
