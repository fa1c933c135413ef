"""The quality benchmark: which training recipe gives the better model on a region the models never saw.

    .venv/bin/python tools/quality.py [--out artifacts/quality] [--seeds 0,1,2] [--epochs 8] [--patches 256]
                                      [--recipes darts,focal+dice,cosine,ema,positives,combined]

A generated dataset in the DARTS layout (smptrain.data.demo: 64 px patches, slumps drawn in a quarter of them, so
positives are rare) is split by region: Lena Delta, whose band statistics lie farthest from the other regions', is
the test split, so the test measures a domain shift; the other three regions train and validate (DARTS' 5 folds,
fold 0). Every recipe trains a Unet with timm's ResNet-10-T encoder (`tu-resnet10t`, resnet-class at half
resnet18's step time, so 18 runs fit in 20 minutes on 2 CPU cores) from scratch with every seed, in fp32 (a number
must not depend on whether the CPU has native bf16). It is `smptrain-recipes`' comparison (smptrain.search.recipes:
each run trained, its best checkpoint chosen on validation and tested in fp32 on the held-out region) on the
generated data, with single changes of DARTS' defaults as the variants beside the named `rare-positives`.

Recipes, each DARTS' default with one change, and their combination:
  darts       DARTS' defaults: focal loss, AdamW lr 1e-3 * 0.9**epoch, batch 8, validation every 3 epochs
  focal+dice  train.loss = {focal = 1.0, dice = 1.0}
  cosine      train.schedule = "cosine" with train.warmup_epochs = 1
  ema         train.ema_decay = 0.99 with train.ema_warmup
  positives   data.positive_fraction = 0.33 (nnU-Net's share)
  rare-positives  the named recipe: focal+dice, cosine with a warmup epoch and positives together
  combined    every change above whose mean best val/JaccardIndex beat darts' (chosen on validation, never on
              test); all four if fewer than two did

Prints, per recipe, the mean +- sample standard deviation over the seeds of test IoU and F1 (and of the best
validation IoU), with the CPU the numbers came from; writes runs.csv (one row per run), summary.csv (with the paired
differences to darts), comparison.json, comparison.png and quality.png to --out. Three seeds are few: a difference
smaller than the spread is no difference. A machine repeats its own numbers exactly, but fp32 convolutions take
other kernels with AVX-512 than with AVX2, so runs differ between machines: compare recipes within one table (the
CPU is printed with it), never across. The same command again continues where a killed one stopped (finished runs
are kept, a killed run resumes from its last checkpoint).
"""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smptrain.core.runtime import describe_cpu  # noqa: E402
from smptrain.data.demo import make_demo  # noqa: E402
from smptrain.evaluation import plots  # noqa: E402
from smptrain.search.recipes import METRICS, Comparison, compare, summarise  # noqa: E402

HELD_OUT = "Lena Delta"
ENCODER = "tu-resnet10t"  # timm's ResNet-10-T: resnet-class, half resnet18's step time in a Unet on CPU
CHANGES = {  # recipe -> its overrides of DARTS' defaults
    "focal+dice": ["train.loss={focal = 1.0, dice = 1.0}"],
    "cosine": ["train.schedule='cosine'", "train.warmup_epochs=1"],
    "ema": ["train.ema_decay=0.99", "train.ema_warmup=true"],
    "positives": ["data.positive_fraction=0.33"],
}
NAMED = {"rare-positives": ["train.recipe='rare-positives'"]}  # smptrain's named recipe (smptrain/config/recipes.toml)
RECIPES = ("darts", *CHANGES, *NAMED, "combined")


def base_overrides(data: Path, out: Path, epochs: int) -> list[str]:
    """DARTS' defaults (smptrain's), but for a small encoder, fp32 and the benchmark's data and split."""
    return [f"data.dir='{data}'", "data.split_method='region'", f"data.split_by=['{HELD_OUT}']",
            "data.fold_method='kfold'", "data.total_folds=5", "data.fold=0", "data.in_memory=true",
            "data.num_workers=0", f"model.encoder='{ENCODER}'", f"train.max_epochs={epochs}",
            "train.mixed_precision='no'", "log.preview_every_n_val=0", "log.log_every_n_steps=50"]


def benchmark_data(out: Path, patches: int) -> Path:
    """The generated dataset, made once: a benchmark run again with the same --out continues (the comparison keeps
    its finished runs and resumes a killed one), on the same data."""
    data = out / "data"
    if (data / "config.toml").exists():
        stated = tomllib.loads((data / "config.toml").read_text())["darts"]["n_patches"]
        if stated != patches:
            raise click.ClickException(f"{data} holds {stated} patches, not --patches {patches}; choose another --out")
        print(f"continuing in {out} (finished runs are kept)")
        return data
    if (out / "runs").exists():
        raise click.ClickException(f"{out / 'runs'} exists without its data; remove it or choose another --out")
    return make_demo(data, patches=patches, patch_size=64, seed=0, slump_share=0.25)


def combination(summary: list[dict]) -> list[str]:
    """The changes whose mean best validation IoU beat DARTS' defaults (all of them if fewer than two did)."""
    key = "best/val/JaccardIndex mean"
    darts = next(entry[key] for entry in summary if entry["recipe"] == "darts")
    better = [entry["recipe"] for entry in summary if entry["recipe"] in CHANGES and entry[key] > darts]
    return better if len(better) >= 2 else list(CHANGES)


def table(summary: list[dict]) -> str:
    lines = ["| recipe | test IoU | test F1 | best val IoU | changes |", "|---|---|---|---|---|"]
    for entry in summary:
        cells = [f"{entry[f'{m} mean']:.3f} +- {entry[f'{m} std']:.3f}" for m in METRICS]
        lines.append(f"| {entry['recipe']} | {' | '.join(cells)} | {entry['changes']} |")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False), default="artifacts/quality", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@click.option("--epochs", default=8, show_default=True, help="Epochs of every run (validation every 3).")
@click.option("--patches", default=256, show_default=True, help="Patches of the generated dataset (4 regions).")
@click.option("--recipes", default=",".join(RECIPES), show_default=True,
              help="Comma-separated recipes to run (darts is always run: the others are measured against it).")
def main(out, seeds, epochs, patches, recipes):
    """Train recipes side by side over seeds and test them on a held-out region."""
    out = Path(out).absolute()
    seeds = [int(s) for s in seeds.split(",")]
    chosen = ["darts", *(r for r in recipes.split(",") if r != "darts")]
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of {', '.join(RECIPES)}", param_hint="--recipes")
    cpu = describe_cpu()
    print(f"quality benchmark on {cpu}: {len(chosen)} recipes x {len(seeds)} seeds, {epochs} epochs each")
    data = benchmark_data(out, patches)
    started = time.perf_counter()
    variants = {recipe: CHANGES.get(recipe) or NAMED.get(recipe, []) for recipe in chosen if recipe != "combined"}
    result = compare(None, base_overrides(data, out, epochs), Comparison(variants, seeds, claims=False), out)
    if "combined" in chosen:  # chosen on validation from the runs above, which the comparison keeps
        picked = combination(summarise(result.rows))
        print(f"combined: {', '.join(picked)}")
        variants["combined"] = [c for name in picked for c in CHANGES[name]]
        result = compare(None, base_overrides(data, out, epochs), Comparison(variants, seeds, claims=False), out)
    rows, summary = result.rows, summarise(result.rows)
    heading = (f"held-out region {HELD_OUT}; Unet-{ENCODER}, {epochs} epochs, fp32; {len(seeds)} seeds; {cpu}")
    plots.recipes(rows, ["test/JaccardIndex", "test/F1Score"], out / "quality.png", heading)
    print(f"\n{heading}\n{table(summary)}\n\n{len(rows)} runs in {(time.perf_counter() - started) / 60:.1f} min; "
          f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'quality.png'}")


if __name__ == "__main__":
    main()
