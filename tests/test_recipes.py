"""The recipes (``ebcompile.recipes``): search → ticket → retrain called from Python, the CLI as a thin layer over
them (same defaults, same work), and ``take_ticket``, the one step from search to retraining."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile import recipes
from ebcompile.cli.main import build_parser, main
from ebcompile.recipes import RetrainSettings, SearchSettings, finished, take_ticket

TINY_VIT = json.dumps({"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 64})


def _parsed(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("cls, argv", [
    (SearchSettings, ["search", "M", "--out", "O", "--data", "D"]),
    (RetrainSettings, ["retrain", "S", "--out", "O", "--data", "D"]),
])
def test_settings_defaults_are_the_command_lines(cls, argv):
    """A field left at its default means what the flag left out means on the command line."""
    args = _parsed(argv)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            assert getattr(args, f.name) == f.default, f.name


def test_the_cli_hands_its_settings_to_the_recipes(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(recipes, "search", lambda s: seen.append(s) or 0)
    monkeypatch.setattr(recipes, "retrain", lambda s: seen.append(s) or 0)
    assert main(["search", "m", "--out", str(tmp_path / "a"), "--data", "d", "--ratio", "0.5", "--every", "7"]) == 0
    assert main(["retrain", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--data", "d", "--mode", "rewind"]) == 0
    assert seen[0] == SearchSettings(model="m", out=str(tmp_path / "a"), data="d", ratio=0.5, every=7)
    assert seen[1] == RetrainSettings(search=str(tmp_path / "a"), out=str(tmp_path / "b"), data="d", mode="rewind")


def _png_folder(root, per_class: int = 8):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.randn(12, 12, 3, generator=g) * 20 + 60 + 120 * c).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), "RGB").save(root / name / f"{i}.png")
    return root


def test_search_and_retrain_from_python(tmp_path, capsys):
    torch.set_num_threads(1)
    data = str(_png_folder(tmp_path / "pngs"))
    run, small = tmp_path / "run", tmp_path / "small"
    settings = SearchSettings(model="torchvision:VisionTransformer", model_kwargs=TINY_VIT, out=str(run), data=data,
                              epochs=4, batch=4, every=2, window=2, rule="relative", threshold=1.0, deadline=None)
    assert recipes.search(settings) == 0
    assert settings.lr is None  # the caller's settings are not filled in
    result = json.loads((run / "search.json").read_text())
    assert result["found"] and result["found_at"]["by"] == "rule"
    assert recipes.retrain(RetrainSettings(search=str(run), out=str(small), data=data, epochs=1, batch=4)) == 0
    report = json.loads((small / "retrain.json").read_text())
    assert report["optimizer_state"] == "carried" and report["parameters"] < report["dense_parameters"]
    with pytest.raises(ebcompile.errors.ConfigError, match="other settings"):  # a resume with another ratio: refused
        recipes.search(dataclasses.replace(settings, ratio=0.5))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("structure", ["structured", "unstructured"])
def test_take_ticket_trains_what_the_masked_model_computes(structure):
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    x = torch.randn(2, 5, 16)
    ebcompile.prepare(model, (x,), ratio=0.5, structure=structure)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    opt.step()
    ticket = ebcompile.draw_ticket(model)
    small = take_ticket(model, ticket, optimizer=opt)
    assert small.training
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in small.parameters() if p.requires_grad}
    with torch.no_grad():
        masked = model.eval()(x)
        torch.testing.assert_close(small.eval()(x), masked, rtol=1e-5, atol=1e-5)
    if structure == "structured":
        assert small is not model and sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    else:
        assert small is model
    final = finished(small, model)
    with torch.no_grad():
        torch.testing.assert_close(final.eval()(x), masked, rtol=1e-5, atol=1e-5)


def test_python_callers_get_the_command_lines_output_checks(tmp_path):
    from ebcompile.errors import OutputPathError

    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(OutputPathError, match="search folder"):
        recipes.retrain(RetrainSettings(search=str(tmp_path / "run"), out=str(tmp_path / "run" / "model" / "x"), data="d"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ebcompile.errors.EbcompileError, match="Fix:"):
        recipes.search(SearchSettings(model="m", out=str(tmp_path / "file"), data="d"))
