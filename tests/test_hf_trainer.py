"""The Hugging Face Trainer callback: ``EarlyBirdCallback`` finds and applies a ticket during ``Trainer.train``,
resumes the search (or the applied ticket) from a checkpoint, logs into the Trainer's entries, and leaves a
checkpoint folder that ``ebcompile compact`` reads.

Tiny random BERT / GPT-2 models from tests/hf_models.py; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertForSequenceClassification  # noqa: E402

import ebcompile  # noqa: E402
from ebcompile.errors import ConfigError  # noqa: E402
from ebcompile.prepare import config_of  # noqa: E402
from ebcompile.transforms.masks import iter_masks  # noqa: E402

from hf_models import (  # noqa: E402
    TOL,
    build,
    logits,
    quiet_one_thread,  # noqa: F401 - an autouse fixture: one thread, quiet transformers
    text_batch,
)
from zoo import SEQ, VOCAB  # noqa: E402


def test_trainer_with_earlybird_callback_finds_and_applies_a_ticket(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    model = ebcompile.prepare(build("bert"), text_batch(), ratio=0.5, structure="structured")
    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=torch.randint(2, VOCAB, (SEQ,), generator=g), attention_mask=torch.ones(SEQ, dtype=torch.long),
                 labels=torch.tensor(i % 2)) for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True)
    callback = EarlyBirdCallback(every=1, window=2, threshold=1.0, stop=True, deadline=None)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback.attach(trainer)
    trainer.train()
    assert callback.applied and callback.ticket is not None
    assert config_of(model).importance == "taylor"  # the default, auto, saw the Trainer's optimizer steps
    assert trainer.state.global_step == 3  # found at the third check; stop=True ends the search phase
    assert all(m.frozen for *_, m in iter_masks(model))
    logged = [h for h in trainer.state.log_history if "eb/distance_overall" in h]
    assert len(logged) == 2 and all({"eb/distance", "eb/distance_head", "eb/distance_neuron"} <= set(h) for h in logged)
    assert any(h.get("eb/ticket_found") == 1.0 for h in trainer.state.log_history)


def test_trainer_resume_restores_the_search_and_the_applied_ticket(tmp_path):
    """Checkpoints every 2 steps; the ticket appears at step 3. Resuming from step 2 finds it at the same
    check; resuming from step 4 starts with it applied and frozen, without searching again."""
    from transformers import Trainer, TrainingArguments

    from ebcompile.integrations import STATE_FILE, EarlyBirdCallback

    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=torch.randint(2, VOCAB, (SEQ,), generator=g), attention_mask=torch.ones(SEQ, dtype=torch.long),
                 labels=torch.tensor(i % 2)) for i in range(24)]

    def run(resume: str | None = None):
        model = ebcompile.prepare(build("bert"), text_batch(), ratio=0.5, structure="structured")
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                                 report_to="none", save_strategy="steps", save_steps=2, logging_steps=100, use_cpu=True,
                                 disable_tqdm=True, seed=0)
        callback = EarlyBirdCallback(every=1, window=2, threshold=1.0, deadline=None)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        callback.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model, callback

    straight, cb = run()
    assert cb.ticket.found_at == {"check": 2, "tick": 3, "by": "rule"}
    assert all((tmp_path / f"checkpoint-{s}" / STATE_FILE).is_file() for s in (2, 4, 6))
    mid, cb_mid = run(str(tmp_path / "checkpoint-2"))
    assert cb_mid.applied and cb_mid.ticket.found_at == cb.ticket.found_at
    assert [r["tick"] for r in cb_mid.earlybird.history] == [r["tick"] for r in cb.earlybird.history] == [1, 2, 3]
    assert all(torch.equal(cb_mid.ticket.masks.units[k], v) for k, v in cb.ticket.masks.units.items())
    late, cb_late = run(str(tmp_path / "checkpoint-4"))
    assert cb_late.applied and len(cb_late.earlybird.history) == 3 and cb_late.ticket.found_at == cb.ticket.found_at
    assert all(m.frozen for *_, m in iter_masks(late))
    inputs = text_batch()
    torch.testing.assert_close(logits(late.eval(), inputs), logits(straight.eval(), inputs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(mid.eval(), inputs), logits(straight.eval(), inputs), rtol=1e-4, atol=1e-5)
    # the checkpoint folder is also what `ebcompile compact` reads: weights (save_pretrained) + the search's ticket
    from ebcompile.cli.main import main

    ckpt = str(tmp_path / "checkpoint-4")
    assert main(["compact", ckpt, ckpt, str(tmp_path / "small")]) == 0
    small = ebcompile.load(tmp_path / "small")
    reference = BertForSequenceClassification.from_pretrained(ckpt).eval()
    ebcompile.prepare(reference, inputs, ratio=0.5, structure="structured")
    ebcompile.apply_ticket(reference, cb.ticket)
    torch.testing.assert_close(logits(small, inputs), logits(reference, inputs), **TOL)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in build("bert").parameters())


def test_trainer_resume_from_a_folder_without_search_state_raises(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    model = ebcompile.prepare(build("bert"), text_batch(), ratio=0.5, structure="structured")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback = EarlyBirdCallback(resume_from=tmp_path)
    with pytest.raises(ConfigError, match="no early-bird search state"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_trainer_callback_unbound_logs_into_the_trainer_entries(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    inputs = text_batch()
    model = ebcompile.prepare(build("gpt2-lm"), inputs, ratio=0.5, structure="structured")
    data = [dict(input_ids=row, attention_mask=torch.ones(SEQ, dtype=torch.long), labels=row)
            for row in torch.randint(2, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(0))]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = EarlyBirdCallback(every="epoch", window=1, threshold=1.0, mode="rewind", deadline=None)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.applied and callback.ticket.found_at == {"check": 1, "tick": 2, "by": "rule"}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert [h.get("eb/pruned") for h in trainer.state.log_history if "eb/pruned" in h] == [0.5, 0.5]
    assert sum("eb/distance_overall" in h for h in trainer.state.log_history) == 1



@pytest.mark.parametrize("every,deadline,stopped", [(1, 0.25, 5), ("auto", 0.25, 5), ("epoch", 0.4, 8)])
def test_trainer_callback_draws_the_ticket_by_its_deadline_share_of_the_training(tmp_path, every, deadline, stopped):
    from transformers import Trainer, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    model = ebcompile.prepare(build("bert"), text_batch(), ratio=0.5, structure="structured")
    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=torch.randint(2, VOCAB, (SEQ,), generator=g), attention_mask=torch.ones(SEQ, dtype=torch.long),
                 labels=torch.tensor(i % 2)) for i in range(16)]  # 4 steps per epoch, 5 epochs: 20 steps
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True)
    callback = EarlyBirdCallback(every=every, threshold=1e-9, rule="absolute", stop=True, deadline=deadline)  # the rule never fires
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.applied and callback.ticket.found_at["by"] == "deadline"
    assert trainer.state.global_step == stopped  # 25% of 20 steps; 40% of 5 epochs = epoch 2
    assert callback.earlybird.budget == (5 if every == "epoch" else 20)
    assert callback.earlybird.every == 1  # every=1, "epoch" (one tick per epoch) or auto: max_steps / 75, at least 1


def test_trainer_callback_defaults_check_often_enough_for_the_rule_to_decide():
    """The defaults follow the measured fine-tuning recipe: ``every="auto"`` checks every ``max_steps / 75`` steps
    (10 of the 750 steps of three MiniLM epochs) and the deadline is at 30%, where the rule fired at 15-20%."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    model = ebcompile.prepare(build("bert"), text_batch(), ratio=0.3, structure="structured")
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback = EarlyBirdCallback()
    callback.on_train_begin(args, TrainerState(max_steps=750), TrainerControl(), model=model)
    eb = callback.earlybird
    assert (eb.every, eb.budget, eb.deadline, eb.window) == (10, 750, 0.3, 5)
    with pytest.raises(ConfigError, match="'auto', 'epoch' or a number"):
        EarlyBirdCallback(every="often")


def test_safe_checkpoints_resume_to_the_same_weights_without_a_pickle(tmp_path):
    """A Trainer with ``SafeCheckpoints`` (dropout on, so the random states matter) resumed from its step-2
    checkpoint ends where the uninterrupted run ends; its checkpoints hold no pickle, and a checkpoint whose
    optimizer state is a pickle is refused."""
    from transformers import Trainer, TrainingArguments

    from ebcompile.errors import CheckpointError
    from ebcompile.integrations import EarlyBirdCallback, SafeCheckpoints, safe_trainer_class

    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=torch.randint(2, VOCAB, (SEQ,), generator=g), attention_mask=torch.ones(SEQ, dtype=torch.long),
                 labels=torch.tensor(i % 2)) for i in range(24)]

    def run(out, resume=None):
        model = build("bert")
        model.config.hidden_dropout_prob = 0.1
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
        model = ebcompile.prepare(model, text_batch(), ratio=0.5, structure="structured")
        args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                                 report_to="none", save_strategy="steps", save_steps=2, logging_steps=100, use_cpu=True,
                                 disable_tqdm=True, seed=0)
        trainer = safe_trainer_class()(model=model, args=args, train_dataset=data)
        EarlyBirdCallback(every=1, window=2, threshold=1.0, deadline=None).attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "a", str(tmp_path / "a" / "checkpoint-2"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    files = {p.name for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert {"optimizer.safetensors", "scheduler.json", "rng_state.safetensors", "training_args.json"} <= files
    assert not {n for n in files if n.endswith((".pt", ".pth", ".bin"))}
    assert issubclass(safe_trainer_class(Trainer), SafeCheckpoints)
    pickled = tmp_path / "a" / "checkpoint-4"
    (pickled / "optimizer.safetensors").rename(pickled / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"holds pickles \(optimizer.pt\)"):
        run(tmp_path / "b", str(pickled))
    (pickled / "optimizer.pt").unlink()  # a checkpoint cut short: refused before its weights are loaded
    with pytest.raises(CheckpointError, match="incomplete"):
        run(tmp_path / "b", str(pickled))


def test_a_resumed_search_draws_by_the_deadline_of_this_runs_budget(tmp_path):
    """The saved search had a 10-step budget; resumed into a 40-step training, the deadline follows 40 steps."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    model = ebcompile.prepare(build("bert"), text_batch(), ratio=0.5, structure="structured")
    ebcompile.EarlyBird(model, every=1, budget=10, deadline=0.5).save(tmp_path / "search.safetensors")
    callback = EarlyBirdCallback(every=1, deadline=0.5, resume_from=tmp_path / "search.safetensors")
    state = TrainerState()
    state.max_steps = 40
    callback.on_train_begin(TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True), state,
                            TrainerControl(), model=model)
    assert callback.earlybird.budget == 40 and callback.earlybird.deadline_tick == 20
