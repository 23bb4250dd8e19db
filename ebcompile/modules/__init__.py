"""Modules that compaction puts in place of attention modules whose head count changed (``mha``, ``swin``),
and the sparse linear that stores an unstructured ticket's weights as CSR (``sparse``)."""

from __future__ import annotations

import sys
import types

from . import mha
from .mha import CompactMultiheadAttention
from .sparse import SparseLinear
from .swin import CompactShiftedWindowAttention, CompactShiftedWindowAttentionV2, compact_shifted_window_attention

__all__ = [
    "CompactMultiheadAttention",
    "CompactShiftedWindowAttention",
    "CompactShiftedWindowAttentionV2",
    "SparseLinear",
    "compact_shifted_window_attention",
]


class _Package(types.ModuleType):
    """``ebcompile.modules.FUSED_EXPORT`` stays the one flag ``CompactMultiheadAttention`` reads: getting or
    setting it here gets or sets ``ebcompile.modules.mha.FUSED_EXPORT`` (not a stale copy)."""

    @property
    def FUSED_EXPORT(self) -> bool:
        return mha.FUSED_EXPORT

    @FUSED_EXPORT.setter
    def FUSED_EXPORT(self, value: bool) -> None:
        mha.FUSED_EXPORT = value


sys.modules[__name__].__class__ = _Package
