"""Recipes compared on your own data: `smptrain-recipes --config FILE --recipes darts,rare-positives`.

    smptrain-recipes --config FILE [--set ...] [--recipes darts,rare-positives] [--seeds 42,21,69] [--name NAME]
                     [--task K]

Every recipe (`smptrain/config/recipes.toml`; your file's own keys and `--set` still win over a recipe's, as in any run)
is trained with every seed on your configuration's split, its best checkpoint chosen on validation only, and that
checkpoint tested in fp32 on the held-out test split by smptrain-test's own code. So the comparison answers the
question a researcher has: which recipe gives the better model on data it never saw, on my data.

Outputs in `{log.artifact_dir}/{name}/`: `runs/{recipe}-seed{seed}/` (normal run directories: test, convert and
resume them on their own), `runs.csv` and `runs.parquet` (one row per run), `summary.csv` (per recipe: mean and
sample standard deviation over the seeds of test IoU and F1 and of the best validation IoU; the paired difference
to the first recipe over the seeds both ran, and on how many seeds it was better), `comparison.json` and
`comparison.png`. As `smptrain-cv`: the same command again continues (finished runs are kept, a run stopped
midway resumes, a trained but untested run is tested), several workers (or `--task K` of a job array, recipes outer
and seeds inner) share the plan through claims, and every pass writes the tables from every row on disk.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.config import Config, plain, read_config, replace
from smptrain.core.choices import RECIPES
from smptrain.core.errors import UserError
from smptrain.core.processes import on_main
from smptrain.core.storage import replacing, write_text
from smptrain.search.cv import ROWS, read_rows, record, take, write_frame
from smptrain.search.slots import in_turn
from smptrain.training.layout import has_checkpoint

METRICS = ("test/JaccardIndex", "test/F1Score", "best/val/JaccardIndex")
RUNS = "runs"  # {out}/runs/{recipe}-seed{seed}
DONE = ("tested", "diverged")  # a continued comparison does not run these again


@dataclass(frozen=True)
class Comparison:
    """Recipes x seeds: what each variant changes (--set overrides, by label), and which runs this worker may do."""

    variants: dict[str, list[str]]  # label -> overrides on top of the configuration (a named recipe: train.recipe)
    seeds: list[int]
    task: int | None = None  # only this slot of the plan (a job array's task); None = every missing one
    claims: bool = True

    @property
    def slots(self) -> list[tuple[str, int]]:
        return [(label, seed) for label in self.variants for seed in self.seeds]


@dataclass
class Compared:
    out_dir: Path
    status: str  # finished | incomplete | interrupted
    rows: list[dict]
    summary: list[dict]
    missing: list[str] = field(default_factory=list)


def named(recipes: list[str]) -> dict[str, list[str]]:
    """The variants of named recipes (each one `train.recipe`, so the recipe's keys fill in what the file leaves)."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"--recipes: {unknown[0]!r} is not a recipe; the recipes are {', '.join(RECIPES)}")
    return {recipe: [f"train.recipe='{recipe}'"] for recipe in dict.fromkeys(recipes)}


def compare(config_path: str | None, overrides, plan: Comparison, out_dir: Path, base: dict | None = None,
            say=print) -> Compared:
    """Train and test the plan's missing runs under `out_dir` that no other worker holds, then tabulate every run
    there is; every rank calls it. The configuration is read once per variant: `config_path` (or `base`, a nested
    dict) with `overrides`, then the variant's own."""
    if plan.task is not None and not 0 <= plan.task < len(plan.slots):
        raise UserError(f"--task must be between 0 and {len(plan.slots) - 1} ({len(plan.variants)} recipe(s) x "
                        f"{len(plan.seeds)} seed(s)), got {plan.task}")
    configs = {label: read_config(config_path, [*overrides, *changes], base=base).config
               for label, changes in plan.variants.items()}
    for cfg in configs.values():
        if cfg.data.split_method == "none":
            raise UserError("comparing recipes needs a held-out test split (data.split_method region, sample or "
                            "random): with none, the test split is every patch, trained on too")
    chosen = plan.slots if plan.task is None else [plan.slots[plan.task]]
    status = "finished"
    for label, seed in chosen:
        run_name = f"{label}-seed{seed}"
        rows = on_main(lambda: read_rows(out_dir), out_dir / ROWS)
        if rows.get(run_name, {}).get("status") in DONE:
            continue
        held = take(out_dir, run_name, plan.claims, say)
        if held is None:
            continue
        try:
            row = run_and_test(configs[label], out_dir, label, seed, "; ".join(plan.variants[label]), say)
        finally:
            held.release()
        on_main(lambda: record(out_dir, row), out_dir / ROWS / f"{run_name}.json")
        tested = f", test IoU {row['test/JaccardIndex']:.4f}" if row.get("test/JaccardIndex") is not None else ""
        done = sum(r.get("status") in DONE for name, r in {**rows, run_name: row}.items())
        say(f"recipes {out_dir.name}: {run_name} {row['status']}{tested} ({row['duration_s']:.0f} s); {done} of "
            f"{len(plan.slots)} run(s) of the comparison done")
        if row["status"] == "interrupted":
            status = "interrupted"
            break
    return on_main(lambda: tabulate(out_dir, plan, status), out_dir)


def run_and_test(cfg: Config, out_dir: Path, label: str, seed: int, changes: str, say) -> dict:
    """One run of the plan: trained (or resumed), then its best checkpoint (chosen on validation) tested in fp32
    on the test split. Its row for the table."""
    from smptrain.evaluation.assess import assess_checkpoint
    from smptrain.train import train

    run_name = f"{label}-seed{seed}"
    run_dir = out_dir / RUNS / run_name
    run_cfg = replace(cfg, **{"train.seed": seed, "log.artifact_dir": str(out_dir / RUNS), "log.run_name": run_name,
                              "log.wandb_group": out_dir.name})
    resume = run_dir if has_checkpoint(run_dir) else None
    if run_dir.exists() and resume is None:  # started but never saved a checkpoint: nothing worth keeping
        on_main(lambda: shutil.rmtree(run_dir), run_dir)
    say(f"recipes {out_dir.name}: {label}, seed {seed}{' (resuming)' if resume else ''}")
    started = time.perf_counter()
    result = train(run_cfg, resume)
    row = {"recipe": label, "seed": seed, "status": result.status, "changes": changes or "(the configuration)",
           "epochs": result.epochs, "steps": result.steps, "run_name": run_name, "run_dir": str(run_dir)}
    if result.status in ("finished", "early-stopped"):
        metrics = assess_checkpoint(run_dir, precision="fp32")
        row.update({"status": "tested", "test/JaccardIndex": metrics["test/JaccardIndex"],
                    "test/F1Score": metrics["test/F1Score"],
                    "best/val/JaccardIndex": result.best.get("val/JaccardIndex")})
    row["duration_s"] = round(time.perf_counter() - started, 1)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per recipe, in the order of `rows`: tested runs, and the mean and sample standard deviation (n - 1) of each
    metric over them."""
    summary = []
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        runs = [row for row in rows if row["recipe"] == recipe and all(row.get(m) is not None for m in METRICS)]
        entry = {"recipe": recipe, "seeds": len(runs), "changes": next(
            (row.get("changes", "") for row in rows if row["recipe"] == recipe), "")}
        for metric in METRICS:
            values = [float(row[metric]) for row in runs]
            entry[f"{metric} mean"] = statistics.fmean(values) if values else math.nan
            entry[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        summary.append(entry)
    return summary


def paired(rows: list[dict], first: str) -> dict[str, dict]:
    """For each other recipe, its difference to `first` seed by seed (the seeds both tested): mean, sample std,
    how many seeds, and on how many it was better (test IoU)."""
    by = {(row["recipe"], row["seed"]): row for row in rows if row.get("test/JaccardIndex") is not None}
    differences = {}
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        if recipe == first:
            continue
        seeds = [seed for (name, seed) in by if name == recipe and (first, seed) in by]
        entry = {"seeds": len(seeds)}
        for metric in METRICS:
            values = [float(by[recipe, s][metric]) - float(by[first, s][metric]) for s in seeds]
            entry[f"{metric} difference mean"] = statistics.fmean(values) if values else math.nan
            entry[f"{metric} difference std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        entry["better on"] = sum(by[recipe, s]["test/JaccardIndex"] > by[first, s]["test/JaccardIndex"] for s in seeds)
        differences[recipe] = entry
    return differences


def tabulate(out_dir: Path, plan: Comparison, status: str) -> Compared:
    """Main process, in turn with other workers: the tables, the json and the figure from every row on disk."""
    import pandas as pd

    from smptrain.core.runtime import describe_cpu
    from smptrain.evaluation import plots

    with in_turn(out_dir):
        found = read_rows(out_dir)
        names = [f"{label}-seed{seed}" for label, seed in plan.slots]
        rows = [found[name] for name in names if name in found]
        missing = [name for name in names if found.get(name, {}).get("status") not in DONE]
        if status == "finished" and missing:
            status = "incomplete"
        summary = summarise(rows)
        first = next(iter(plan.variants))
        differences = paired(rows, first)
        for entry in summary:
            entry.update({f"vs {first}: {k}": v for k, v in differences.get(entry["recipe"], {}).items()})
        if rows:
            write_frame(pd.DataFrame(rows), out_dir / "runs")
            with replacing(out_dir / "summary.csv") as tmp:
                table = pd.DataFrame(summary)
                counts = [c for c in table.columns if c.endswith(("better on", "seeds"))]  # counts, not 3.0
                table.astype({c: "Int64" for c in counts}).to_csv(tmp, index=False)
        cpu = describe_cpu()
        write_text(out_dir / "comparison.json", json.dumps(
            {"status": status, "recipes": plan.variants, "seeds": plan.seeds, "cpu": cpu, "missing": missing,
             "summary": summary, "runs": len(rows)}, indent=2, default=plain) + "\n")
        tested = [row for row in rows if row.get("test/JaccardIndex") is not None]
        if tested:
            plots.recipes(tested, ["test/JaccardIndex", "test/F1Score"], out_dir / "comparison.png",
                          f"{out_dir.name}: test split, fp32, best checkpoint chosen on validation; {cpu}")
    return Compared(out_dir, status, rows, summary, missing)


def table(summary: list[dict], first: str) -> str:
    """The summary as a Markdown table: mean +- sample std per metric, and the paired difference to `first`."""
    def cell(entry, metric):
        return f"{entry[f'{metric} mean']:.3f} +- {entry[f'{metric} std']:.3f}"

    lines = ["| recipe | test IoU | test F1 | best val IoU | test IoU vs " + first + " | changes |",
             "|---|---|---|---|---|---|"]
    for entry in summary:
        key = f"vs {first}: test/JaccardIndex difference"
        versus = (f"{entry[key + ' mean']:+.3f} +- {entry[key + ' std']:.3f} (better on {entry[f'vs {first}: better on']}"
                  f" of {entry[f'vs {first}: seeds']} seeds)" if key + " mean" in entry else "")
        lines.append(f"| {entry['recipe']} | {' | '.join(cell(entry, m) for m in METRICS)} | {versus} | "
                     f"{entry['changes']} |")
    return "\n".join(lines)
