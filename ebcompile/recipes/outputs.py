"""What the text and image searches (``recipes/text.py``, ``recipes/image.py``) share at both ends of a run: the
check that a resumed search keeps its saved settings, and the ticket and ``search.json`` a finished one writes.

Invariant: a resume with other settings is refused (``ConfigError``) before anything in ``--out`` changes;
``search.json`` is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..persist.io import atomic_path
from .settings import SearchSettings

__all__ = ["refuse_other_settings", "finish"]


def refuse_other_settings(out: Path, saved: dict[str, Any], settings: dict[str, Any], keys: tuple[str, ...]) -> None:
    """``ConfigError`` naming the settings of the search saved in ``out`` that this run changes (a resume needs them
    equal; only ``--epochs`` may change)."""
    changed = [k for k in keys if saved.get(k) != settings[k]]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        raise ConfigError(f"{out} holds a search with other settings ({was}). Fix: pass the same settings to resume it "
                          "(only --epochs may change), or a new --out.")


def finish(args: SearchSettings, out: Path, eb: Any, result: dict[str, Any], step: int, longer: str) -> int:
    """Write the ticket and ``search.json`` of a finished search and say what to do next; 1 when no ticket appeared."""
    if eb.found:
        eb.ticket.save(out / "ticket.safetensors")
        result["found_at"] = eb.ticket.found_at
    with atomic_path(out / "search.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    if not eb.found:
        print(f"no ticket within {step} steps ({eb.checks} checks; distances in {out / 'search.json'}). {longer}, check "
              "more often (--every) or loosen --threshold.")
        return 1
    how = "by the deadline (--deadline)" if eb.ticket.found_at.get("by") == "deadline" else "by the rule"
    print(f"ticket found {how} at step {eb.ticket.found_at['tick']} ({eb.checks} checks), validation accuracy of the early-bird "
          f"model {result['validation_accuracy']:.2%}; pruned {eb.ticket.sparsity():.1%} of the {args.structure} units.")
    print(f"written to {out}/ (model/, ticket.safetensors, earlybird.safetensors, search.png). "
          f"Next: ebcompile retrain {out} --data {args.data} --out <folder>")
    return 0
