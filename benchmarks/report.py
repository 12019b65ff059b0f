"""The benchmark's outputs: bench.json (every raw number), bench.md (the tables), the README's
Results section, and tradeoff.png (quality retention against throughput).

`write_results` writes them in that order: the tables and the JSON cost nothing to write and
are the run's whole value, so they exist before the plot is attempted. The plot needs
matplotlib (the `bench` extra); without it `write_results` raises `PlotUnavailable`, whose
message names the extra and the command that redraws the plot from the saved JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from torch import Tensor

from twotower.evaluation import AGREEMENT_TOKENS

from .summary import diffusion_against_target, summarize_runs

__all__ = ["TARGET_RETENTION", "TARGET_SPEEDUP", "README_START", "README_END", "PlotUnavailable", "render_markdown",
           "plot_tradeoff", "update_readme", "write_results"]

TARGET_RETENTION, TARGET_SPEEDUP = 0.987, 2.42  # NVIDIA's headline (threshold 0.8, block 16)
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
INSTALL_HINT = 'pip install -e ".[bench]"'


class PlotUnavailable(RuntimeError):
    """matplotlib is missing: the tables and JSON were written, the plot was not."""


def _f(v, fmt: str = ".3f", missing: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, fmt)


def _mib(v) -> str:
    return _f(None if v is None else v / 2**20, ".2f")


def _m(s: dict | None, fmt: str = ".2f", missing: str = "n/a") -> str:
    """A `summary.spread` as "mean (min-max)", or the mean alone when one seed gave it."""
    if s is None:
        return missing
    if s["n"] == 1 or s["min"] == s["max"]:
        return _f(s["mean"], fmt, missing)
    return f"{_f(s['mean'], fmt)} ({_f(s['min'], fmt)}-{_f(s['max'], fmt)})"


def _times(s: dict | None) -> str:
    """A ratio's spread as "1.50x (seeds 1.20-1.80x)"."""
    if s is None or s["n"] == 1 or s["min"] == s["max"]:
        return f"{_f(None if s is None else s['mean'], '.2f')}x"
    return f"{s['mean']:.2f}x (seeds {s['min']:.2f}-{s['max']:.2f}x)"


def _mean(s: dict | None):
    return None if s is None else s["mean"]


def render_markdown(res: dict, *, level: int = 1, png: str = "tradeoff.png") -> str:
    """The report as markdown; `level` is the heading level of its title (README: 3)."""
    h = "#" * level
    s, m = res["settings"], res["machine"]
    cuda = m["device"].startswith("cuda")
    seeds = s["seeds"]
    n_prompts = [len(p["prompts"]) for p in res["per_seed"]]
    L: list[str] = [f"{h} twotower benchmark{' (smoke: tiny random model)' if s['smoke'] else ''}", ""]
    L += [f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), each drawing {n_prompts[0]} held-out prompt windows "
          f"({s['prompt_source']}; {sum(n_prompts)} prompts in all), prompt = [bos] + {s['prompt_len']} "
          f"byte tokens, {s['max_new_tokens']} new tokens; greedy (temperature 0) everywhere. Every mode runs on "
          f"each seed's prompts; every ratio (x AR, x HF, retention) is computed within one seed's run, then the "
          f"seeds are aggregated: **mean (min-max over seeds)**; bench.json also holds the standard deviation and "
          f"each seed's value. **EOS is ignored** (no early stop), so every mode generates exactly "
          f"{s['max_new_tokens']} tokens and speeds compare like for like. tok/s = generated tokens / wall second, "
          f"median of {s['repeats']} runs after one warm-up call per mode, interleaved (each round times one pass "
          f"of every mode, batch by batch in a rotating mode order, so a slow spell of the machine hits all modes "
          f"alike). Diffusion uses steps_per_block = "
          f"block size. mock_ar: the released mock-AR decoder, one token per denoiser forward. spec_b<S>: "
          f"speculative decoding, a one-forward denoiser draft of S positions verified by the context tower (its "
          f"output is the AR output); its NFE counts denoiser forwards, one per iteration, so tok/NFE = tokens per "
          f"iteration, each of which also runs one verifying context extend.", ""]
    if s.get("compile"):
        L += ["**Compiled**: our towers ran under `torch.compile` (`TwoTowerLM.compile_towers`) in every mode of ours, "
              "AR included; transformers' `generate` ran eagerly. Compilation happened in the warm-up calls.", ""]
    L += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
          f"transformers {m['transformers']}, device `{m['device']}`" + (f" ({m['gpu']})" if cuda else "")
          + f", {m['date']}.", ""]
    if res.get("targets"):
        L += [f"{h}# Targets (issue 13)", "",
              "Embedded default, block 16. Met: the mean over seeds reaches the target (for = AR output: every "
              "seed does). Gap = mean - target (= AR output: lowest seed - target); negative = short by that much.",
              "", "| target | mode @ batch | needs | measured: mean (min-max) | seeds meeting it | status | gap |",
              "|---|---|---:|---:|---:|---|---:|"]
        for t in res["targets"]:
            spread = None if t["mean"] is None else {"mean": t["mean"], "min": t["min"], "max": t["max"], "n": t["n"]}
            gap = "-" if t["gap"] is None else f"{t['gap']:+.3f}"
            L.append(f"| {t['label']} | {t['mode']} @ {t['batch']} | >= {t['minimum']:g} | {_m(spread, '.3f')} "
                     f"| {t['seeds_met']}/{t['n']} | **{t['status']}** | {gap} |")
        L += [""]
        diff = diffusion_against_target(res["summary"])
        if len(diff) > 1:
            L += ["Every diffusion mode of the run against the diffusion target (batch 1, means; fastest first):", "",
                  "| mode | x AR (>= 1.5) | ret. agree (>= 0.95) | both met |", "|---|---:|---:|---|"]
            L += [f"| {d['mode']} | {_m(d['speedup_vs_ar'])} | {_m(d['retention_agreement'], '.3f')} "
                  f"| {'yes' if d['met'] else 'no'} |" for d in diff]
            L += [""]
    L += [f"{h}# Generation", "", f"Mean (min-max) over {len(seeds)} seed(s); per-seed rows below.", ""]
    L += [f"| mode | batch | tok/s | x AR | x HF | tok/NFE | NFE/block | agree@{AGREEMENT_TOKENS} | ret. agree "
          f"| NLL | ret. NLL | dist-4 | = AR |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["summary"]:
        L.append(f"| {r['mode']} | {r['batch_size']} | {_m(r['tokens_per_s'], '.1f')} | {_m(r['speedup_vs_ar'])} "
                 f"| {_m(r['speedup_vs_hf'])} | {_m(r['tokens_per_nfe'])} | {_m(r['nfe_per_block'], '.2f', '-')} "
                 f"| {_m(r['agreement'], '.3f')} | {_m(r['retention_agreement'], '.3f')} | {_m(r['nll'], '.3f')} "
                 f"| {_m(r['retention_nll'], '.3f')} | {_m(r['distinct_4'], '.3f')} | {_m(r['match_ar'], '.3f')} |")
    L += [""]
    L += ["- **agree@64**: fraction of the first 64 generated positions equal to the held-out continuation. "
          "**ret. agree** = mode / AR (same seed and batch size).",
          "- **NLL**: mean negative log-likelihood (nats / token) of the generated continuation under the context "
          "tower, teacher-forced over prompt + continuation. **Lower is better**; **ret. NLL** = AR NLL / mode NLL. "
          "Greedy AR output is the context tower's own choice, so its NLL is low by construction.",
          "- **dist-2 / dist-4**: distinct n-grams / n-grams of a continuation (mean over prompts); low = repetitive.",
          "- **= AR**: fraction of generated tokens identical to our AR mode's at the same seed and batch size.",
          "- **x AR / x HF**: throughput ratio vs our AR mode / vs transformers' greedy `generate` "
          "(same seed and batch size). tok/NFE of transformers is 1 by construction (not counted).",
          "- Memory (per-seed table): " + (
              "parameter bytes of the model(s) the mode uses + measured CUDA working memory: "
              "`torch.cuda.max_memory_allocated` during the timed runs minus what was allocated before "
              "them (all loaded weights); the raw peak is in bench.json." if cuda else
              "CPU run, so no measured peak: parameter bytes of the model(s) the mode uses + bytes of "
              "that run's cache tensors (`HybridCache.nbytes()`; transformers: its cache object), "
              "computed from tensor shapes, not measured RSS."), ""]
    if any(not r["deterministic_across_repeats"] for r in res["runs"]):
        bad = ", ".join(f"{r['mode']}@{r['batch_size']} seed {r['seed']}" for r in res["runs"]
                        if not r["deterministic_across_repeats"])
        L += [f"Warning: output differed between repeats for {bad} (quality uses the first repeat).", ""]
    for head in (r for r in res["summary"] if r["mode"] in ("diff_t0.8_b16", "spec_b16")):
        what = "Headline operating point (threshold 0.8, block 16)" if head["kind"] == "diffusion" else \
            "Lossless speculative mode (block 16)"
        vs_hf = "" if head["speedup_vs_hf"] is None else f" ({_times(head['speedup_vs_hf'])} transformers')"
        L += [f"- {what} at batch {head['batch_size']}: "
              f"{_times(head['speedup_vs_ar'])} our AR's throughput{vs_hf} at "
              f"{_f(_mean(head['retention_agreement']), '.1%')} agreement retention / "
              f"{_f(_mean(head['retention_nll']), '.1%')} NLL retention (means; NVIDIA: {TARGET_SPEEDUP}x at "
              f"{TARGET_RETENTION:.1%})."]
    L += [""]
    L += [f"![quality retention vs throughput]({png})", ""]
    mem = "params + CUDA peak working MiB" if cuda else "params + cache MiB (from shapes)"
    L += [f"{h}## Per seed", "",
          f"| seed | mode | batch | tok/s | x AR | x HF | tok/NFE | agree@{AGREEMENT_TOKENS} | ret. agree | NLL "
          f"| ret. NLL | dist-2 | dist-4 | = AR | {mem} |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        q = r["quality"]
        memv = f"{_mib(r['param_bytes'])} + {_mib(r['cuda_peak_working_bytes' if cuda else 'cache_bytes'])}"
        L.append(f"| {r['seed']} | {r['mode']} | {r['batch_size']} | {_f(r['tokens_per_s'], '.1f')} "
                 f"| {_f(r['speedup_vs_ar'], '.2f')} | {_f(r['speedup_vs_hf'], '.2f')} "
                 f"| {_f(r['tokens_per_nfe'], '.2f')} "
                 f"| {_f(q['agreement'])} | {_f(r['retention_agreement'])} | {_f(q['nll'])} | {_f(r['retention_nll'])} "
                 f"| {_f(q['distinct_2'])} | {_f(q['distinct_4'])} | {_f(q.get('match_ar'))} | {memv} |")
    L += ["", "Held-out text itself: " + "; ".join(
        f"seed {p['seed']}: NLL {_f(p['reference']['nll'])}, dist-2 {_f(p['reference']['distinct_2'])}, "
        f"dist-4 {_f(p['reference']['distinct_4'])}" for p in res["per_seed"]) + ".", ""]
    t = res.get("training")
    if t:
        L += [f"{h}# Training speed", "",
              f"Batch {t['batch']} x {t['seq_len']} tokens, median step time of {t['steps']} steps after "
              f"{t['warmup']} warm-up step(s); a step = forward + backward + AdamW step.", "",
              "| path | step ms | tokens/s |", "|---|---:|---:|",
              f"| denoiser fine-tuning (frozen context pass + denoiser) | "
              f"{_f(1e3 * statistics.median(t['denoiser_step_seconds']), '.1f')} | {_f(t['denoiser_tokens_per_s'], '.0f')} |",
              f"| AR backbone training | {_f(1e3 * statistics.median(t['ar_step_seconds']), '.1f')} "
              f"| {_f(t['ar_tokens_per_s'], '.0f')} |", "",
              f"Denoiser / AR training throughput: **{_f(t['ratio'], '.2f')}** (target >= {t['target_ratio']}).", ""]
    if res.get("eval_suite"):
        from benchmarks.eval_suite import render

        L += render(res["eval_suite"], h)
    L += _render_profile(res, h)
    return "\n".join(L).rstrip() + "\n"


def _render_profile(res: dict, h: str) -> list[str]:
    prof = res.get("profile_summary")
    if not prof:
        return []
    L = [f"{h}# Where the time goes (batch 1)", "",
         "Phases are the towers' public methods (`prefill`, `forward_block`, `extend`, `accept`), timed on "
         "the model's instances, over each seed's prompts, the modes interleaved prompt by prompt; "
         "sampling/commit + other is the rest of the wall time (token choice, the sampler's commits, bookkeeping, "
         "host syncs). Mean (min-max) over seeds.", ""]
    for p in prof:
        L += [f"`{p['mode']}`: {p['tokens']} tokens over {len(p['seeds'])} seed(s), "
              f"{_m(p['tokens_per_s'], '.1f')} tok/s with timers on.", "",
              "| phase | share | calls | ms / call |", "|---|---:|---:|---:|"]
        for name, r in p["phases"].items():
            L.append(f"| {name} | {_m(r['share'], '.1%')} | {r['calls'] or '-'} | {_m(r['ms_per_call'], '.2f', '-')} |")
        L += [""]
    its = (res.get("iterations") or {}).get("summary") or []
    for it in its:
        L += [f"{h}## `{it['mode']}` per iteration (batch 1)", "",
              f"{it['iterations']} iterations over {it['seeds']} seed(s). Each phase's wall time divided by the "
              f"iterations (the prefill, once per prompt, is left out: {_m(it['prefill_ms_per_call'])} ms per "
              f"prompt). An AR step is one AR decode step of the AR profile of the same seed: its wall time without "
              f"the prefill / its decode steps ({_m(it['ar_step_ms'], '.3f')} ms).", "",
              "| phase | ms / iteration | AR steps |", "|---|---:|---:|"]
        ar_step = _mean(it["ar_step_ms"])
        for name, sp in it["phases_ms"].items():
            steps = None if not ar_step or sp is None else sp["mean"] / ar_step
            L.append(f"| {name} | {_m(sp, '.3f')} | {_f(steps, '.2f')} |")
        L += [f"| **iteration** | **{_m(it['iteration_ms'], '.3f')}** | **{_m(it['iteration_ar_steps'])}** |", "",
              f"Tokens per iteration: **{_m(it['tokens_per_iteration'])}** (accepted by the verifier, before the cut "
              f"at max_new_tokens: {_m(it['verifier_accepted_per_iteration'])}). Tokens per iteration / iteration "
              f"cost in AR steps = **{_m(it['implied_speedup'])}x** AR, the throughput ratio these imply without "
              "prefills (AR steps per column: phase mean / mean AR step).", "",
              "Tokens accepted per iteration (committed, so the last iteration of a prompt counts only what "
              "reached max_new_tokens), all seeds:", "",
              "| tokens | " + " | ".join(str(k + 1) for k in range(len(it["accepted_histogram"]))) + " |",
              "|---|" + "---:|" * len(it["accepted_histogram"]),
              "| iterations | " + " | ".join(str(c) for c in it["accepted_histogram"]) + " |",
              "| share | " + " | ".join(_f(f, ".1%") for f in it["accepted_fraction"]) + " |", ""]
    return L


def plot_tradeoff(res: dict, path: Path) -> None:
    """Quality retention (agreement, NLL) vs throughput ratio over AR: one labelled point per mode x batch
    (the mean over seeds, with bars from the lowest to the highest seed).

    Raises PlotUnavailable (naming the extra to install) when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise PlotUnavailable(f"the trade-off plot needs matplotlib, which cannot be imported ({err}). Install the "
                              f"benchmark extra: {INSTALL_HINT} (or pip install 'matplotlib>=3.8')") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    # A bench.json from before the seeds has no summary: its runs are one seed's.
    rows = res.get("summary") or summarize_runs([{"seed": 0} | r for r in res["runs"]])
    batches = sorted({r["batch_size"] for r in rows})
    colors = dict(zip(batches, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, key, title in ((axes[0], "retention_agreement", "(a) agreement retention (mode / AR)"),
                           (axes[1], "retention_nll", "(b) NLL retention (AR NLL / mode NLL; lower NLL is better)")):
        xs, ys, others = [TARGET_SPEEDUP, 1.0], [TARGET_RETENTION, 1.0], 0
        for k, b in enumerate(batches):
            pts = [r for r in rows if r["batch_size"] == b and r[key] is not None and r["speedup_vs_ar"]]
            x, y = [r["speedup_vs_ar"] for r in pts], [r[key] for r in pts]
            # mean over seeds, bars from the lowest to the highest seed
            ax.errorbar([v["mean"] for v in x], [v["mean"] for v in y],
                        xerr=[[v["mean"] - v["min"] for v in x], [v["max"] - v["mean"] for v in x]],
                        yerr=[[v["mean"] - v["min"] for v in y], [v["max"] - v["mean"] for v in y]],
                        fmt="o", color=colors[b], label=f"batch {b}", zorder=3, elinewidth=1, capsize=2)
            for r in pts:  # batch sizes' labels on alternating sides so coinciding points stay readable
                ax.annotate(r["mode"], (r["speedup_vs_ar"]["mean"], r[key]["mean"]), fontsize=7, color=colors[b],
                            xytext=(4, 4 if k % 2 == 0 else -10), textcoords="offset points")
            xs += [v["max"] for v in x]
            ys += [v for sp in y for v in (sp["min"], sp["max"])]
            others += sum(r["mode"] != "ar" for r in pts)
        ax.axhline(TARGET_RETENTION, ls="--", color="gray", lw=1)
        ax.axvline(TARGET_SPEEDUP, ls="--", color="gray", lw=1)
        ax.text(TARGET_SPEEDUP, TARGET_RETENTION, f" NVIDIA: {TARGET_RETENTION:.1%} @ {TARGET_SPEEDUP}x",
                fontsize=8, color="gray", va="bottom")
        ax.set_xlim(0, 1.15 * max(xs))
        ax.set_ylim(min(0.0, 1.1 * min(ys)), 1.1 * max(ys))
        ax.set_xlabel("throughput ratio vs our AR (tokens/s, same seed and batch size)")
        ax.set_ylabel("quality retention")
        ax.set_title(title if others else title + "\n(undefined for the other modes: AR's score is 0)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"twotower: quality vs speed ({res['machine']['device']}"
                 f"{', smoke model' if res['settings']['smoke'] else ''})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(readme: Path, text: str) -> None:
    """Replace what sits between the bench markers in `readme` with `text` (append a Results section
    with the markers when they are missing)."""
    body = readme.read_text() if readme.exists() else ""
    block = f"{README_START}\n{text.rstrip()}\n{README_END}"
    i, j = body.find(README_START), body.find(README_END)
    if i != -1 and j > i:
        body = body[:i] + block + body[j + len(README_END):]
    else:
        body = body.rstrip() + ("\n\n" if body.strip() else "") + f"## Results\n\n{block}\n"
    readme.write_text(body)


def _jsonable(obj):
    """`obj` without its tensors (kept in memory only) and with non-finite floats as null (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not isinstance(v, Tensor)}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(res: dict, out_dir: Path, *, readme: Path | None = None) -> list[Path]:
    """bench.json, bench.md, the README's Results section (if `readme`), then tradeoff.png, in that
    order; returns the files written. Without matplotlib everything but the plot is on disk when
    PlotUnavailable is raised, and its message says how to draw the plot from bench.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / "bench.json", out_dir / "bench.md", out_dir / "tradeoff.png"
    json_path.write_text(json.dumps(_jsonable(res), indent=1, allow_nan=False))
    md_path.write_text(render_markdown(res))
    written = [json_path, md_path]
    if readme is not None:
        png = os.path.relpath(png_path.resolve(), readme.resolve().parent)
        update_readme(readme, render_markdown(res, level=3, png=png))
        written.append(readme)
    try:
        plot_tradeoff(res, png_path)
    except PlotUnavailable as err:
        raise PlotUnavailable(f"{err}; then draw the plot from this run's results: python benchmarks/bench.py "
                              f"--plot-from {json_path}. Written without it: "
                              f"{', '.join(str(p) for p in written)}") from err.__cause__
    return written + [png_path]
