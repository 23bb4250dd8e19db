"""One vocabulary of op names (``analysis.op_names``): an op seen as an aten overload (structure labels), a torch
function, a Tensor method or dunder, or an ``operator`` call (feature rewrites under ``symbolic_trace``, the attention
fusion under a ``TorchFunctionMode``) gets the same aten-style name, so every handler table is keyed the same way."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from ebcompile.analysis import structure  # noqa: F401 - registers every label handler
from ebcompile.analysis.op_names import SIZED_VIEWS, SPLITS, function_name, op_name
from ebcompile.analysis.ophandlers import HANDLERS as LABELS
from ebcompile.export.attention_ops import HANDLERS as FUSION

T = torch.Tensor
aten = torch.ops.aten


@pytest.mark.parametrize("name, forms", [
    ("mul", [aten.mul.Tensor, torch.mul, T.mul, T.__mul__, T.__rmul__, operator.mul, torch.multiply]),
    ("mul_", [aten.mul_.Tensor, T.mul_, T.__imul__, operator.imul]),
    ("div", [aten.div.Tensor, torch.div, T.__truediv__, torch.true_divide, operator.truediv, torch.divide]),
    ("add", [aten.add.Tensor, torch.add, T.__add__, T.__radd__, operator.add]),
    ("sub", [aten.sub.Tensor, torch.sub, T.__sub__, torch.subtract]),
    ("matmul", [aten.matmul.default, torch.matmul, T.__matmul__, operator.matmul]),
    ("softmax", [torch.softmax, T.softmax, F.softmax]),
    ("view", [aten.view.default, T.view]),
    ("transpose", [aten.transpose.int, torch.transpose, T.transpose]),
    ("scaled_dot_product_attention", [aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention]),
])
def test_every_form_of_an_op_has_its_aten_name(name, forms):
    assert {function_name(f) for f in forms} == {name}


def test_reflected_ops_that_compute_something_else_keep_their_own_name():
    assert function_name(T.__rsub__) == "rsub" and function_name(T.__rmatmul__) == "rmatmul"
    assert function_name(T.__rtruediv__) != "div"


def test_fx_nodes_of_a_symbolic_trace_are_named_like_aten_ops():
    class M(torch.nn.Module):
        def forward(self, x):
            y = x.view(2, 3, 4).transpose(1, 2) * 2
            a, b = torch.chunk(y @ y.transpose(-1, -2), 2, dim=0)
            return a.reshape(-1) + b.flatten()

    names = [op_name(n) for n in fx.symbolic_trace(M()).graph.nodes if n.op in ("call_method", "call_function")]
    assert names == ["view", "transpose", "mul", "transpose", "matmul", "chunk", "getitem", "getitem", "reshape",
                     "flatten", "add"]


def test_the_handler_tables_are_keyed_by_the_same_names():
    for name in ("matmul", "bmm", "softmax", "scaled_dot_product_attention", "expand", "repeat_interleave", "view"):
        assert name in LABELS and name in FUSION, name
    assert SIZED_VIEWS - {"expand"} <= set(LABELS) and SPLITS <= set(LABELS)
