"""Model families: what ebcompile knows of a family that its graph does not show.

- ``records``: one ``Family`` record per family (how to recognise it, its fused-export type, its opaque attention);
- ``vocabulary``: the names every family shares for head counts, widths and config fields;
- ``registry``: the ``AttentionFamily`` dispatch for attention modules the graph cannot see into. Importing this
  package registers, in this order (``family_of`` returns the first match): ``torch_mha``
  (``nn.MultiheadAttention``), ``torchvision_swin``, ``hf_gpt2`` and ``hf_separate_qkv`` (Hugging Face);
- ``hf_moe``: mixture-of-experts layout facts (``analysis.experts`` reads them).
"""

from __future__ import annotations

from .registry import FAMILIES, AttentionFamily, class_named, compacted_by, family_of, linear_op, qkv_members, register

# registration order is the match order of family_of: keep it
# isort: off
from . import torch_mha  # noqa: F401
from . import torchvision_swin  # noqa: F401
from . import hf_gpt2  # noqa: F401
from . import hf_separate_qkv  # noqa: F401
from .records import RECORDS, Family, record_of, register_record
# isort: on

__all__ = ["AttentionFamily", "register", "family_of", "compacted_by", "FAMILIES", "linear_op", "qkv_members",
           "class_named", "Family", "RECORDS", "record_of", "register_record"]
