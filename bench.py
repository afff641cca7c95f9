"""Measure and show: learning curves, per-step cost, perception-prior speed, token heatmaps.

    python bench.py learn [--quick]    # results/learning.{json,md,png}: the papers' table at toy scale
    python bench.py presets [--task T] # results/presets*.{json,md}: every preset's default run on 5 seeds
    python bench.py overhead --json    # seconds per training step and phase, ratios between methods
    python bench.py prior --json       # pepo.perception_prior vs the per-row, per-layer similarity matrix
    python bench.py speed              # the default run's wall time, this tree vs an earlier commit
    python bench.py heatmap runs/pepo  # tokens.html from the tokens.jsonl of a `pepo.py --visualize N` run
    python bench.py memory-table       # GPU memory per model and GPU count under torchrun (FSDP2), from parameters
    python bench.py memory             # peak memory of a scoring pass and an update at Qwen2.5-VL-3B widths
    python bench.py memory-lora        # peak RSS of one PEPO_G step at Qwen2.5-VL-3B widths: full vs --lora-rank 16
    python bench.py memory-plan        # results/memory-plan.{json,md}: peak GiB on one GPU, full vs LoRA (CPU-measured)
    python bench.py gpu                # results/gpu.{json,md}: two steps per preset and setting on CUDA (< 8 min, H100)
    python bench.py signals [--quick]  # results/signals.{json,md,png}: AUROC of each token signal for perception tokens

Plots need matplotlib (requirements-bench.txt); without it the JSON and Markdown are still written.
Run torch jobs with OMP_NUM_THREADS=1 on a shared machine: `learn` runs 2 single-threaded workers.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

ALGOS = {  # table row -> pepo.py flags
    "grpo": ["--algo", "grpo"],
    "pepo_g": ["--algo", "pepo_g"],
    "dapo": ["--algo", "dapo"],
    "pepo_d": ["--algo", "pepo_d"],
    "vppo": ["--algo", "vppo"],
    "dapo+entropy_top": ["--algo", "dapo", "--token-rule", "entropy_top"],  # high-entropy minority, arXiv 2506.01939
}
ABLATION_ROWS = {  # each paper's ablations at toy scale: one --ablation flag of the shaping step each
    "pepo_g prior only": ["--algo", "pepo_g", "--ablation", "pepo-prior-only"],
    "pepo_g entropy only": ["--algo", "pepo_g", "--ablation", "pepo-entropy-only"],
    "pepo_g fixed lambda=1": ["--algo", "pepo_g", "--ablation", "pepo-no-ramp"],
    "pepo_g additive fusion": ["--algo", "pepo_g", "--ablation", "pepo-additive"],
    "vppo TAS only": ["--algo", "vppo", "--ablation", "vppo-tas-only"],
    "vppo TGF only": ["--algo", "vppo", "--ablation", "vppo-tgf-only"],
    "vppo random 40% mask": ["--algo", "vppo", "--ablation", "vppo-random-mask"],
    "vppo top 40% entropy": ["--algo", "vppo", "--ablation", "vppo-entropy-mask"],
}
ALGOS.update(ABLATION_ROWS)
# Per-run budget, the same for every row; the ablation rows run on `ablation_tasks` only. The full table
# leaves steps, learning rate, schedule and temperature to each task's own default-run budget (tasks.py), so
# its main rows are the default runs `python pepo.py --algo A --task T --seed S` with a held-out curve added
# (evaluation has its own RNG, so the curve does not change the run). Earlier tables ran `color` at lr 1e-3 for
# 70 steps and `color-think` at 5e-4 for 50; after the chat-template prompts both stalled on some seeds.
# --quick checks the pipeline in < 5 minutes; its numbers mean nothing.
BUDGETS = {
    "full": dict(
        tasks=["color", "color-think"],
        ablation_tasks=["color-think"],
        seeds=[1, 2, 3, 4, 5],
        prompts_per_step=16,
        group_size=8,
        eval_every=10,
        eval_size=100,
    ),
    "quick": dict(
        tasks=["color", "color-think"],
        ablation_tasks=["color-think"],
        seeds=[1],
        steps=2,
        lr=1e-3,
        prompts_per_step=4,
        group_size=4,
        lr_schedule="constant",
        eval_every=2,
        eval_size=16,
        warmup_steps=20,
    ),  # a short warm-up too
}


TASK_BUDGET = ("steps", "lr", "lr_schedule", "temperature")  # what a budget may leave to the task's own


def per_task(budget: dict, key: str, task: str):
    """A budget setting for one task's runs: a value for every task, a dict with one per task, or, for a key
    of TASK_BUDGET that the budget leaves out, the task's own default-run budget (tasks.py)."""
    if key not in budget and key in TASK_BUDGET:
        import tasks

        return tasks.get_task(task).budget[key]
    value = budget[key]
    return value[task] if isinstance(value, dict) else value


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------
# learn: held-out accuracy vs step for every algorithm, task and seed
# ----------------------------------------------------------------------------------------
def _worker_init():
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars from parallel runs
    import torch

    torch.set_num_threads(1)


def _job(job: dict) -> dict:
    """One tiny-model build or one pepo.main run, in a worker process, its output to a log file."""
    import pepo
    import tasks

    if job["kind"] == "build":  # a model built before with the same settings is reused, like a finished run
        spec = {k: job[k] for k in ("task", "seed", "warmup_steps")}
        marker = Path(job["path"]) / "build.json"
        if marker.exists() and json.loads(marker.read_text()) == spec:
            return {**job, "seconds": 0.0, "reused": True}
    with open(job["log"], "w") as log, redirect_stdout(log), redirect_stderr(log):
        t0 = time.time()
        if job["kind"] == "build":
            pepo.build_tiny_model(job["path"], tasks.get_task(job["task"]), job["seed"], job["warmup_steps"])
            marker.write_text(json.dumps(spec))
        else:
            pepo.main(job["argv"])
    return {**job, "seconds": time.time() - t0}


def read_run(out: Path) -> dict:
    """The curves of one finished run: held-out accuracy at step 0 (before RL), every --eval-every
    step and the last step, plus the per-step rollout reward and accuracy."""
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps, acc = [0], [summary["accuracy_before"]]
    for m in metrics:
        if "eval_accuracy" in m:
            steps.append(m["step"])
            acc.append(m["eval_accuracy"])
    if steps[-1] != summary["steps"]:
        steps.append(summary["steps"])
        acc.append(summary["accuracy_after"])
    return {
        "eval_steps": steps,
        "eval_accuracy": acc,
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "seconds": summary["seconds"],
        "train_reward": [m["reward"] for m in metrics],
        "train_accuracy": [m["accuracy"] for m in metrics],
        "step_seconds": [round(m["seconds"], 3) for m in metrics],
    }


def steps_to(steps: list[int], acc: list[float], threshold: float):
    """First evaluated step whose held-out accuracy is >= threshold, else None."""
    return next((s for s, a in zip(steps, acc) if a >= threshold), None)


def curve_area(steps: list[int], acc: list[float]) -> float:
    """Area under the held-out accuracy curve (trapezoids) divided by the steps covered: the
    curve's mean height, in [0, 1]. It rewards learning early, which final accuracy does not."""
    area = sum((s1 - s0) * (a0 + a1) / 2 for s0, s1, a0, a1 in zip(steps, steps[1:], acc, acc[1:]))
    return area / (steps[-1] - steps[0]) if steps[-1] > steps[0] else acc[0]


class CI(tuple):
    """(lo, hi) of a bootstrap interval; .dropped = the draws left out because the statistic was nan."""

    def __new__(cls, lo: float, hi: float, dropped: int = 0):
        ci = super().__new__(cls, (lo, hi))
        ci.dropped = dropped
        return ci

    lo, hi = property(lambda self: self[0]), property(lambda self: self[1])


def bootstrap_ci(fn, groups: list, n: int = 1000, seed: int = 0, level: float = 0.95) -> CI:
    """Percentile bootstrap interval of the statistic fn(groups).

    groups: the independent units, each passed whole to fn: seeds for a learning curve;
    completions (or prompts) for a token statistic, not tokens: the tokens of one completion are
    correlated (same context, same image), so resampling tokens would pretend there are more
    independent observations than there are and give too narrow an interval. Each draw takes
    len(groups) units with replacement and recomputes fn; draws where fn is nan (e.g. no
    positive token drawn) are left out and counted in `.dropped`.
    Returns CI(lo, hi): the (1-level)/2 and (1+level)/2 quantiles of the draws; nan if no draw
    was finite.
    """
    rng = np.random.default_rng(seed)
    values = np.asarray(
        [fn([groups[i] for i in rng.integers(0, len(groups), len(groups))]) for _ in range(n)], dtype=float
    )
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return CI(float("nan"), float("nan"), n)
    q = (1 - level) / 2 * 100
    lo, hi = np.percentile(finite, [q, 100 - q])
    return CI(float(lo), float(hi), int(n - finite.size))


def summarize(runs: list[dict], threshold: float) -> dict:
    """{task: {algo: {final_mean, final_std, steps_to_threshold (per seed), reached, cell texts}}}"""
    table = {}
    for r in runs:
        table.setdefault(r["task"], {}).setdefault(r["algo"], []).append(r)
    out = {}
    for task, by_algo in table.items():
        out[task] = {}
        for algo, rs in by_algo.items():
            final = [r["accuracy_after"] for r in rs]
            area = [curve_area(r["eval_steps"], r["eval_accuracy"]) for r in rs]
            reach = [steps_to(r["eval_steps"], r["eval_accuracy"], threshold) for r in rs]
            hit = sorted(s for s in reach if s is not None)
            mean, std = statistics.mean(final), (statistics.stdev(final) if len(final) > 1 else 0.0)
            lo, hi = bootstrap_ci(statistics.mean, final)  # over seeds: the independent unit here
            area_lo, area_hi = bootstrap_ci(statistics.mean, area)
            # median over seeds, a seed that never reached the threshold counting as infinitely slow
            med = sorted(reach, key=lambda s: float("inf") if s is None else s)[(len(reach) - 1) // 2]
            to = f"not reached ({len(hit)}/{len(rs)})" if med is None else f"{med} ({len(hit)}/{len(rs)})"
            out[task][algo] = {
                "final_mean": mean,
                "final_std": std,
                "final_ci95": [lo, hi],
                "area_mean": statistics.mean(area),
                "area_ci95": [area_lo, area_hi],
                "seeds": len(rs),
                "steps_to_threshold": reach,
                "final_cell": f"{mean:.2f} [{lo:.2f}, {hi:.2f}]",
                "area_cell": f"{statistics.mean(area):.2f} [{area_lo:.2f}, {area_hi:.2f}]",
                "steps_cell": to,
            }
    return out


def markdown_table(summary: dict, algos: list[str], threshold: float) -> str:
    task_names = list(summary)
    head = (
        "| algorithm | "
        + " | ".join(f"{t}: final acc | {t}: curve area | {t}: steps to {threshold:g}" for t in task_names)
        + " |"
    )
    rule = "|---|" + "---|---|---|" * len(task_names)
    rows = []
    for algo in algos:
        cells = []
        for t in task_names:
            s = summary[t].get(algo)
            cells += [s["final_cell"], s["area_cell"], s["steps_cell"]] if s else ["—", "—", "—"]
        rows.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def plot_learning(path: Path, runs: list[dict], algos: list[str], threshold: float) -> bool:
    """Held-out accuracy vs step, one panel per task: the mean over seeds and its min-max band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"matplotlib is not installed: skipped {path} (pip install -r requirements-bench.txt); JSON and Markdown "
            f"are written"
        )
        return False
    task_names = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 4), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        for algo in algos:
            rs = [r for r in runs if r["task"] == task and r["algo"] == algo]
            if not rs:
                continue
            steps = rs[0]["eval_steps"]
            curves = list(zip(*[r["eval_accuracy"] for r in rs]))  # per step: one value per seed
            (line,) = ax.plot(steps, [statistics.mean(c) for c in curves], label=algo, lw=1.6)
            ax.fill_between(
                steps, [min(c) for c in curves], [max(c) for c in curves], color=line.get_color(), alpha=0.15, lw=0
            )
        ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"{threshold:g}")
        seeds = len({r["seed"] for r in runs if r["task"] == task})
        ax.set(
            title=f"{task} ({seeds} seed{'s' * (seeds > 1)}: mean, min-max band)",
            xlabel="RL step",
            ylabel="held-out greedy accuracy",
            ylim=(0, 1),
        )
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_learning(results: Path, runs: list[dict], config: dict, algos: list[str], threshold: float) -> str:
    """results/learning.json (all curves + config), learning.md (the table), learning.png (if matplotlib)."""
    results.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, threshold)
    (results / "learning.json").write_text(json.dumps({"config": config, "summary": summary, "runs": runs}, indent=1))
    b = config["budget"]
    table = markdown_table(summary, algos, threshold)
    runs_of = "; ".join(
        f"{t}: {per_task(b, 'steps', t)} steps of {per_task(b, 'prompts_per_step', t)} prompts x {b['group_size']} "
        f"samples, learning rate {per_task(b, 'lr', t):g} ({per_task(b, 'lr_schedule', t)}), temperature "
        f"{per_task(b, 'temperature', t):g}"
        for t in b["tasks"]
    )
    md = (
        f"Held-out greedy accuracy ({b['eval_size']} examples) at the end of each run ({runs_of}): mean over seeds "
        f"{b['seeds']} "
        f"[bootstrap 95% interval over seeds]. Curve area: the mean "
        f"height of the held-out curve (evaluated every {b['eval_every']} steps, step 0 included). Steps to "
        f"{threshold:g}: median "
        f"over seeds of the first evaluation at or above it (seeds that reached it / seeds)."
        + (
            f" Only {config['runs']} runs had finished: each row's cells are over the seeds it has."
            if config.get("partial")
            else ""
        )
        + f"\n\n{table}\n"
    )
    (results / "learning.md").write_text(md)
    plot_learning(results / "learning.png", runs, algos, threshold)
    return md


def model_path(root: Path, task: str, seed: int) -> str:
    """The initial model shared by every run of one task and seed."""
    return str(root / "models" / f"{task}_s{seed}")


def build_job(root: Path, task: str, seed: int, warmup_steps: int | None) -> dict:
    """One initial model to build (pepo.build_tiny_model), shared by every run of its task and seed."""
    log = root / "logs" / f"build_{task}_s{seed}.log"
    return dict(
        kind="build", task=task, seed=seed, path=model_path(root, task, seed), warmup_steps=warmup_steps, log=str(log)
    )


def run_job(root: Path, task: str, algo: str, seed: int, argv: list[str], out: Path) -> dict:
    """One `pepo.py` run: its argv (ending with --output-dir out), folder, log and initial model."""
    model = model_path(root, task, seed)
    log = str(root / "logs" / f"{task}_{algo}_s{seed}.log")
    return dict(kind="run", task=task, algo=algo, seed=seed, model=model, argv=argv, out=str(out), log=log)


def learn_jobs(budget: dict, algos: list[str], root: Path, extra: str = "") -> tuple[list[dict], list[dict]]:
    """(model builds, runs) of the learning table: one initial model per task and seed, shared by
    every algorithm, and one pepo.py run per task, algorithm and seed (its argv and folders)."""
    builds, runs = [], []
    for task in budget["tasks"]:
        for seed in budget["seeds"]:  # one initial model per task and seed, shared by every algorithm
            builds.append(build_job(root, task, seed, budget.get("warmup_steps")))
            for algo in algos:
                if algo in ABLATION_ROWS and task not in budget["ablation_tasks"]:
                    continue
                out = root / task / algo.replace(" ", "_").replace("%", "pct") / f"seed{seed}"
                setting = lambda key, task=task: str(per_task(budget, key, task))
                argv = [
                    *ALGOS[algo],
                    "--model",
                    builds[-1]["path"],
                    "--task",
                    task,
                    "--seed",
                    str(seed),
                    "--steps",
                    setting("steps"),
                    "--prompts-per-step",
                    setting("prompts_per_step"),
                    "--group-size",
                    str(budget["group_size"]),
                    "--lr",
                    setting("lr"),
                    "--lr-schedule",
                    setting("lr_schedule"),
                    "--temperature",
                    setting("temperature"),
                    "--eval-every",
                    str(budget["eval_every"]),
                    "--eval-size",
                    str(budget["eval_size"]),
                    *shlex.split(extra),
                    "--output-dir",
                    str(out),
                ]
                runs.append(run_job(root, task, algo, seed, argv, out))
    return builds, runs


def prepare_run(job: dict) -> dict:
    """A run's folder, emptied of an old result and holding its argv (job.json, for resuming)."""
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # never report a stale result
    (out / "job.json").write_text(json.dumps(job["argv"]))
    return job


def learn(opt) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    budget = dict(BUDGETS["quick" if opt.quick else "full"])
    for key in ("tasks", "seeds", "steps", "prompts_per_step"):
        if getattr(opt, key) is not None:
            budget[key] = getattr(opt, key)
    for key in TASK_BUDGET:  # spelled out per task, for the report and learning.json
        budget[key] = {t: per_task(budget, key, t) for t in budget["tasks"]}
    algos = opt.algos or list(ALGOS)
    root = Path(opt.runs_dir) / ("quick" if opt.quick else "full")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before they import torch
    t_start = time.time()
    builds, runs = learn_jobs(budget, algos, root, opt.extra)
    # Finished runs with the same flags are reused, so an interrupted benchmark can be resumed.
    done = lambda j: (
        all((Path(j["out"]) / f).exists() for f in ("summary.json", "job.json"))
        and json.loads((Path(j["out"]) / "job.json").read_text()) == j["argv"]
    )
    todo = [] if opt.report else [j for j in runs if not done(j)]
    print(
        f"learn: {len(runs)} runs ({sum(map(done, runs))} already done), budget {budget}, {opt.workers} workers; "
        f"logs in {root / 'logs'}"
    )
    needs = {b["path"]: [j for j in todo if j["model"] == b["path"]] for b in builds}  # the runs waiting for each model
    with ProcessPoolExecutor(opt.workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        # Each run is queued as soon as its initial model is built, so no worker waits for the last
        # build; the models with the most runs are built first.
        pending = {
            pool.submit(_job, b): b for b in sorted(builds, key=lambda b: -len(needs[b["path"]])) if needs[b["path"]]
        }
        i = 0
        while pending:
            for f in wait(pending, return_when=FIRST_COMPLETED)[0]:
                j = pending.pop(f)
                if j["kind"] == "build":
                    try:
                        r = f.result()
                        how = "reused" if r.get("reused") else f"built ({r['seconds']:.0f} s)"
                        print(f"  model {j['task']} seed {j['seed']} {how}", flush=True)
                    except Exception as e:  # its runs are left out; the log says why
                        print(
                            f"  build {j['task']} seed {j['seed']} FAILED ({type(e).__name__}: {e}); log: {j['log']}",
                            flush=True,
                        )
                        continue
                    pending.update({pool.submit(_job, prepare_run(r)): r for r in needs[j["path"]]})
                    continue
                i += 1
                head = f"  [{i}/{len(todo)}] {j['task']:9s} {j['algo']:17s} seed {j['seed']}:"
                try:
                    seconds = f.result()["seconds"]
                except Exception as e:  # one failed run should not cost the other 99; its log says why
                    print(f"{head} FAILED ({type(e).__name__}: {e}); log: {j['log']}", flush=True)
                    continue
                s = json.loads((Path(j["out"]) / "summary.json").read_text())
                eta = (time.time() - t_start) / i * (len(todo) - i) / 60  # rough: runs differ in length
                print(
                    f"{head} {s['accuracy_before']:.2f} -> {s['accuracy_after']:.2f} ({seconds:.0f} s; "
                    f"{time.time() - t_start:.0f} s total, "
                    f"~{eta:.0f} min left)",
                    flush=True,
                )
    results = [
        dict(task=j["task"], algo=j["algo"], seed=j["seed"], **read_run(Path(j["out"]))) for j in runs if done(j)
    ]
    if not results:
        sys.exit("learn: no run finished; see the logs")
    config = {
        "budget": budget,
        "algos": {a: ALGOS[a] for a in algos},
        "extra_flags": opt.extra,
        "workers": opt.workers,
        "threshold": opt.threshold,
        "quick": opt.quick,
        "report_only": opt.report,
        "runs": f"{len(results)} of {len(runs)}",
        "partial": len(results) < len(runs),
        "wall_seconds": round(time.time() - t_start, 1),
        "run_seconds_sum": round(sum(r["seconds"] for r in results), 1),
        "machine": machine(),
        "command": " ".join(sys.argv),
    }
    out = Path(opt.results_dir or ("results/quick" if opt.quick else "results"))
    md = write_learning(out, results, config, algos, opt.threshold)
    print(
        md + f"\nwall time {config['wall_seconds']:.0f} s ({config['run_seconds_sum']:.0f} s in the runs); wrote "
        f"{out}/learning.json, learning.md, learning.png"
    )


# ----------------------------------------------------------------------------------------
# presets: the default run of every preset on 5 seeds, nothing but --algo, --task and --seed
# ----------------------------------------------------------------------------------------
PRESETS = ["grpo", "dapo", "pepo_g", "pepo_d", "vppo"]


def presets_jobs(task: str, algos: list[str], seeds: list[int], root: Path, extra: str = "") -> tuple[list, list]:
    """(model builds, runs): `python pepo.py --algo A --task T --seed S` for each preset and seed. The
    initial model a default run builds for itself depends on the task and seed only, so it is built
    once per seed (the same files) and passed as --model."""
    builds, runs = [], []
    for seed in seeds:
        builds.append(build_job(root, task, seed, None))
        model = builds[-1]["path"]
        for algo in algos:
            out = root / task / algo / f"seed{seed}"
            argv = ["--algo", algo, "--task", task, "--seed", str(seed), "--model", model, *shlex.split(extra)]
            runs.append(run_job(root, task, algo, seed, [*argv, "--output-dir", str(out)], out))
    return builds, runs


def presets_markdown(rows: list[dict], algos: list[str], seeds: list[int], threshold: float = 0.9) -> str:
    """One row per preset: final greedy held-out accuracy per seed (before -> after), the lowest,
    how many seeds reach `threshold`, and the mean run time. A run that did not finish shows '-'."""
    by = {(r["algo"], r["seed"]): r for r in rows}
    head = f"| preset | {' | '.join(f'seed {s}' for s in seeds)} | min | >= {threshold:g} | s per run |"
    lines = [head, "|---" * (len(seeds) + 4) + "|"]
    for algo in algos:
        got = [by.get((algo, s)) for s in seeds]
        done = [r for r in got if r is not None]
        cells = [f"{r['before']:.2f} → {r['after']:.2f}" if r else "-" for r in got]
        low = f"{min(r['after'] for r in done):.2f}" if done else "-"
        ok = sum(r["after"] >= threshold for r in done)
        secs = f"{statistics.mean(r['seconds'] for r in done):.0f}" if done else "-"
        lines.append(f"| {algo} | {' | '.join(cells)} | {low} | {ok} of {len(seeds)} | {secs} |")
    return "\n".join(lines)


def run_pool(builds: list[dict], runs: list[dict], workers: int, report=print) -> None:
    """Builds, then each run as soon as its model is built, on `workers` single-threaded processes.
    A failed job is reported and skipped (its log says why)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    needs = {b["path"]: [j for j in runs if j["model"] == b["path"]] for b in builds}
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before they import torch
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        pending = {pool.submit(_job, b): b for b in builds if needs[b["path"]]}
        while pending:
            for f in wait(pending, return_when=FIRST_COMPLETED)[0]:
                j = pending.pop(f)
                try:
                    seconds = f.result()["seconds"]
                except Exception as e:
                    report(f"  {j['kind']} {j.get('algo', j['task'])} seed {j['seed']} FAILED ({e}); log: {j['log']}")
                    continue
                if j["kind"] == "build":
                    pending.update({pool.submit(_job, prepare_run(r)): r for r in needs[j["path"]]})
                    continue
                s = json.loads((Path(j["out"]) / "summary.json").read_text())
                before, after = s["accuracy_before"], s["accuracy_after"]
                report(f"  {j['algo']:7s} seed {j['seed']}: {before:.2f} -> {after:.2f} ({seconds:.0f} s)")


def presets(opt) -> str:
    """Every preset's default run on 5 seeds: results/presets[_TASK].{json,md}."""
    root = Path(opt.runs_dir) / "presets"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    builds, runs = presets_jobs(opt.task, opt.algos, opt.seeds, root, opt.extra)

    def done(j):  # finished with the same flags: reused, so an interrupted table can be resumed
        out = Path(j["out"])
        return (out / "summary.json").exists() and json.loads((out / "job.json").read_text()) == j["argv"]

    todo = [] if opt.report else [j for j in runs if not done(j)]
    t0 = time.time()
    print(
        f"presets: {len(todo)} of {len(runs)} runs of `pepo.py --task {opt.task} --algo A --seed S {opt.extra}`, "
        f"{opt.workers} workers"
    )
    run_pool(builds, todo, opt.workers, lambda line: print(line, flush=True))
    rows = []
    for j in runs:
        if (Path(j["out"]) / "summary.json").exists():
            s = json.loads((Path(j["out"]) / "summary.json").read_text())
            rows.append(
                dict(
                    algo=j["algo"],
                    seed=j["seed"],
                    before=s["accuracy_before"],
                    after=s["accuracy_after"],
                    seconds=s["seconds"],
                )
            )
    md = presets_markdown(rows, opt.algos, opt.seeds, opt.threshold)
    config = dict(
        task=opt.task,
        algos=opt.algos,
        seeds=opt.seeds,
        extra_flags=opt.extra,
        workers=opt.workers,
        report_only=opt.report,
        wall_seconds=round(time.time() - t0, 1),
        machine=machine(),
        command=" ".join(sys.argv),
    )
    name = "presets" if opt.task == "color" else f"presets_{opt.task}"
    out = Path(opt.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(dict(config=config, runs=rows), indent=1))
    title = f"Default runs: `{' '.join(['python pepo.py --task', opt.task, '--algo A --seed S', opt.extra]).strip()}`"
    (out / f"{name}.md").write_text(
        f"## {title}\n\n{md}\n\nwall time {config['wall_seconds']:.0f} s on {opt.workers} workers\n"
    )
    print(md + f"\nwall time {config['wall_seconds']:.0f} s; wrote {out}/{name}.json, {name}.md")
    return md


# ----------------------------------------------------------------------------------------
# overhead: one training step of each algorithm on the same rollouts, split into phases
# ----------------------------------------------------------------------------------------
def one_update(pepo, model, ref_model, optimizer, vl, batch, args, seed: int) -> dict:
    """Steps 2-4 of pepo.train on one rollout batch (CPU), timed: score + shape, then update."""
    import torch

    import vppo

    t0 = time.perf_counter()
    inputs = {k: batch[k] for k in (*pepo.MODEL_KEYS, "completion_ids")}
    if args.vppo:
        inputs["pixel_values_perturbed"] = vppo.perturbed_pixel_values(
            batch, vl.ip, args.vppo_perturb, torch.Generator().manual_seed(seed)
        )
    parts = pepo.micro_batches(inputs, args.micro_batch_size)
    reuse = args.ppo_epochs == args.mini_batches == len(parts) == 1  # as pepo.train: the update reuses the policy pass
    scores = pepo.score(model, ref_model, parts, args, prior=args.pepo, dependency=args.vppo, keep_graph=reuse)
    advantages, weights, mask, _, stats = pepo.shape(
        scores, batch["rewards"], batch["completion_mask"], batch["truncated"], 1, args
    )
    t1 = time.perf_counter()
    stats.update(
        pepo.update(
            model,
            optimizer,
            inputs,
            scores["old_logp"],
            scores["ref_logp"],
            advantages,
            weights,
            mask,
            args,
            1,
            nullcontext(),
            logits=scores.pop("logits"),
        )
    )
    return dict(stats, time_scoring=t1 - t0, time_update=time.perf_counter() - t1)


def overhead(opt) -> dict:
    import copy
    import random
    from contextlib import nullcontext

    import torch

    import pepo
    import tasks

    torch.set_num_threads(opt.threads)
    task = tasks.get_task(opt.task)
    path = pepo.build_tiny_model(str(Path(opt.runs_dir) / "models" / f"{opt.task}_s1"), task, 1)
    model, tokenizer, image_processor = pepo.load_policy(path)
    vl = pepo.VLHelper(tokenizer, image_processor, model.config)
    initial = copy.deepcopy(model.state_dict())
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # GRPO's KL reference: the initial policy
    examples = [task.sample(random.Random(1000 + i)) for i in range(opt.prompts)]
    algos = ["grpo", "pepo_g", "dapo", "pepo_d", "vppo"]
    times = {a: {"rollout": [], "scoring": [], "update": [], "step": [], "step_cpu": []} for a in algos}
    rollout_ids = {}
    for rep in range(opt.warmup + opt.repeats):
        for algo in algos:  # interleaved, so a slow phase of the machine hits every algorithm alike
            args = pepo.parse_args(
                ["--algo", algo, "--prompts-per-step", str(opt.prompts), "--group-size", str(opt.group_size)]
            )
            model.load_state_dict(initial)  # every algorithm starts from the same weights ...
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
            torch.manual_seed(rep)  # ... and samples the same rollouts
            t0, c0 = time.perf_counter(), time.process_time()
            batch = pepo.rollout(model, vl, task, examples, opt.group_size, args, torch.device("cpu"), nullcontext())
            t1 = time.perf_counter()
            stats = one_update(pepo, model, ref_model if args.beta > 0 else None, optimizer, vl, batch, args, rep)
            t2, c2 = time.perf_counter(), time.process_time()
            rollout_ids.setdefault(rep, set()).add(hash(batch["completion_ids"].numpy().tobytes()))
            if rep >= opt.warmup:
                for key, value in (
                    ("rollout", t1 - t0),
                    ("scoring", stats["time_scoring"]),
                    ("update", stats["time_update"]),
                    ("step", t2 - t0),
                    ("step_cpu", c2 - c0),
                ):
                    times[algo][key].append(value)
    med = {a: {k: round(statistics.median(v), 4) for k, v in t.items()} for a, t in times.items()}
    pairs = [
        ("pepo_g", "grpo"),
        ("pepo_d", "dapo"),
        ("vppo", "dapo"),
        ("vppo", "pepo_g"),
    ]  # vppo/pepo_g: VPPO's cost over the default
    # ratio = median over repeats of the two algorithms' times in the same round (paired: robust to a busy machine)
    paired = lambda a, b, f: round(statistics.median(f(a, i) / f(b, i) for i in range(opt.repeats)), 3)
    full = lambda a, i: times[a]["step"][i]
    train = lambda a, i: times[a]["scoring"][i] + times[a]["update"][i]
    cpu = lambda a, i: times[a]["step_cpu"][i]  # CPU seconds of this process: hardly moved by other jobs on the machine
    result = {
        "seconds": med,
        "ratios": {f"{a}/{b}": paired(a, b, full) for a, b in pairs},
        "ratios_without_rollout": {f"{a}/{b}": paired(a, b, train) for a, b in pairs},
        "ratios_cpu_time": {f"{a}/{b}": paired(a, b, cpu) for a, b in pairs},
        "targets": {"pepo_g/grpo": 1.05, "vppo/dapo": 1.35},
        "same_rollouts": all(len(ids) == 1 for ids in rollout_ids.values()),
        "config": {
            "task": opt.task,
            "prompts": opt.prompts,
            "group_size": opt.group_size,
            "repeats": opt.repeats,
            "warmup": opt.warmup,
            "statistic": "median; ratios: median of per-round ratios",
            "model": "tiny Qwen2.5-VL (pepo.build_tiny_model)",
            "note": "fixed rollout batch per repeat (no dynamic-sampling refills); step = rollout + scoring + update "
            "(wall seconds); step_cpu = CPU seconds of the same step",
            "machine": machine(),
        },
    }
    return result


# ----------------------------------------------------------------------------------------
# speed: wall time of the default run, this tree against an earlier commit, side by side
# ----------------------------------------------------------------------------------------
def children_cpu_seconds() -> float:
    """CPU seconds used so far by finished child processes: unlike wall time, hardly moved by other jobs."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def speed(opt) -> dict:
    import subprocess

    here = Path(__file__).resolve().parent
    root = Path(opt.runs_dir).resolve() / "speed"
    base = root / f"tree-{opt.baseline[:12]}"
    if not (base / "pepo.py").exists():  # a checkout of the baseline commit beside this one
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(here), "worktree", "add", "--detach", str(base), opt.baseline],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    trees = {"baseline": base, "current": here}
    env = dict(os.environ, TQDM_DISABLE="1")
    runs = {name: [] for name in trees}
    for rep in range(opt.repeats):
        for name, tree in trees.items():  # alternate, so a slow phase of the machine hits both alike
            out = root / f"{name}{rep}"
            shutil.rmtree(out, ignore_errors=True)
            t0, c0 = time.perf_counter(), children_cpu_seconds()
            subprocess.run(
                [sys.executable, "pepo.py", *shlex.split(opt.flags), "--output-dir", str(out)],
                cwd=tree,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            s = json.loads((out / "summary.json").read_text())
            runs[name].append(
                {
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "cpu_s": round(children_cpu_seconds() - c0, 1),
                    "accuracy_before": s["accuracy_before"],
                    "accuracy_after": s["accuracy_after"],
                }
            )
            print(f"{name:8s} repeat {rep}: {runs[name][-1]}", flush=True)
    wall = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu_s"] for r in rs) for name, rs in runs.items()}
    return {
        "runs": runs,
        "median_wall_s": wall,
        "ratio_current_over_baseline": round(wall["current"] / wall["baseline"], 3),
        "median_cpu_s": cpu,
        "cpu_ratio_current_over_baseline": round(cpu["current"] / cpu["baseline"], 3),
        "config": {
            "baseline": opt.baseline,
            "flags": opt.flags or "(defaults)",
            "repeats": opt.repeats,
            "note": "wall and CPU time of the whole `python pepo.py` process: model build, evaluation, training",
            "machine": machine(),
        },
    }


# ----------------------------------------------------------------------------------------
# prior: the one-mean-vector perception prior against the similarity-matrix loop
# ----------------------------------------------------------------------------------------
def naive_prior(hidden_states, vision_mask, completion_len: int, score: str = "cosine"):
    """Reference PEPO prior, written as the paper describes it: per layer and row, the L x N
    similarity matrix between completion tokens and image tokens, averaged over the N image
    tokens, then over layers. Rows without image tokens give 0.  -> [B, L]"""
    import torch
    import torch.nn.functional as F

    B = vision_mask.shape[0]
    out = torch.zeros(B, completion_len)
    for b in range(B):
        if not vision_mask[b].any():
            continue
        for h in hidden_states:
            q, v = h[b, -completion_len:].float(), h[b, vision_mask[b]].float()  # [L, D], [N, D]
            if score == "cosine":
                sim = F.normalize(q, dim=-1) @ F.normalize(v, dim=-1).T
            elif score == "dot":
                sim = q @ v.T
            else:
                sim = -torch.cdist(q, v, p=2.0 if score == "l2" else 1.0)
            out[b] += sim.mean(dim=1) / len(hidden_states)
    return out


def prior(opt) -> dict:
    import torch

    import pepo

    torch.set_num_threads(opt.threads)
    g = torch.Generator().manual_seed(0)
    B, T, D, L = opt.batch, opt.seq, opt.hidden, opt.completion
    # random states around a shared direction per layer, as real hidden states are (cosines ~ 0.5, not ~ 0)
    layers = [torch.randn(B, T, D, generator=g) + torch.randn(D, generator=g) for _ in range(opt.layers)]
    vision = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # one image block per row after a short text prefix; rows differ in size
        n = opt.image_tokens - 40 * b
        vision[b, 20 : 20 + n] = True
    out = {}
    for score in opt.scores:
        timings = {"fast": [], "naive": []}
        for _ in range(opt.repeats):
            t0 = time.perf_counter()
            fast = pepo.perception_prior(layers, vision, L, score)
            t1 = time.perf_counter()
            slow = naive_prior(layers, vision, L, score)
            t2 = time.perf_counter()
            timings["fast"].append(t1 - t0)
            timings["naive"].append(t2 - t1)
        f, n = statistics.median(timings["fast"]), statistics.median(timings["naive"])
        out[score] = {
            "fast_s": round(f, 4),
            "naive_s": round(n, 4),
            "speedup": round(n / f, 2),
            "max_abs_diff": float((fast - slow).abs().max()),
            "max_abs_value": float(slow.abs().max()),
        }
    return {
        "scores": out,
        "shapes": {
            "B": B,
            "T": T,
            "D": D,
            "L": L,
            "layers": opt.layers,
            "image_tokens_per_row": [int(x) for x in vision.sum(1)],
        },
        "config": {"repeats": opt.repeats, "statistic": "median", "dtype": "float32", "machine": machine()},
    }


# ----------------------------------------------------------------------------------------
# memory: peak memory of one scoring pass and one update at Qwen2.5-VL-3B widths
# ----------------------------------------------------------------------------------------
# "before": forward() and the token functions as first written, each step of the formula one
# float32 [B, L, V] tensor (0.6 GB per 1k-token completion at V = 151,936); "after": pepo's and vppo's.
def _plain_forward(model, batch: dict, temperature: float = 1.0, hidden_states: bool = False):
    import pepo

    L = batch["completion_ids"].shape[1]
    out = model(
        **{k: batch[k] for k in pepo.MODEL_KEYS},
        output_hidden_states=hidden_states,
        logits_to_keep=L + 1,
        use_cache=False,
    )
    return out.logits[:, :-1] / temperature, (out.hidden_states if hidden_states else None)


def _plain_entropy(logits):
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def _plain_logprobs(logits, tokens):
    import torch

    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _plain_visual_kl(logits, logits_perturbed):
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(logits.detach().float(), dim=-1)
        lq = torch.log_softmax(logits_perturbed.detach().float(), dim=-1)
        p = lp.exp()
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(dim=-1).clamp_min(0.0)


def memory_model(seed: int = 0):
    """Random-weight Qwen2.5-VL with Qwen2.5-VL-3B's widths and token ids, but 2 text layers and
    2 vision blocks (543M parameters, 311M of them the tied 151,936 x 2048 embedding)."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig
    from transformers.initialization import no_init_weights

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=2,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    with (
        no_init_weights()
    ):  # transformers' own init (normal_ on every matrix) takes ~30 s on 2 cores; the draws below ~5 s
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.uniform_(-0.035, 0.035, generator=g)  # std 0.02, as the usual init
            else:
                p.fill_(1.0 if "norm" in name or "ln_q" in name else 0.0)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def memory_inputs(config, completion: int, seed: int = 0) -> tuple[dict, object]:
    """One row: 16 text tokens, a 448 x 448 image (32 x 32 patches -> 256 image tokens), 8 more
    text tokens, `completion` random completion tokens; and the processor that made the pixels."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    g = torch.Generator().manual_seed(seed)
    ip = Qwen2VLImageProcessorPil()
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    vis = ip([image], return_tensors="pt")
    n_image = int(vis["image_grid_thw"].prod()) // ip.merge_size**2
    text = lambda n: torch.randint(0, 151643, (n,), generator=g)  # ordinary (non-special) token ids
    prompt = torch.cat(
        [
            text(16),
            torch.tensor(
                [config.vision_start_token_id] + [config.image_token_id] * n_image + [config.vision_end_token_id]
            ),
            text(8),
        ]
    )
    completion_ids = text(completion)[None]
    input_ids = torch.cat([prompt[None], completion_ids], 1)
    batch = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == config.image_token_id).long(),
        pixel_values=vis["pixel_values"],
        image_grid_thw=vis["image_grid_thw"],
        completion_ids=completion_ids,
    )
    return batch, ip


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux) -> the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def measure_in_fresh_process(command: str, one: str, threads: int, *extra: str):
    """`python bench.py COMMAND --one ONE [extra]` in a fresh process, so its peak RSS is its own, with
    `threads` torch threads and malloc handing large blocks back (MALLOC_MMAP_THRESHOLD_=1 MiB).
    -> the JSON of the last line it prints."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    cmd = [sys.executable, str(Path(__file__).resolve()), command, "--one", one, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_memory(phase: str, version: str, completion: int, device: str) -> dict:
    """One measurement, run in a fresh process: build the model and inputs, then one scoring
    pass or one update with the `before` or `after` functions. -> peak bytes above the start."""
    import gc
    from contextlib import nullcontext

    import torch

    import pepo
    import vppo

    fwd, logprobs, entropy, kl = (
        (_plain_forward, _plain_logprobs, _plain_entropy, _plain_visual_kl)
        if version == "before"
        else (pepo.forward, pepo.token_logprobs, pepo.token_entropy, vppo.token_visual_kl)
    )
    model = memory_model().to(device)
    batch, ip = memory_inputs(model.config, completion)
    batch["pixel_values_perturbed"] = vppo.blacken_pixel_values(
        batch["pixel_values"], ip, 0.5, torch.Generator().manual_seed(0)
    )
    batch = pepo.to_device(batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()  # as pepo.train
    ids = batch["completion_ids"]
    mask, advantages = torch.ones(ids.shape, device=device), torch.ones(ids.shape[0], device=device)
    model.train(phase == "update")
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = reset_peak_rss()
    peak = lambda: torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
    t0 = time.perf_counter()
    if phase == "scoring":  # as pepo.score for PEPO's prior plus VPPO's exact KL
        with torch.no_grad(), autocast:
            logits, hidden = fwd(model, batch, 1.0, hidden_states=True)
            logp, ent = logprobs(logits, ids), entropy(logits)
            prior = pepo.perception_prior(hidden, batch["input_ids"] == model.config.image_token_id, ids.shape[1])
            logits_pert, _ = fwd(model, dict(batch, pixel_values=batch["pixel_values_perturbed"]), 1.0)
            dep = kl(logits, logits_pert)
        check = float(logp.sum() + ent.sum() + prior.sum() + dep.sum())
        forward_peak = None
    else:  # as pepo.update: forward with grad, log-probs, clipped surrogate, backward
        with autocast:
            logits, _ = fwd(model, batch, 1.0)
        logp = logprobs(logits, ids)
        loss, _ = pepo.policy_loss(logp, logp.detach(), advantages, mask)
        forward_peak = peak() - start  # the backward pass adds the parameter gradients
        loss.backward()
        check = float(loss.detach())
    if device == "cuda":
        torch.cuda.synchronize()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {
        "phase": phase,
        "version": version,
        "completion": completion,
        "peak_bytes": peak() - start,
        "peak_before_backward_bytes": forward_peak,
        "seconds": round(time.perf_counter() - t0, 2),
        "param_grad_bytes": grads,
        "finite": math.isfinite(check),
    }


def memory(opt) -> dict:
    V, GB = 151936, 1e9
    rows = []
    for L in opt.completions:
        for phase in ("scoring", "update"):
            for version in ("before", "after"):
                one = f"{phase},{version},{L}"
                rows.append(measure_in_fresh_process("memory", one, opt.threads, "--device", opt.device))
                r = rows[-1]
                print(
                    f"  L={L:5d} {phase:7s} {version:6s} peak +{r['peak_bytes'] / GB:.2f} GB  {r['seconds']:.1f} s",
                    file=sys.stderr,
                )
    import torch

    return {
        "rows": rows,
        "fp32_BLV_bytes": {str(L): L * V * 4 for L in opt.completions},
        "config": {
            "model": "random-weight Qwen2.5-VL, 3B widths (vocab 151936, hidden 2048, 16/2 heads, "
            "1280-wide vision), 2 text layers, 2 vision blocks",
            "image": "448x448 (256 image tokens)",
            "batch": 1,
            "device": opt.device,
            "dtype": "float32" if opt.device == "cpu" else "bfloat16 autocast (as pepo.train)",
            "method": "cuda: max_memory_allocated - memory_allocated at the start"
            if opt.device == "cuda"
            else "fresh process per row; peak RSS (VmHWM, reset via /proc/self/clear_refs after setup) - RSS at the "
            "start; "
            "MALLOC_MMAP_THRESHOLD_=1 MiB so freed tensors go back to the OS",
            "machine": machine() | {"threads": opt.threads},
            "torch": torch.__version__,
        },
    }


def memory_markdown(result: dict) -> str:
    by = {(r["phase"], r["version"], r["completion"]): r for r in result["rows"]}
    lines = [
        "| completion tokens | one fp32 [B, L, V] | scoring pass | update | update, before `backward()` |",
        "|---|---|---|---|---|",
    ]
    for L, blv in result["fp32_BLV_bytes"].items():
        L = int(L)
        cell = lambda phase, key, L=L: (
            f"{by[phase, 'before', L][key] / 1e9:.2f} → **{by[phase, 'after', L][key] / 1e9:.2f} GB**"
        )
        lines.append(
            f"| {L} | {blv / 1e9:.2f} GB | {cell('scoring', 'peak_bytes')} | {cell('update', 'peak_bytes')} | "
            f"{cell('update', 'peak_before_backward_bytes')} |"
        )
    grads = max(r["param_grad_bytes"] for r in result["rows"])
    c = result["config"]
    lines += [
        "",
        f"Peak memory above the built model and inputs, before → after, batch {c['batch']}, {c['dtype']}, "
        f"{c['device']}; "
        f"the update's parameter gradients are {grads / 1e9:.2f} GB. Method: {c['method']}.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# memory-lora: peak RSS of one PEPO_G step, full fine-tuning vs --lora-rank, at Qwen2.5-VL-3B widths
# ----------------------------------------------------------------------------------------
def _measure_step(mode: str, bf16: bool, group: int, completion: int, rank: int) -> dict:
    """One PEPO_G step (score -> shape -> update with AdamW's step) on `group` completions of one
    448x448 prompt, set up as pepo.run does, in a fresh process. full: the policy (fp32), a reference
    copy (bf16 with --bf16), gradients and AdamW's two moments. lora: the frozen base (bf16 with --bf16)
    with rank-`rank` adapters (pepo.add_lora); the reference is the base with the adapters disabled."""
    import copy
    import gc

    import torch

    import pepo

    rss = {"start": _status_bytes("VmRSS")}  # python, torch and transformers imported
    args = pepo.Args(algo="pepo_g", group_size=group, prompts_per_step=1, steps=1, max_new_tokens=completion, lr=1e-6)
    pepo.apply_budget(args)  # the rest of the default run's settings
    args.lora_rank, args.bf16 = (rank if mode == "lora" else 0), bf16
    pepo.apply_preset(args)
    model = memory_model()
    if mode == "lora":
        ref_model = pepo.add_lora(model, args, "bench.memory_model")
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if bf16:
            ref_model.to(torch.bfloat16)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, args.adam_beta2))
    batch, _ = memory_inputs(model.config, completion)
    g = torch.Generator().manual_seed(1)
    inputs = pepo.repeat_rows(batch, group)
    ids = torch.randint(0, 151643, (group, completion), generator=g)  # a different completion per row
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :-completion], ids], 1)
    inputs["completion_ids"] = ids
    mask, truncated = torch.ones(ids.shape), torch.zeros(group, dtype=torch.bool)
    rewards = torch.arange(group).remainder(2).float()  # half right: every advantage non-zero
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    gc.collect()
    rss["setup"] = _status_bytes("VmRSS")  # weights, reference, inputs; no gradients or optimizer state yet
    t0 = time.perf_counter()
    with autocast:  # as pepo.train, one process: the update reuses the scoring pass (one micro-batch)
        scores = pepo.score(model, ref_model, [inputs], args, prior=True, dependency=False, keep_graph=True)
    advantages, weights, mask, _, _ = pepo.shape(scores, rewards, mask, truncated, 1, args)
    old_logp, ref_logp, logits = scores["old_logp"], scores["ref_logp"], scores.pop("logits")
    stats = pepo.update(
        model, optimizer, inputs, old_logp, ref_logp, advantages, weights, mask, args, 1, autocast, logits
    )
    rss["peak"] = _status_bytes("VmHWM")
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    return {
        "mode": mode,
        "bf16": bf16,
        "lora_rank": args.lora_rank,
        "group": group,
        "completion": completion,
        "params": sum(p.numel() for p in model.parameters()),
        "trained_params": sum(p.numel() for p in trained),
        "reference_copy_bytes": 0 if mode == "lora" else sum(p.nbytes for p in ref_model.parameters()),
        "optimizer_state_bytes": state,
        "rss_bytes": rss,
        "seconds": round(time.perf_counter() - t0, 1),
        "kl": stats["kl"],
        "finite": math.isfinite(stats["loss"]) and stats["nonfinite_skipped"] == 0,
    }


def memory_lora(opt) -> dict:
    """Each (mode, dtype) in a fresh process, one at a time; rows in MB of RSS."""
    rows = []
    for bf16 in (False, True):
        for mode in ("full", "lora"):
            one = f"{mode},{int(bf16)},{opt.group_size},{opt.completion},{opt.lora_rank}"
            rows.append(measure_in_fresh_process("memory-lora", one, opt.threads))
            print(f"  {mode} bf16={bf16}: peak RSS {rows[-1]['rss_bytes']['peak'] / 1e9:.2f} GB", file=sys.stderr)
    import torch

    return {
        "rows": rows,
        "config": {
            "model": "bench.memory_model: random-weight Qwen2.5-VL at the 3B's widths (vocab 151936, hidden 2048), "
            "2 text layers, 2 vision blocks",
            "step": f"one PEPO_G step (beta 0.001: KL reference pass), {opt.group_size} completions of "
            f"{opt.completion} tokens of one prompt with a 448x448 image; score -> shape -> update, AdamW",
            "method": "fresh process per row; peak RSS = VmHWM of the whole process (imports, model, reference, "
            "inputs, step); MALLOC_MMAP_THRESHOLD_=1 MiB",
            "command": shlex.join(["python", "bench.py", "memory-lora", *sys.argv[2:]]),
            "machine": machine() | {"threads": opt.threads},
            "torch": torch.__version__,
        },
    }


def memory_lora_markdown(result: dict) -> str:
    GB = 1e9
    lines = [
        "| weights | run | trained params | reference copy | AdamW state | RSS after setup | peak RSS | LoRA / full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    full = {r["bf16"]: r["rss_bytes"]["peak"] for r in result["rows"] if r["mode"] == "full"}
    for r in result["rows"]:
        run = "full fine-tune" if r["mode"] == "full" else f"LoRA rank {r['lora_rank']}"
        ratio = f"{r['rss_bytes']['peak'] / full[r['bf16']]:.2f}" if r["mode"] == "lora" else ""
        lines.append(
            f"| {'bf16 frozen (--bf16)' if r['bf16'] else 'fp32'} | {run} | {r['trained_params'] / 1e6:.1f}M | "
            f"{r['reference_copy_bytes'] / GB:.2f} GB | {r['optimizer_state_bytes'] / GB:.3f} GB | "
            f"{r['rss_bytes']['setup'] / GB:.2f} GB | **{r['rss_bytes']['peak'] / GB:.2f} GB** | {ratio} |"
        )
    c = result["config"]
    lines += ["", f"{c['model']}; {c['step']}. Method: {c['method']}. Command: `{c['command']}`."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Token heatmap (pepo.py --visualize N)
# ----------------------------------------------------------------------------------------
SIGNALS = {  # record key -> label shown in the switch
    "prior": "PEPO perception prior",
    "entropy": "entropy",
    "pepo_weight": "PEPO weight w_t",
    "dependency": "VPPO dependency",
    "vppo_mask": "VPPO mask (TGF)",
    "weight": "token weight used",
}
EXTRA_SIGNALS = {  # shown only when the records carry them (bench.py signals writes them; pepo.py does not)
    "dependency_exact": "VPPO dependency, exact KL",
    "perception": "perception token (label)",
}


CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222} h1{font-size:1.2em}
input[name=signal]{display:none} .legend{color:#666;font-size:12px;margin:.4em 0 1em}
h2{font-size:1em;margin:1.2em 0 .3em}
.switch label{display:inline-block;margin:0 .4em .3em 0;padding:.2em .7em;border:1px solid #bbb;
  border-radius:1em;cursor:pointer}
.rollout{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0;display:flex;gap:1em;align-items:flex-start}
.rollout img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc}
.meta{font-size:12px;color:#555;margin-bottom:.4em} .tokens{font:15px ui-monospace,monospace;line-height:2}
.tok{white-space:pre;padding:2px 1px;border-right:1px solid #eee}
"""


def write_token_heatmap(path, records: list[dict], title: str = "") -> None:
    """Self-contained HTML: images inlined as base64 PNG, tokens coloured by the signal picked with
    a CSS-only radio switch (no script, no external resource). Colour = the signal min-max
    normalised within each rollout; hover a token for every signal's raw value."""
    labels = {**SIGNALS, **EXTRA_SIGNALS}
    names = [k for k in labels if any(k in r["signals"] for r in records)]
    css = CSS + "".join(
        f"#s-{k}:checked~.rollouts .tok{{background:var(--{k})}}\n"
        f"#s-{k}:checked~.switch label[for=s-{k}]{{background:#d22;color:#fff;border-color:#d22}}\n"
        for k in names
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tokens "
        f"{html.escape(title)}</title><style>{css}</style></head><body>",
        f"<h1>Per-token signals: {html.escape(title)}</h1>",
    ]
    for j, k in enumerate(names):  # the radios must precede .rollouts for the ~ selector
        parts.append(f"<input type='radio' name='signal' id='s-{k}'{' checked' if j == 0 else ''}>")
    parts.append("<div class='switch'>" + "".join(f"<label for='s-{k}'>{labels[k]}</label>" for k in names) + "</div>")
    parts.append(
        "<div class='legend'>Colour: white = lowest, red = highest value within each rollout; hover a token for "
        "every value. "
        "Prior: mean similarity of the token's hidden states to the image tokens'; dependency: KL between the policy "
        "with "
        "the image and with half its patches blacked out; mask: the top 40% by dependency (VPPO's TGF); PEPO weight: "
        "w_t before the ramp; token weight used: what multiplied this run's loss (PEPO ramp, masks). Computed for "
        "every "
        "algorithm; only the run's own method acts on them.</div>"
    )
    parts.append("<div class='rollouts'>")
    for j, r in enumerate(records):
        if j == 0 or r["step"] != records[j - 1]["step"]:
            parts.append(f"<h2>step {r['step']}{' (start of training)' if j == 0 else ' (end of training)'}</h2>")
        imgs = "".join(f"<img alt='input image' src='data:image/png;base64,{b64}'>" for b64 in r["images"])
        spans = []
        for t, tok in enumerate(r["tokens"]):
            values = {k: r["signals"][k][t] for k in names if k in r["signals"]}
            style = ";".join(f"--{k}:rgba(220,40,30,{_norm(r['signals'][k], t):.2f})" for k in values)
            tip = " | ".join(f"{labels[k]} {v:.4g}" for k, v in values.items())
            spans.append(f"<span class='tok' style='{style}' title='{html.escape(tip)}'>{html.escape(tok)}</span>")
        meta = (
            f"step {r['step']} · rollout {r['row']} · reward {r['reward']:.2f} · accuracy {r['accuracy']:.2f} · "
            f"advantage {r['advantage']:+.3f} · answer {html.escape(r['answer'])}"
        )
        parts.append(
            f"<div class='rollout' data-step='{r['step']}' data-row='{r['row']}'><div>{imgs}</div><div>"
            f"<div class='meta'>{meta}</div><div class='meta'>{html.escape(r['prompt'])}</div>"
            f"<div class='tokens'>{''.join(spans)}</div></div></div>"
        )
    parts.append("</div></body></html>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")


def heatmap(opt) -> Path:
    src = Path(opt.run_dir) / "tokens.jsonl"
    if not src.is_file():
        raise SystemExit(f"error: {src} not found; run pepo.py with --visualize N --output-dir {opt.run_dir} first")
    records = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    summary = Path(opt.run_dir) / "summary.json"
    title = (
        " on ".join(json.loads(summary.read_text())[k] for k in ("algo", "task"))
        if summary.is_file()
        else str(opt.run_dir)
    )
    out = Path(opt.out or Path(opt.run_dir) / "tokens.html")
    write_token_heatmap(out, records, title=title)
    print(f"wrote {out} ({len(records)} rollouts)")
    return out


def _norm(values: list[float], t: int) -> float:
    lo, hi = min(values), max(values)
    return 0.0 if hi - lo < 1e-12 else (values[t] - lo) / (hi - lo)


# ----------------------------------------------------------------------------------------
# memory-table: what FSDP2 shards, per GPU, from the real models' parameter counts
# ----------------------------------------------------------------------------------------
# The published config.json values that set the parameter count (everything else is left at the
# transformers defaults, which do not change it). `count_parameters` builds each model on the meta
# device (no memory, no download) and counts; PARAMS holds the result (transformers 5.23).
CONFIGS = {
    "Qwen2.5-VL-3B": (
        "qwen2_5_vl",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
        ),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
    ),
    "Qwen2.5-VL-7B": (
        "qwen2_5_vl",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
        ),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
    ),
    "Qwen3-VL-8B": (
        "qwen3_vl",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True
            ),
        ),
        dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            patch_size=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    ),
    "Qwen3-VL-32B": (
        "qwen3_vl",
        dict(
            vocab_size=151936,
            hidden_size=5120,
            intermediate_size=25600,
            num_hidden_layers=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True
            ),
        ),
        dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=5120,
            patch_size=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    ),
}
PARAMS = {}  # name -> (total, vision tower incl. merger); filled by count_parameters() on first use
BYTES = dict(weights=4, grads=4, adam=8, reference=2)  # fp32 weights, fp32 grads, AdamW m and v, the bf16 KL reference


def count_parameters(name: str) -> tuple[int, int]:
    """(all parameters, those of the vision tower and merger) of a model built from CONFIGS on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if name not in PARAMS:
        model_type, text, vision = CONFIGS[name]
        config = AutoConfig.for_model(
            model_type, text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"]
        )
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        total = sum(p.numel() for p in model.parameters())  # a tied lm_head (3B) counts once
        PARAMS[name] = (total, sum(p.numel() for p in model.model.visual.parameters()))
    return PARAMS[name]


def gib_per_gpu(total: int, vision: int, gpus: int, freeze_vision: bool, beta: bool) -> float:
    """GiB per GPU for the sharded model state (not activations): fp32 weights of every parameter,
    fp32 grads and AdamW moments of the trained ones, the bf16 reference when beta > 0, all / gpus."""
    trained = total - (vision if freeze_vision else 0)
    n = (
        total * BYTES["weights"]
        + trained * (BYTES["grads"] + BYTES["adam"])
        + (total * BYTES["reference"] if beta else 0)
    )
    return n / gpus / 2**30


def memory_table(opt) -> dict:
    gpus = [1, 2, 4, 8]
    rows, lines = (
        {},
        [
            "| model (params, vision) | --freeze-vision | " + " | ".join(f"{g} GPU" for g in gpus) + " |",
            "|---|---|" + "---|" * len(gpus),
        ],
    )
    for name in CONFIGS:
        total, vision = count_parameters(name)
        for freeze in (False, True):
            cells = [
                f"{gib_per_gpu(total, vision, g, freeze, True):.1f} "
                f"({gib_per_gpu(total, vision, g, freeze, False):.1f})"
                for g in gpus
            ]
            rows[f"{name}{' freeze_vision' if freeze else ''}"] = dict(zip(map(str, gpus), cells))
            label = f"{name} ({total / 1e9:.2f}B, {vision / 1e9:.2f}B)" if not freeze else ""
            lines.append(f"| {label} | {'yes' if freeze else 'no'} | " + " | ".join(cells) + " |")
        # --lora-rank 64: bf16 base (2 B/param) + fp32 adapters, grads and AdamW (16 B); no reference copy
        lora = (2 * total + 16 * lora_parameters(name, PLAN["lora_rank"])) / 2**30
        cells = [f"{lora / g:.1f}" for g in gpus]
        rows[f"{name} lora"] = dict(zip(map(str, gpus), cells))
        lines.append(f"| | LoRA r{PLAN['lora_rank']} (frozen) | " + " | ".join(cells) + " |")
    return {
        "params": {k: {"total": t, "vision": v} for k, (t, v) in PARAMS.items()},
        "GiB_per_gpu beta>0 (beta=0)": rows,
        "markdown": "\n".join(lines),
    }


# ----------------------------------------------------------------------------------------
# memory-plan: peak memory of one training step on one GPU, full fine-tune vs LoRA. The
# activations are measured on CPU at each model's real widths with 1-3 layers (a fresh process
# per point), fitted per layer and per token, and extrapolated to the full depth.
# ----------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # pepo.py's default
PLAN = dict(  # the recipes' settings the table covers (pepo-geo3k-3b: 1,024 tokens, micro-batch 2, checkpointing)
    completions=[1024, 2048],
    micro_batches=[1, 2, 4, 8],
    group_size=8,
    prompts_per_step=8,  # the PEPO recipe's (pepo-geo3k-3b): 64 rows generated at once, their attention cache
    image_px=448,  # one 448 x 448 image per prompt: 256 image tokens (Qwen2.5-VL), 196 (Qwen3-VL)
    prompt_text=100,  # text tokens around it (system message, question, format prompt)
    lora_rank=64,
    gpus_gib=[24, 48, 80],
    usable=0.9,  # of a GPU's memory: the CUDA context and the allocator's fragmentation take the rest
)
# Measured points (text layers, prompt text tokens, completion tokens, rows), one 224 x 224 image.
# The fit uses the first four: depth, prompt tokens (cheap: no logits) and completion tokens apart.
FIT_POINTS = [(1, 26, 16, 1), (2, 26, 16, 1), (1, 282, 16, 1), (1, 26, 48, 1)]
HELD_OUT = {  # points the fit never sees; 2 rows at the 3B's widths, depth 3 with LoRA at all three (CPU time)
    "all": [(2, 282, 48, 1), (1, 538, 32, 1)],
    "Qwen2.5-VL-3B": [(3, 282, 48, 1), (1, 26, 48, 2)],
    "Qwen2.5-VL-7B lora": [(3, 282, 48, 1)],
    "Qwen3-VL-8B lora": [(3, 282, 48, 1)],
}
MEASURE_IMAGE_PX = 224
PHASES = ("rollout_prefill", "scoring", "update", "update_ckpt")


def plan_config(name: str, layers: int | None = None, vision_depth: int | None = None, widths=None):
    """The published config of `name` (CONFIGS), optionally cut to `layers` text layers and
    `vision_depth` vision blocks (Qwen3-VL keeps the deepstack taps that still exist, else block 0),
    or with other `widths` (text, vision dicts: TINY_WIDTHS)."""
    from transformers import AutoConfig

    model_type, text, vision = CONFIGS[name]
    text, vision = dict(text), dict(vision)
    if widths:
        text |= widths[0] | ({"head_dim": 16} if "head_dim" in text else {})
        text["rope_parameters"] = text["rope_parameters"] | {"mrope_section": [2, 3, 3]}  # head_dim 16
        vision |= widths[1]
        layers, vision_depth = layers or text["num_hidden_layers"], vision_depth or vision["depth"]
    if layers:
        text["num_hidden_layers"] = layers
    if vision_depth:
        vision["depth"] = vision_depth
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = [
                i for i in vision["deepstack_visual_indexes"] if i < vision_depth
            ] or [0]
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=text["tie_word_embeddings"],
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def random_model(config, device: str = "cpu", seed: int = 0):
    """Random weights (uniform, std 0.02; norms 1) on `device`, fp32, without transformers' slow init."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()  # no_init_weights leaves a tied lm_head untied
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.uniform_(-0.035, 0.035, generator=g)
            else:
                p.fill_(1.0 if "norm" in name or "ln_q" in name else 0.0)
    return model


def add_lora(model, rank: int):
    """LoRA adapters (peft) on the language model's linear layers, as pepo.py's --lora-rank does by
    default: alpha = 2 rank, no dropout, the base frozen; the adapters in fp32."""
    from peft import LoraConfig, inject_adapter_in_model

    pattern = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LORA_TARGETS) + ")"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    return model


def lora_disabled(model, off: bool = True):
    """The reference pass of a LoRA run: the same model with its adapters switched off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(not off)


def plan_inputs(config, image_px: int, prompt_text: int, completion: int, rows: int = 1, seed: int = 0) -> dict:
    """`rows` rows of one prompt (`prompt_text` text tokens around one image_px x image_px image)
    with `completion` random completion tokens each: the G rows of a group, as one micro-batch holds them."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vc = config.vision_config
    ip = Qwen2VLImageProcessorPil(
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        min_pixels=image_px * image_px,
        max_pixels=image_px * image_px,
    )
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (image_px, image_px, 3), dtype=np.uint8))
    vis = ip([image], return_tensors="pt")
    n_image = int(vis["image_grid_thw"].prod()) // ip.merge_size**2
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 151643, (n,), generator=g)  # ordinary token ids
    image_ids = [config.vision_start_token_id] + [config.image_token_id] * n_image + [config.vision_end_token_id]
    prompt = torch.cat([text(prompt_text // 2), torch.tensor(image_ids), text(prompt_text - prompt_text // 2)])
    completion_ids = text(rows * completion).view(rows, completion)
    input_ids = torch.cat([prompt.expand(rows, -1), completion_ids], 1)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == config.image_token_id).long(),
        pixel_values=vis["pixel_values"].repeat(rows, 1),
        image_grid_thw=vis["image_grid_thw"].repeat(rows, 1),
        completion_ids=completion_ids,
    )


def _measure_plan(name: str, mode: str, layers: int, points: list[tuple]) -> list[dict]:
    """The points (prompt text tokens, completion tokens, rows) of one depth, in one fresh process:
    bytes above the start of each phase's peak RSS, at `name`'s widths with `layers` text layers
    and 1 vision block, under bf16 autocast as pepo.py runs on CUDA. mode "full": fp32 weights,
    the text layers trained (the embedding, lm_head and vision tower frozen: less CPU memory, and
    the only activation it drops is the lm_head's [L, D] input); "lora": bf16 base, rank
    PLAN["lora_rank"] adapters in fp32. An unmeasured small pass first: one-time allocations
    (libraries' buffers) stay out of the numbers."""
    import gc

    import torch

    import pepo

    torch.manual_seed(0)
    config = plan_config(name, layers, vision_depth=1)
    model = random_model(config)
    if mode == "lora":
        model = add_lora(model.to(torch.bfloat16), PLAN["lora_rank"])
    else:
        model.requires_grad_(False)
        model.model.language_model.layers.requires_grad_(True)
        model.model.language_model.norm.requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def prefill(batch, ids):  # generate's first pass: the prompt once, with its attention cache
        model.eval()
        with torch.no_grad(), autocast:
            cache = model(**pepo.model_inputs(model, batch), logits_to_keep=1, use_cache=True).past_key_values
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return {"kv_bytes_per_token_layer": sum(t.numel() * t.element_size() for t in kv) / ids.numel() / layers}

    def scoring(batch, ids):  # as pepo.score for PEPO_G: every layer's hidden states, the prior, the reference
        model.eval()
        with torch.no_grad(), autocast:
            layout = pepo.prompt_layout(model, batch)
            logits, hidden = pepo.forward(model, batch, 1.0, hidden_states=True, layout=layout)
            logp, ent = pepo.token_logprobs(logits, batch["completion_ids"]), pepo.token_entropy(logits)
            prior = pepo.perception_prior(hidden, batch["input_ids"] == config.image_token_id, logits.shape[1])
            lora_disabled(model, mode == "lora")  # full: the policy stands in for the bf16 reference copy
            ref = pepo.token_logprobs(pepo.forward(model, batch, 1.0, layout=layout)[0], batch["completion_ids"])
            lora_disabled(model, False)
        assert math.isfinite(float(logp.sum() + ent.sum() + prior.sum() + ref.sum()))

    def update(batch, ids):  # as pepo.update, one micro-batch: forward, log-probs, clipped surrogate, backward
        model.train()
        comp = batch["completion_ids"]
        with autocast:
            logits, _ = pepo.forward(model, batch, 1.0)
        logp = pepo.token_logprobs(logits, comp)
        del logits
        loss, _ = pepo.policy_loss(logp, logp.detach(), torch.ones(comp.shape[0]), torch.ones(comp.shape))
        loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        return {"grad_bytes": grads}

    def measure(out, phase, fn, batch):
        gc.collect()
        start, t0 = reset_peak_rss(), time.perf_counter()
        extra = fn(batch, batch["input_ids"])
        out[phase] = _status_bytes("VmHWM") - start
        out[phase + "_seconds"] = round(time.perf_counter() - t0, 2)
        out.update({f"{phase}_{k}": v for k, v in (extra or {}).items()})

    rows = []
    for i, (prompt_text, completion, n_rows) in enumerate([(2, 4, 1), *points]):
        batch = plan_inputs(config, MEASURE_IMAGE_PX, prompt_text, completion, n_rows)
        T = int(batch["input_ids"].shape[1])
        out = dict(name=name, mode=mode, layers=layers, prompt_text=prompt_text, completion=completion, rows=n_rows)
        out |= dict(tokens=T, prompt_tokens=T - completion)
        model.activation_checkpointing_disable()
        for phase, fn in zip(PHASES, (prefill, scoring, update)):
            measure(out, phase, fn, batch)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        measure(out, "update_ckpt", update, batch)
        if i:  # the first, small pass is the warm-up
            rows.append(out)
    return rows


def _features(layers, tokens, completion, rows=1, prompts=None):
    """a + d n + b n (token rows) + c rows L: a fixed cost, a per-layer one (weight copies, the
    layers' gradients), a per-layer-and-token one (activations) and a per-completion-token one
    (logits). Token rows = rows x tokens, or with `prompts` distinct prompts shared by the rows
    (pepo.forward without checkpointing) prompts x prompt tokens + rows x completion tokens."""
    token_rows = rows * tokens if prompts is None else prompts * (tokens - completion) + rows * completion
    return [1.0, layers, layers * token_rows, rows * completion]


SHARED_PHASES = ("scoring", "update")  # the passes through pepo.forward, which shares a group's prompt


def nonnegative_fit(X, y):
    """Least squares with the per-layer and per-token costs (columns 1-3) kept >= 0: a negative one is
    measurement noise, and extrapolated to the full depth and length it would subtract gigabytes."""
    keep = list(range(X.shape[1]))
    while True:
        coef = np.zeros(X.shape[1])
        coef[keep] = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
        worst = min(keep[1:], key=lambda k: coef[k], default=None)
        if worst is None or coef[worst] >= 0:
            return coef
        keep.remove(worst)


def fit_plan(points: list[dict]) -> dict:
    """Per (model, mode, phase): the coefficients solved from the FIT_POINTS measurements, and
    the held-out points' measured vs predicted bytes."""
    fits = {}
    for key in sorted({(p["name"], p["mode"]) for p in points}):
        mine = [p for p in points if (p["name"], p["mode"]) == key]
        fit = [p for p in mine if (p["layers"], p["prompt_text"], p["completion"], p["rows"]) in FIT_POINTS]
        if len(fit) < len(FIT_POINTS):  # still being measured
            continue
        rest = [p for p in mine if p not in fit]
        X = np.array([_features(p["layers"], p["tokens"], p["completion"]) for p in fit])
        for phase in PHASES:
            coef = nonnegative_fit(X, np.array([p[phase] for p in fit], dtype=float))
            if phase == "scoring":  # it keeps every layer's hidden state [T, D]: a cost below the points' resolution
                D = CONFIGS[key[0]][1]["hidden_size"]
                coef[2] = max(coef[2], D * (2 if key[1] == "lora" else 4))  # bf16 residual stream, or fp32
            held = []
            for p in rest:
                shared = 1 if phase in SHARED_PHASES else None  # the points' rows repeat one prompt
                pred = float(np.dot(_features(p["layers"], p["tokens"], p["completion"], p["rows"], shared), coef))
                held.append(
                    dict(
                        point=[p["layers"], p["tokens"], p["completion"], p["rows"]],
                        measured=p[phase],
                        predicted=round(pred),
                        error=round(pred / p[phase] - 1, 4),
                        # the error against what the point costs beyond the fixed term a: a stricter measure
                        error_beyond_a=round((pred - p[phase]) / (p[phase] - coef[0]), 4)
                        if p[phase] - coef[0] > 2**20
                        else None,
                    )
                )
            fits[f"{key[0]} {key[1]} {phase}"] = dict(
                zip(["a", "d_per_layer", "b_per_layer_token", "c_per_completion_token"], coef.round(1).tolist())
            ) | {"held_out": held}
        kv = [p["rollout_prefill_kv_bytes_per_token_layer"] for p in mine]
        fits[f"{key[0]} {key[1]} kv_bytes_per_token_layer"] = max(kv)
    return fits


def lora_parameters(name: str, rank: int) -> int:
    """Parameters of rank-`rank` adapters on every LORA_TARGETS layer of the language model."""
    t = CONFIGS[name][1]
    D, inter = t["hidden_size"], t["intermediate_size"]
    hd = t.get("head_dim", D // t["num_attention_heads"])
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    per_layer = (D + q) + 2 * (D + kv) + (q + D) + 2 * (D + inter) + (inter + D)
    return rank * per_layer * t["num_hidden_layers"]


def predict_peak(
    fits,
    name,
    mode,
    completion,
    micro_batch,
    ckpt,
    prompt_tokens,
    prompts_per_step,
    group_size,
    beta=True,
    freeze_vision=True,
) -> dict:
    """Bytes per phase of one training step of `name` on one GPU (see PLAN_NOTES), and the peak.
    A micro-batch holds whole groups or part of one (consecutive rows), so max(1, mb / G) prompts."""
    total, vision = count_parameters(name)
    text = CONFIGS[name][1]
    V, D, N = text["vocab_size"], text["hidden_size"], text["num_hidden_layers"]
    coef = lambda phase: fits[f"{name} {mode} {phase}"]
    shared = lambda phase: None if ckpt or phase not in SHARED_PHASES else max(1, micro_batch // group_size)
    act = lambda phase, rows, T, L: float(
        np.dot(
            _features(N, T, L, rows, shared(phase)),
            [coef(phase)[k] for k in ("a", "d_per_layer", "b_per_layer_token", "c_per_completion_token")],
        )
    )
    T = prompt_tokens + completion
    if mode == "lora":
        n = lora_parameters(name, PLAN["lora_rank"])
        static = {"weights": 2 * total + 4 * n, "grads": 4 * n, "adam": 8 * n, "reference": 0}
        head_grads = 0
    else:
        trained = total - (vision if freeze_vision else 0)
        static = {
            "weights": 4 * total,
            "grads": 4 * trained,
            "adam": 8 * trained,
            "reference": 2 * total if beta else 0,
        }
        head_grads = 4 * V * D * (1 if text["tie_word_embeddings"] else 2)  # trained, frozen in the measurement
    if f"{name} {mode} update" not in fits:  # activations not measured: the static memory alone, a lower bound
        held = sum(static.values())
        return {"static": static, "phases": {"static": held}, "peak": held, "peak_phase": "static only"}
    rows = prompts_per_step * group_size
    kv = rows * T * N * fits[f"{name} {mode} kv_bytes_per_token_layer"]
    # decoding holds the fixed and per-layer terms of the prefill (with fp32 weights: autocast's bf16 copies of the
    # trained weights, cached until the autocast block ends) next to the growing cache and the sampling temporaries
    fixed = coef("rollout_prefill")["a"] + N * coef("rollout_prefill")["d_per_layer"]
    rollout = max(act("rollout_prefill", prompts_per_step, prompt_tokens, 0), fixed + kv * (1 + 1 / N) + 16 * rows * V)
    held = sum(static.values())
    phases = {
        "rollout": held + rollout,
        "scoring": held + act("scoring", micro_batch, T, completion),
        # the update starts with the gradients freed (zero_grad(set_to_none=True)); the fit holds the layers' own
        "update": held
        - static["grads"]
        + head_grads
        + act("update_ckpt" if ckpt else "update", micro_batch, T, completion),
    }
    return {"static": static, "phases": phases, "peak": max(phases.values()), "peak_phase": max(phases, key=phases.get)}


def plan_points(models: list[str]) -> list[tuple]:
    """(name, mode, layers, prompt text, completion, rows) of every measurement."""
    order = [(name, "lora") for name in models] + [(name, "full") for name in models]  # LoRA's first
    held = lambda name, mode: HELD_OUT["all"] + HELD_OUT.get(name, []) + HELD_OUT.get(f"{name} {mode}", [])
    return [(name, mode, *pt) for name, mode in order for pt in FIT_POINTS + held(name, mode)]


def measure_plan_points(opt) -> list[dict]:
    """The plan_points, one process per model, mode and depth, one after another; points already
    in memory-plan-points.jsonl are kept (delete the file to measure again)."""

    path = Path(opt.results_dir) / "memory-plan-points.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    have = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(p["name"], p["mode"], p["layers"], p["prompt_text"], p["completion"], p["rows"]) for p in have}
    todo = {}
    for name, mode, layers, *pt in plan_points(opt.models):
        if (name, mode, layers, *pt) not in done:
            todo.setdefault((name, mode, layers), []).append(pt)
    for (name, mode, layers), pts in todo.items():
        t0 = time.time()
        new = measure_in_fresh_process("memory-plan", json.dumps([name, mode, layers, pts]), opt.threads)
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        have += new
        print(f"  {name} {mode} {layers} layer(s): {len(new)} points in {time.time() - t0:.0f} s", file=sys.stderr)
    return [p for p in have if p["name"] in opt.models]


def plan_prompt_tokens(name: str) -> int:
    """Prompt tokens of PLAN's prompt: its text and one PLAN["image_px"] image (+2 vision markers)."""
    vision = CONFIGS[name][2]
    side = PLAN["image_px"] // (vision.get("patch_size", 14) * 2)  # 2 x 2 patches merge into one token
    return PLAN["prompt_text"] + side * side + 2


def plan_table(fits: dict, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        P = plan_prompt_tokens(name)
        for mode in ("full", "lora"):
            for L in PLAN["completions"]:
                for ckpt in (False, True):
                    for mb in PLAN["micro_batches"]:
                        r = predict_peak(fits, name, mode, L, mb, ckpt, P, PLAN["prompts_per_step"], PLAN["group_size"])
                        gib = r["peak"] / 2**30
                        rows.append(
                            dict(
                                model=name,
                                mode=mode,
                                completion=L,
                                gradient_checkpointing=ckpt,
                                micro_batch=mb,
                                prompt_tokens=P,
                                peak_gib=round(gib, 2),
                                peak_phase=r["peak_phase"],
                                phases_gib={k: round(v / 2**30, 2) for k, v in r["phases"].items()},
                                static_gib={k: round(v / 2**30, 2) for k, v in r["static"].items()},
                                fits={  # None: unknown (only the static memory, a lower bound, is known)
                                    str(g): (gib <= PLAN["usable"] * g)
                                    and (None if r["peak_phase"] == "static only" else True)
                                    for g in PLAN["gpus_gib"]
                                },
                            )
                        )
    return rows


def plan_markdown(result: dict) -> str:
    gpus = PLAN["gpus_gib"]
    mark = lambda gib: next((f"≤{g}" for g in gpus if gib <= PLAN["usable"] * g), f">{gpus[-1]}")
    # a static-only (≥) row marks "≤g" only as "not ruled out"; its activations were not measured
    lines = [
        f"Peak GiB of one training step on one GPU (PEPO_G: reference for beta > 0; --freeze-vision for full "
        f"fine-tuning; {PLAN['prompts_per_step']} prompts x {PLAN['group_size']} completions per step, one "
        f"{PLAN['image_px']}px image per prompt), by --micro-batch-size (mb); each cell: GiB and the smallest GPU "
        f"(GiB) it fits at {PLAN['usable']:.0%} use.",
        "",
        "| model | training | completion | --gradient-checkpointing | "
        + " | ".join(f"mb {m}" for m in PLAN["micro_batches"])
        + " | peak phase (mb 1) |",
        "|---|---|---|---|" + "---|" * len(PLAN["micro_batches"]) + "---|",
    ]
    by = {}
    for r in result["plan"]:
        by.setdefault((r["model"], r["mode"], r["completion"], r["gradient_checkpointing"]), []).append(r)
    for (name, mode, L, ckpt), rs in by.items():
        label = "full (fp32 + AdamW)" if mode == "full" else f"LoRA r{PLAN['lora_rank']} (bf16 base)"
        lower = rs[0]["peak_phase"] == "static only"
        cells = [f"{'≥' if lower else ''}{r['peak_gib']:.1f} ({mark(r['peak_gib'])})" for r in rs]
        lines.append(
            f"| {name} | {label} | {L} | {'yes' if ckpt else 'no'} | "
            + " | ".join(cells)
            + f" | {rs[0]['peak_phase']} |"
        )
    lines += [
        "",
        "Fit: peak above the start = a + d·layers + b·layers·(token rows) + c·rows·(completion tokens); held-out "
        "points [layers, tokens, completion, rows]: predicted vs measured, in % of the measured peak, in MiB, and in % "
        "of the part above a.",
        "",
        "| model, training, phase | a (MiB) | d (MiB/layer) | b (KiB/layer/token) | c (KiB/completion token) "
        "| held-out errors |",
        "|---|---|---|---|---|---|",
    ]
    for key, f in result["fits"].items():
        if not isinstance(f, dict):
            continue
        errs = ", ".join(
            f"{h['error']:+.1%} ({(h['predicted'] - h['measured']) / 2**20:+.0f} MiB, "
            f"{'n/a' if h['error_beyond_a'] is None else format(h['error_beyond_a'], '+.0%')}) "
            f"@{h['point']}"
            for h in f["held_out"]
        )
        lines.append(
            f"| {key} | {f['a'] / 2**20:.0f} | {f['d_per_layer'] / 2**20:.1f} | "
            f"{f['b_per_layer_token'] / 2**10:.1f} | {f['c_per_completion_token'] / 2**10:.1f} | {errs} |"
        )
    lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines)


PLAN_NOTES = [
    "Activations measured on CPU (peak RSS above the start, /proc/self/status VmHWM reset through "
    "/proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=1 MiB), one process per model, mode and depth, at each model's "
    "published widths with 1-3 text layers and 1 vision block, under torch.autocast('cpu', bfloat16): the dtypes of "
    "CUDA's bf16 autocast (bf16 matmul outputs; fp32 residual stream, norms and RoPE'd keys with fp32 weights; bf16 "
    "everywhere with a bf16 LoRA base), so no fp32-to-bf16 factor is applied. Points: [layers, tokens per row, "
    "completion tokens, rows].",
    "Extrapolation: the fit's per-layer terms times the full depth, its per-row terms times the micro-batch. Without "
    "checkpointing the rows of a group share their prompt's pass (pepo.forward), so scoring and update count the "
    "prompt's tokens once per group in a micro-batch (checked on the 2-row held-out point).",
    "Static memory: full fine-tune = fp32 weights (4 B/param) + fp32 grads and AdamW m, v of the trained parameters "
    "(12 B) + the bf16 reference (2 B/param, beta > 0); a step's grads live on through the next rollout and scoring "
    "(zero_grad(set_to_none) runs at the update). LoRA = bf16 base (2 B/param) + fp32 adapters, grads, AdamW (16 B "
    "per adapter parameter); the reference is the base with the adapters off.",
    "Phases: rollout = static + the attention cache of every row (measured bytes per token and layer: fp32 keys and "
    "bf16 values with fp32 weights) + sampling temporaries; scoring = PEPO_G's pass (every layer's hidden states, "
    "prior, reference pass; for the full fine-tune the policy stands in for its bf16 reference copy); update = "
    "forward + backward of one micro-batch (the fit holds the trained layers' gradients; the lm_head and embedding "
    "gradients are added).",
    "Not counted: the CUDA context and allocator fragmentation (hence the 90% use), VPPO's perturbed pass (like the "
    "reference pass) and a trained vision tower's activations (PEPO's scripts freeze it).",
    "The per-layer and per-token costs are fitted >= 0 (a negative one is noise); scoring's per-layer cost is at "
    "least its kept hidden states (D x 2 bytes per token, D x 4 with fp32 weights), which the points cannot resolve.",
    "With fp32 weights (full fine-tune) autocast caches a bf16 copy of every trained weight until its block ends "
    "(the fit's d, ~2 bytes per parameter of a layer): the rollout and scoring hold it too, pepo.train running each "
    "in one autocast block.",
    "CPU-only term: about V x D x 2 bytes of a (598 MiB at the 3B's widths) is a copy of the lm_head weight that CPU "
    "F.linear makes per row for a non-contiguous bf16 input (the logits_to_keep slice; 612 MiB for 1 row, 1188 for 2, "
    "1 MiB once the input is contiguous). The 2-row held-out point misses it in the two phases that slice per row; "
    "CUDA's matmul makes no such copy, so the plan keeps it once: conservative by one copy.",
    "The update with checkpointing peaks either at the logits' backward or at one layer's recomputation; a linear fit "
    "of that maximum holds near the measured sizes (held-out points) and may under-count the recomputation at long "
    "sequences by about (one layer's activations - the logits' cost) per row: ~0.1 GB per row at 3B, 1,382 tokens.",
]


def memory_plan(opt) -> dict:
    path = Path(opt.results_dir) / "memory-plan-points.jsonl"
    if opt.report:
        points = [json.loads(line) for line in path.read_text().splitlines()]
        points = [p for p in points if p["name"] in opt.models]
    else:
        points = measure_plan_points(opt)
    models = [m for m in opt.models if any(p["name"] == m for p in points)]
    fits = fit_plan(points)
    result = {
        "plan": plan_table(fits, models),
        "fits": fits,
        "settings": PLAN | {"fit_points": FIT_POINTS, "held_out": HELD_OUT, "measure_image_px": MEASURE_IMAGE_PX},
        "params": {
            m: dict(zip(("total", "vision"), count_parameters(m))) | {"lora": lora_parameters(m, PLAN["lora_rank"])}
            for m in models
        },
        "notes": PLAN_NOTES,
        "machine": machine() | {"threads": opt.threads},
        "command": "python " + shlex.join(sys.argv) if sys.argv[1:2] == ["memory-plan"] else None,
        "points": "memory-plan-points.jsonl (one line per measured point)",
    }
    md = plan_markdown(result)
    (Path(opt.results_dir) / "memory-plan.json").write_text(json.dumps(result, indent=1))
    (Path(opt.results_dir) / "memory-plan.md").write_text("# Memory plan: one GPU\n\n" + md + "\n")
    print(md)
    return result


# ----------------------------------------------------------------------------------------
# gpu: two training steps of every preset and setting on random-weight models with the full
# published configs (no download), peak GPU memory and seconds per step against the memory plan
# ----------------------------------------------------------------------------------------
GPU_SETTINGS = {  # setting -> pepo.py flags on top of the preset's defaults (--bf16 on CUDA)
    "defaults": [],
    "lora": ["--lora-rank", "64"],
    "gradient_checkpointing": ["--gradient-checkpointing"],
    "freeze_vision": ["--freeze-vision"],
}
GPU_RUN = dict(  # small enough that 20 runs of the 3B and the 7B's LoRA runs take < 8 minutes on one H100
    task="color", steps=2, prompts_per_step=2, group_size=4, max_new_tokens=64, eval_size=2, image_px=448
)
TINY_RUN = dict(GPU_RUN, group_size=2, max_new_tokens=32, eval_size=1, image_px=112)  # --tiny: CPU seconds
TINY_WIDTHS = (  # --tiny: the same code path at widths a CPU runs in seconds (vocabulary kept: Qwen's token ids)
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
)


def qwen_ids_tokenizer():
    """A byte-level tokenizer whose special tokens have Qwen's ids (<|endoftext|> = 151643 ...
    <|image_pad|> = 151655), so that a random model with a published config reads its prompts;
    the ids below 151643 are the 256 bytes and unused fillers (a random model writes no text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import pepo

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab |= {f"<|fill_{i}|>": i for i in range(len(vocab), 151643)}
    vocab |= {t: 151643 + i for i, t in enumerate(pepo.SPECIAL_TOKENS)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(pepo.SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = pepo.QWEN2_VL_CHAT_TEMPLATE  # prompts render as Qwen2.5-VL's (a random model reads any)
    return tok


def gpu_checkpoint(name: str, path: Path, device: str, tiny: bool) -> Path:
    """save_pretrained folder of a random-weight `name` (its published config, or TINY_WIDTHS):
    the weights in bf16 (half the disk and load time; pepo.py loads them as fp32), Qwen's token ids."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import pepo

    if (path / "config.json").exists():
        return path
    config = plan_config(name, widths=TINY_WIDTHS if tiny else None)
    tok = qwen_ids_tokenizer()
    config.text_config.eos_token_id, config.text_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    vc, px = config.vision_config, (TINY_RUN if tiny else GPU_RUN)["image_px"] ** 2
    ip = Qwen2VLImageProcessorPil(
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        min_pixels=px,
        max_pixels=px,
    )
    model = random_model(config, device).to(torch.bfloat16)
    pepo.save_atomic(str(path), model, tok, ip)
    del model
    return path


def gpu_check(opt) -> dict:
    """Each model, preset and setting: pepo.main for GPU_RUN's two steps in this process, the
    peak memory (CUDA: max_memory_allocated; CPU: peak RSS) and the seconds of each step, next to
    the memory plan's prediction (results/memory-plan.json, full-size models only). A setting the
    plan predicts to exceed the GPU is skipped; so is every run once --budget-s is spent."""

    import torch

    import pepo

    t_start, cuda, run = time.time(), opt.device == "cuda", TINY_RUN if opt.tiny else GPU_RUN
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA device; use --device cpu --tiny to check the code path")
    plan_path = Path(opt.results_dir) / "memory-plan.json"
    fits = None if opt.tiny else json.loads(plan_path.read_text())["fits"] if plan_path.exists() else {}
    saver, pepo.save_training_state = pepo.save_training_state, lambda *a, **k: None  # a 3B checkpoint: > 2 steps
    try:
        return _gpu_runs(opt, pepo, run, cuda, t_start, fits)
    finally:
        pepo.save_training_state = saver


def _gpu_runs(opt, pepo, run: dict, cuda: bool, t_start: float, fits) -> dict:
    import gc
    import random

    import torch
    from transformers import AutoConfig, AutoImageProcessor

    import tasks

    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else None
    rows, out_json = [], Path(opt.results_dir) / ("gpu-tiny.json" if opt.tiny else "gpu.json")
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "peak": "torch.cuda.max_memory_allocated - memory_allocated at the start"
        if cuda
        else "peak RSS - RSS at the start",
        "run": run,
        "rows": rows,
        "command": "python bench.py gpu " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["gpu"] else None,
    }
    for name in opt.models:
        path = gpu_checkpoint(name, Path(opt.runs_dir) / (name + ("-tiny" if opt.tiny else "")), opt.device, opt.tiny)
        tok, ip = qwen_ids_tokenizer(), AutoImageProcessor.from_pretrained(path)
        vl = pepo.VLHelper(tok, ip, AutoConfig.from_pretrained(path))
        task = tasks.get_task(run["task"])
        prompt_tokens = vl.encode_prompts([task.sample(random.Random(0))])["input_ids"].shape[1]
        for preset in opt.presets:
            for setting in opt.settings:
                flags = GPU_SETTINGS[setting]
                row = dict(model=name, preset=preset, setting=setting, flags=shlex.join(flags))
                rows.append(row)
                args = pepo.apply_preset(pepo.apply_budget(pepo.Args(algo=preset)))
                mode = "lora" if setting == "lora" else "full"
                if fits is not None:  # without measured activations: the static memory, a lower bound
                    pred = predict_peak(
                        fits,
                        name,
                        mode,
                        run["max_new_tokens"],
                        run["prompts_per_step"] * run["group_size"],
                        setting == "gradient_checkpointing",
                        prompt_tokens,
                        run["prompts_per_step"],
                        run["group_size"],
                        beta=args.beta > 0,
                        freeze_vision=setting in ("freeze_vision", "lora"),
                    )
                    row["predicted_gib"] = round(pred["peak"] / 2**30, 2)
                    row["predicted_phase"] = pred["peak_phase"]
                if capacity and row.get("predicted_gib", 0) * 2**30 > PLAN["usable"] * capacity:
                    row["status"] = f"skipped: predicted {row['predicted_gib']} GiB > {PLAN['usable']:.0%} of the GPU"
                    continue
                if time.time() - t_start > opt.budget_s:
                    row["status"] = "skipped: --budget-s spent"
                    continue
                run_dir = Path(opt.runs_dir) / f"{name}-{preset}-{setting}{'-tiny' if opt.tiny else ''}"
                argv = [
                    "--model",
                    str(path),
                    "--algo",
                    preset,
                    "--device",
                    opt.device,
                    "--bf16",
                    "--no-dynamic-sampling",
                    "--lr",
                    "1e-6",
                    "--output-dir",
                    str(run_dir),
                    *flags,
                ]
                argv += [f"--{k.replace('_', '-')}={v}" for k, v in run.items() if k != "image_px"]
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    start = torch.cuda.memory_allocated()
                else:
                    start = reset_peak_rss()
                shutil.rmtree(run_dir, ignore_errors=True)  # no metrics of an earlier run
                t0 = time.time()
                try:
                    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
                        pepo.main(argv)
                    row["status"] = "ok"
                except (Exception, SystemExit) as e:  # one failing setting must not hide the others' numbers
                    row["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                row["wall_s"] = round(time.time() - t0, 1)
                row["peak_gib"] = round(
                    ((torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - start) / 2**30, 3
                )
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists():
                    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
                    row["seconds_per_step"] = [round(m["seconds"], 2) for m in steps]
                    row["updated_steps"] = sum("skipped" not in m for m in steps)
                if "predicted_gib" in row and row["status"] == "ok":
                    row["measured_over_predicted"] = round(row["peak_gib"] / row["predicted_gib"], 3)
                print(
                    f"  {name} {preset} {setting}: {row['status']} {row['peak_gib']} GiB {row.get('seconds_per_step')}",
                    file=sys.stderr,
                )
                out_json.parent.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(result, indent=1))  # after every run: a timeout keeps what ran
    result["wall_s"] = round(time.time() - t_start, 1)
    out_json.write_text(json.dumps(result, indent=1))
    md = gpu_markdown(result)
    out_json.with_suffix(".md").write_text(md + "\n")
    print(md)
    return result


def gpu_markdown(result: dict) -> str:
    lines = [
        f"Two steps of each preset on {result['device']} ({', '.join(f'{k} {v}' for k, v in result['run'].items())}; "
        f"--bf16, --no-dynamic-sampling), {result.get('wall_s')} s in all. Peak = {result['peak']} over the run "
        "(load, evaluations, two steps); predicted = the memory plan's peak for that setting "
        "(results/memory-plan.json).",
        "",
        "| model | preset | setting | peak GiB | predicted GiB | measured / predicted | seconds per step | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['setting']} | {r.get('peak_gib', '')} | "
            f"{r.get('predicted_gib', '')} | {r.get('measured_over_predicted', '')} | "
            f"{', '.join(map(str, r.get('seconds_per_step', [])))} | {r.get('status', '')} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# signals: how well each per-token signal finds the perception tokens, before and after RL
# ----------------------------------------------------------------------------------------
SIGNAL_NAMES = {  # key in collect_signals' output -> name in the table
    "prior": "PEPO prior VS_t",
    "entropy": "entropy H_t",
    "pepo_weight": "PEPO weight w_t",
    "dep_k3": "VPPO dependency (k3)",
    "dep_exact": "VPPO dependency (exact KL)",
}
LABELINGS = {  # which tokens count as perception tokens
    "slot": "every colour word inside <think>, whichever colour the policy wrote (the slot where the image is read)",
    "first": "only the first colour word inside <think> (the one read off the image; the second restates it)",
    "task": "Task.perception_mask: the ground-truth colour word inside <think> (a wrong colour is not marked)",
    "answer": "the name inside <answer> (colour + rule): where the image is read once the <think> text no longer "
    "names the colour",
}
# prompts x group_size completions per collection; train = extra pepo.py flags (none: the default run)
SIGNALS_BUDGETS = {
    "full": dict(seeds=[1], prompts=32, group_size=8, train=[]),
    "quick": dict(
        seeds=[1], prompts=16, group_size=8, train=["--steps", "8", "--prompts-per-step", "8", "--eval-size", "20"]
    ),
}
HIGH_DEPENDENCY = 0.1  # VPPO sparsity: share of tokens whose dependency exceeds this
TOP_SHARE = 0.2  # ... and the share of all dependency that the top 20% of tokens carry


def average_ranks(x) -> np.ndarray:
    """1-based ranks of x, tied values sharing the average of their ranks: [3, 1, 3] -> [2.5, 1, 2.5]."""
    x = np.asarray(x, dtype=float)
    if np.isnan(x).any():
        raise ValueError("average_ranks: scores contain nan")
    order = np.argsort(x)  # any order within a run of ties: they all get the run's average rank
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]  # first position of each run of equal values
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of the 1-based ranks starts+1 .. ends
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for telling labels True from False.

    The Mann-Whitney form: the probability that a random positive scores above a random
    negative, ties counting one half (average ranks): AUROC = (R+ - n+(n+ + 1)/2) / (n+ n-),
    R+ the rank sum of the positives. 1 = every positive above every negative, 0 = below,
    0.5 = no separation. One class empty: nan (there is nothing to separate), never 0.5.
    """
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pooled_auroc(units: list) -> float:
    """AUROC over all tokens of a list of (scores, labels) units (completions or prompts)."""
    if not units:
        return float("nan")
    return auroc(np.concatenate([u[0] for u in units]), np.concatenate([u[1] for u in units]))


def first_run(flags: list[bool]) -> list[bool]:
    """Only the first run of consecutive True values: [F, T, T, F, T] -> [F, T, T, F, F]."""
    out, started = [False] * len(flags), False
    for i, f in enumerate(flags):
        if f:
            out[i], started = True, True
        elif started:
            break
    return out


def slot_words(task) -> set[str]:
    """Every word that can fill the task's perception slot: for the colour tasks any colour, so
    a token counts as a perception token whether or not the policy read the colour right."""
    import tasks

    return set(tasks.COLORS) if task.name in ("color", "color-think") else set()


def answer_words(task) -> set[str]:
    """Every answer the task accepts (its label pool): for color-think the four colour names."""
    return set(task.labels)


def collect_signals(model, vl, task, examples: list, group_size: int, args, seed: int, micro_batch: int = 64) -> dict:
    """Sample group_size completions per example at args.temperature and compute every per-token
    signal in one place, from the same two passes: the clean pass with hidden states (log-probs,
    entropy, PEPO prior) and one pass on the perturbed images (VPPO dependency, k3 on the sampled
    token and the exact KL over the vocabulary, from the same perturbation). PEPO's w_t follows
    from the prior and the entropy. -> {"batch", "scores" ([B, L] tensors), "completions": one dict
    per completion with its valid tokens, per-token signal lists, perception labels, correctness}."""
    import torch

    import pepo
    import tasks
    import vppo

    torch.manual_seed(seed)
    batch = pepo.rollout(model, vl, task, examples, group_size, args, torch.device("cpu"), nullcontext())
    inputs = {k: batch[k] for k in (*pepo.MODEL_KEYS, "completion_ids")}
    inputs["pixel_values_perturbed"] = vppo.perturbed_pixel_values(
        batch, vl.ip, args.vppo_perturb, torch.Generator().manual_seed(seed)
    )
    model.eval()
    parts = {k: [] for k in ("entropy", "prior", "dep_k3", "dep_exact")}
    with torch.no_grad():
        for mb in pepo.micro_batches(inputs, micro_batch):
            logits, hidden = pepo.forward(model, mb, args.temperature, hidden_states=True)
            logits_pert, _ = pepo.forward(model, dict(mb, pixel_values=mb["pixel_values_perturbed"]), args.temperature)
            logp = pepo.token_logprobs(logits, mb["completion_ids"])
            vision = mb["input_ids"] == model.config.image_token_id
            parts["entropy"].append(pepo.token_entropy(logits))
            parts["prior"].append(pepo.perception_prior(hidden, vision, logits.shape[1], args.pepo_score))
            parts["dep_k3"].append(
                vppo.token_visual_dependency(logp, pepo.token_logprobs(logits_pert, mb["completion_ids"]))
            )
            parts["dep_exact"].append(vppo.token_visual_kl(logits, logits_pert))
    scores = {k: torch.cat(v) for k, v in parts.items()}
    mask = batch["completion_mask"]
    scores["pepo_weight"] = pepo.pepo_token_weights(
        scores["prior"], scores["entropy"], mask, args.pepo_alpha, args.pepo_temperature
    )
    words = slot_words(task)
    completions = []
    for i in range(mask.shape[0]):
        valid = mask[i].bool()
        pieces = vl.tok.convert_ids_to_tokens(batch["completion_ids"][i][valid].tolist())
        example = batch["examples"][i]
        slot = (
            tasks.perception_token_mask(pieces, words, task.perception_region)
            if words
            else task.perception_mask(pieces, example)
        )
        completions.append(
            {
                "prompt": i // group_size,
                "correct": bool(batch["accuracy"][i] > 0.5),
                "text": batch["texts"][i],
                "tokens": [tasks.token_text(p) for p in pieces],
                "signals": {k: v[i][valid].tolist() for k, v in scores.items()},
                "labels": {
                    "slot": slot,
                    "first": first_run(slot),
                    "task": task.perception_mask(pieces, example),
                    "answer": tasks.perception_token_mask(pieces, answer_words(task), "answer"),
                },
            }
        )
    return {"batch": batch, "scores": scores, "completions": completions}


def quantiles(x, qs=(10, 50, 90)) -> dict:
    x = np.asarray(x, dtype=float)
    return {f"p{q}": float(np.percentile(x, q)) for q in qs} if x.size else {f"p{q}": float("nan") for q in qs}


def mean_or_nan(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def signal_stats(completions: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Everything the table reports for one collection: AUROC of each signal for each labelling
    with a bootstrap interval over completions (and, for the main labelling, over prompts),
    VPPO's sparsity and trajectory spread, PEPO's correct-vs-wrong contrast."""
    out = {
        "completions": len(completions),
        "tokens": sum(len(c["tokens"]) for c in completions),
        "accuracy": mean_or_nan([c["correct"] for c in completions]),
        "auroc": {},
    }
    for lab in LABELINGS:
        out[f"perception_tokens_{lab}"] = sum(sum(c["labels"][lab]) for c in completions)
        out["auroc"][lab] = {}
        for key in SIGNAL_NAMES:
            units = [(np.asarray(c["signals"][key]), np.asarray(c["labels"][lab], dtype=bool)) for c in completions]
            ci = bootstrap_ci(pooled_auroc, units, n_boot, seed)
            entry = {"auroc": pooled_auroc(units), "ci": list(ci), "ci_dropped_draws": ci.dropped}
            pos = [v for c in completions for v, f in zip(c["signals"][key], c["labels"][lab]) if f]
            rest = [v for c in completions for v, f in zip(c["signals"][key], c["labels"][lab]) if not f]
            entry.update(mean_perception=mean_or_nan(pos), mean_rest=mean_or_nan(rest))
            if lab == "slot":  # the same, resampling whole prompts (their 8 completions share one image)
                by_prompt = {}
                for c, u in zip(completions, units):
                    by_prompt.setdefault(c["prompt"], []).append(u)
                prompt_units = [
                    (np.concatenate([u[0] for u in us]), np.concatenate([u[1] for u in us]))
                    for us in by_prompt.values()
                ]
                entry["ci_prompts"] = list(bootstrap_ci(pooled_auroc, prompt_units, n_boot, seed))
            out["auroc"][lab][key] = entry
    out["vppo"] = {}
    for key in ("dep_k3", "dep_exact"):
        tokens = np.sort(np.concatenate([c["signals"][key] for c in completions]))[::-1]
        k = int(np.ceil(TOP_SHARE * tokens.size))
        per_completion = [np.mean(c["signals"][key]) for c in completions if c["signals"][key]]
        out["vppo"][key] = {
            "share_above_threshold": float((tokens > HIGH_DEPENDENCY).mean()),
            "threshold": HIGH_DEPENDENCY,
            "top20_share_of_total": float(tokens[:k].sum() / max(tokens.sum(), 1e-30)),
            "token": quantiles(tokens, (50, 90, 99)),
            "token_max": float(tokens.max()),
            "completion_mean": quantiles(per_completion),
        }
    out["pepo_contrast"] = {}
    for key in ("prior", "entropy"):
        for where in ("all", "perception"):  # mean over all of a completion's tokens, or over its slot tokens

            def per_completion(c, key=key, where=where):
                vals = [v for v, f in zip(c["signals"][key], c["labels"]["slot"]) if f or where == "all"]
                return (float(np.mean(vals)) if vals else float("nan")), c["correct"]

            units = [u for u in map(per_completion, completions) if np.isfinite(u[0])]

            def diff(us):
                right = [v for v, ok in us if ok]
                wrong = [v for v, ok in us if not ok]
                return mean_or_nan(right) - mean_or_nan(wrong) if right and wrong else float("nan")

            right = [v for v, ok in units if ok]
            wrong = [v for v, ok in units if not ok]
            out["pepo_contrast"][f"{key}_{where}"] = {
                "correct": mean_or_nan(right),
                "wrong": mean_or_nan(wrong),
                "n_correct": len(right),
                "n_wrong": len(wrong),
                "diff": diff(units),
                "ci": list(bootstrap_ci(diff, units, n_boot, seed)),
            }
    return out


def pick_rows(batch: dict, scores: dict, rows: list[int]) -> tuple[dict, dict]:
    """The given rows of a rollout batch and its [B, L] scores (for pepo.token_records)."""
    import torch

    idx = torch.tensor(rows)
    keys = ("completion_ids", "completion_mask", "rewards", "accuracy")
    sub = {k: batch[k][idx] for k in keys}
    sub["examples"] = [batch["examples"][i] for i in rows]
    return sub, {k: v[idx] for k, v in scores.items()}


def signal_records(vl, coll: dict, group_size: int, step: int, n: int = 4) -> list[dict]:
    """pepo.token_records of the first completion of n prompts (the heatmap page), the exact
    dependency and the slot labels added to each record's signals."""
    import pepo
    import vppo

    rows = [p * group_size for p in range(min(n, len(coll["completions"]) // group_size))]
    batch, sc = pick_rows(coll["batch"], coll["scores"], rows)
    mask = batch["completion_mask"]
    advantages = pepo.grpo_advantages(coll["batch"]["rewards"], group_size)[rows]
    scores = {"prior": sc["prior"], "entropy": sc["entropy"], "dependency": sc["dep_k3"]}
    signals = {"pepo_weight": sc["pepo_weight"], "vppo_mask": vppo.token_gradient_mask(sc["dep_k3"], mask)}
    records = pepo.token_records(vl, batch, scores, signals, advantages, None, step, len(rows))
    for r, i in zip(records, rows):
        c = coll["completions"][i]
        r["signals"]["dependency_exact"] = c["signals"]["dep_exact"]
        r["signals"]["perception"] = [float(f) for f in c["labels"]["slot"]]
    return records


def json_safe(v):
    """nan and inf -> None (null), recursively: strict JSON."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def fmt_ci(e: dict) -> str:
    a, (lo, hi) = e["auroc"], e["ci"]
    return "n/a (one class empty)" if not np.isfinite(a) else f"{a:.2f} [{lo:.2f}, {hi:.2f}]"


def signals_markdown(result: dict) -> str:
    """The compact tables of results/signals.md (the reading is added by hand)."""
    seeds = result["seeds"]
    lines = []
    for seed, r in seeds.items():
        s, e = r["start"], r["end"]
        lines += [
            f"### seed {seed}: {s['tokens']} labelled tokens at the start ({s['perception_tokens_slot']} perception), "
            f"{e['tokens']} at the end ({e['perception_tokens_slot']}); accuracy of these samples (temperature "
            f"{result['config']['temperature']:g}) "
            f"{s['accuracy']:.2f} -> {e['accuracy']:.2f}, "
            f"greedy held-out {r['train']['accuracy_before']:.2f} -> {r['train']['accuracy_after']:.2f}",
            "",
            "AUROC [95% bootstrap CI, resampling completions] for telling perception tokens from the rest "
            "(perception tokens at the start / end in brackets):",
            "",
            "| perception tokens | signal | start | end |",
            "|---|---|---|---|",
        ]
        for lab in LABELINGS:
            for j, (key, name) in enumerate(SIGNAL_NAMES.items()):
                head = f"{lab} ({s[f'perception_tokens_{lab}']} / {e[f'perception_tokens_{lab}']})" if j == 0 else ""
                lines.append(f"| {head} | {name} | {fmt_ci(s['auroc'][lab][key])} | {fmt_ci(e['auroc'][lab][key])} |")
        lines += ["", "| VPPO dependency | estimator | start | end |", "|---|---|---|---|"]
        for label, f in [
            (f"share of tokens > {HIGH_DEPENDENCY}", lambda v: f"{v['share_above_threshold']:.3f}"),
            (f"share of the total in the top {TOP_SHARE:.0%} of tokens", lambda v: f"{v['top20_share_of_total']:.2f}"),
            ("per token: p50 / p90 / p99", lambda v: "{p50:.2g} / {p90:.2g} / {p99:.2g}".format(**v["token"])),
            (
                "per-completion mean: p10 / p50 / p90",
                lambda v: "{p10:.2g} / {p50:.2g} / {p90:.2g}".format(**v["completion_mean"]),
            ),
        ]:
            for j, (k, est) in enumerate((("dep_k3", "k3"), ("dep_exact", "exact KL"))):
                lines.append(
                    f"| {label if j == 0 else ''} | {est} | {f(r['start']['vppo'][k])} | {f(r['end']['vppo'][k])} |"
                )
        lines += ["", "| PEPO contrast: correct - wrong (per-completion means) | start | end |", "|---|---|---|"]
        for key in ("prior_all", "prior_perception", "entropy_all", "entropy_perception"):
            cells = []
            for w in ("start", "end"):
                c = r[w]["pepo_contrast"][key]
                d, (lo, hi) = c["diff"], c["ci"]
                cells.append(
                    f"{c['correct']:.3g} vs {c['wrong']:.3g}: {d:+.3g} [{lo:+.3g}, {hi:+.3g}] (n "
                    f"{c['n_correct']}/{c['n_wrong']})"
                    if np.isfinite(d)
                    else f"n/a (n {c['n_correct']} correct / {c['n_wrong']} wrong)"
                )
            where = "all tokens" if key.endswith("all") else "perception (slot) tokens"
            lines.append(f"| {key.split('_')[0]}, {where} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_signals(path: Path, result: dict) -> bool:
    """AUROC with its interval per signal, start vs end, one panel per labelling (first seed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"matplotlib is not installed: skipped {path} (pip install -r requirements-bench.txt); JSON and Markdown "
            f"are written"
        )
        return False
    seed, r = next(iter(result["seeds"].items()))
    fig, axes = plt.subplots(1, len(LABELINGS), figsize=(4.2 * len(LABELINGS), 4), sharey=True)
    x = np.arange(len(SIGNAL_NAMES))
    for ax, lab in zip(axes, LABELINGS):
        for j, when in enumerate(("start", "end")):
            es = [r[when]["auroc"][lab][k] for k in SIGNAL_NAMES]
            a = np.array([e["auroc"] for e in es])
            err = np.array([[e["auroc"] - e["ci"][0], e["ci"][1] - e["auroc"]] for e in es]).T
            ax.bar(x + (j - 0.5) * 0.38, a, 0.38, yerr=err, capsize=3, label=f"{when} of training")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        n = f"{r['start'][f'perception_tokens_{lab}']} / {r['end'][f'perception_tokens_{lab}']}"
        ax.set(title=f"perception tokens: {lab} ({n})", ylim=(0, 1), ylabel="AUROC (95% CI)" if lab == "slot" else None)
        ax.set_xticks(x, ["PEPO\nprior", "entropy", "PEPO\nw_t", "VPPO\nk3", "VPPO\nexact KL"], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{result['config']['task']}, seed {seed}: which signal finds the perception tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def signals(opt) -> dict:
    import dataclasses
    import random

    import torch

    import pepo
    import tasks

    torch.set_num_threads(opt.threads)
    os.environ["TQDM_DISABLE"] = "1"
    mode = "quick" if opt.quick else "full"
    budget = dict(SIGNALS_BUDGETS[mode])
    if opt.seeds:
        budget["seeds"] = opt.seeds
    task = tasks.get_task(opt.task)
    root = Path(opt.runs_dir) / mode
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    examples = [
        task.sample(random.Random(20_000 + i)) for i in range(budget["prompts"])
    ]  # held out: training and eval use other streams
    result = {"seeds": {}}
    records = []
    for seed in budget["seeds"]:
        out = root / f"seed{seed}"
        argv = ["--task", task.name, "--algo", "grpo", "--seed", str(seed), *budget["train"], "--output-dir", str(out)]
        args = pepo.parse_args(argv)
        summary_path = out / "summary.json"
        want = {k: v for k, v in dataclasses.asdict(args).items() if k != "bf16"}  # bf16 is filled in at run time
        defaults = {f.name: f.default for f in dataclasses.fields(pepo.Args)}  # a flag newer than the run: its default
        reused = summary_path.is_file() and all(
            json.loads(summary_path.read_text())["args"].get(k, defaults[k]) == v for k, v in want.items()
        )
        if not reused:  # train: a finished run with the same settings is reused
            print(f"signals: seed {seed}: training `python pepo.py {' '.join(argv)}` (log: {out}.log)", flush=True)
            summary_path.unlink(missing_ok=True)
            with open(f"{out}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
                pepo.main(argv)
        summary = json.loads(summary_path.read_text())
        print(
            f"signals: seed {seed}: {'reused' if reused else 'trained'} ({summary['seconds']:.0f} s of training); "
            f"greedy accuracy {summary['accuracy_before']:.2f} -> {summary['accuracy_after']:.2f}",
            flush=True,
        )
        entry = {
            "train": {
                "argv": argv,
                "reused": reused,
                "seconds": summary["seconds"],
                "steps": summary["steps"],
                "accuracy_before": summary["accuracy_before"],
                "accuracy_after": summary["accuracy_after"],
            }
        }
        for when, path, step in (("start", out / "tiny_init", 0), ("end", out / "checkpoint", summary["steps"])):
            t1 = time.time()
            model, tokenizer, image_processor = pepo.load_policy(str(path))
            vl = pepo.VLHelper(tokenizer, image_processor, model.config)
            coll = collect_signals(model, vl, task, examples, budget["group_size"], args, seed=1000 + seed)
            t2 = time.time()
            entry[when] = signal_stats(coll["completions"], opt.bootstrap, seed=seed)
            entry[when]["seconds"] = {"collect": round(t2 - t1, 1), "stats": round(time.time() - t2, 1)}
            s = entry[when]["auroc"]["slot"]
            print(
                f"signals: seed {seed} {when}: {entry[when]['tokens']} tokens, "
                f"{entry[when]['perception_tokens_slot']} perception; AUROC "
                + ", ".join(f"{k} {fmt_ci(s[k])}" for k in SIGNAL_NAMES),
                flush=True,
            )
            if seed == budget["seeds"][0]:
                records += signal_records(vl, coll, budget["group_size"], step)
        result["seeds"][str(seed)] = entry
    with open(root / "tokens.jsonl", "w") as f:  # `python bench.py heatmap RUNS_DIR/MODE` renders it
        for r in records:
            f.write(json.dumps(r) + "\n")
    write_token_heatmap(
        root / "tokens.html", records, title=f"grpo on {task.name}, held-out rollouts (bench.py signals)"
    )
    result["config"] = {
        "task": task.name,
        "mode": mode,
        "budget": budget,
        "bootstrap": opt.bootstrap,
        "temperature": args.temperature,
        "perturbation": args.vppo_perturb,
        "labelings": LABELINGS,
        "signals": SIGNAL_NAMES,
        "held_out_prompts": "task.sample(random.Random(20_000 + i)) for i < prompts",
        "ci": "percentile bootstrap, 95%, resampling whole completions (ci) or whole prompts (ci_prompts)",
        "wall_seconds": round(time.time() - t_start, 1),
        "command": " ".join(["python", "bench.py", *sys.argv[1:]]),
        "machine": machine(),
        "tokens_jsonl": str(root / "tokens.jsonl"),
    }
    results = Path(opt.results_dir or ("results" if mode == "full" else "results/quick"))
    results.mkdir(parents=True, exist_ok=True)
    (results / "signals.json").write_text(json.dumps(json_safe(result), indent=1))
    md = signals_markdown(result)
    (results / "signals.md").write_text(md)
    plot_signals(results / "signals.png", result)
    print(
        md + f"\nwall time {result['config']['wall_seconds']:.0f} s; wrote {results}/signals.json, signals.md, "
        f"signals.png; "
        f"heatmap {root / 'tokens.html'}"
    )
    return result


# ----------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "learn",
        help="held-out accuracy vs step for every algorithm, task and seed",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--quick", action="store_true", help="1 seed, 2 steps: checks the pipeline in under 5 minutes")
    a.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    a.add_argument("--tasks", nargs="+", default=None, help="override the budget's tasks")
    a.add_argument("--seeds", nargs="+", type=int, default=None, help="override the budget's seeds")
    a.add_argument("--steps", type=int, default=None, help="override the budget's RL steps per run")
    a.add_argument("--prompts-per-step", type=int, default=None, help="override the budget's prompts per step")
    a.add_argument(
        "--algos", nargs="+", choices=list(ALGOS), default=None, help="subset of algorithms; all when omitted"
    )
    a.add_argument("--extra", default="", help="extra pepo.py flags for every run, e.g. '--lr 5e-4'")
    a.add_argument("--threshold", type=float, default=0.9, help="accuracy for the steps-to-threshold column")
    a.add_argument(
        "--report",
        action="store_true",
        help="run nothing: write the table from the runs already finished with these settings",
    )
    a.add_argument("--runs-dir", default="runs/bench", help="run folders, logs and the initial models")
    a.add_argument(
        "--results-dir",
        default=None,
        help="learning.json, learning.md, learning.png (default: results, --quick: results/quick)",
    )
    q = sub.add_parser(
        "presets",
        help="the default run of every preset on 5 seeds: final held-out accuracy per seed, one table",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("--task", default="color", help="toy task (its own default budget applies)")
    q.add_argument("--algos", nargs="+", choices=PRESETS, default=PRESETS, help="presets")
    q.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="seeds")
    q.add_argument("--extra", default="", help="extra pepo.py flags for every run, e.g. '--vppo-max-scale 2'")
    q.add_argument("--threshold", type=float, default=0.9, help="accuracy a seed must reach")
    q.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    q.add_argument("--report", action="store_true", help="run nothing: the table of the runs already finished")
    q.add_argument("--runs-dir", default="runs/bench", help="run folders (under presets/), logs and initial models")
    q.add_argument("--results-dir", default="results", help="presets[_TASK].json and .md go here")
    o = sub.add_parser(
        "overhead",
        help="seconds per training step and phase for each algorithm on the same rollouts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    o.add_argument("--json", action="store_true", help="print JSON only")
    o.add_argument("--task", default="color", help="toy task")
    o.add_argument("--prompts", type=int, default=16, help="prompts per step (the default run's 16)")
    o.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    o.add_argument("--repeats", type=int, default=7, help="timed repeats per algorithm (median)")
    o.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    o.add_argument("--threads", type=int, default=1, help="torch threads")
    o.add_argument("--runs-dir", default="runs/bench", help="where the tiny model is built")
    o.add_argument("--results-dir", default="results", help="overhead.json goes here")
    r = sub.add_parser(
        "prior",
        help="perception_prior vs the per-row, per-layer similarity-matrix loop",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("--json", action="store_true", help="print JSON only")
    r.add_argument(
        "--scores",
        nargs="+",
        default=["cosine", "dot", "l2"],
        choices=["cosine", "dot", "l2", "l1"],
        help="similarities",
    )
    r.add_argument("--batch", type=int, default=4, help="B rows")
    r.add_argument("--seq", type=int, default=1024, help="T sequence length")
    r.add_argument("--image-tokens", type=int, default=600, help="image tokens of row 0 (row b has 40 b fewer)")
    r.add_argument("--completion", type=int, default=256, help="L completion tokens")
    r.add_argument("--hidden", type=int, default=2048, help="D hidden size (Qwen2.5-VL-3B: 2048)")
    r.add_argument("--layers", type=int, default=4, help="hidden-state tensors averaged over")
    r.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    r.add_argument("--threads", type=int, default=1, help="torch threads")
    r.add_argument("--results-dir", default="results", help="prior.json goes here")
    s = sub.add_parser(
        "speed",
        help="wall time of the default run: this tree against an earlier commit, side by side",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument(
        "--baseline", default="5888c4f", help="commit to compare with (a git worktree of it is made in --runs-dir)"
    )
    s.add_argument("--flags", default="", help="pepo.py flags for both, e.g. '--steps 20'")
    s.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (median)")
    s.add_argument("--json", action="store_true", help="print JSON only")
    s.add_argument("--runs-dir", default="runs/bench", help="the baseline checkout and the run folders")
    s.add_argument("--results-dir", default="results", help="speed.json goes here")
    h = sub.add_parser(
        "heatmap",
        help="tokens.html from the tokens.jsonl that `pepo.py --visualize N` wrote",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    h.add_argument("run_dir", help="the run's --output-dir")
    h.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/tokens.html)")
    m = sub.add_parser(
        "memory-table",
        help="GiB per GPU of weights, grads, AdamW moments and the reference under FSDP2",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m.add_argument("--json", action="store_true", help="print JSON only")
    m.add_argument("--results-dir", default="results", help="memory-table.json goes here")
    mm = sub.add_parser(
        "memory",
        help="peak memory of one scoring pass and one update, token functions before/after chunking",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Random-weight Qwen2.5-VL at the 3B's widths (2 text layers, 2 vision blocks), one 448x448 image, "
        "batch 1. Each row runs in a fresh process. CPU: peak RSS (/proc/self/status VmHWM, reset after the "
        "model and inputs are built) minus the RSS then, with MALLOC_MMAP_THRESHOLD_=1 MiB so freed tensors "
        "are returned to the OS (Linux only). CUDA: torch.cuda.max_memory_allocated minus the allocation then.",
    )
    mm.add_argument("--completions", nargs="+", type=int, default=[256, 1024], help="completion lengths L")
    mm.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs under bf16 autocast, as pepo.train"
    )
    mm.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of each measurement")
    mm.add_argument("--results-dir", default="results", help="memory.json and memory.md go here")
    mm.add_argument(
        "--one", default=None, help=argparse.SUPPRESS
    )  # internal: "phase,version,L", one measurement as JSON
    ml = sub.add_parser(
        "memory-lora",
        help="peak RSS of one PEPO_G step at Qwen2.5-VL-3B widths: full fine-tune vs --lora-rank",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ml.add_argument("--lora-rank", type=int, default=16, help="adapter rank")
    ml.add_argument("--group-size", type=int, default=8, help="completions of the one prompt")
    ml.add_argument("--completion", type=int, default=128, help="completion tokens")
    ml.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of each measurement")
    ml.add_argument("--results-dir", default="results", help="memory-lora.json and memory-lora.md go here")
    ml.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "mode,bf16,G,L,rank" as JSON
    pl = sub.add_parser(
        "memory-plan",
        help="peak GPU memory of a training step, full fine-tune vs LoRA, from activations measured on CPU",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Measures each point of the fit in its own process at the real widths with 1-3 layers "
        "(peak RSS, bf16 autocast), fits per-layer and per-token costs, checks held-out points, and writes "
        "memory-plan.{json,md}: which settings fit 24, 48 and 80 GB.",
    )
    pl.add_argument(
        "--models", nargs="+", default=["Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen3-VL-8B"], choices=list(CONFIGS)
    )
    pl.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of each measurement")
    pl.add_argument("--report", action="store_true", help="measure nothing: fit and write from the points measured")
    pl.add_argument("--results-dir", default="results", help="memory-plan-points.jsonl, memory-plan.{json,md}")
    pl.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one point as JSON
    gp = sub.add_parser(
        "gpu",
        help="two steps per preset and setting on random models of the published configs: peak memory vs the plan",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gp.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    gp.add_argument("--tiny", action="store_true", help="TINY_WIDTHS instead of the published widths (CPU tests)")
    gp.add_argument("--models", nargs="+", default=["Qwen2.5-VL-3B", "Qwen2.5-VL-7B"], choices=list(CONFIGS))
    gp.add_argument("--presets", nargs="+", default=["grpo", "dapo", "pepo_g", "pepo_d", "vppo"])
    gp.add_argument("--settings", nargs="+", default=list(GPU_SETTINGS), choices=list(GPU_SETTINGS))
    gp.add_argument("--budget-s", type=float, default=420, help="start no run after this many seconds")
    gp.add_argument("--runs-dir", default="runs/gpu", help="the random checkpoints and the run folders")
    gp.add_argument("--results-dir", default="results", help="gpu.json and gpu.md (--tiny: gpu-tiny.*) go here")
    g = sub.add_parser(
        "signals",
        help="AUROC of each per-token signal for perception tokens, before and after RL, and the papers' token "
        "statistics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="16 held-out prompts and an 8-step training run instead of 32 and the task's default run: under "
        "10 minutes",
    )
    g.add_argument("--task", default="color-think", help="toy task with perception labels")
    g.add_argument("--seeds", nargs="+", type=int, default=None, help="override the budget's seeds")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws per interval")
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument(
        "--runs-dir", default="runs/signals", help="training runs, tokens.jsonl and tokens.html (under full/ or quick/)"
    )
    g.add_argument(
        "--results-dir", default=None, help="signals.{json,md,png} (default: results, --quick: results/quick)"
    )
    opt = p.parse_args(argv)
    if opt.command == "signals":
        return signals(opt)
    if opt.command == "learn":
        return learn(opt)
    if opt.command == "presets":
        return presets(opt)
    if opt.command == "heatmap":
        return heatmap(opt)
    if opt.command == "memory-plan" and opt.one:
        name, mode, layers, points = json.loads(opt.one)
        print(json.dumps(_measure_plan(name, mode, layers, [tuple(p) for p in points])))
        return None
    if opt.command == "memory-plan":
        return memory_plan(opt)
    if opt.command == "gpu":
        return gpu_check(opt)
    if opt.command == "memory" and opt.one:
        phase, version, L = opt.one.split(",")
        print(json.dumps(_measure_memory(phase, version, int(L), opt.device)))
        return None
    if opt.command == "memory-lora" and opt.one:
        mode, bf16, G, L, rank = opt.one.split(",")
        print(json.dumps(_measure_step(mode, bf16 == "1", int(G), int(L), int(rank))))
        return None
    if opt.command == "memory-lora":
        result = memory_lora(opt)
        md = memory_lora_markdown(result)
        Path(opt.results_dir).mkdir(parents=True, exist_ok=True)
        (Path(opt.results_dir) / "memory-lora.json").write_text(json.dumps(result, indent=1))
        (Path(opt.results_dir) / "memory-lora.md").write_text(md + "\n")
        print(md)
        return result
    if opt.command == "memory":
        result = memory(opt)
        md = memory_markdown(result)
        Path(opt.results_dir).mkdir(parents=True, exist_ok=True)
        (Path(opt.results_dir) / "memory.json").write_text(json.dumps(result, indent=1))
        (Path(opt.results_dir) / "memory.md").write_text(md + "\n")
        print(md)
        return result
    result = {"overhead": overhead, "prior": prior, "speed": speed, "memory-table": memory_table}[opt.command](opt)
    Path(opt.results_dir).mkdir(parents=True, exist_ok=True)
    (Path(opt.results_dir) / f"{opt.command}.json").write_text(json.dumps(result, indent=1))
    if opt.json:
        print(json.dumps(result, indent=1))
    elif opt.command == "memory-table":
        print(result["markdown"])
    elif opt.command == "speed":
        print(f"median wall time: {result['median_wall_s']}  current/baseline {result['ratio_current_over_baseline']}")
    elif opt.command == "overhead":
        for algo, t in result["seconds"].items():
            print(f"{algo:7s} " + "  ".join(f"{k} {v:.3f} s" for k, v in t.items()))
        print("ratios (full step):", result["ratios"], " same rollouts:", result["same_rollouts"])
    else:
        for score, s in result["scores"].items():
            print(
                f"{score:6s} fast {s['fast_s']:.4f} s  naive {s['naive_s']:.4f} s  speed-up {s['speedup']:.1f}x  max "
                f"|diff| {s['max_abs_diff']:.2e}"
            )
    return result


if __name__ == "__main__":
    main()
