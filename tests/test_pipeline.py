"""The pass contract (``ebcompile.pipeline``): ``prepare`` and ``compact`` are declared pipelines whose passes say
what they require, ensure and preserve; the contract is checked at declaration and at run time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.analysis.build import ANALYSE
from ebcompile.pipeline import Pass, PassContractError, Pipeline, Retry, describe
from ebcompile.prepare import PREPARE, Options
from ebcompile.transforms.shrink import COMPACT


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(16, 3)).eval()


def test_prepare_and_compact_are_declared_pipelines_in_order() -> None:
    assert [r["pass"] for r in describe(PREPARE)][:2] == ["check_model", "check_options"]
    assert [p.name for p in ANALYSE.passes] == [p.name for p in PREPARE.passes][1:len(ANALYSE.passes) + 1]
    assert all(p.kind == "analysis" for p in ANALYSE.passes)  # the analysis changes nothing
    assert {p.name for p in PREPARE.passes if p.preserves} == {"insert_masks", "attach_config", "track_importance"}
    compact_passes = {r["pass"]: r for r in describe(COMPACT)}
    assert compact_passes["remove_units"]["preserves"] == "no" and compact_passes["check_function"]["kind"] == "analysis"
    assert list(compact_passes).index("check_function") > list(compact_passes).index("adapt_forwards")


def test_a_requirement_no_earlier_pass_ensures_is_refused_when_declared() -> None:
    with pytest.raises(PassContractError, match="'b' requires \\['y'\\]"):
        Pipeline("p", ("x",), [Pass("a", lambda s: None, ("x",), ("z",)), Pass("b", lambda s: None, ("y",))])
    with pytest.raises(PassContractError, match="twice"):
        Pipeline("p", ("x",), [Pass("a", lambda s: None), Pass("a", lambda s: None)])


def test_a_pass_that_does_not_deliver_what_it_ensures_is_named() -> None:
    pipe = Pipeline("p", ("x",), [Pass("lazy", lambda s: None, ("x",), ("y",))])
    with pytest.raises(PassContractError, match="'lazy' ensures \\['y'\\]"):
        pipe.run(x=1)
    with pytest.raises(PassContractError, match="needs the inputs"):
        pipe.run()


def test_retry_runs_the_pipeline_again_from_its_start() -> None:
    calls: list[str] = []

    def flaky(s) -> None:
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise Retry

    state = Pipeline("p", (), [Pass("first", lambda s: calls.append("first")), Pass("flaky", flaky)]).run()
    assert calls == ["first", "flaky", "first", "flaky", "first", "flaky"] and state.trace == ["first", "flaky"]
    with pytest.raises(PassContractError, match="more than 2 times"):
        Pipeline("p", (), [Pass("always", lambda s: (_ for _ in ()).throw(Retry()))], retries=2).run()


def test_checked_run_verifies_every_preserving_pass_and_catches_one_that_is_not() -> None:
    m, x = _model(), torch.randn(2, 5, 16)
    state = PREPARE.run(check=True, model=m, example_inputs=x, options=Options(structure="structured", importance="activation"),
                        ratio=0.3)
    assert state.trace == [p.name for p in PREPARE.passes] and m._ebcompile.plan.groups

    def doubles(s) -> None:
        with torch.no_grad():
            s.model[2].weight.mul_(2)

    broken = PREPARE + [Pass("claims_to_preserve", doubles, ("model",), preserves=True)]
    with pytest.raises(PassContractError, match="'claims_to_preserve' is declared to preserve"):
        broken.run(check=True, model=_model(), example_inputs=x, options=Options(), ratio=0.3)


def test_compact_runs_its_pipeline_checked_and_computes_the_masked_model() -> None:
    m, x = _model(), torch.randn(2, 5, 16)
    ebcompile.prepare(m, x, ratio=0.4, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    state = COMPACT.run(check=True, model=m, cfg=m._ebcompile, ticket=m._ebcompile.ticket, round_to=None, sparse=False,
                        check_function=True)
    assert "remove_units" in state.trace and "check_function" in state.trace and "sparsify" not in state.trace
    small = state.new
    assert small[0].q.out_features < 16 or small[0].up.out_features < 32
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))


def test_docs_extending_shows_the_pipelines_as_declared() -> None:
    from pathlib import Path

    from ebcompile.pipeline import markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    assert markdown(PREPARE) in text and markdown(COMPACT) in text


def test_the_environment_turns_checked_runs_on_for_prepare(monkeypatch) -> None:
    seen: list[bool] = []
    original = Pipeline._run_pass

    def spy(self, p, state, check):
        seen.append(check)
        return original(self, p, state, check)

    monkeypatch.setattr(Pipeline, "_run_pass", spy)
    monkeypatch.setenv("EBCOMPILE_CHECK_PASSES", "1")
    ebcompile.prepare(_model(), torch.randn(2, 5, 16), structure="structured", importance="magnitude")
    assert seen and all(seen)
    seen.clear()
    monkeypatch.setenv("EBCOMPILE_CHECK_PASSES", "0")
    ebcompile.prepare(_model(), torch.randn(2, 5, 16), structure="structured", importance="magnitude")
    assert seen and not any(seen)
