"""Greedy generation in vLLM for ``save_for_serving`` folders: a script run by the *vLLM* environment's python.

vLLM pins its own torch, so it lives in its own virtual environment without ebcompile; the test
(``tests/test_serving.py``, ``EBCOMPILE_VLLM_PYTHON``) and ``bench/serve_vllm.py`` run this file there by path:
``python vllm_run.py JOB.json``. It imports the standard library and vLLM only. ``JOB.json``:
``{"runs": [{"folder", "prompts": [[ids]], "max_tokens", "repeats"}], "max_model_len", "kv_cache_gib"}``; it prints one
line ``RESULT {json}``: per run the generated ids of every prompt and, per repeat after a warm-up, the seconds that
``generate`` took and the tokens it produced. Every run is greedy (temperature 0), ignores EOS, runs eagerly in
float32 on the CPU backend (``VLLM_CPU_KVCACHE_SPACE``, one engine in this process), and loads DeciLM folders with
``trust_remote_code=True`` (their ``configuration_decilm.py``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    results = []
    for spec in job["runs"]:
        llm = LLM(model=spec["folder"], skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                  max_model_len=job.get("max_model_len", 256), trust_remote_code=True, seed=0,
                  max_num_seqs=max(1, len(spec["prompts"])))
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False)
        prompts = [{"prompt_token_ids": list(p)} for p in spec["prompts"]]
        outs = llm.generate(prompts, params, use_tqdm=False)  # also the warm-up
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        timings = []
        for _ in range(int(spec.get("repeats", 0))):
            start = time.perf_counter()
            again = llm.generate(prompts, params, use_tqdm=False)
            timings.append({"seconds": time.perf_counter() - start,
                            "tokens": sum(len(o.outputs[0].token_ids) for o in again)})
        results.append({"folder": spec["folder"], "tokens": tokens, "timings": timings})
        del llm
        gc.collect()
    return {"runs": results}


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 1)))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    print("RESULT " + json.dumps(run(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
