"""The Hugging Face test-suite zoo: every model family of transformers' own tests through ebcompile, end to end.

    python bench/hf_zoo.py --suite /work/hf-tests                   # the folder holding transformers' tests/
    python bench/hf_zoo.py --suite DIR --families llama,gpt2 --rerun
    python bench/hf_zoo.py --suite DIR --fetch                      # sparse shallow clone of tests/ when online

Each family runs in its own process (one thread, ``--timeout`` seconds) through the stages of ``_zoo_stages.py``;
its row is cached in docs/zoo.json (a later run skips families already there unless ``--rerun``) and docs/ZOO.md
is rewritten from all rows after each family (``_zoo_report.py``). Invariant: one row per family, always with its
status, first failing stage and reason — a timeout or a crash of the child is a row too — and both files are
written whole (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from _zoo_report import markdown  # noqa: E402
from _zoo_stages import IMPORTANCE  # noqa: E402
from _zoo_suite import SuiteError, families, fetch_suite, suite_root  # noqa: E402

DECODERS = ("llama mistral qwen2 qwen3 gemma gemma2 gemma3 phi phi3 gpt2 gptj codegen gpt_bigcode gpt_neox falcon olmo "
            "olmo2 stablelm starcoder2 mixtral qwen2_moe qwen3_moe olmoe deepseek_v3 deepseek_v2 minicpm3 granite "
            "granitemoe cohere cohere2 bloom opt mpt gpt_neo persimmon glm glm4 helium exaone4 smollm3 "
            "ernie4_5 hunyuan_v1_dense seed_oss arcee apertus dbrx jetmoe phimoe").split()
ENCODERS = ("bert roberta deberta deberta_v2 electra distilbert albert xlm_roberta convbert big_bird funnel layoutlm "
            "layoutlmv3 mpnet camembert ernie modernbert nystromformer megatron_bert rembert roformer squeezebert "
            "mobilebert ibert xlm data2vec_text canine").split()
VISION = ("vit deit swin swinv2 beit dinov2 convnext convnextv2 vit_msn vit_mae data2vec_vision levit mobilevit "
          "segformer poolformer regnet resnet efficientnet pvt pvt_v2 focalnet cvt dinov2_with_registers dinov3_vit "
          "hiera ijepa siglip clip").split()


def order(available: list[str]) -> list[str]:
    first = [f for f in DECODERS + ENCODERS + VISION if f in available]
    return first + [f for f in available if f not in first]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def child(family: str, suite: Path, row_path: Path, importance: str = "magnitude", lora: bool = False) -> int:
    """The per-family process: one thread, quiet transformers, the row written after every stage."""
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    from _zoo_stages import run_family

    row = run_family(suite, family, lambda r: write_atomic(row_path, json.dumps(r)), importance, lora)
    return 0 if row["status"] == "pass" else 1


ENV = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
           TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")


def _spawned(family: str, suite: Path, row_path: Path, timeout: float, importance: str, lora: bool) -> tuple[int | None, str]:
    """A fresh interpreter per family (imports everything itself): (exit code or None on timeout, stderr)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--suite", str(suite), "--child", family, "--row", str(row_path),
           "--importance", importance] + (["--lora"] if lora else [])
    proc = subprocess.Popen(cmd, env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err or ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err or ""


def _forked(family: str, suite: Path, row_path: Path, timeout: float, importance: str, lora: bool) -> tuple[int | None, str]:
    """A fork of this (warmed-up, single-threaded) process per family: the suite's helpers are imported once."""
    err_path = row_path.with_name("stderr.txt")
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.setsid()
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            code = child(family, suite, row_path, importance, lora)
        except BaseException:  # noqa: BLE001 - the row already says the stage; the traceback goes to stderr.txt
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            code = None
            break
        time.sleep(0.05)
    return code, err_path.read_text(errors="replace") if err_path.is_file() else ""


def _warm(suite: Path) -> None:
    """Import torch, transformers, ebcompile and the suite's shared helpers once, single-threaded, before forking."""
    os.environ.update(ENV)
    import torch
    import transformers
    from _zoo_suite import warm_up

    import ebcompile  # noqa: F401

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warm_up(suite)


def run_one(family: str, suite: Path, timeout: float, fork: bool = False, importance: str = "magnitude",
            lora: bool = False) -> dict[str, Any]:
    """Run ``family`` in a child process; a timeout or crash becomes the row's reason at the stage it reached."""
    from _zoo_stages import new_row

    with tempfile.TemporaryDirectory(prefix="hf-zoo-") as tmp:
        row_path = Path(tmp) / "row.json"
        start = time.perf_counter()
        code, err = (_forked if fork else _spawned)(family, suite, row_path, timeout, importance, lora)
        note = (f"Timeout: over {timeout:.0f} s" if code is None else
                None if code in (0, 1) else f"Crash: child exited with {code}")
        try:
            row = json.loads(row_path.read_text())
        except (OSError, ValueError):
            row = new_row(family)
        if note is not None and row["status"] != "pass":
            tail = [line for line in (err or "").strip().splitlines() if line.strip()][-1:]
            row["reason"] = note + (f" (in stage {row['stage']})" if "Timeout" in note else f"; {tail[0][:200]}" if tail else "")
            row["where"] = ""
        row["seconds"] = round(time.perf_counter() - start, 1)
        return row


def source_of(suite: Path) -> str:
    note = suite / "SOURCE.txt"
    if note.is_file():
        return note.read_text().strip()
    try:
        rev = subprocess.run(["git", "-C", str(suite), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return f"transformers tests/ at {rev.stdout.strip()}"
    except (OSError, subprocess.CalledProcessError):
        return str(suite)


def _shown(path: Path) -> str:
    """``path`` as the report names it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default=os.environ.get("HF_ZOO_SUITE", str(Path.home() / ".cache" / "hf-tests")),
                   help="folder holding transformers' tests/ (default $HF_ZOO_SUITE or ~/.cache/hf-tests)")
    p.add_argument("--fetch", action="store_true", help="clone tests/ into --suite first when it is missing (online)")
    p.add_argument("--families", default="", help="comma-separated subset (default: every family, decoders first)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds per family")
    p.add_argument("--limit", type=int, default=0, help="run at most this many families not cached yet")
    p.add_argument("--rerun", action="store_true", help="run the chosen families again even when cached")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "zoo.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "ZOO.md")
    p.add_argument("--in-process", action="store_true", help="run families in this process (no timeout; debugging, tests)")
    p.add_argument("--spawn", action="store_true", help="a fresh interpreter per family instead of a fork of a warm one")
    p.add_argument("--importance", default="magnitude", choices=IMPORTANCE,
                   help="how the ticket ranks units; a data-aware kind first trains a few steps on the tester's inputs")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on every linear (peft) before prepare; compact's "
                   "result merged before it is compared, exported and saved")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        p.error("--jobs must be >= 1 and --timeout > 0")
    try:
        if args.fetch:
            fetch_suite(Path(args.suite).expanduser())
        suite = suite_root(args.suite)
    except (SuiteError, subprocess.CalledProcessError, OSError) as exc:
        print(f"hf_zoo: {exc}", file=sys.stderr)
        return 2
    if args.child:
        return child(args.child, suite, args.row, args.importance, args.lora)
    available = families(suite)
    chosen = [f.strip() for f in args.families.split(",") if f.strip()] or order(available)
    unknown = [f for f in chosen if f not in available]
    if unknown:
        print(f"hf_zoo: no tests/models/<family>/test_modeling_<family>.py for {', '.join(unknown)} in {suite}. "
              "Fix: use the folder names under tests/models/", file=sys.stderr)
        return 2
    rows: dict[str, dict[str, Any]] = {}
    if args.json.is_file():
        rows = {r["family"]: r for r in json.loads(args.json.read_text()).get("rows", [])}
    same = {f for f, r in rows.items()
            if r.get("importance", "magnitude") == args.importance and r.get("lora", False) == args.lora}
    todo = [f for f in chosen if args.rerun or f not in same]  # a row of another kind is not this run's
    todo = todo[:args.limit] if args.limit else todo
    command = ("python bench/hf_zoo.py --suite SUITE" + (f" --timeout {args.timeout:.0f}" if args.timeout != 90 else "")
               + (f" --importance {args.importance}" if args.importance != "magnitude" else "") + (" --lora" if args.lora else ""))
    meta = {"source": source_of(suite), "command": command}

    def publish() -> None:
        ordered = [rows[k] for k in sorted(rows)]
        write_atomic(args.json, json.dumps(dict(meta, rows=ordered), indent=1) + "\n")
        write_atomic(args.md, markdown(ordered, meta["source"], command, _shown(args.json)))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        if args.in_process:
            from _zoo_stages import run_family  # noqa: I001

            runs = map(lambda f: run_family(suite, f, importance=args.importance, lora=args.lora), todo)
        elif args.jobs == 1 and hasattr(os, "fork") and not args.spawn and todo:
            _warm(suite)
            runs = (run_one(f, suite, args.timeout, fork=True, importance=args.importance, lora=args.lora) for f in todo)
        else:
            runs = pool.map(lambda f: run_one(f, suite, args.timeout, importance=args.importance, lora=args.lora), todo)
        for i, row in enumerate(runs):
            rows[row["family"]] = row
            publish()
            print(f"[{i + 1}/{len(todo)}] {row['family']:24s} {row['status']:4s} {row['stage'] or '-':10s} "
                  f"{row['seconds']:5.1f}s {row['reason'][:110]}", flush=True)
    if not todo:
        publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
