"""docs/ZOO.md from the zoo rows: the summary, the failure causes grouped by reason, then one line per family.

Invariant: every number in the page is counted from the rows given; nothing is typed in by hand.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

_ORDER = ("head", "kv", "expert", "neuron")


def skipped(row: dict[str, Any]) -> bool:
    """A test module without a ModelTester (integration tests only): not a failure, nothing to build."""
    return row["status"] == "skip" or (row["stage"] == "load" and "has no TestCase using ModelTesterMixin" in row["reason"])


def dense_ok(row: dict[str, Any]) -> bool:
    return row["status"] == "pass" or row["stage"] not in ("load", "dense")


def cut_heads(row: dict[str, Any]) -> bool:
    cut = row.get("cut") or {}
    return cut.get("head", 0) + cut.get("kv", 0) + cut.get("expert", 0) > 0


def exact(row: dict[str, Any]) -> bool:
    return row["status"] == "pass" or row["stage"] in ("onnx", "save_load")


def cause(row: dict[str, Any]) -> str:
    """The failure with family-specific words blurred: numbers -> N, quoted names -> '…', class names of the family
    -> <Model>, so that one library limitation groups across families."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", row["reason"])
    text = re.sub(r" in (a module|[\w.]+ \(\w+\))", " in <module>", text)
    prefix = re.sub(r"(Model|For\w+)$", "", row.get("model_class") or "") or "\0"
    text = re.sub(rf"\b{re.escape(prefix)}\w*", "<Model>", text, flags=re.IGNORECASE) if len(prefix) > 2 else text
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    both = " [dense ONNX fails too]" if row["stage"] == "onnx" and row.get("dense_onnx") != "ok" else ""
    return f"{row['stage']}{both}: {text[:160]}"


def coarse(row: dict[str, Any]) -> str:
    """Stage, exception type and the type of the exception it wraps (``ExportError(UnsupportedOperatorError)``)."""
    types = re.findall(r"\b(\w+(?:Error|Exception|Expired))\b", row["reason"])
    outer = row["reason"].split(":", 1)[0]
    inner = next((t for t in types if t != outer), "")
    both = " [dense ONNX fails too]" if row["stage"] == "onnx" and row.get("dense_onnx") != "ok" else ""
    return f"{row['stage']}{both}: {outer}" + (f"({inner})" if inner else "")


def summary(rows: list[dict[str, Any]]) -> list[str]:
    skips = [r for r in rows if skipped(r)]
    rows = [r for r in rows if not skipped(r)]
    dense = [r for r in rows if dense_ok(r)]
    found_heads = [r for r in dense if sum((r.get("found") or {}).get(k, 0) for k in ("head", "kv", "expert"))]
    heads = [r for r in dense if cut_heads(r)]
    neurons = [r for r in dense if (r.get("cut") or {}).get("neuron", 0) > 0]
    both_exact = [r for r in heads if r in neurons and exact(r)]
    any_exact = [r for r in dense if exact(r)]
    onnx_dense = [r for r in rows if r.get("dense_onnx") == "ok"]
    onnx_both = [r for r in onnx_dense if r["status"] == "pass" or r["stage"] == "save_load"]
    attending = [r for r in dense if r.get("attention")]
    attending_both = [r for r in attending if r in both_exact]
    one_head = [r for r in attending if r not in both_exact and r.get("max_heads") == 1]
    passed = [r for r in rows if r["status"] == "pass"]
    stops = Counter(r["stage"] for r in onnx_dense if r not in onnx_both)
    failed_export = [r for r in rows if r["status"] == "fail" and r["stage"] == "onnx"]
    return [
        f"- **{len(rows)} families run; {len(passed)} pass every stage** ({len(skips)} more have no ModelTester: "
        f"{', '.join(r['family'] for r in skips) or 'none'}).",
        f"- Of the **{len(dense)}** whose dense model builds and runs: **{len(found_heads)}** have heads, KV groups or "
        f"experts found, **{len(heads)}** prune some at p = 0.3 (one global {_kind(rows)} ranking over heads and neurons), "
        f"**{len(neurons)}** prune FFN neurons, **{len(both_exact)}** do both and compact exactly (compact ≡ masked; "
        f"counted by what compact removed, {sum(bool(r.get('held')) for r in dense)} hold some module whole); "
        f"{len(any_exact)} compact exactly whatever they prune."
        + (f" Of the **{len(attending)}** whose dense forward computes attention (scaled dot-product attention, or a "
           f"softmax next to a batched product; the others are CNNs, state-space models, codecs: no heads to find), "
           f"**{len(attending_both)}** ({100 * len(attending_both) / len(attending):.1f}%) do both"
           + (f"; {len(one_head)} of the others have one head per attention module in their tester config (no head "
              f"to cut: {', '.join(r['family'] for r in one_head)})" if one_head else "") + "."
           if attending else ""),
        f"- Of the **{len(onnx_dense)}** whose dense model exports to ONNX (verified): **{len(onnx_both)}** export the "
        "compact model and verify; the others stop at " + (", ".join(f"{s} ({n})" for s, n in stops.most_common()) or "none")
        + f". Of the {len(failed_export)} families whose compact export fails, "
        f"{sum(r.get('dense_onnx') != 'ok' for r in failed_export)} fail the dense export too.",
    ]


def causes(rows: list[dict[str, Any]], key: Any = cause) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "pass" and not skipped(r):
            groups[key(r)].append(r["family"])
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def _units(d: dict[str, int] | None) -> str:
    d = d or {}
    return " / ".join(f"{d[k]} {k}" for k in _ORDER if d.get(k)) or "–"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _kind(rows: list[dict[str, Any]]) -> str:
    """The importance kind the rows' tickets were drawn with (rows of a ``--importance`` run say it)."""
    return next((r["importance"] for r in rows if r.get("importance")), "magnitude")


def markdown(rows: list[dict[str, Any]], source: str, command: str, json_name: str = "docs/zoo.json") -> str:
    rows = sorted(rows, key=lambda r: r["family"])
    kind, lora = _kind(rows), any(r.get("lora") for r in rows)
    trained = (f" → three AdamW steps on the mean square of its outputs (so that `{kind}` has data to rank by)"
               if kind != "magnitude" else "")
    out = ["# The Hugging Face test-suite zoo" + (f": importance={kind}" if kind != "magnitude" else "")
           + (", LoRA" if lora else ""), "",
           "Every family of transformers' own test suite (`tests/models/<family>/test_modeling_<family>.py`), built "
           "from its `ModelTester`'s tiny config and `prepare_config_and_inputs_for_common()`, through dense forward → "
           "dense ONNX export (baseline) → "
           + ("LoRA adapters on every linear (peft, r = 4, the base frozen) → " if lora else "")
           + f"`prepare(structure=\"structured\", importance=\"{kind}\")`{trained} → {kind} ticket at p = 0.3 → "
           "`compact(round_to=None)` (its self-check)" + (" → `merge_and_unload()`" if lora else "")
           + " → compact ≡ masked on the example inputs → verified ONNX export "
           f"of the compact model → `save`/`load` round trip. Written by `bench/hf_zoo.py` (rows: {json_name}).", "",
           f"Suite: {source}. Command: `{command}`.", "", "## Summary", ""]
    out += summary(rows)
    for title, key in (("by stage and exception type", coarse), ("by stage and reason", cause)):
        out += ["", f"## Failure causes ({title}, most families first)", "",
                "| families | stage: reason | which |", "|---|---|---|"]
        for text, fams in causes(rows, key):
            out.append(f"| {len(fams)} | {_cell(text)} | {', '.join(fams[:12])}{' …' if len(fams) > 12 else ''} |")
    held = [r for r in rows if r.get("held")]
    if held:
        out += ["", "## Modules compact held whole", "",
                "Their forward failed with units cut (a width no attribute rewrite or traced reshape rewrite reaches, "
                "e.g. a cache object in the example call that a trace cannot record, or features the rewrite cannot "
                "place); compact kept their units (zeros where the ticket cut) and cut the rest.", "",
                "| family | linears held | first |", "|---|---|---|"]
        out += [f"| {r['family']} | {len(r['held'])} | `{r['held'][0]}` |" for r in held]
    out += ["", "## Per family", "",
            "Units: `head` attention heads, `kv` whole KV groups (grouped-query attention), `expert` MoE experts, "
            "`neuron` FFN neurons (a Mamba-2 mixer's SSM heads sharing B/C groups count as `kv`). *Cut* counts the "
            "units `compact` removed: a module whose forward cannot take fewer units is held whole and its ticket "
            "cuts stay as zeros, counted in neither column. *Stage* is the first stage that failed.", "",
            "| family | status | stage | class | found | cut | dense ONNX | s | reason |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        onnx = r.get("dense_onnx") or ""
        onnx = "ok" if onnx == "ok" else ("fail" if onnx else "–")
        out.append(f"| {r['family']} | {r['status']} | {r['stage'] or '–'} | {r.get('model_class') or ''} | "
                   f"{_units(r.get('found'))} | {_units(r.get('cut'))} | {onnx} | {r.get('seconds', 0):.0f} | "
                   f"{_cell(r.get('reason') or '')[:200]} |")
    return "\n".join(out) + "\n"
