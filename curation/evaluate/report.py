"""The comparison report: every recipe side by side, with the evidence to tell signal from noise.

One row per recipe at the MAIN compute budget (the ``samples_seen`` every recipe trains for):
samples kept, kept fraction of the pool and of the post-dedup candidates, samples seen, training
time, the main metric of every eval task and their mean (DataComp's average) as mean ± std over
training seeds, and the difference of that average from ``full`` and from the recipe's
size-matched random control (:mod:`curation.select.controls`), each marked by a paired t-test
over seeds (:mod:`curation.evaluate.stats`: ``**`` p < 0.01, ``*`` p < 0.05, ``~`` within
noise, ``n/a`` fewer than 2 shared seeds).

Compute curves (:func:`compute_curves`): checkpoints trained at several samples-seen budgets
(``samples_seen_multiples`` of the trained_checkpoints config) give the average against
compute per recipe; :func:`reach_full` states the compute at which a recipe first reaches
``full``'s average at the main budget (linear interpolation in log2 compute between the two
bracketing budgets), or that it does not within the budgets trained.

The verdict at the top of the report (:func:`verdict`) is generated from these numbers.

Outputs: a polars table (:func:`build_comparison`), a markdown table (:func:`to_markdown`) and
an HTML page with a grid of plots (every metric against the kept fraction, one colour per
method, the same colour in every plot and run: :func:`method_color`) and the compute curves
(:func:`write_report`, matplotlib's Agg backend).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from curation.evaluate.stats import TEST_NAME, paired_compare

log = logging.getLogger(__name__)

AVERAGE = "average"
AVERAGE_COL = "average"
CONTROL_METHOD = "control"

# Stable colours: the same method has the same colour in every plot of every run.
METHOD_COLORS = {
    "full": "#000000",
    "random": "#7f7f7f",
    CONTROL_METHOD: "#b8b8b8",
    "semdedup": "#1f77b4",
    "ssp": "#ff7f0e",
    "dbp": "#2ca02c",
    "clipscore": "#d62728",
    "clipcov": "#9467bd",
}
_EXTRA_COLORS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173"]

# Differences smaller than this (half the table's last digit) are "no difference" whatever the
# p-value: identical runs at chance level differ by 1e-4 with zero spread, a "significant" nothing.
MIN_EFFECT = 0.0005

FIXED_COLUMNS = (
    "recipe", "method", "kept", "fraction", "candidates", "fraction_candidates", "seeds", "samples_seen",
    "train_seconds", "strategy", "model", "delta_full", "p_full", "control", "delta_control", "p_control",
)  # fmt: skip


def method_of(recipe: str) -> str:
    """The curation method of a recipe name: the part before ``@`` (``"dbp@0.5"`` -> ``"dbp"``);
    ``control`` for a derived size-matched control (``control:...``)."""
    if recipe.startswith("control:"):
        return CONTROL_METHOD
    return recipe.split("@", 1)[0]


def method_color(method: str) -> str:
    """A fixed colour per method (unknown methods: a colour picked by a stable hash of the name)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    h = int(hashlib.sha256(method.encode()).hexdigest(), 16)
    return _EXTRA_COLORS[h % len(_EXTRA_COLORS)]


def _main_metric_of_task(task: str) -> str:
    from curation.evaluate.evaluator import EvalTask, main_metric

    if task == AVERAGE:
        return "main"
    return main_metric(EvalTask.parse(task).kind)


def metric_label(task: str) -> str:
    """Column label of a task's main metric: ``"emoji-heldout/retrieval"`` -> ``"retrieval mean_recall@1"``."""
    if task == AVERAGE:
        return AVERAGE_COL
    short = task.split("/", 1)[1] if "/" in task else task
    return f"{short} {_main_metric_of_task(task)}"


def _is_main_budget(config_json: str | None) -> bool:
    if not config_json:
        return True
    try:
        return bool(json.loads(config_json).get("main_budget", True))
    except (TypeError, ValueError):
        return True


def _with_labels(eval_results: pl.DataFrame) -> pl.DataFrame:
    ev = eval_results.with_columns(pl.col("task").map_elements(_main_metric_of_task, return_dtype=pl.Utf8).alias("_main"))
    ev = ev.filter(pl.col("metric") == pl.col("_main"))
    return ev.with_columns(pl.col("task").map_elements(metric_label, return_dtype=pl.Utf8).alias("label"))


def main_budget_checkpoints(checkpoints: pl.DataFrame) -> pl.DataFrame:
    """The checkpoints of the main budget: the typed ``main_budget`` column (or, for tables
    written before it existed, ``config_json.main_budget``; true when absent)."""
    if checkpoints.height == 0:
        return checkpoints
    if "main_budget" in checkpoints.columns:
        return checkpoints.filter(pl.col("main_budget").fill_null(True))
    if "config_json" not in checkpoints.columns:
        return checkpoints
    keep = [_is_main_budget(c) for c in checkpoints["config_json"].to_list()]
    return checkpoints.filter(pl.Series(keep, dtype=pl.Boolean))


def per_seed_values(eval_results: pl.DataFrame, metric: str = AVERAGE_COL) -> dict[str, dict[int, float]]:
    """recipe -> {seed: value of ``metric`` (a label of :func:`metric_label`)} from eval rows."""
    ev = _with_labels(eval_results).filter(pl.col("label") == metric)
    out: dict[str, dict[int, float]] = {}
    for r in ev.group_by(["recipe", "seed"]).agg(pl.col("value").mean()).iter_rows(named=True):
        out.setdefault(r["recipe"], {})[int(r["seed"])] = float(r["value"])
    return out


def build_comparison(
    eval_results: pl.DataFrame,
    checkpoints: pl.DataFrame,
    kept: Mapping[str, int],
    pool_size: int | None = None,
    methods: Mapping[str, str] | None = None,
    candidates: Mapping[str, int] | None = None,
    controls: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Every recipe side by side at the main budget.

    Args:
        eval_results: rows of the ``eval_results`` table (recipe, checkpoint, task, metric,
            value, seed); the main metric of every task and the ``average`` task are used.
        checkpoints: rows of the ``checkpoints`` table (recipe, strategy, model, path,
            samples_seen, seconds, config_json); several rows per recipe = several seeds
            and/or budgets. Only main-budget checkpoints (and their eval rows) are used.
        kept: recipe -> number of samples in its subset.
        pool_size: samples in the pool (default: ``kept["full"]``, else the largest subset).
        methods: recipe -> method name (default: :func:`method_of`).
        candidates: recipe -> candidates after its dedup chain (the pool size when absent).
        controls: recipe -> its size-matched control recipe (see
            :func:`curation.select.controls.control_map`).

    Returns:
        One row per recipe (``full``, ``random``, controls, then the other methods, each by
        kept count) with the columns of :data:`FIXED_COLUMNS` and per metric label ``<label>``
        (mean over seeds) and ``<label> std`` (population std, 0 with one seed).
        ``delta_full`` / ``delta_control`` are differences of the average, ``p_full`` /
        ``p_control`` their paired-test p-values (null without a test).
    """
    if eval_results.height == 0:
        raise ValueError("eval_results: got 0 rows; expected the results of at least one recipe")
    methods = dict(methods or {})
    candidates = dict(candidates or {})
    controls = dict(controls or {})
    if pool_size is None:
        pool_size = int(kept.get("full", max(kept.values()) if kept else 0))
    ck = main_budget_checkpoints(checkpoints)
    ev = eval_results
    if ck.height and "checkpoint" in ev.columns and "path" in ck.columns:
        ev = ev.join(ck.select(pl.col("path").alias("checkpoint")), on="checkpoint", how="semi")
        if ev.height == 0:
            raise ValueError("eval_results: got no rows of a main-budget checkpoint; expected eval_reports of the main runs")
    ev = _with_labels(ev)
    labels = sorted(set(ev["label"].to_list()) - {AVERAGE_COL}) + ([AVERAGE_COL] if AVERAGE_COL in ev["label"] else [])
    per_seed = ev.group_by(["recipe", "seed", "label"]).agg(pl.col("value").mean())
    stats = per_seed.group_by(["recipe", "label"]).agg(
        pl.col("value").mean().alias("mean"),
        pl.col("value").std(ddof=0).fill_null(0.0).alias("std"),
        pl.col("seed").n_unique().alias("seeds"),
    )
    ck_stats = (
        ck.group_by("recipe").agg(
            pl.col("samples_seen").mean().alias("samples_seen"),
            pl.col("seconds").mean().alias("train_seconds"),
            pl.col("strategy").first().alias("strategy"),
            pl.col("model").first().alias("model"),
        )
        if ck.height
        else pl.DataFrame(schema={"recipe": pl.Utf8, "samples_seen": pl.Float64, "train_seconds": pl.Float64, "strategy": pl.Utf8, "model": pl.Utf8})
    )
    seeds_avg: dict[str, dict[int, float]] = {}
    for r in per_seed.filter(pl.col("label") == AVERAGE_COL).iter_rows(named=True):
        seeds_avg.setdefault(r["recipe"], {})[int(r["seed"])] = float(r["value"])
    recipes = sorted(set(stats["recipe"].to_list()))
    rows = []
    for r in recipes:
        s = stats.filter(pl.col("recipe") == r)
        c = ck_stats.filter(pl.col("recipe") == r)
        n_kept = kept.get(r)
        n_cand = candidates.get(r, pool_size)
        row = {
            "recipe": r,
            "method": methods.get(r, method_of(r)),
            "kept": int(n_kept) if n_kept is not None else None,
            "fraction": (float(n_kept) / pool_size) if (n_kept is not None and pool_size) else None,
            "candidates": int(n_cand) if n_cand else None,
            "fraction_candidates": (float(n_kept) / n_cand) if (n_kept is not None and n_cand) else None,
            "seeds": int(s["seeds"].max()),
            "samples_seen": int(round(c["samples_seen"][0])) if c.height else None,
            "train_seconds": float(c["train_seconds"][0]) if c.height else None,
            "strategy": c["strategy"][0] if c.height else None,
            "model": c["model"][0] if c.height else None,
        }
        for lab in labels:
            m = s.filter(pl.col("label") == lab)
            row[lab] = float(m["mean"][0]) if m.height else None
            row[f"{lab} std"] = float(m["std"][0]) if m.height else None
        a = seeds_avg.get(r, {})
        d_full = paired_compare(a, seeds_avg["full"]) if ("full" in seeds_avg and r != "full") else None
        row["delta_full"] = d_full.mean_diff if d_full and d_full.n else None
        row["p_full"] = d_full.p if d_full else None
        ctrl = controls.get(r)
        d_ctrl = paired_compare(a, seeds_avg[ctrl]) if (ctrl in seeds_avg) else None
        row["control"] = ctrl if ctrl in seeds_avg else None
        row["delta_control"] = d_ctrl.mean_diff if d_ctrl and d_ctrl.n else None
        row["p_control"] = d_ctrl.p if d_ctrl else None
        rows.append(row)
    schema_over = {k: pl.Float64 for k in ("delta_full", "p_full", "delta_control", "p_control", "fraction", "fraction_candidates")}
    schema_over["control"] = pl.Utf8
    df = pl.DataFrame(rows, infer_schema_length=None, schema_overrides=schema_over)
    order = (
        pl.when(pl.col("method") == "full").then(0)
        .when(pl.col("method") == "random").then(1)
        .when(pl.col("method") == CONTROL_METHOD).then(2)
        .otherwise(3)
    )  # fmt: skip
    return df.with_columns(order.alias("_o")).sort(["_o", "method", "kept"], nulls_last=True).drop("_o")


def metric_columns(comparison: pl.DataFrame) -> list[str]:
    """The metric labels of a comparison table (per-task main metrics, then ``average``)."""
    return [c for c in comparison.columns if c not in FIXED_COLUMNS and not c.endswith(" std")]


def best_per_metric(comparison: pl.DataFrame) -> dict[str, str]:
    """metric label -> the recipe with the highest mean (ties: the first in table order)."""
    out = {}
    for m in metric_columns(comparison):
        vals = [(v, i) for i, v in enumerate(comparison[m].to_list()) if v is not None and not math.isnan(v)]
        if vals:
            best = max(vals, key=lambda t: (t[0], -t[1]))
            out[m] = comparison["recipe"][best[1]]
    return out


# ------------------------------------------------------------------------------------------
# compute curves
# ------------------------------------------------------------------------------------------


def compute_curves(eval_results: pl.DataFrame, checkpoints: pl.DataFrame, metric: str = AVERAGE_COL) -> pl.DataFrame:
    """``metric`` against samples seen per recipe, over every budget trained.

    Returns:
        Rows (recipe, method, samples_seen i64, seeds i64, mean f64, std f64), sorted by
        recipe then samples seen; empty when no checkpoint rows.
    """
    schema = {"recipe": pl.Utf8, "method": pl.Utf8, "samples_seen": pl.Int64, "seeds": pl.Int64, "mean": pl.Float64, "std": pl.Float64}
    if checkpoints.height == 0 or eval_results.height == 0:
        return pl.DataFrame(schema=schema)
    ev = _with_labels(eval_results).filter(pl.col("label") == metric)
    ev = ev.join(checkpoints.select(pl.col("path").alias("checkpoint"), "samples_seen"), on="checkpoint", how="inner")
    if ev.height == 0:
        return pl.DataFrame(schema=schema)
    per = ev.group_by(["recipe", "samples_seen", "seed"]).agg(pl.col("value").mean())
    cur = per.group_by(["recipe", "samples_seen"]).agg(
        pl.col("seed").n_unique().cast(pl.Int64).alias("seeds"),
        pl.col("value").mean().alias("mean"),
        pl.col("value").std(ddof=0).fill_null(0.0).alias("std"),
    )
    cur = cur.with_columns(
        pl.col("recipe").map_elements(method_of, return_dtype=pl.Utf8).alias("method"),
        pl.col("samples_seen").cast(pl.Int64),
    )
    return cur.select(list(schema)).sort(["recipe", "samples_seen"])


def reach_full(curves: pl.DataFrame, target: float | None) -> dict[str, float | None]:
    """recipe -> samples seen at which its mean first reaches ``target`` (None: does not).

    Between the last budget below ``target`` and the first at or above it the crossing is
    interpolated linearly in ``log2(samples seen)``.
    """
    out: dict[str, float | None] = {}
    if target is None:
        return out
    for (recipe,), g in curves.sort("samples_seen").group_by("recipe", maintain_order=True):
        x = g["samples_seen"].to_numpy().astype(np.float64)
        y = g["mean"].to_numpy()
        hit = np.flatnonzero(y >= target - 1e-12)
        if hit.size == 0:
            out[recipe] = None
            continue
        i = int(hit[0])
        if i == 0:
            out[recipe] = float(x[0])
            continue
        lx0, lx1 = math.log2(x[i - 1]), math.log2(x[i])
        frac = (target - y[i - 1]) / (y[i] - y[i - 1]) if y[i] != y[i - 1] else 1.0
        out[recipe] = float(2 ** (lx0 + frac * (lx1 - lx0)))
    return out


# ------------------------------------------------------------------------------------------
# the verdict
# ------------------------------------------------------------------------------------------


def significant(d: float | None, p: float | None) -> bool:
    """True when the paired test says p < 0.05 AND the difference is at least :data:`MIN_EFFECT`."""
    return d is not None and p is not None and p < 0.05 and abs(d) >= MIN_EFFECT


def _p(p: float | None) -> str:
    return "no test" if p is None else (f"p={p:.3f}" if p >= 0.001 else "p<0.001")


def verdict(
    comparison: pl.DataFrame,
    reach: Mapping[str, float | None] | None = None,
    full_samples_seen: int | None = None,
) -> list[str]:
    """Short sentences stating the result, generated from the table (no fixed conclusions)."""
    lines: list[str] = []
    rows = {r["recipe"]: r for r in comparison.iter_rows(named=True)}
    if AVERAGE_COL not in comparison.columns:
        return ["No average metric: no verdict."]
    seeds = int(comparison["seeds"].min())
    best = best_per_metric(comparison).get(AVERAGE_COL)
    if best:
        b = rows[best]
        lines.append(f"Highest average: {best} ({b[AVERAGE_COL]:.3f} ± {b[f'{AVERAGE_COL} std']:.3f} over {b['seeds']} seed(s)).")
    if seeds < 2:
        lines.append("Only one seed per recipe: no difference can be told from seed noise; train with seeds: [0, 1, 2].")
    if "full" in rows:
        better = [r for r in rows.values() if r["recipe"] != "full" and significant(r["delta_full"], r["p_full"]) and r["delta_full"] > 0]
        worse = [r for r in rows.values() if r["recipe"] != "full" and significant(r["delta_full"], r["p_full"]) and r["delta_full"] < 0]
        noise = [r for r in rows.values() if r["recipe"] != "full" and r["delta_full"] is not None and not significant(r["delta_full"], r["p_full"])]
        if better:
            lines.append("Significantly better than full at the same compute: " + ", ".join(f"{r['recipe']} ({r['delta_full']:+.3f}, {_p(r['p_full'])})" for r in better) + ".")
        else:
            lines.append("No subset is significantly better than full at the same compute.")
        if worse:
            lines.append("Significantly worse than full: " + ", ".join(f"{r['recipe']} ({r['delta_full']:+.3f})" for r in worse) + ".")
        if noise:
            lines.append("Within seed noise of full: " + ", ".join(f"{r['recipe']} ({r['delta_full']:+.3f}, {_p(r['p_full'])})" for r in noise) + ".")
    for r in rows.values():
        if r["control"] is None or r["delta_control"] is None:
            continue
        sig = significant(r["delta_control"], r["p_control"])
        if sig:
            word = "beats" if r["delta_control"] > 0 else "loses to"
            lines.append(f"{r['recipe']} {word} its size-matched random control {r['control']} ({r['delta_control']:+.3f}, {_p(r['p_control'])}).")
        else:
            lines.append(f"{r['recipe']} is within noise of its size-matched random control {r['control']} ({r['delta_control']:+.3f}, {_p(r['p_control'])}).")
    if reach and full_samples_seen:
        reached = {k: v for k, v in reach.items() if k != "full" and v is not None}
        missed = sorted(k for k, v in reach.items() if k != "full" and v is None)
        if reached:
            lines.append("Reaches full's average within the budgets trained: " + ", ".join(
                f"{k} at {v:,.0f} samples seen ({v / full_samples_seen:.2f}x full's compute)" for k, v in sorted(reached.items(), key=lambda t: t[1])) + ".")  # fmt: skip
        if missed:
            lines.append("Does not reach full's average within the budgets trained: " + ", ".join(missed) + ".")
    return lines


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_delta(d, p) -> str:
    from curation.evaluate.stats import significance_mark

    if d is None or (isinstance(d, float) and math.isnan(d)):
        return "-"
    return f"{d:+.3f} {significance_mark(p) if abs(d) >= MIN_EFFECT or p is None else '~'}"


def _table_cells(comparison: pl.DataFrame) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    metrics = metric_columns(comparison)
    multi = comparison["seeds"].max() > 1
    best = best_per_metric(comparison)
    header = ["recipe", "kept", "of pool", "of candidates", "seeds", "samples seen", "train s"] + metrics + ["Δ full", "Δ control (control)"]
    body, bold = [], []
    for r in comparison.iter_rows(named=True):
        cells = [r["recipe"], _fmt(r["kept"]), _fmt(r["fraction"], 2), _fmt(r["fraction_candidates"], 2), _fmt(r["seeds"]),
                 _fmt(r["samples_seen"]), _fmt(r["train_seconds"], 1)]  # fmt: skip
        marks = [False] * len(cells)
        for m in metrics:
            v = _fmt(r[m])
            if multi and r[m] is not None:
                v += f" ± {_fmt(r[f'{m} std'])}"
            cells.append(v)
            marks.append(best.get(m) == r["recipe"])
        cells.append(_fmt_delta(r["delta_full"], r["p_full"]))
        ctrl = r["control"]
        cells.append(_fmt_delta(r["delta_control"], r["p_control"]) + (f" ({ctrl})" if ctrl else ""))
        marks += [False, False]
        body.append(cells)
        bold.append(marks)
    return header, body, bold


def to_markdown(comparison: pl.DataFrame) -> str:
    """A markdown table of the comparison (mean ± std over seeds, the best per metric in bold)."""
    header, body, bold = _table_cells(comparison)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row, marks in zip(body, bold, strict=True):
        cells = [(f"**{c}**" if b else c).replace("|", "\\|") for c, b in zip(row, marks, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves_markdown(curves: pl.DataFrame, reach: Mapping[str, float | None], full_samples_seen: int | None) -> str:
    """Per recipe: its average at every budget and the compute at which it reaches full."""
    if curves.height == 0:
        return ""
    budgets = sorted(set(curves["samples_seen"].to_list()))
    header = ["recipe"] + [f"{b:,}" for b in budgets] + ["reaches full at"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for (recipe,), g in curves.group_by("recipe", maintain_order=True):
        vals = {int(s): (m, sd) for s, m, sd in zip(g["samples_seen"], g["mean"], g["std"], strict=True)}
        cells = [recipe] + [f"{vals[b][0]:.3f} ± {vals[b][1]:.3f}" if b in vals else "-" for b in budgets]
        v = reach.get(recipe)
        if recipe == "full":
            cells.append("(reference)")
        elif v is None:
            cells.append("does not")
        else:
            cells.append(f"{v:,.0f}" + (f" ({v / full_samples_seen:.2f}x)" if full_samples_seen else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower() or "metric"


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric_title(metric: str) -> str:
    if metric == AVERAGE_COL:
        return "Average of all tasks (DataComp style) vs kept fraction of the pool"
    return f"{metric} vs kept fraction of the pool"


def _draw_metric(ax, comparison: pl.DataFrame, metric: str) -> None:
    df = comparison.filter(pl.col(metric).is_not_null() & pl.col("fraction").is_not_null())
    for method in sorted(set(df["method"].to_list())):
        sub = df.filter(pl.col("method") == method).sort("fraction")
        x = sub["fraction"].to_numpy()
        y = sub[metric].to_numpy()
        err = sub[f"{metric} std"].fill_null(0.0).to_numpy()
        color = method_color(method)
        if method == "full":
            ax.axhline(float(y[0]), color=color, ls="--", lw=1, label="full")
        ax.errorbar(x, y, yerr=err if np.any(err > 0) else None, marker="o", ms=6, capsize=3, color=color,
                    ls="-" if method not in (CONTROL_METHOD, "random") else ":", label=None if method == "full" else method)  # fmt: skip
        for xi, yi, rec in zip(x, y, sub["recipe"].to_list(), strict=True):
            ax.annotate(rec, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.set_xlabel("kept fraction of the pool")
    ax.set_ylabel(metric)
    ax.set_title(_metric_title(metric), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_metric_vs_fraction(comparison: pl.DataFrame, metric: str, path: str | Path) -> Path:
    """PNG: ``metric`` (mean, with std bars) against the kept fraction, one colour per method.

    ``full`` is a dashed horizontal reference line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    _draw_metric(ax, comparison, metric)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_metric_grid(comparison: pl.DataFrame, path: str | Path, ncols: int = 2) -> Path:
    """PNG: every metric against the kept fraction, one panel per metric in a grid."""
    plt = _plt()
    metrics = metric_columns(comparison)
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), dpi=100, squeeze=False)
    for ax, m in zip(axes.flat, metrics, strict=False):
        _draw_metric(ax, comparison, m)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    seeds = int(comparison["seeds"].max())
    fig.suptitle(f"Metrics against kept fraction at matched samples seen (mean ± std over {seeds} seed(s))", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_compute_curves(curves: pl.DataFrame, path: str | Path, full_target: float | None = None) -> Path:
    """PNG: the average against samples seen (log2 axis) per recipe, mean ± std over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=100)
    recipes = sorted(set(curves["recipe"].to_list()))
    styles = ["-", "--", "-.", ":"]
    per_method: dict[str, int] = {}
    for rec in recipes:
        g = curves.filter(pl.col("recipe") == rec).sort("samples_seen")
        method = g["method"][0]
        k = per_method.get(method, 0)
        per_method[method] = k + 1
        ax.errorbar(g["samples_seen"].to_numpy(), g["mean"].to_numpy(), yerr=g["std"].to_numpy(), marker="o", ms=5, capsize=3,
                    color=method_color(method), ls=styles[k % len(styles)], label=rec)  # fmt: skip
    if full_target is not None:
        ax.axhline(full_target, color=method_color("full"), lw=0.8, ls=":", label="full at the main budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples seen (training compute)")
    ax.set_ylabel("average")
    ax.set_title("Compute curves: average of all tasks against samples seen (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# the documents
# ------------------------------------------------------------------------------------------


def _md_to_html_table(md: str) -> str:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return ""

    def cells(ln: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]

    def td(c: str, tag: str) -> str:
        if c.startswith("**") and c.endswith("**"):
            return f'<{tag} class="best"><strong>{html.escape(c[2:-2])}</strong></{tag}>'
        return f"<{tag}>{html.escape(c)}</{tag}>"

    head = "".join(td(c, "th") for c in cells(lines[0]))
    body = "\n".join("<tr>" + "".join(td(c, "td") for c in cells(ln)) + "</tr>" for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def to_html(
    comparison: pl.DataFrame,
    plots: Sequence[str],
    title: str = "Curation report",
    notes: Sequence[str] = (),
    verdict_lines: Sequence[str] = (),
    sections: Sequence[tuple[str, str]] = (),
) -> str:
    """A self-contained HTML page (plots referenced by relative file name).

    ``sections`` are extra ``(heading, markdown table or text)`` blocks (compute curves, DBP
    diagnostics, the filter audit).
    """
    table = _md_to_html_table(to_markdown(comparison))
    imgs = "\n".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"></figure>' for p in plots)
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    verdict_html = "".join(f"<li>{html.escape(v)}</li>" for v in verdict_lines)
    extra = ""
    for head, body in sections:
        t = _md_to_html_table(body)
        rest, imgs_s = "", ""
        for ln in body.splitlines():
            im = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", ln.strip())
            if im:
                imgs_s += f'<figure><img src="{html.escape(im.group(2))}" alt="{html.escape(im.group(1))}"></figure>'
            elif ln.strip() and not ln.startswith("|"):
                rest += f"<p>{html.escape(ln)}</p>"
        extra += f"<h2>{html.escape(head)}</h2>\n{rest}\n{t}\n{imgs_s}\n"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
td.best {{ background: #e6f4ea; }}
.verdict {{ background: #f7f7ff; border-left: 4px solid #557; padding: 0.5em 1em; }}
figure {{ display: block; margin: 1em 0; }} figure img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="verdict"><h2>Verdict</h2><ul>{verdict_html}</ul></div>
<ul>{note_html}</ul>
{table}
<h2>Plots</h2>
{imgs}
{extra}
</body></html>
"""


def write_report(
    comparison: pl.DataFrame,
    out_dir: str | Path,
    title: str = "Curation report",
    notes: Sequence[str] = (),
    curves: pl.DataFrame | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> dict[str, object]:
    """Write ``curation_report.md``/``.html``, ``comparison.parquet``, the plot grid and compute curves.

    Args:
        comparison: :func:`build_comparison`.
        out_dir: the report directory.
        notes: bullet lines under the verdict.
        curves: :func:`compute_curves` (a compute-curve plot and table when it holds more
            than one budget).
        sections: extra ``(heading, markdown)`` blocks (diagnostics, audit).

    Returns:
        ``{"markdown", "html", "table", "plots": [Path, ...], "markdown_text", "verdict": [str]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_metric_grid(comparison, out / "metrics_vs_fraction.png")]
    rows = {r["recipe"]: r for r in comparison.iter_rows(named=True)}
    full_seen = rows.get("full", {}).get("samples_seen")
    full_target = rows.get("full", {}).get(AVERAGE_COL)
    reach: dict[str, float | None] = {}
    extra_sections = list(sections)
    test_note = (f"Significance: {TEST_NAME}; ** p<0.01, * p<0.05, ~ within seed noise (or a difference below "
                 f"{MIN_EFFECT}), n/a fewer than 2 shared seeds.")  # fmt: skip
    if curves is not None and curves.height and curves["samples_seen"].n_unique() > 1:
        reach = reach_full(curves, full_target)
        plots.append(plot_compute_curves(curves, out / "compute_curves.png", full_target))
        extra_sections.insert(0, (
            "Compute curves: the compute at which each recipe reaches full's average",
            f"Target: full's average at the main budget ({_fmt(full_target)} at {_fmt(full_seen)} samples seen); "
            "crossings interpolated in log2(samples seen).\n\n" + curves_markdown(curves, reach, full_seen),
        ))  # fmt: skip
    verdict_lines = verdict(comparison, reach, full_seen)
    md = to_markdown(comparison)
    md_doc = f"# {title}\n\n## Verdict\n\n" + "".join(f"- {v}\n" for v in verdict_lines) + "\n"
    md_doc += "".join(f"- {n}\n" for n in [*notes, test_note]) + "\n" + md + "\n"
    md_doc += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    md_doc += "".join(f"\n## {h}\n\n{b}\n" for h, b in extra_sections)
    (out / "curation_report.md").write_text(md_doc, encoding="utf-8")
    page = to_html(comparison, [p.name for p in plots], title, [*notes, test_note], verdict_lines, extra_sections)
    (out / "curation_report.html").write_text(page, encoding="utf-8")
    comparison.write_parquet(out / "comparison.parquet")
    if curves is not None:
        curves.write_parquet(out / "compute_curves.parquet")
    log.info("wrote the curation report (%d recipes, %d plots) to %s", comparison.height, len(plots), out)
    return {
        "markdown": out / "curation_report.md",
        "html": out / "curation_report.html",
        "table": out / "comparison.parquet",
        "plots": plots,
        "markdown_text": md,
        "verdict": verdict_lines,
    }


__all__ = [
    "METHOD_COLORS",
    "best_per_metric",
    "build_comparison",
    "compute_curves",
    "curves_markdown",
    "main_budget_checkpoints",
    "method_color",
    "method_of",
    "metric_columns",
    "metric_label",
    "per_seed_values",
    "plot_compute_curves",
    "plot_metric_grid",
    "plot_metric_vs_fraction",
    "reach_full",
    "significant",
    "to_html",
    "to_markdown",
    "verdict",
    "write_report",
]
