"""``export_onnx`` checks its arguments before anything is traced or written: ``ConfigError`` naming the fix."""

from __future__ import annotations

import pytest
import torch

from ebcompile.cli.main import main
from ebcompile.errors import ConfigError
from ebcompile.export import export_onnx


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"opset": 99}, "newer"),
    ({"opset": 3}, "older"),
    ({"opset": "x"}, "not an int"),
    ({"opset": True}, "not an int"),
    ({"dynamic_axes": "bogus"}, "dynamic_axes"),
    ({"dynamic_axes": ["input"]}, "dynamic_axes"),
    ({"rtol": -1}, "rtol"),
    ({"atol": -1e-3}, "atol"),
    ({"atol": float("nan")}, "atol"),
    ({"input_names": ["a", "b", "c"]}, "3 names for 1"),
    ({"input_names": "input"}, "input_names"),
])
def test_bad_export_arguments_are_config_errors_and_write_nothing(tmp_path, kwargs, words):
    with pytest.raises(ConfigError, match=words) as info:
        export_onnx(torch.nn.Linear(4, 2), tmp_path / "m.onnx", torch.randn(2, 4), **kwargs)
    assert "Fix:" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_keyword_input_names_must_be_keys_of_the_example(tmp_path):
    class Keywords(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    example = {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}
    with pytest.raises(ConfigError, match=r"\['z'\]"):
        export_onnx(Keywords(), tmp_path / "m.onnx", example, input_names=["x", "z"])
    assert list(tmp_path.iterdir()) == []


def test_supported_opsets_still_export(tmp_path):
    for opset in (11, 17):
        report = export_onnx(torch.nn.Linear(4, 2), tmp_path / f"m{opset}.onnx", torch.randn(2, 4), opset=opset,
                             input_names=["x"])
        assert report.max_abs_error is not None and report.max_abs_error <= 1e-5


def test_cli_bad_opset_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["export", str(tmp_path / "no-model"), str(tmp_path / "o.onnx"), "--opset", "99"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "opset=99" in err and "Fix:" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
