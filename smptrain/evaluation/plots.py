"""Figures: sample grids (image, label, prediction, errors), the confusion matrix, ROC and precision-recall curves.

Matplotlib with the Agg backend; every function writes one PNG and returns its path. Colours in overlays:
green = true positive, red = false positive, blue = false negative (missed), grey = ignored (label 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smptrain.core.labels import IGNORE, POSITIVE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def composite(x: np.ndarray, bands) -> np.ndarray:
    """An RGB (H, W, 3) view of a (C, H, W) patch: red/green/blue bands if present, else the first band in grey;
    stretched per patch between the 2nd and 98th percentile."""
    bands = list(bands)
    if all(b in bands for b in ("red", "green", "blue")):
        rgb = np.stack([x[bands.index(b)] for b in ("red", "green", "blue")], -1)
    else:
        rgb = np.repeat(x[0][..., None], 3, -1)
    low, high = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return np.clip((rgb - low) / max(high - low, 1e-6), 0, 1) ** (1 / 1.4)


IGNORED_COLOUR = (1.0, 0.8, 0.0)  # amber: no grey of the image can pass for it


def error_overlay(image: np.ndarray, prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The image in its own colours, with true positives, false positives and false negatives painted over it and
    the ignored pixels hatched in amber (every other pixel, so the image still shows through)."""
    pred, target = prob > 0.5, y == POSITIVE
    out = image.copy()
    colours = {(1, 1): (0.1, 0.9, 0.1), (1, 0): (0.95, 0.1, 0.1), (0, 1): (0.1, 0.4, 1.0)}
    for (p, t), colour in colours.items():
        mask = (pred == bool(p)) & (target == bool(t)) & (y != IGNORE)
        out[mask] = colour
    rows, cols = np.indices(y.shape)
    out[(y == IGNORE) & ((rows + cols) % 3 == 0)] = IGNORED_COLOUR
    return out


def sample_grid(xs, ys, probs, bands, titles, path: Path, heading: str) -> Path:
    """One row per sample: composite, label, probability, TP/FP/FN overlay."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = len(xs)
    fig, axes = plt.subplots(rows, 4, figsize=(10.6, 2.6 * rows + 1.0), squeeze=False)
    for i in range(rows):
        image = composite(xs[i], bands)
        label = np.where(ys[i] == IGNORE, 0.5, ys[i] == POSITIVE)
        panels = [(image, None, "image"), (label, "gray", "label (grey = ignored)"),
                  (probs[i], "magma", "probability"), (error_overlay(image, probs[i], ys[i]), None, "TP / FP / FN")]
        for j, (data, cmap, name) in enumerate(panels):
            ax = axes[i, j]
            shown = ax.imshow(data, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 2:
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
        axes[i, 0].set_ylabel(titles[i], fontsize=8)
    legend = [Patch(color=colour, label=name) for name, colour in
              (("true positive", (0.1, 0.9, 0.1)), ("false positive", (0.95, 0.1, 0.1)),
               ("false negative", (0.1, 0.4, 1.0)), ("ignored (label 2, hatched)", IGNORED_COLOUR))]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def confusion_matrix(tn: int, fp: int, fn: int, tp: int, path: Path, heading: str) -> Path:
    """Confusion matrix normalised by the true class (rows sum to 1), with raw counts."""
    plt = _pyplot()
    counts = np.array([[tn, fp], [fn, tp]], dtype=float)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{norm[i, j]:.3f}\n({int(counts[i, j]):,})", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks([0, 1], ["background", "positive"])
    ax.set_yticks([0, 1], ["background", "positive"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    ax.set_title(heading, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def curve(x, y, path: Path, heading: str, axes: tuple[str, str], score: tuple[str, float], diagonal: bool = False,
          marks=()) -> Path:
    """A curve in the unit square (ROC, precision-recall); `axes` = (x label, y label), `score` = (name, value);
    `marks`: (x, y, label) points on it, such as the operating threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot(x, y, marker=".", lw=1.5, label=f"{score[0]} = {score[1]:.4f}")
    for (mark_x, mark_y, name), style in zip(marks, ("*", "D")):
        ax.plot([mark_x], [mark_y], style, ms=12 if style == "*" else 7, color="gold" if style == "*" else "C3",
                markeredgecolor="black", zorder=5, label=name)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(heading, fontsize=8)
    ax.legend(loc="lower right" if diagonal else "lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def learning_rate(steps: list[int], rates: list[float], steps_per_epoch: int, path: Path, heading: str) -> Path:
    """A run's planned learning rate over optimizer steps, epoch boundaries marked (`RUN_DIR/schedule.png`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(steps, rates, lw=1.6)
    epochs = (steps[-1] + 1) // steps_per_epoch if steps else 0
    if epochs <= 200:  # more lines than that would only grey the figure
        for boundary in range(steps_per_epoch, epochs * steps_per_epoch, steps_per_epoch):
            ax.axvline(boundary, c="grey", lw=0.4, alpha=0.4)
    ax.set_title(heading, fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from smptrain.core.storage import replacing

    path = Path(path)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def cv_metrics(rows: list[dict], metrics: list[str], path: Path, heading: str) -> Path:
    """One panel per metric: its value for every fold (x) and seed (colour), with the mean over runs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    seeds = sorted({row["seed"] for row in rows})
    folds = sorted({row["fold"] for row in rows})
    for ax, metric in zip(axes[0], metrics):
        finite = []
        for i, seed in enumerate(seeds):
            points = [(row["fold"], row.get(metric)) for row in rows if row["seed"] == seed]
            points = [(f, v) for f, v in points if isinstance(v, (int, float)) and np.isfinite(v)]
            finite += [v for _, v in points]
            offset = (i - (len(seeds) - 1) / 2) * 0.08
            ax.plot([f + offset for f, _ in points], [v for _, v in points], "o", label=f"seed {seed}")
        if finite:
            ax.axhline(float(np.mean(finite)), color="0.4", linestyle="--", linewidth=1,
                       label=f"mean {np.mean(finite):.3f}")
        ax.set_xticks(folds)
        ax.set_xlabel("fold")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def recipes(rows: list[dict], metrics: list[str], path: Path, heading: str) -> Path:
    """One panel per metric: each recipe's runs, one marker per seed (the same seed's runs joined across recipes, so
    pairs can be followed; the legend names the seeds), and each recipe's mean +- sample standard deviation."""
    import textwrap

    plt = _pyplot()
    names = list(dict.fromkeys(row["recipe"] for row in rows))
    seeds = list(dict.fromkeys(row["seed"] for row in rows))
    width = max(3.2, 0.9 * len(names) + 1.8)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, seed in enumerate(seeds):
            points = [(i, row[metric]) for i, name in enumerate(names) for row in rows
                      if row["recipe"] == name and row["seed"] == seed]
            if points:
                ax.plot(*zip(*points), marker="os^vD<>p"[k % 8], ls="-", lw=0.8, ms=5, alpha=0.75, color=f"C{k % 10}",
                        label=f"seed {seed}")
        for i, name in enumerate(names):
            values = np.array([row[metric] for row in rows if row["recipe"] == name], float)
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.errorbar([i + 0.22], [values.mean()], yerr=[spread], fmt="s", color="black", capsize=4, markersize=6,
                        label="mean +- sample std" if i == 0 else None)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.3)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("\n".join(textwrap.wrap(heading, width=int(width * len(metrics) * 11))), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def tuning(rows: list[dict], keys: list[str], out_dir: Path, study: str) -> dict[str, Path]:
    """The optimisation history (score per trial, best so far) and the score against each searched parameter."""
    plt = _pyplot()
    done = [r for r in rows if r["state"] == "COMPLETE" and r["score"] is not None]
    figures = {}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if done:
        numbers = [r["number"] for r in done]
        scores = [r["score"] for r in done]
        colours = ["tab:red" if r["score_is_unstable"] else "tab:blue" for r in done]
        ax.scatter(numbers, scores, c=colours, s=22, label="trial (red: unstable)")
        ax.step(numbers, np.maximum.accumulate(scores), where="post", color="0.3", label="best so far")
        ax.legend(fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel("CV score")
    ax.set_title(f"study {study}: optimisation history", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figures["history"] = _save(fig, out_dir / "history.png")
    if keys:
        columns = min(3, len(keys))
        rows_count = -(-len(keys) // columns)
        fig, axes = plt.subplots(rows_count, columns, figsize=(4.2 * columns, 3.4 * rows_count), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, key in zip(axes.flat, keys):
            values = [r.get(key) for r in done]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric:
                ax.scatter(values, [r["score"] for r in done], s=22)
                if values and min(values) > 0 and max(values) / min(values) > 30:  # spans decades: log axis
                    ax.set_xscale("log")
                else:
                    ax.locator_params(axis="x", nbins=4)
                    ax.tick_params(axis="x", labelsize=8)
            else:
                labels = sorted({str(v) for v in values})
                ax.scatter([labels.index(str(v)) for v in values], [r["score"] for r in done], s=22)
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7, ha="right")
            ax.set_title(key, fontsize=9)
            ax.set_ylabel("CV score")
            ax.grid(alpha=0.3)
        fig.suptitle(f"study {study}: score against each parameter", fontsize=10)
        fig.tight_layout()
        figures["parameters"] = _save(fig, out_dir / "parameters.png")
    return figures


def groups(rows: list[dict], prefix: str, path: Path, heading: str, group_name: str = "region",
           tta_rows: list[dict] | None = None) -> Path:
    """IoU per group as horizontal bars (worst at the top), each labelled with its patches and positive pixels;
    with TTA rows, a second bar per group."""
    plt = _pyplot()
    names = [r["group"] for r in rows]
    iou = [r[f"{prefix}/JaccardIndex"] for r in rows]
    fig, ax = plt.subplots(figsize=(8.5, 1.8 + (0.7 if tta_rows else 0.42) * len(rows)))
    ypos = np.arange(len(rows))[::-1]
    height = 0.38 if tta_rows else 0.7
    ax.barh(ypos + (height / 2 if tta_rows else 0), iou, height=height, color="tab:blue", label="without TTA")
    if tta_rows:
        tta = {r["group"]: r[f"{prefix}_tta/JaccardIndex"] for r in tta_rows}
        ax.barh(ypos - height / 2, [tta[n] for n in names], height=height, color="tab:orange", label="with TTA")
        for y, n in zip(ypos, names):
            ax.text(0.01, y - height / 2, f"{tta[n]:.3f}", va="center", fontsize=7,
                    color="white" if tta[n] > 0.1 else "black")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for y, r, v in zip(ypos, rows, iou):
        note = f"{v:.3f}  ({r['patches']} patches, {r['positive_pixels']:,} positive px)" if r["positive_pixels"] \
            else f"no positives ({r['patches']} patches)"
        ax.text(0.01, y + (height / 2 if tta_rows else 0), note, va="center", fontsize=7,
                color="white" if v > 0.35 else "black")
    ax.set_yticks(ypos, names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU (JaccardIndex) at 0.5")
    ax.set_ylabel(group_name)
    ax.set_title(heading, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def reliability(table: dict, path: Path, heading: str) -> Path:
    """Reliability diagram: observed frequency of positives against mean predicted probability per bin, the
    diagonal of perfect calibration, and the share of pixels per bin below."""
    plt = _pyplot()
    fig, (ax, share) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = len(table["pixels"])
    centres = (np.arange(bins) + 0.5) / bins
    seen = table["pixels"] > 0
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfectly calibrated")
    ax.bar(centres[seen], table["frequency"][seen], width=1 / bins, edgecolor="tab:blue", color="tab:blue", alpha=0.35,
           label="observed frequency")
    ax.plot(table["confidence"][seen], table["frequency"][seen], "o-", color="tab:blue", ms=4,
            label=f"per bin (ECE = {table['ece']:.4f})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of positive pixels")
    ax.set_title(heading, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    total = max(int(table["pixels"].sum()), 1)
    share.bar(centres, table["pixels"] / total, width=1 / bins, color="0.5")
    share.set_yscale("log")
    share.set_xlim(0, 1)
    share.set_xlabel("predicted probability")
    share.set_ylabel("share of pixels", fontsize=8)
    share.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def runs_over_steps(curves: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """One line per run: `metric` against the optimizer step (smptrain-compare)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, curve in curves.items():
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, marker=".", lw=1.3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of {len(curves)} run(s)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(records: list[dict], path: Path, heading: str, monitor: str = "val/JaccardIndex",
                    schedule: tuple[list[int], list[float]] | None = None) -> Path:
    """A run's progress from its metrics.jsonl records (`RUN_DIR/curves.png`): the train loss (on a log scale, where
    its later epochs would otherwise be a flat line at 0), the validation metrics (the best `monitor` marked) and
    the learning rate of every step so far (`schedule`, the rates followed; else the logged ones), each against the
    optimizer step."""
    plt = _pyplot()
    fig, (loss_ax, val_ax, lr_ax) = plt.subplots(3, 1, figsize=(7.5, 8.2), sharex=True)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if monitor in r]
    if train:
        loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=1.2, label="train/loss")
    if val and "val/loss" in val[0]:
        loss_ax.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", lw=1.2, ms=3, label="val/loss")
    loss_ax.set_ylabel("loss")
    positive = [r["train/loss"] for r in train if isinstance(r.get("train/loss"), (int, float)) and r["train/loss"] > 0]
    if positive and len(positive) == len(train):
        loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=8)
    for key in (monitor, "val/F1Score", "val/Recall", "val/Precision"):
        points = [(r["step"], r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if points:
            val_ax.plot(*zip(*points), "o-", lw=1.2, ms=3, label=key)
    finite = [(r["step"], r[monitor]) for r in val if isinstance(r[monitor], (int, float)) and np.isfinite(r[monitor])]
    if finite:
        step, best = max(finite, key=lambda point: point[1])
        val_ax.plot([step], [best], "*", ms=14, color="gold", markeredgecolor="black", zorder=5,
                    label=f"best {monitor} {best:.4f} (step {step})")
    val_ax.set_ylabel("validation")
    val_ax.set_ylim(0, 1.02)
    val_ax.legend(fontsize=8, loc="lower right")
    rates = list(zip(*schedule)) if schedule else [(r["step"], r["learning_rate"]) for r in records
                                                   if "learning_rate" in r]
    if rates:
        lr_ax.plot(*zip(*sorted(rates)), lw=1.2, color="C3", drawstyle="steps-post")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, val_ax, lr_ax):
        ax.grid(alpha=0.3)
    loss_ax.set_title(heading, fontsize=9)
    # fixed margins: tight_layout would measure every label at every validation (it doubled the drawing's time)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.96, bottom=0.06, hspace=0.12)
    return _save(fig, path)
