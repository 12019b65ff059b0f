"""The local evaluation suite (benchmarks/eval/) through lm-evaluation-harness, per decoder.

Runs `twotower_nextline` (multiple choice: exact log-likelihoods from the context tower, so the
decoder plays no part and every decoder scores the same) and `twotower_complete` (generate-until:
each decoder writes the completions) with lm_eval's own `simple_evaluate`, in this process, for
AR, speculative and mask diffusion at threshold 0.8, and reports each score with its retention
against AR (mode / AR), next to the benchmark's agreement / NLL retention.
"""

from __future__ import annotations

import time
from pathlib import Path

SUITE = Path(__file__).resolve().parent / "eval"
TASKS = ("twotower_nextline", "twotower_complete")
METRICS = {"twotower_nextline": ("acc", "acc_norm"), "twotower_complete": ("first_line_exact", "edit_similarity")}
# name -> model_args of `--model twotower` beyond pretrained
DECODERS = {"ar": {"decoder": "ar"}, "spec_b16": {"decoder": "speculative", "block_size": 16},
            "diff_t0.8_b16": {"decoder": "diffusion", "threshold": 0.8, "block_size": 16, "steps_per_block": 16}}


def run_suite(model_dir: str, *, limit: int | None = None, batch_size: int = 8) -> dict:
    """{"decoders": {name: {task: {metric: value}}, ...}, "retention": {...}, "limit": ..., "seconds": ...}.

    Raises ImportError naming the `[eval]` extra when lm_eval is not installed."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"the evaluation suite needs lm-evaluation-harness: pip install -e \".[eval]\" ({e})") from e
    from twotower.evaluation.harness import TwoTowerEvalLM

    manager = TaskManager(include_path=str(SUITE))
    scores, extra, seconds = {}, {}, {}
    for name, settings in DECODERS.items():
        # Log-likelihood tasks do not involve the decoder: score them once, with the first decoder.
        tasks = list(TASKS) if not scores else [t for t in TASKS if t != "twotower_nextline"]
        start = time.perf_counter()
        lm = TwoTowerEvalLM(pretrained=model_dir, batch_size=batch_size, **settings)
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                              bootstrap_iters=0, log_samples=False)
        seconds[name] = time.perf_counter() - start
        scores[name] = {t: {m: float(out["results"][t][f"{m},none"]) for m in METRICS[t]} for t in tasks}
        if "twotower_nextline" not in scores[name]:
            scores[name]["twotower_nextline"] = dict(next(iter(scores.values()))["twotower_nextline"])
        extra[name] = {k: v for k, v in lm.get_model_info().items() if k.startswith("twotower_tokens")}
        print(f"  eval suite {name}: " + ", ".join(f"{t.removeprefix('twotower_')} {m} {v:.3f}"
                                                  for t, ms in scores[name].items() for m, v in ms.items()), flush=True)
    retention = {name: {t: {m: (v / scores["ar"][t][m] if scores["ar"][t][m] else None) for m, v in ms.items()}
                         for t, ms in per.items()} for name, per in scores.items()}
    return {"decoders": scores, "retention": retention, "speed": extra, "seconds": seconds, "limit": limit}


def render(suite: dict, h: str) -> list[str]:
    """The markdown section for `report.render_markdown`."""
    lim = suite["limit"]
    L = [f"{h}# Evaluation suite (lm-evaluation-harness)", "",
         "`benchmarks/eval/`: next-line multiple choice (200 held-out stdlib spots, 4 candidates; scored by the "
         "context tower's exact log-likelihoods, so identical for every decoder) and function-body completion "
         "(68 held-out functions, greedy, `until` = the next def / class / blank lines, max 128 tokens; first-line "
         "exact match and edit similarity of the body)" + (f", first {lim} documents per task" if lim else "")
         + ". ret. = decoder / AR.", "",
         "| decoder | nextline acc | acc_norm | complete first-line exact | ret. | edit similarity | ret. "
         "| tok/forward | tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    for name, per in suite["decoders"].items():
        ret, sp = suite["retention"][name]["twotower_complete"], suite["speed"].get(name, {})
        c, n = per["twotower_complete"], per["twotower_nextline"]
        L.append(f"| {name} | {f(n['acc'])} | {f(n['acc_norm'])} | {f(c['first_line_exact'])} "
                 f"| {f(ret['first_line_exact'], '.1%')} | {f(c['edit_similarity'])} | {f(ret['edit_similarity'], '.1%')} "
                 f"| {f(sp.get('twotower_tokens_per_forward'), '.2f')} | {f(sp.get('twotower_tokens_per_second'), '.1f')} |")
    return L + [""]
