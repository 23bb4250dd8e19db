"""Attention families: the registry (``registry``) and the families shipped with ebcompile.

Importing this package registers, in this order (``family_of`` returns the first match): ``torch_mha``
(``nn.MultiheadAttention``), ``torchvision_swin``, ``hf_gpt2`` and ``hf_separate_qkv`` (Hugging Face).
"""

from __future__ import annotations

from .registry import FAMILIES, AttentionFamily, class_named, family_of, linear_op, qkv_members, register

# registration order is the match order of family_of: keep it
# isort: off
from . import torch_mha  # noqa: F401
from . import torchvision_swin  # noqa: F401
from . import hf_gpt2  # noqa: F401
from . import hf_separate_qkv  # noqa: F401
# isort: on

__all__ = ["AttentionFamily", "register", "family_of", "FAMILIES", "linear_op", "qkv_members", "class_named"]
