"""The comparison report: every recipe side by side at matched compute.

One row per recipe: samples kept, kept fraction of the pool, samples seen, training time,
the main metric of every eval task and their mean (DataComp's average), the difference of
that mean from ``full`` and from the ``random`` recipe of the nearest size. With several
seeds per recipe every number is the mean over seeds and the metrics also get a std.

Outputs: a polars table (:func:`build_comparison`), a markdown table (:func:`to_markdown`)
and an HTML page with PNG plots of each metric against the kept fraction, one series per
curation method (:func:`write_report`, matplotlib's Agg backend).
"""

from __future__ import annotations

import html
import logging
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

log = logging.getLogger(__name__)

AVERAGE = "average"
AVERAGE_COL = "average"


def method_of(recipe: str) -> str:
    """The curation method of a recipe name: the part before ``@`` (``"dbp@0.5"`` -> ``"dbp"``)."""
    return recipe.split("@", 1)[0]


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


def build_comparison(
    eval_results: pl.DataFrame,
    checkpoints: pl.DataFrame,
    kept: Mapping[str, int],
    pool_size: int | None = None,
    methods: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Every recipe side by side.

    Args:
        eval_results: rows of the ``eval_results`` table (recipe, checkpoint, task, metric,
            value, seed); the main metric of every task and the ``average`` task are used.
        checkpoints: rows of the ``checkpoints`` table (recipe, strategy, model, path,
            samples_seen, seconds, ...); several rows per recipe = several seeds.
        kept: recipe -> number of samples in its subset.
        pool_size: samples in the pool (default: ``kept["full"]``, else the largest subset).
        methods: recipe -> method name (default: :func:`method_of`).

    Returns:
        One row per recipe (``full``, then ``random`` recipes, then the other methods, each
        by kept count) with columns ``recipe``,
        ``method``, ``kept`` (i64), ``fraction`` (f64), ``seeds`` (i64), ``samples_seen``,
        ``train_seconds`` (mean over seeds), ``strategy``, ``model``, then per metric label
        ``<label>`` (mean over seeds) and ``<label> std`` (0 with one seed), and
        ``delta_full``, ``delta_random`` (differences of the average from ``full`` and from
        the nearest-size ``random`` recipe; null when there is none) and ``random_ref``.
    """
    if eval_results.height == 0:
        raise ValueError("eval_results: got 0 rows; expected the results of at least one recipe")
    methods = dict(methods or {})
    if pool_size is None:
        pool_size = int(kept.get("full", max(kept.values()) if kept else 0))
    ev = eval_results.with_columns(pl.col("task").map_elements(_main_metric_of_task, return_dtype=pl.Utf8).alias("_main"))
    ev = ev.filter(pl.col("metric") == pl.col("_main"))
    ev = ev.with_columns(pl.col("task").map_elements(metric_label, return_dtype=pl.Utf8).alias("label"))
    labels = sorted(set(ev["label"].to_list()) - {AVERAGE_COL}) + ([AVERAGE_COL] if AVERAGE_COL in ev["label"] else [])
    per_seed = ev.group_by(["recipe", "seed", "label"]).agg(pl.col("value").mean())
    stats = per_seed.group_by(["recipe", "label"]).agg(
        pl.col("value").mean().alias("mean"),
        pl.col("value").std(ddof=0).fill_null(0.0).alias("std"),
        pl.col("seed").n_unique().alias("seeds"),
    )
    ck = checkpoints
    ck_stats = (
        ck.group_by("recipe")
        .agg(
            pl.col("samples_seen").mean().alias("samples_seen"),
            pl.col("seconds").mean().alias("train_seconds"),
            pl.col("strategy").first().alias("strategy"),
            pl.col("model").first().alias("model"),
        )
        if ck.height
        else pl.DataFrame(
            schema={"recipe": pl.Utf8, "samples_seen": pl.Float64, "train_seconds": pl.Float64, "strategy": pl.Utf8, "model": pl.Utf8}
        )
    )
    recipes = sorted(set(stats["recipe"].to_list()))
    rows = []
    for r in recipes:
        s = stats.filter(pl.col("recipe") == r)
        c = ck_stats.filter(pl.col("recipe") == r)
        n_kept = kept.get(r)
        row = {
            "recipe": r,
            "method": methods.get(r, method_of(r)),
            "kept": int(n_kept) if n_kept is not None else None,
            "fraction": (float(n_kept) / pool_size) if (n_kept is not None and pool_size) else None,
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
        rows.append(row)
    df = pl.DataFrame(rows, infer_schema_length=None)
    avg = {r["recipe"]: r.get(AVERAGE_COL) for r in rows}
    full_avg = avg.get("full")
    randoms = [(r["recipe"], r["kept"]) for r in rows if r["method"] == "random" and r["kept"] is not None]
    d_full, d_rand, refs = [], [], []
    for r in rows:
        a = r.get(AVERAGE_COL)
        d_full.append(a - full_avg if (a is not None and full_avg is not None) else None)
        ref = None
        if randoms and r["kept"] is not None:
            ref = min(randoms, key=lambda t: (abs(t[1] - r["kept"]), t[0]))[0]
        refs.append(ref)
        d_rand.append(a - avg[ref] if (ref is not None and a is not None and avg.get(ref) is not None) else None)
    df = df.with_columns(
        pl.Series("delta_full", d_full, dtype=pl.Float64),
        pl.Series("delta_random", d_rand, dtype=pl.Float64),
        pl.Series("random_ref", refs, dtype=pl.Utf8),
    )
    order = pl.when(pl.col("method") == "full").then(0).when(pl.col("method") == "random").then(1).otherwise(2)
    return df.with_columns(order.alias("_o")).sort(["_o", "method", "kept"], nulls_last=True).drop("_o")


def metric_columns(comparison: pl.DataFrame) -> list[str]:
    """The metric labels of a comparison table (per-task main metrics, then ``average``)."""
    fixed = {"recipe", "method", "kept", "fraction", "seeds", "samples_seen", "train_seconds", "strategy", "model"}
    fixed |= {"delta_full", "delta_random", "random_ref"}
    return [c for c in comparison.columns if c not in fixed and not c.endswith(" std")]


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_signed(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"


def _table_cells(comparison: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    metrics = metric_columns(comparison)
    multi = comparison["seeds"].max() > 1
    header = ["recipe", "kept", "fraction", "samples seen", "train s"] + metrics + ["Δ full", "Δ random (ref)"]
    body = []
    for r in comparison.iter_rows(named=True):
        cells = [r["recipe"], _fmt(r["kept"]), _fmt(r["fraction"], 2), _fmt(r["samples_seen"]), _fmt(r["train_seconds"], 1)]
        for m in metrics:
            v = _fmt(r[m])
            if multi and r[m] is not None:
                v += f" ± {_fmt(r[f'{m} std'])}"
            cells.append(v)
        cells.append(_fmt_signed(r["delta_full"]))
        ref = r["random_ref"]
        cells.append(_fmt_signed(r["delta_random"]) + (f" ({ref})" if ref else ""))
        body.append(cells)
    return header, body


def to_markdown(comparison: pl.DataFrame) -> str:
    """A markdown table of the comparison (metrics as mean ± std when there are several seeds)."""
    header, body = _table_cells(comparison)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower() or "metric"


def plot_metric_vs_fraction(comparison: pl.DataFrame, metric: str, path: str | Path) -> Path:
    """PNG: ``metric`` (mean, with std bars) against the kept fraction, one series per method.

    ``full`` is a dashed horizontal reference line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    df = comparison.filter(pl.col(metric).is_not_null() & pl.col("fraction").is_not_null())
    for method in sorted(set(df["method"].to_list())):
        sub = df.filter(pl.col("method") == method).sort("fraction")
        x = sub["fraction"].to_numpy()
        y = sub[metric].to_numpy()
        err = sub[f"{metric} std"].fill_null(0.0).to_numpy()
        if method == "full":
            ax.axhline(float(y[0]), color="black", ls="--", lw=1, label="full")
        ax.errorbar(x, y, yerr=err if np.any(err > 0) else None, marker="o", ms=6, capsize=3, label=None if method == "full" else method)
        for xi, yi, rec in zip(x, y, sub["recipe"].to_list()):
            ax.annotate(rec, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("kept fraction of the pool")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs kept fraction (matched samples seen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def to_html(comparison: pl.DataFrame, plots: Sequence[str], title: str = "Curation report", notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page (plots referenced by relative file name)."""
    header, body = _table_cells(comparison)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    imgs = "\n".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"></figure>' for p in plots)
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 1em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{note_html}</ul>
<table><thead><tr>{th}</tr></thead><tbody>
{trs}
</tbody></table>
<h2>Metrics against the kept fraction</h2>
{imgs}
</body></html>
"""


def write_report(
    comparison: pl.DataFrame, out_dir: str | Path, title: str = "Curation report", notes: Sequence[str] = ()
) -> dict[str, object]:
    """Write ``curation_report.md``, ``curation_report.html``, ``comparison.parquet`` and one PNG per metric.

    Returns:
        ``{"markdown": Path, "html": Path, "table": Path, "plots": [Path, ...], "markdown_text": str}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for m in metric_columns(comparison):
        plots.append(plot_metric_vs_fraction(comparison, m, out / f"{_slug(m)}_vs_fraction.png"))
    md = to_markdown(comparison)
    md_doc = f"# {title}\n\n" + "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "") + md + "\n"
    md_doc += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    (out / "curation_report.md").write_text(md_doc, encoding="utf-8")
    (out / "curation_report.html").write_text(to_html(comparison, [p.name for p in plots], title, notes), encoding="utf-8")
    comparison.write_parquet(out / "comparison.parquet")
    log.info("wrote the curation report (%d recipes, %d plots) to %s", comparison.height, len(plots), out)
    return {
        "markdown": out / "curation_report.md",
        "html": out / "curation_report.html",
        "table": out / "comparison.parquet",
        "plots": plots,
        "markdown_text": md,
    }


__all__ = [
    "build_comparison",
    "method_of",
    "metric_columns",
    "metric_label",
    "plot_metric_vs_fraction",
    "to_html",
    "to_markdown",
    "write_report",
]
