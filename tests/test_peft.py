"""PEFT / LoRA models: prepare the PeftModel itself, search with data-aware importance while only the adapters
train, compact into a smaller model whose adapters are sliced with their base layers, merge, save and reload."""

from __future__ import annotations

import pytest
import torch

import ebcompile
from ebcompile.errors import ImportanceDataError

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")


def lora_llama(seed: int = 0, targets="all-linear"):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=3, head_dim=8)
    return peft.get_peft_model(tf.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def lora_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    lc = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1,
                         target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"])
    return peft.get_peft_model(tf.BertForSequenceClassification(cfg), lc)


def inputs(model, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 8), generator=g)
    labels = ids if model.config.model_type == "llama" else torch.randint(0, 2, (4,), generator=g)
    return {"input_ids": ids, "labels": labels}


def search(model, kind: str, steps: int = 6, **prep):
    batch = inputs(model)
    ebcompile.prepare(model, {"input_ids": batch["input_ids"]}, ratio=0.5, importance=kind, **prep)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    eb = ebcompile.EarlyBird(model, every=2, window=2, deadline=None)
    for i in range(steps):
        model(**inputs(model, seed=i)).loss.backward()
        if kind == "gate":
            ebcompile.add_gate_penalty_grad(model, 1e-3)
        opt.step()
        opt.zero_grad()
        eb.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # base stays frozen
    return opt, eb


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("build", "kind"), [(lora_llama, "activation"), (lora_bert, "gate")])  # each kind, each family
def test_lora_search_compacts_merges_and_reloads(build, kind, tmp_path):
    model = build()
    opt, eb = search(model, kind)
    plan = model._ebcompile.plan
    assert {g.kind for g in plan.groups} == {"head", "neuron"}
    assert not any("lora_A" in g.name for g in plan.groups)  # an adapter's rank is never a unit
    heads = [g for g in plan.groups if g.kind == "head"]
    assert all(any(".lora_B." in m.tensor for m in g.members) for g in heads)  # adapters follow the base heads
    assert all(p.requires_grad == ("lora_" in n or ".gates." in n or "modules_to_save" in n)
               for n, p in model.named_parameters())
    ebcompile.apply_ticket(model, eb.ticket or ebcompile.draw_ticket(model))
    model.train()
    small = ebcompile.compact(model, round_to=None, optimizer=opt)
    assert all(p.requires_grad == ("lora_" in n or "modules_to_save" in n) for n, p in small.named_parameters())
    assert small.training and all(m.training for m in small.modules())  # compact keeps the train mode
    ids = inputs(model, seed=9)["input_ids"]
    masked = logits(model, ids)
    torch.testing.assert_close(logits(small, ids), masked, atol=1e-5, rtol=1e-4)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < 0.8 * sum(p.numel() for p in build().parameters())
    small.train()
    small(**inputs(small)).loss.backward()  # the compact adapters still train, with the carried optimizer
    opt.step()
    opt.zero_grad()
    masked = logits(small, ids)
    merged = small.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), masked, atol=1e-5, rtol=1e-4)
    ebcompile.save(merged, tmp_path / "merged")
    torch.testing.assert_close(logits(ebcompile.load(tmp_path / "merged"), ids), masked, atol=1e-5, rtol=1e-4)


def test_uniform_lora_ticket_reloads_in_stock_transformers_and_adapters_reload_in_peft(tmp_path):
    model = lora_llama()
    search(model, "activation", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    ids = inputs(model, seed=9)["input_ids"]
    masked = logits(model, ids)
    small.save_pretrained(tmp_path / "adapter")  # PEFT's own adapter folder, sliced like the base
    assert not (tmp_path / "adapter" / "ebcompile.json").exists()
    base = small.unload()  # the compact base without adapters
    assert base.config.num_attention_heads < 6 and base.config.intermediate_size < 80  # one config says the compact sizes
    base.save_pretrained(tmp_path / "base")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    again = peft.PeftModel.from_pretrained(stock, tmp_path / "adapter")
    torch.testing.assert_close(logits(again, ids), masked, atol=1e-5, rtol=1e-4)


def test_merged_lora_ticket_exports_to_onnx(tmp_path):
    model = lora_bert()
    search(model, "activation")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    merged = ebcompile.compact(model).merge_and_unload()
    ebcompile.export_onnx(merged, tmp_path / "m.onnx", {"input_ids": inputs(model)["input_ids"]})
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_taylor_with_frozen_base_weights_names_the_fix_and_changes_nothing():
    model = lora_llama(targets=["q_proj", "v_proj"])
    batch = inputs(model)
    ebcompile.prepare(model, {"input_ids": batch["input_ids"]}, ratio=0.5, importance="taylor")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    eb = ebcompile.EarlyBird(model, every=1, deadline=None)
    model(**batch).loss.backward()
    opt.step()
    with pytest.raises(ImportanceDataError, match="activation"):
        eb.step()
    assert eb.checks == 0


def test_unstructured_masks_never_touch_the_adapters():
    model = lora_llama()
    ebcompile.prepare(model, {"input_ids": inputs(model)["input_ids"]}, structure="unstructured")
    masked = {op.weight for op in model._ebcompile.plan.linears}
    assert masked and not any("lora_" in w for w in masked)
    assert all("adapter of" in model._ebcompile.plan.skipped[n] for n, _ in model.named_modules() if n.endswith("lora_A.default"))


@pytest.mark.parametrize("config, kind", [
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), "DoRA"),
    (lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]), "LoHa"),
    (lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]), "LoKr"),
])
def test_adapters_whose_update_cannot_be_sliced_are_named_before_anything_changes(config, kind):
    model = peft.get_peft_model(lora_llama().unload(), config())  # the plain Llama, these adapters on it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ebcompile.errors.ConfigError, match=f"{kind}.*Fix: use LoRA"):
        ebcompile.prepare(model, inputs(model), ratio=0.3, structure="structured", importance="activation")
    assert getattr(model, "_ebcompile", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
