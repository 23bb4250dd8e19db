"""Text classification for the search and retrain recipes: data, model + tokenizer, a Trainer, accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import looks_local
from ..errors import CheckpointError, ConfigError

Split = tuple[list[str], list[int]]
LR = 5e-5  # text default: fine-tuning a pretrained model


def load_texts(spec: str, train_limit: int | None = None) -> tuple[Split, Split]:
    """(train, validation) texts and labels from an MR-style folder or a ``datasets`` hub name."""
    from ..data import load_polarity

    folder = Path(spec)
    if (folder / "rt-polarity.pos").is_file() and (folder / "rt-polarity.neg").is_file():
        try:
            xtr, ytr, xva, yva = load_polarity(folder)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"--data {spec}: cannot read it ({type(exc).__name__}: {str(exc)[:120]}). Fix: pass a "
                              "readable MR polarity folder (one sentence per line in rt-polarity.pos / .neg).") from exc
    elif folder.exists():
        raise CheckpointError(f"{spec} has no rt-polarity.pos / rt-polarity.neg. Fix: pass the MR polarity folder "
                              "(e.g. ../shared/data/mr-polarity) or a datasets hub name.")
    elif looks_local(spec, hub_ids=True):
        raise ConfigError(f"--data {spec}: no such folder. Fix: check the path (a hub name has no ./, ../, / or ~ "
                          "in front).")
    else:
        xtr, ytr, xva, yva = _hub_texts(spec)
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0)).tolist()  # hub splits come sorted
        xtr, ytr = [xtr[i] for i in order], [ytr[i] for i in order]
    if train_limit is not None:
        if train_limit < 2:
            raise ConfigError(f"--train-limit {train_limit} is too small. Fix: pass at least 2 (or leave it out).")
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    check_split("training", spec, xtr, ytr)
    check_split("validation", spec, xva, yva)
    return (xtr, ytr), (xva, yva)


def check_split(what: str, spec: str, texts: list, labels: list) -> None:
    """Data fit to train a classifier on: not empty, integer labels >= 0, at least two classes (training)."""
    if not texts or len(texts) != len(labels):
        raise ConfigError(f"--data {spec}: the {what} split is empty. Fix: pass data with examples in both files.")
    if any(isinstance(y, bool) or not isinstance(y, int) or y < 0 for y in labels):
        raise ConfigError(f"--data {spec}: {what} labels must be integers >= 0. Fix: pass a text classification data set.")
    if what == "training" and len(set(labels)) < 2:
        raise ConfigError(f"--data {spec}: every training example has label {labels[0]}; a classifier needs two classes "
                          "at least. Fix: pass data with both positive and negative examples.")


def _hub_texts(name: str) -> tuple[list[str], list[int], list[str], list[int]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--data {name}: no such folder, and hub data sets need the datasets package. "
                          "Fix: pip install datasets (and be online), or pass a local MR-style folder.") from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, ...
        raise ConfigError(f"--data {name}: cannot load it ({type(exc).__name__}). Fix: check the name and the network, "
                          "or pass a local MR-style folder.") from exc
    if "train" not in ds:
        raise ConfigError(f"--data {name}: the data set has no train split (has {sorted(ds)}). Fix: pick a text "
                          "classification data set such as imdb.")
    val = next((s for s in ("validation", "test") if s in ds), None)
    text = next((c for c in ("text", "sentence") if c in ds["train"].column_names), None)
    if val is None or text is None or "label" not in ds["train"].column_names:
        raise ConfigError(f"--data {name}: expected train + validation/test splits with text/sentence and label columns. "
                          "Fix: pick a text classification data set such as imdb.")
    return list(ds["train"][text]), list(ds["train"]["label"]), list(ds[val][text]), list(ds[val]["label"])


def label_count(train: Split, val: Split) -> int:
    return max(max(train[1]), max(val[1], default=0)) + 1


def load_classifier(source: str, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """A sequence classifier and its tokenizer from a folder or hub name (a pad token is set if missing);
    ``num_labels=None`` keeps the saved head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..persist.hfload import NO_CODE, NO_PICKLE, quiet_transformers, read_folder, refuse_custom_code
    from ..persist.hub import hub_kwargs

    if looks_local(source, hub_ids=True) and not Path(source).expanduser().exists():
        raise CheckpointError(f"{source}: no such folder. Fix: check the path, or pass a hub name when online.")
    raw = read_folder(source)  # bounded JSON; no code from the folder runs (NO_CODE)
    hub = {} if Path(source).expanduser().exists() else hub_kwargs(source)  # offline or unreachable: at once
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source, **hub, **NO_CODE)
            kw = {} if num_labels is None else {"num_labels": num_labels}
            model = AutoModelForSequenceClassification.from_pretrained(source, **kw, **hub, **NO_PICKLE)
    except Exception as exc:  # noqa: BLE001 - missing folder, no tokenizer, offline hub name
        refuse_custom_code(source, exc, raw)
        raise CheckpointError(f"{source}: cannot load a tokenizer and sequence classifier ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]}). Fix: pass a save_pretrained folder with its tokenizer, "
                              "or a hub name when online.") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


class Encoded(torch.utils.data.Dataset):
    """Tokenized on access; the Trainer's collator pads each batch."""

    def __init__(self, tok: Any, split: Split, max_len: int) -> None:
        self.tok, (self.texts, self.labels), self.max_len = tok, split, max_len

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.tok(self.texts[i], truncation=True, max_length=self.max_len)
        item["labels"] = int(self.labels[i])
        return dict(item)


def example_batch(tok: Any, split: Split, max_len: int) -> dict[str, torch.Tensor]:
    return dict(tok(split[0][:2], padding=True, truncation=True, max_length=max_len, return_tensors="pt"))


def trainer(model: nn.Module, tok: Any, train: Split, args: Any, out: Path, callbacks: list | None = None,
            save_every: int | None = None, optimizer: torch.optim.Optimizer | None = None):
    """A Trainer (AdamW, linear decay; or ``optimizer``'s own settings) whose checkpoints, every ``save_every`` steps
    (None: none), hold no pickle."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    from ..integrations.safe_checkpoints import safe_trainer_class

    if args.epochs <= 0 or args.batch < 1 or args.max_len < 1:
        raise ConfigError("--epochs, --batch and --max-len must be positive. Fix: e.g. --epochs 3 --batch 32 --max-len 128.")
    targs = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
                              learning_rate=LR if args.lr is None else args.lr, weight_decay=0.01, report_to="none",
                              save_strategy="no" if save_every is None else "steps", save_steps=save_every or 500, save_total_limit=2,
                              logging_steps=50, seed=args.seed, use_cpu=not torch.cuda.is_available())
    return safe_trainer_class()(model=model, args=targs, train_dataset=Encoded(tok, train, args.max_len),
                   data_collator=DataCollatorWithPadding(tok), callbacks=callbacks, optimizers=(optimizer, None))


def accuracy(model: nn.Module, tok: Any, split: Split, max_len: int, batch: int = 64) -> float:
    model.eval()
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for i in range(0, len(split[0]), batch):
            enc = tok(split[0][i:i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
            right += int((model(**enc).logits.argmax(-1).cpu() == torch.tensor(split[1][i:i + batch])).sum())
    return right / max(1, len(split[0]))


def save_pretrained_atomically(model: nn.Module, tok: Any, folder: Path) -> None:
    """``model`` and ``tok`` in ``folder``, written beside it and committed (``savedir``: no half-written folder,
    and files a save did not write stay)."""
    from ..persist.savedir import atomic_dir

    with atomic_dir(folder, marker="config.json") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
