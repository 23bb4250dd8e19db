"""``SparseLinear``: the linear layer that stores an unstructured ticket's weights as CSR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """``nn.Linear`` whose weight is stored in CSR form: ``values`` (a parameter, so the kept weights stay
    trainable), ``crow_indices`` and ``col_indices`` (int32 buffers where they fit).

    ``weight`` is the ``[out_features, in_features]`` CSR tensor, assembled without a copy; ``F.linear``
    accepts it, so code that reads ``module.weight`` functionally (torchvision Swin) keeps working.
    The forward is ``F.linear(x, weight, bias)``: a sparse-dense matmul, equal to the dense one up to
    float rounding. Deep copies, ``.to()``, ``state_dict`` and ``load_state_dict`` (of any nnz) work.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, nnz: int = 0, device=None, dtype=None,
                 index_dtype: torch.dtype = torch.int32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype))
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=index_dtype, device=device))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
        """Store the nonzero entries of ``weight`` ([out, in]); ``bias`` is kept dense."""
        w = weight.detach()
        csr = w.to_sparse_csr()
        out_features, in_features = w.shape
        small = csr.values().numel() < 2**31 and in_features < 2**31
        index_dtype = torch.int32 if small else torch.int64
        new = cls(in_features, out_features, bias is not None, 0, w.device, w.dtype, index_dtype)
        new.values = nn.Parameter(csr.values().clone(), requires_grad=weight.requires_grad)
        new.crow_indices = csr.crow_indices().to(index_dtype)
        new.col_indices = csr.col_indices().to(index_dtype)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        new = cls.from_dense(linear.weight, linear.bias)
        new.train(linear.training)
        return new

    @property
    def weight(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` with the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a checkpoint may hold another number of nonzeros: take its sizes before the usual copy
        for name in ("values", "col_indices", "crow_indices"):
            value = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.shape != current.shape:
                fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device)
                if name == "values":
                    self.values = nn.Parameter(fresh, requires_grad=self.values.requires_grad)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={density:.3f}")
