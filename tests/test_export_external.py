"""ONNX export with external data (the >2 GB path, forced here on tiny models): the graph in ``m.onnx``, the weights
in one data file beside it, committed together; it verifies, reloads in onnxruntime with the outputs of the inline
export, keeps the fused attention, replaces an earlier export without leaving its data behind, never removes a file
it did not write, and a failure midway leaves the previous export (or nothing)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.models import VisionTransformer

import ebcompile.export.onnx as export_module
import ebcompile.persist.io as io_module
from ebcompile.errors import ConfigError, ExportError
from ebcompile.export import export_onnx

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zeroes the head: outputs would all be 0
    return model


def _run(path: Path, x: torch.Tensor = X) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("optimize", [False, True])
def test_forced_external_data_verifies_reloads_and_keeps_fused_attention(tmp_path, vit, optimize):
    inline = export_onnx(vit, tmp_path / "inline" / "m.onnx", X, optimize=optimize, fused_attention=True)
    rep = export_onnx(vit, tmp_path / "ext" / "m.onnx", X, optimize=optimize, fused_attention=True, external_data=True)
    data = tmp_path / "ext" / "m.onnx.data"
    assert not inline.external_data and inline.files == [str(tmp_path / "inline" / "m.onnx")]
    assert rep.external_data and rep.files == [str(tmp_path / "ext" / "m.onnx"), str(data)]
    assert sorted(os.listdir(tmp_path / "ext")) == ["m.onnx", "m.onnx.data"]
    assert rep.bytes == sum(Path(f).stat().st_size for f in rep.files) and rep.max_abs_error is not None
    assert rep.optimized == optimize and rep.op_counts == inline.op_counts and rep.op_counts["Attention"] == 2
    model = onnx.load(str(tmp_path / "ext" / "m.onnx"), load_external_data=False)
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and not any(t.raw_data for t in big) and data.stat().st_size > 20_000
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"m.onnx.data"}
    onnx.checker.check_model(str(tmp_path / "ext" / "m.onnx"))
    x = torch.randn(3, 3, 16, 16)  # another batch size than the one exported with
    np.testing.assert_allclose(_run(tmp_path / "ext" / "m.onnx", x), _run(tmp_path / "inline" / "m.onnx", x), atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(_run(tmp_path / "ext" / "m.onnx", x), vit(x).numpy(), atol=1e-4, rtol=1e-4)


def test_reexport_replaces_the_data_file_and_keeps_files_it_did_not_write(tmp_path, vit):
    path = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_text("the user's own file")
    first = export_onnx(vit, path, X, external_data=True)
    assert first.files == [str(path), str(tmp_path / "m.onnx.1.data")]  # the name is taken: another one
    second = export_onnx(vit, path, X, external_data=True, fused_attention=True)
    assert second.files == [str(path), str(tmp_path / "m.onnx.2.data")]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.2.data", "m.onnx.data"]  # the first one's data is gone
    np.testing.assert_allclose(_run(path), _run(path), atol=0)
    third = export_onnx(vit, path, X)  # small: inline again, and the previous data file is removed
    assert not third.external_data and sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_text() == "the user's own file"
    with torch.no_grad():
        np.testing.assert_allclose(_run(path), vit(X).numpy(), atol=1e-4, rtol=1e-4)


def test_a_foreign_onnx_with_external_data_is_replaced_without_touching_its_data(tmp_path, vit):
    path = tmp_path / "m.onnx"
    export_onnx(vit, path, X, external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]  # as another tool would write it: no ebcompile stamp
    onnx.save_model(model, str(path))
    export_onnx(vit, path, X)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def _fail_verification(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["verify", "commit"])
def test_a_failure_midway_leaves_the_previous_export_or_nothing(tmp_path, vit, monkeypatch, where):
    path = tmp_path / "m.onnx"
    if where == "verify":
        monkeypatch.setattr(export_module, "run_onnxruntime", _fail_verification)
    else:  # the data file is already beside path; then the rename of the .onnx fails
        real = os.replace

        def replace(src, dst):
            if Path(dst) == path:
                raise OSError(5, "injected I/O error")
            return real(src, dst)

        monkeypatch.setattr(io_module.os, "replace", replace)
    with pytest.raises((ExportError, io_module.OutputPathError)):
        export_onnx(vit, path, X, external_data=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_onnx(vit, path, X, external_data=True)
    before = _snapshot(tmp_path)
    if where == "verify":
        monkeypatch.setattr(export_module, "run_onnxruntime", _fail_verification)
    else:
        monkeypatch.setattr(io_module.os, "replace", replace)
    with pytest.raises((ExportError, io_module.OutputPathError)):
        export_onnx(vit, path, X, external_data=True, fused_attention=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    with torch.no_grad():
        np.testing.assert_allclose(_run(path), vit(X).numpy(), atol=1e-4, rtol=1e-4)


def test_automatic_by_size_and_refused_when_it_cannot_be_inline(tmp_path, vit, monkeypatch):
    monkeypatch.setattr(export_module, "INLINE_LIMIT", 10_000)  # as if the weights passed 2 GB
    with pytest.raises(ConfigError, match="external_data=None"):
        export_onnx(vit, tmp_path / "m.onnx", X, external_data=False)
    assert list(tmp_path.iterdir()) == []
    rep = export_onnx(vit, tmp_path / "m.onnx", X)
    assert rep.external_data and sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    with pytest.raises(ConfigError, match="external_data"):
        export_onnx(vit, tmp_path / "n.onnx", X, external_data="yes")


def test_export_leaves_the_callers_model_as_it_was(tmp_path, vit):
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "h.onnx", X, dtype="fp16", fused_attention=True, external_data=True)
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert type(model.encoder.layers[0].self_attention) is torch.nn.MultiheadAttention


def test_cli_export_with_external_data(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ebcompile.cli.main import main

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_inner=64, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "dense")
    out = tmp_path / "onnx" / "m.onnx"
    assert main(["export", str(tmp_path / "dense"), str(out), "--seq", "8", "--external-data"]) == 0
    printed = capsys.readouterr().out
    assert f"weights in {out}.data" in printed and "matches PyTorch" in printed
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]
    assert main(["export", str(tmp_path / "dense"), str(out), "--seq", "8", "--no-external-data"]) == 0
    assert sorted(os.listdir(out.parent)) == ["m.onnx"]


def _tiny_llama() -> torch.nn.Module:
    import transformers as t

    torch.manual_seed(0)
    return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                            max_position_embeddings=32)).eval()


def test_optimizer_reads_and_writes_external_data_as_the_exporter_spills_it(tmp_path, monkeypatch):
    """Past 2 GB the exporter writes one file per tensor beside the .onnx: simulated here on a tiny Llama (RMSNorm
    becomes onnxruntime's SimplifiedLayerNormalization, which onnx.checker does not know)."""
    real = torch.onnx.export

    def spilling_export(model, args, f, **kwargs):
        real(model, args, f, **kwargs)
        proto = onnx.load(f)
        onnx.save_model(proto, f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)

    model, tokens = _tiny_llama(), {"input_ids": torch.randint(0, 64, (1, 8)), "attention_mask": torch.ones(1, 8).long()}
    inline = export_onnx(model, tmp_path / "inline.onnx", tokens, optimize=True)
    monkeypatch.setattr(export_module.torch.onnx, "export", spilling_export)
    rep = export_onnx(model, tmp_path / "m.onnx", tokens, optimize=True)  # automatic: the exporter spilled
    assert rep.external_data and rep.optimized and rep.op_counts == inline.op_counts
    assert rep.op_counts.get("SimplifiedLayerNormalization", 0) + rep.op_counts.get("SkipSimplifiedLayerNormalization", 0) > 0
    assert rep.op_counts["GroupQueryAttention"] == 2
    assert sorted(os.listdir(tmp_path)) == ["inline.onnx", "m.onnx", "m.onnx.data"]
    feeds = {k: v.numpy() for k, v in tokens.items()}
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**tokens).logits.numpy(), atol=1e-4, rtol=1e-4)
