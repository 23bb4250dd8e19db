"""What ebcompile adds to a training step: plain vs prepared vs applied ticket (masked) vs compacted ticket.

    python bench/train_overhead.py            # small ViT on MNIST-sized inputs and a small HF RoBERTa, CPU

For each model, one optimizer step (AdamW, forward + backward + step) of: the plain model; the prepared one
(masks inserted, all ones: the search phase); the same with a structured p = 0.3 ticket applied (masked
training, the "continue" flow); and the compacted ticket. Plus the cost of one EarlyBird check (drawing the
masks, measuring the distance). Steps are timed interleaved, round-robin, and reported as medians and as
ratios to the plain step measured in the same rounds. Writes the ``train_overhead`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402

from _sections import publish  # noqa: E402


def _vit() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=256, num_classes=10)
    return model, torch.randn(64, 3, 28, 28), torch.randint(0, 10, (64,))


def _roberta() -> tuple[nn.Module, dict, torch.Tensor]:
    import transformers as tf

    cfg = tf.RobertaConfig(vocab_size=4000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=34, pad_token_id=1, type_vocab_size=1, num_labels=2)
    ids = torch.randint(3, 4000, (64, 32))
    return tf.RobertaForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 2, (64,))


MODELS = {"small ViT (b64, 17 tokens)": _vit, "small RoBERTa (b64 x 32 tokens)": _roberta}


def _stepper(model: nn.Module, x, y) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(**x) if isinstance(x, dict) else model(x)
        loss = F.cross_entropy(getattr(out, "logits", out), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def measure(build, rounds: int, per_round: int) -> dict[str, float]:
    torch.manual_seed(0)
    plain, x, y = build()
    example = {k: v[:2] for k, v in x.items()} if isinstance(x, dict) else x[:2]
    prepared = ebcompile.prepare(copy.deepcopy(plain), example, ratio=0.3, structure="structured")
    masked = copy.deepcopy(prepared)
    ebcompile.apply_ticket(masked, ebcompile.draw_ticket(masked))
    compact = ebcompile.compact(masked)
    eb = ebcompile.EarlyBird(prepared, every=1)
    steps = {"plain": _stepper(plain, x, y), "prepared (masks all ones)": _stepper(prepared, x, y),
             "ticket applied (masked)": _stepper(masked, x, y), "compacted ticket": _stepper(compact, x, y),
             "one EarlyBird check": eb.check}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - start) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def weight_read_us(reads: int = 200_000) -> dict[str, float]:
    """Microseconds per read of a masked weight attribute: plain, all-ones fast path, and torch's parametrization call."""
    import timeit

    from ebcompile.passes import masks

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    fast = ebcompile.prepare(mlp(), torch.randn(2, 8))
    wrap, masks._fast_path = masks._fast_path, lambda cls, attr: None  # the parametrization as torch runs it
    try:
        slow = ebcompile.prepare(mlp(), torch.randn(2, 8))
    finally:
        masks._fast_path = wrap
    out = {}
    for name, model in (("plain nn.Linear", mlp()), ("prepared, all-ones fast path", fast), ("prepared, torch parametrization", slow)):
        out[name] = timeit.timeit(lambda m=model: m[0].weight, number=reads) / reads * 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = ["| model | configuration | ms per step | ratio to plain |", "|---|---|---|---|"]
    for label, build in MODELS.items():
        med = measure(build, a.rounds, a.per_round)
        for name, sec in med.items():
            rows.append(f"| {label} | {name} | {sec * 1e3:.2f} | {sec / med['plain']:.3f} |")
    reads = weight_read_us()
    rows += ["", "| weight attribute read | µs per read |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in reads.items()]
    header = (f"## Training-step overhead\n\nMeasured {time.strftime('%Y-%m-%d')} on the CPU ({a.threads} torch thread(s), a 2-core "
              f"machine shared with other jobs; no GPU) by `python bench/train_overhead.py`: median of {a.rounds} rounds of "
              f"{a.per_round} AdamW steps, the configurations interleaved round-robin so that load changes hit them alike. "
              "Structured p = 0.3 ticket; the EarlyBird check row is one `check()` (draw masks + distance) against one step. "
              "Target: the prepared model within 3% of plain. While every mask is all ones the masked attribute read returns "
              "the stored tensor directly (`ebcompile/passes/masks.py`), so the prepared model runs the plain model's ops; "
              "the second table shows what one read costs through torch's parametrization call instead (every masked weight and "
              "bias is read at least once per forward).")
    publish("benchmarks.md", "train_overhead", header, "\n".join(rows), write=not a.no_write)


if __name__ == "__main__":
    main()
