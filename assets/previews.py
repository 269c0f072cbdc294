"""Dagster metadata that shows the data: thumbnails and plots in the asset pages.

Each builder returns a ``{label: MetadataValue}`` dict that an asset merges into its
metadata with one line (``meta.update(previews.cluster_gallery(lake, datasets))``). Images
are markdown with ``data:`` URIs (``MetadataValue.md("![..](data:image/png;base64,...)")``,
the way Dagster's docs embed a plot), rendered inline on the asset's page. The data
comes from :mod:`curation.evaluate.views`; every view is bounded (a few clusters, groups
and samples, 64 px thumbnails) so the event log stays small. A builder that fails logs a
warning and returns ``{}``: a preview never fails a materialization.

Also the progress bridge: :func:`dagster_progress` turns the library's progress events
(:mod:`curation.engine.progress`) into run-log lines and ``AssetObservation`` events.
"""

from __future__ import annotations

import functools
import math
import logging
import re
from collections.abc import Callable, Mapping, Sequence

import dagster as dg

log = logging.getLogger(__name__)

THUMB = 64  # px
MAX_ALT = 60


def _safe(fn: Callable[..., dict]) -> Callable[..., dict]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> dict:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a preview never fails the asset
            log.warning("preview %s failed: %s: %s", fn.__name__, type(e).__name__, e)
            return {}

    return wrapper


def md_text(s: object, limit: int = 80) -> str:
    """Text safe inside a markdown table cell: no pipes, brackets, HTML, newlines; cut to ``limit``."""
    s = re.sub(r"\s+", " ", str(s if s is not None else ""))
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("[", "(").replace("]", ")").replace("*", "\\*").replace("_", "\\_").replace("`", "'")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def md_image(uri: str | None, alt: str = "") -> str:
    """``![alt](data:...)`` (alt text sanitized), or a note when there is no image."""
    if not uri:
        return "_(does not decode)_"
    alt = re.sub(r"[^\w .,:;!?'-]", " ", alt)[:MAX_ALT].strip() or "sample"
    return f"![{alt}]({uri})"


def md_sample_table(samples: Sequence[Mapping], note: Callable[[Mapping], str] | None = None, label: str = "") -> str:
    """A one-row gallery: thumbnails in the first row, captions (and a note) in the second."""
    if not samples:
        return "_none_"
    head = ([md_text(label)] if label else []) + [md_image(s.get("thumb"), str(s.get("caption", ""))) for s in samples]
    caps = ([""] if label else []) + [
        md_text(s.get("caption", ""), 50) + (f" — **{md_text(note(s), 60)}**" if note else "") for s in samples
    ]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(caps) + " |"])


def md_png(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG plot as a markdown metadata value."""
    from curation.evaluate.figures import png_data_uri

    return dg.MetadataValue.md(f"![{md_text(alt)}]({png_data_uri(png)})")


def _landing(datasets) -> str:
    return str(datasets.landing)


@_safe
def cluster_gallery(lake, datasets, recipes: Sequence[str] | None = (), n_clusters: int = 6, per: int = 3) -> dict:
    """``cluster_gallery``: per cluster (half most, half least complex) the most central, least
    central and random members, with size, d_intra, d_inter, complexity, weight and the kept
    count / keep fraction of ``recipes`` (default none; ``None``: all in ``subsets``)."""
    from curation.evaluate.views import cluster_gallery as gather

    clusters = gather(lake.lake(), _landing(datasets), n_clusters=n_clusters, per=per, size=THUMB, recipes=recipes)
    if not clusters:
        return {}
    parts = []
    for c in clusters:
        kept = "; ".join(f"{md_text(r)} {v['kept']} ({v['keep_fraction']:.0%})" for r, v in c["recipes"].items())
        parts.append(
            f"**cluster {c['cluster_id']}**: size {c['size']}, d_intra {c['d_intra']:.3f}, d_inter {c['d_inter']:.3f}, "
            f"complexity {c['complexity']:.3f}, weight {c['weight']:.3f}" + (f"  \nkept per recipe: {kept}" if kept else "")
        )
        for row, label in (("central", "most central"), ("peripheral", "least central"), ("random", "random")):
            parts.append(md_sample_table(c[row], note=lambda s: f"cos {s['cos']:.3f}", label=label))
    return {"cluster_gallery": dg.MetadataValue.md("\n\n".join(parts))}


@_safe
def dedup_preview(lake, datasets, eps: float = 0.05, n_groups: int = 4, per_group: int = 4) -> dict:
    """``duplicate_groups`` (kept member beside its removed near-copies, with cosines) at
    ``eps`` and ``removed_fraction_plot`` (removed fraction against eps)."""
    from curation.evaluate.figures import removed_fraction_png
    from curation.evaluate.views import dedup_groups

    d = dedup_groups(lake.lake(), _landing(datasets), eps=eps, n_groups=n_groups, per_group=per_group, size=THUMB)
    out: dict = {}
    if d["curve"]:
        out["removed_fraction_plot"] = md_png(removed_fraction_png(d["curve"], eps), "removed fraction vs eps")
    parts = [f"{d['removed']} of {d['n']} samples are near-duplicates at eps={eps:g} (M > {1 - eps:.3f}); "
             "each group keeps its first (least prototypical) member."]
    for g in d["groups"]:
        parts.append(f"**cluster {g['cluster_id']}**: {g['n_removed']} removed")
        parts.append(md_sample_table([{**g["kept"], "cos": 1.0, "_kept": True}] + g["removed"],
                                     note=lambda s: "kept" if s.get("_kept") else f"removed, cos {s['cos']:.3f}"))
    out["duplicate_groups"] = dg.MetadataValue.md("\n\n".join(parts))
    return out


@_safe
def kept_removed(lake, datasets, recipe: str, n: int = 6) -> dict:
    """``kept_vs_removed``: seeded kept and removed samples of one recipe, with the reason."""
    from curation.evaluate.views import kept_removed as gather

    rows = gather(lake.lake(), _landing(datasets), recipes=[recipe], n=n, size=THUMB)
    if not rows:
        return {}
    r = rows[0]
    md = "\n\n".join(
        [
            f"kept {r['n_kept']} of {r['n_pool']} ({r['n_kept'] / max(1, r['n_pool']):.1%})",
            md_sample_table(r["kept"], label="kept"),
            md_sample_table(r["removed"], note=lambda s: s["reason"], label="removed") if r["removed"] else "_nothing removed_",
        ]
    )
    return {"kept_vs_removed": dg.MetadataValue.md(md)}


@_safe
def quarantine_preview(lake, datasets, per_reason: int = 3, shard: str | None = None) -> dict:
    """``quarantine_examples``: every quarantine reason with its count and examples
    (thumbnails where the bytes decode)."""
    from curation.evaluate.views import quarantine_examples

    q = quarantine_examples(lake.lake(), _landing(datasets), per_reason=per_reason, size=THUMB, shard=shard)
    if not q:
        return {}
    parts = []
    for r in q:
        parts.append(f"**{md_text(r['reason'])}** ({r['stage']}): {r['count']} samples")
        parts.append(md_sample_table([{"thumb": e["thumb"], "caption": f"{e['shard']}/{e['key']}: {e['detail']}"} for e in r["examples"]]))
    return {"quarantine_examples": dg.MetadataValue.md("\n\n".join(parts))}


@_safe
def waterfall(lake) -> dict:
    """``waterfall``: what each stage removed (quarantine, dedup, pruning) per recipe, as a plot."""
    from curation.evaluate.figures import waterfall_png
    from curation.evaluate.views import waterfall as gather

    rows = gather(lake.lake())
    return {"waterfall": md_png(waterfall_png(rows), "where the samples went")} if rows else {}


@_safe
def loss_plot(histories: Mapping[str, Sequence[Mapping]]) -> dict:
    """``loss_plot``: training loss against samples seen, one line per seed."""
    from curation.evaluate.figures import loss_curve_png

    histories = {k: v for k, v in histories.items() if v}
    return {"loss_plot": md_png(loss_curve_png(histories), "training loss")} if histories else {}


@_safe
def report_plots(paths: Sequence) -> dict:
    """``plots_inline``: the report's PNG plots shown as images (not file paths)."""
    from pathlib import Path

    from curation.evaluate.figures import png_data_uri

    parts = [f"![{md_text(Path(p).stem)}]({png_data_uri(Path(p).read_bytes())})" for p in paths if Path(p).exists()]
    return {"plots_inline": dg.MetadataValue.md("\n\n".join(parts))} if parts else {}


@_safe
def explorer(lake, datasets) -> dict:
    """Write the HTML data explorer beside the report; ``explorer_html`` is its path."""
    from curation.evaluate.explorer import write_explorer

    res = write_explorer(lake.lake(), _landing(datasets), lake.artifacts("reports"))
    return {"explorer_html": dg.MetadataValue.path(str(res["path"])), "explorer_thumbnails": res["images"]}


def dagster_progress(context, stage: str, min_interval_s: float = 5.0):
    """A progress callback for the library that logs to the run (``context.log.info``) and
    records an ``AssetObservation`` (step, total, samples/s, ETA) on the running asset, at
    most every ``min_interval_s`` seconds (first and last always)."""
    from curation.engine.progress import Throttle

    key = context.asset_key
    partition = context.partition_key if context.has_partition_key else None

    def emit(ev) -> None:
        context.log.info(ev.message())
        meta = {
            "stage": stage,
            "step": ev.step,
            "samples": ev.samples,
            "samples_per_s": round(ev.samples_per_s, 1),
            "elapsed_s": round(ev.elapsed_s, 1),
        }
        if ev.total:
            meta["total"] = ev.total
            meta["percent"] = round(100.0 * ev.step / ev.total, 1)
        if ev.eta_s is not None:
            meta["eta_s"] = round(ev.eta_s, 1)
        meta.update({k: round(v, 5) if isinstance(v, float) else v for k, v in ev.extra.items()})
        context.log_event(dg.AssetObservation(asset_key=key, partition=partition, metadata=meta))

    return Throttle(emit, min_interval_s=min_interval_s)


def _round(v):
    if isinstance(v, bool) or not isinstance(v, float):
        return v
    if not math.isfinite(v) or v == 0.0:
        return v
    return float(f"{v:.4g}") if abs(v) < 1 else round(v, 3)


def rounded(metadata: dict) -> dict:
    """``metadata`` with plain floats rounded for reading (4 significant digits below 1, 3
    decimals above); ``MetadataValue`` s, ints and strings untouched."""
    return {k: _round(v) for k, v in metadata.items()}
