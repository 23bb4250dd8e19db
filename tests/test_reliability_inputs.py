"""Bad input is refused early and typed, in one line with a fix, and a failed run leaves no empty folder behind:
the training commands' --lr / --batch, argparse's own errors, save_for_serving on a non-decoder, EarlyBird's
settings and refused steps, and EarlyBirdCallback's settings at construction."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_reliability_cli import mr_folder

import ebcompile
from ebcompile.cli.main import main
from ebcompile.errors import ConfigError, ImportanceDataError, InvalidRatioError, ServingFormatError
from ebcompile.recipes import RetrainSettings, SearchSettings, retrain, search

from conftest import image_batch, make_vit, save_word_bert


def one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Fix:" in lines[0] and all(w in lines[0] for w in words), err


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 1-layer BERT classifier and a word-level tokenizer for ``mr_folder``'s words, saved like a hub model."""
    words = ["[PAD]", "[UNK]", "a", "good", "bad", "film", *map(str, range(20))]
    return save_word_bert(tmp_path_factory.mktemp("tiny-bert"), words, layers=1, heads=2, hidden=16, positions=16)


# -- 1. a failed or interrupted run leaves no empty --out ------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_run_removes_the_empty_out_folders_it_created(tmp_path, monkeypatch, error):
    import ebcompile.recipes.text as text

    def fails(args):
        Path(args.out, "runs").mkdir(parents=True)  # as the Trainer makes output_dir (and its log folder)
        raise error

    monkeypatch.setattr(text, "search_text", fails)
    monkeypatch.setattr(text, "retrain_text", fails)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(type(error)):
        search(SearchSettings(model="some-text-model", data="d", out=str(out)))
    assert not (tmp_path / "new").exists()  # out and the parents made with it
    with pytest.raises(type(error)):
        retrain(RetrainSettings(search=str(tmp_path / "s"), data="d", out=str(out)))
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"  # a folder that existed before the run stays, empty or not
    mine.mkdir()
    with pytest.raises(type(error)):
        search(SearchSettings(model="some-text-model", data="d", out=str(mine)))
    assert mine.is_dir()


def test_a_failed_run_keeps_an_out_folder_that_holds_a_file(tmp_path, monkeypatch):
    import ebcompile.recipes.text as text

    def fails(args):
        Path(args.out, "checkpoint-4").mkdir(parents=True)
        Path(args.out, "checkpoint-4", "progress.json").write_text("{}")  # a resume point: kept
        raise RuntimeError("boom")

    monkeypatch.setattr(text, "search_text", fails)
    with pytest.raises(RuntimeError):
        search(SearchSettings(model="some-text-model", data="d", out=str(tmp_path / "out")))
    assert (tmp_path / "out" / "checkpoint-4" / "progress.json").is_file()


def test_a_text_search_interrupted_before_its_first_checkpoint_leaves_no_folder(tiny_bert, tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ebcompile.EarlyBird, "step", interrupted)  # the first optimizer step: the Trainer made --out
    out = tmp_path / "run"
    assert main(["search", str(tiny_bert), "--out", str(out), "--data", str(mr_folder(tmp_path)), "--max-len", "8",
                 "--batch", "8", "--epochs", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()


# -- 2. bad --lr / --batch: exit 2 before anything runs --------------------------------------------------------

@pytest.mark.parametrize("bad", [["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"], ["--batch", "0"]])
@pytest.mark.parametrize("model", ["text", "torchvision:vit_b_16"])
def test_a_bad_learning_rate_or_batch_is_one_line_and_exit_2(tiny_bert, tmp_path, capsys, bad, model):
    out = tmp_path / "run"
    argv = ["search", str(tiny_bert) if model == "text" else model, "--out", str(out), "--data", str(tmp_path / "d"), *bad]
    assert main(argv) == 2
    one_line(capsys.readouterr().err, bad[0])
    assert not out.exists()


@pytest.mark.parametrize("bad", [["--lr", "-1"], ["--lr", "nan"], ["--batch", "0"], ["--epochs", "nan"]])
def test_retrain_with_a_bad_learning_rate_or_batch_is_one_line_and_exit_2(tmp_path, capsys, bad):
    out = tmp_path / "small"
    assert main(["retrain", str(tmp_path / "search"), "--out", str(out), "--data", str(tmp_path / "d"), *bad]) == 2
    one_line(capsys.readouterr().err, bad[0])
    assert not out.exists()


# -- 3. save_for_serving on a compact ViT ----------------------------------------------------------------------

def test_save_for_serving_refuses_a_model_that_is_no_decoder_before_writing(tmp_path):
    model = ebcompile.prepare(make_vit(), image_batch(), ratio=0.3)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model)
    with pytest.raises(ServingFormatError, match="Llama-shaped decoders.*Fix:"):
        ebcompile.save_for_serving(small, tmp_path / "served")
    assert not (tmp_path / "served").exists()


# -- 4. EarlyBird: a refused step changes nothing; criterion checked at construction ---------------------------

@pytest.mark.filterwarnings("ignore:importance='activation'")
def test_a_refused_step_leaves_the_controller_as_it_was():
    model = ebcompile.prepare(make_vit(), image_batch(), ratio=0.3, importance="activation")
    eb = ebcompile.EarlyBird(model, every=1, budget=10, deadline=0.2)  # the deadline at step 2
    before = eb.state_dict()
    with pytest.raises(ImportanceDataError, match="no forward pass"):
        eb.step()
    assert eb.ticks == 0 and eb.checks == 0 and eb.state_dict()["history"] == before["history"]
    for _ in range(2):  # the same two steps an unrefused search takes: the deadline is not moved
        model(image_batch())
        eb.step()
    assert eb.found and eb.ticket.found_at == {"check": 1, "tick": 2, "by": "deadline"}


def test_a_criterion_the_model_does_not_measure_is_refused_at_construction():
    model = ebcompile.prepare(make_vit(), image_batch(), ratio=0.3)
    for bad in ("bogus", "weight"):  # weight: only an unstructured model measures it
        with pytest.raises(ConfigError, match=f"criterion='{bad}'.*Fix:"):
            ebcompile.EarlyBird(model, criterion=bad)
    for good in ("max", "overall", "head", "neuron"):
        assert ebcompile.EarlyBird(model, criterion=good).criterion == good


# -- 5. messages with a fix; argparse in one line; the callback's settings at construction ---------------------

@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget": -1}, {"budget": 2.5}, {"warmup": -1}])
def test_earlybird_budget_and_warmup_errors_name_the_fix(kwargs):
    model = ebcompile.prepare(make_vit(), image_batch(), ratio=0.3)
    with pytest.raises(ConfigError, match=f"{next(iter(kwargs))}=.*Fix:"):
        ebcompile.EarlyBird(model, **kwargs)


@pytest.mark.parametrize("argv, words", [
    (["search", "m", "--out", "o", "--data", "d", "--deadline", "2"], "--deadline"),
    (["retrain", "s", "--out", "o", "--data", "d", "--mode", "bogus"], "--mode"),
    (["search", "m", "--data", "d"], "--out"),
    (["search", "m", "--out", "o", "--data", "d", "--batch", "many"], "--batch"),
    (["bogus"], "invalid choice"),
])
def test_an_argument_the_parser_refuses_is_one_line_with_a_fix_and_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    one_line(capsys.readouterr().err, words, "--help")


@pytest.mark.parametrize("kwargs, error", [
    ({"ratio": 1.5}, InvalidRatioError), ({"window": 0}, ConfigError), ({"threshold": -1}, ConfigError),
    ({"rule": "x"}, ConfigError), ({"deadline": 2}, ConfigError), ({"deadline": 0}, ConfigError),
    ({"warmup": -1}, ConfigError), ({"criterion": 3}, ConfigError),
])
def test_the_callback_refuses_bad_settings_when_built(kwargs, error):
    from ebcompile.integrations import EarlyBirdCallback

    with pytest.raises(error, match="Fix:"):
        EarlyBirdCallback(**kwargs)
