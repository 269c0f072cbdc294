"""The filter audit: plant labelled noise in a copy of a landing dataset, then score every filter.

Ground truth for the curation filters, on ANY landing-zone dataset (webdataset shards of
``KEY.<img>`` + ``KEY.txt``): :func:`plant_noise` copies the first shards of a dataset into a
new landing directory and plants, with a seeded generator, samples whose label is known:

==============  ====================================================================  ===================
kind            how it is made                                                        the filter that should catch it
==============  ====================================================================  ===================
``exact_dup``   a copy of a sample (same image bytes, same caption, a new key)        SemDeDup
``near_dup``    a real augmentation of a sample: random crop of 80-95% of the side,   SemDeDup
                resized back, brightness x0.9-1.1, re-encoded as JPEG quality 80
``swapped``     two samples of different concepts (or different captions when the     CLIP score
                dataset has no ``concept`` field) exchange their captions, in place
``blank``       a uniform image of a random colour with a random caption of the pool  (reported per recipe)
``corrupt``     the first 30% of a sample's PNG bytes (a truncated image)            quarantine
==============  ====================================================================  ===================

The copy is then curated by the ordinary lineage (the CLI runs it in its own data home) and
:func:`score_audit` reads that lake: each filter's precision and recall on the kind it should
catch, how much of every kind each recipe keeps, and the models trained on the curated vs the
noisy pool (``full``). Precision counts only PLANTED noise as positive: a filter that also
removes the source's own duplicates or mismatched captions (real datasets have both) is
charged for them, so precision is a lower bound.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

log = logging.getLogger(__name__)

KINDS = ("exact_dup", "near_dup", "swapped", "blank", "corrupt")
DEFAULT_RATES = {"exact_dup": 0.03, "near_dup": 0.03, "swapped": 0.05, "blank": 0.01, "corrupt": 0.01}
_FIXED_MTIME = 1_700_000_000
_IMG_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class PlantResult:
    """What :func:`plant_noise` wrote.

    Attributes:
        dataset: the new dataset name (a landing sub-directory).
        out_dir: its landing directory.
        labels: one row per planted or modified sample: dataset, stem, key, kind, source_key.
        n_clean: samples copied unchanged.
    """

    dataset: str
    out_dir: Path
    labels: pl.DataFrame
    n_clean: int


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _FIXED_MTIME
    tf.addfile(info, io.BytesIO(data))


def _read_groups(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    from curation.ingest.shards import iter_samples

    out = []
    for key, members in iter_samples(tar):
        img_ext = next((e for e in _IMG_EXTS if e in members), None)
        if img_ext is None or "txt" not in members:
            continue
        out.append((key, members))
    return out


def near_duplicate(data: bytes, rng: np.random.Generator) -> bytes:
    """A real augmentation of an encoded image: crop, resize back, brightness, JPEG re-encode."""
    from PIL import ImageEnhance

    im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    w, h = im.size
    s = rng.uniform(0.80, 0.95)
    cw, ch = max(1, int(round(w * s))), max(1, int(round(h * s)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.9, 1.1)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def blank_image(size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """A uniform PNG of a random colour."""
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def plant_noise(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dataset: str,
    rates: Mapping[str, float] | None = None,
    seed: int = 0,
    max_shards: int | None = None,
) -> PlantResult:
    """Copy a landing dataset's shards and plant labelled noise (see the module docstring).

    Args:
        src_dir: ``landing/<dataset>`` of the source (``NNNNN.tar`` shards, any webdataset).
        out_dir: the new dataset's landing directory (created; existing shards replaced).
        dataset: the new dataset's name (the last part of ``out_dir``).
        rates: kind -> fraction of the copied samples to plant (default :data:`DEFAULT_RATES`).
        seed: seeds every choice.
        max_shards: copy only the first N shards (sorted by name).

    Returns:
        A :class:`PlantResult`; ``labels.parquet`` is written beside the shards too.
    """
    rates = dict(DEFAULT_RATES if rates is None else rates)
    unknown = sorted(set(rates) - set(KINDS))
    if unknown:
        raise ValueError(f"rates: got unknown kinds {unknown}; expected any of {KINDS}")
    bad = {k: v for k, v in rates.items() if not 0.0 <= v <= 0.5}
    if bad:
        raise ValueError(f"rates: got {bad}; expected fractions in [0, 0.5]")
    src = Path(src_dir)
    tars = sorted(src.glob("*.tar"))[: max_shards or None]
    if not tars:
        raise FileNotFoundError(f"{src}: got no *.tar shards; expected a landing dataset directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.tar")) + list(out.glob("*.parquet")):
        old.unlink()
    rng = np.random.default_rng(seed)
    labels: list[dict] = []
    n_clean = 0
    for tar in tars:
        groups = _read_groups(tar)
        concepts = []
        for _key, m in groups:
            meta = {}
            if "json" in m:
                try:
                    meta = json.loads(m["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
            concepts.append(str(meta.get("concept", m["txt"].decode("utf-8", "replace").strip())))
        n = len(groups)
        captions = [m["txt"] for _k, m in groups]
        kinds_of: dict[int, str] = {}
        # swapped captions: disjoint pairs of different concepts, in place
        n_swap_pairs = int(round(rates.get("swapped", 0.0) * n / 2))
        order = rng.permutation(n)
        free = [int(i) for i in order]
        pairs = []
        while len(pairs) < n_swap_pairs and len(free) >= 2:
            i = free.pop()
            j_pos = next((p for p in range(len(free) - 1, -1, -1) if concepts[free[p]] != concepts[i]), None)
            if j_pos is None:
                break
            j = free.pop(j_pos)
            pairs.append((i, j))
        for i, j in pairs:
            captions[i], captions[j] = captions[j], captions[i]
            kinds_of[i] = kinds_of[j] = "swapped"
        clean = [i for i in range(n) if i not in kinds_of]
        planted: list[tuple[str, str, bytes, str, bytes, str]] = []  # key, ext, image, kind, caption, source
        for kind in ("exact_dup", "near_dup", "blank", "corrupt"):
            k = int(round(rates.get(kind, 0.0) * n))
            if k == 0 or not clean:
                continue
            picks = rng.choice(len(clean), size=min(k, len(clean)), replace=False)
            for t, pi in enumerate(sorted(int(p) for p in picks)):
                i = clean[pi]
                key, m = groups[i]
                ext = next(e for e in _IMG_EXTS if e in m)
                if kind == "exact_dup":
                    planted.append((f"{key}_dup{t}", ext, m[ext], kind, captions[i], key))
                elif kind == "near_dup":
                    planted.append((f"{key}_near{t}", "jpg", near_duplicate(m[ext], rng), kind, captions[i], key))
                elif kind == "blank":
                    size = Image.open(io.BytesIO(m[ext])).size
                    cap = captions[int(rng.integers(0, n))]
                    planted.append((f"{key}_blank{t}", "png", blank_image(size, rng), kind, cap, ""))
                else:
                    cut = max(8, int(len(m[ext]) * 0.3))
                    planted.append((f"{key}_bad{t}", ext, m[ext][:cut], kind, captions[i], key))
        stem = tar.stem
        rows = []
        with tarfile.open(out / f".{stem}.tar.tmp", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, (key, m) in enumerate(groups):
                ext = next(e for e in _IMG_EXTS if e in m)
                _tar_add(tf, f"{key}.{ext}", m[ext])
                _tar_add(tf, f"{key}.txt", captions[i])
                if "json" in m:
                    _tar_add(tf, f"{key}.json", m["json"])
                rows.append({"key": key, "caption": captions[i].decode("utf-8", "replace"), "status": "success"})
                if i in kinds_of:
                    labels.append({"dataset": dataset, "stem": stem, "key": key, "kind": kinds_of[i], "source_key": key})
                else:
                    n_clean += 1
            for key, ext, data, kind, cap, source in planted:
                _tar_add(tf, f"{key}.{ext}", data)
                _tar_add(tf, f"{key}.txt", cap)
                rows.append({"key": key, "caption": cap.decode("utf-8", "replace"), "status": "success"})
                labels.append({"dataset": dataset, "stem": stem, "key": key, "kind": kind, "source_key": source})
        pl.DataFrame(rows).write_parquet(out / f"{stem}.parquet")
        os.replace(out / f".{stem}.tar.tmp", out / f"{stem}.tar")
    lab = pl.DataFrame(labels, schema={"dataset": pl.String, "stem": pl.String, "key": pl.String, "kind": pl.String, "source_key": pl.String})
    lab.write_parquet(out.parent / f"{dataset}.labels.parquet")
    counts = dict(lab.group_by("kind").len().iter_rows()) if lab.height else {}
    log.info("planted noise in %d shards of %s -> %s: %s (clean %d)", len(tars), src, out, counts, n_clean)
    return PlantResult(dataset=dataset, out_dir=out, labels=lab, n_clean=n_clean)


def _pr(flagged: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None, int, int]:
    tp = int(np.sum(flagged & truth))
    nf, nt = int(flagged.sum()), int(truth.sum())
    return (tp / nf if nf else None), (tp / nt if nt else None), nf, nt


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` ranking ``positive`` first (Mann-Whitney, ties halved)."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(np.asarray(scores, dtype=np.float64))
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def score_audit(
    labels: pl.DataFrame,
    samples: pl.DataFrame,
    quarantine: pl.DataFrame,
    dedup: pl.DataFrame | None,
    clip: pl.DataFrame | None,
    subsets: pl.DataFrame | None,
    dedup_eps: Sequence[float],
    clipscore_recipes: Sequence[str] = (),
) -> dict[str, pl.DataFrame]:
    """Precision and recall of every filter on the planted noise, and what each recipe keeps.

    Args:
        labels: :func:`plant_noise` labels (dataset, stem, key, kind, source_key).
        samples: ``samples`` rows (uid, dataset, shard, key) of the audited lake.
        quarantine: ``quarantine`` rows (dataset, shard, key, stage, reason).
        dedup: ``dedup_scores`` (uid, max_sim_to_earlier) or None.
        clip: ``filter_embeddings`` (uid, clip_score) or None.
        subsets: ``subsets`` (recipe, uid) or None.
        dedup_eps: SemDeDup eps values to score (the recipes' eps / chains).
        clipscore_recipes: recipes whose dropped samples are the CLIP-score filter's flags.

    Returns:
        ``{"filters": one row per filter (filter, catches, precision, recall, flagged,
        planted, note), "kept": one row per recipe with the kept fraction of clean samples and
        of every planted kind}``.
    """
    from curation.ingest.shards import shard_key

    lab = labels.with_columns(
        pl.struct("dataset", "stem").map_elements(lambda s: shard_key(s["dataset"], s["stem"]), return_dtype=pl.String).alias("shard")
    )
    s = samples.select("uid", "shard", "key").join(lab.select("shard", "key", "kind", "source_key"), on=["shard", "key"], how="left")
    s = s.with_columns(pl.col("kind").fill_null("clean"))
    rows = []
    # quarantine on corrupt images (keys of the audited dataset only)
    ds = labels["dataset"][0] if labels.height else None
    q = quarantine.filter(pl.col("dataset") == ds) if ds is not None else quarantine
    qk = set(zip(q["shard"].to_list(), q["key"].to_list(), strict=True))
    kind_of = dict(zip(zip(lab["shard"].to_list(), lab["key"].to_list(), strict=True), lab["kind"].to_list(), strict=True))
    universe = sorted(set(zip(s["shard"].to_list(), s["key"].to_list(), strict=True)) | qk | set(kind_of))
    flagged = np.array([k in qk for k in universe], dtype=bool)
    truth = np.array([kind_of.get(k) == "corrupt" for k in universe], dtype=bool)
    p, r, nf, nt = _pr(flagged, truth)
    rows.append({"filter": "quarantine", "catches": "corrupt", "precision": p, "recall": r, "flagged": nf, "planted": nt,
                 "note": "ingest + embed quarantine"})  # fmt: skip
    # SemDeDup on planted duplicates: a planted pair is caught when either member is flagged
    if dedup is not None and dedup.height:
        d = s.join(dedup.select("uid", "max_sim_to_earlier"), on="uid", how="inner")
        key_to_m = dict(zip(zip(d["shard"].to_list(), d["key"].to_list(), strict=True), d["max_sim_to_earlier"].to_list(), strict=True))
        for eps in dedup_eps:
            thr = 1.0 - eps
            fl = (d["max_sim_to_earlier"] > thr).to_numpy()
            kinds = d["kind"].to_numpy()
            for kind in ("exact_dup", "near_dup"):
                pl_rows = d.filter(pl.col("kind") == kind)
                caught = 0
                for sh, k, src in zip(pl_rows["shard"], pl_rows["key"], pl_rows["source_key"], strict=True):
                    m1 = key_to_m.get((sh, k), 0.0)
                    m2 = key_to_m.get((sh, src), 0.0)
                    caught += int(m1 > thr or m2 > thr)
                rec = caught / pl_rows.height if pl_rows.height else None
                # precision: flagged samples that belong to a planted pair of this kind
                members = set(zip(pl_rows["shard"], pl_rows["key"], strict=True)) | set(zip(pl_rows["shard"], pl_rows["source_key"], strict=True))
                in_pair = np.array([(a, b) in members for a, b in zip(d["shard"], d["key"], strict=True)])
                prec = float((fl & in_pair).sum() / fl.sum()) if fl.sum() else None
                rows.append({"filter": f"semdedup@eps={eps:g}", "catches": kind, "precision": prec, "recall": rec,
                             "flagged": int(fl.sum()), "planted": pl_rows.height,
                             "note": "recall: pairs with either member flagged; precision charged for the source's own duplicates"})  # fmt: skip
            blanks = kinds == "blank"
            if blanks.any():
                rows.append({"filter": f"semdedup@eps={eps:g}", "catches": "blank", "precision": None,
                             "recall": float((fl & blanks).sum() / blanks.sum()), "flagged": int(fl.sum()), "planted": int(blanks.sum()),
                             "note": "uniform images are near-duplicates of each other"})  # fmt: skip
    # CLIP score on swapped captions
    if clip is not None and clip.height:
        c = s.join(clip.select("uid", "clip_score"), on="uid", how="inner")
        pos = (c["kind"] == "swapped").to_numpy()
        auc = roc_auc(-c["clip_score"].to_numpy(), pos)
        rows.append({"filter": "clip_score (threshold-free)", "catches": "swapped", "precision": None, "recall": None,
                     "flagged": 0, "planted": int(pos.sum()), "note": f"ROC AUC of a low score for swapped captions: {auc:.3f}" if auc is not None else "no swapped"})  # fmt: skip
        for rec_name in clipscore_recipes:
            if subsets is None:
                break
            kept = set(subsets.filter(pl.col("recipe") == rec_name)["uid"].to_list())
            if not kept:
                continue
            fl = np.array([u not in kept for u in c["uid"].to_list()])
            p, r, nf, nt = _pr(fl, pos)
            rows.append({"filter": rec_name, "catches": "swapped", "precision": p, "recall": r, "flagged": nf, "planted": nt,
                         "note": "flagged = dropped by the recipe"})  # fmt: skip
    filters = pl.DataFrame(rows, schema={"filter": pl.String, "catches": pl.String, "precision": pl.Float64, "recall": pl.Float64,
                                         "flagged": pl.Int64, "planted": pl.Int64, "note": pl.String})  # fmt: skip
    kept_rows = []
    if subsets is not None and subsets.height:
        for (recipe,), g in subsets.group_by("recipe", maintain_order=True):
            keep = set(g["uid"].to_list())
            row = {"recipe": recipe}
            for kind in ("clean", *KINDS):
                sub = s.filter(pl.col("kind") == kind)
                row[kind] = (sum(u in keep for u in sub["uid"].to_list()) / sub.height) if sub.height else None
            kept_rows.append(row)
    kept = pl.DataFrame(kept_rows, schema={"recipe": pl.String, **{k: pl.Float64 for k in ("clean", *KINDS)}})
    return {"filters": filters.sort(["catches", "filter"]), "kept": kept.sort("recipe")}


def audit_markdown(result: Mapping[str, pl.DataFrame], models: pl.DataFrame | None = None, header: str = "") -> str:
    """The audit as markdown: filter precision/recall, kept fraction per kind, the models."""

    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    out = [header] if header else []
    fl = result["filters"]
    cols = ["filter", "catches", "precision", "recall", "flagged", "planted", "note"]
    out += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in fl.iter_rows(named=True)]
    kept = result["kept"]
    if kept.height:
        out.append("\nKept fraction of each kind of sample per recipe (clean = not planted):\n")
        cols = kept.columns
        out += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in kept.iter_rows(named=True)]
    if models is not None and models.height:
        out.append("\nModels trained on the noisy pool (full) and on the curated subsets (same samples seen):\n")
        cols = models.columns
        out += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in models.iter_rows(named=True)]
    return "\n".join(out)


def plot_examples(
    labels: pl.DataFrame,
    landing_dir: str | os.PathLike,
    samples: pl.DataFrame,
    quarantine_keys: set[tuple[str, str]],
    kept: Mapping[str, set[str]],
    path: str | os.PathLike,
    per_kind: int = 4,
) -> Path:
    """PNG: planted samples per kind (rows) with their caption and what each recipe decided.

    Args:
        labels: :func:`plant_noise` labels.
        landing_dir: the noisy copy's landing directory (its ``NNNNN.tar`` shards).
        samples: ``samples`` rows (uid, shard, key) of the audited lake.
        quarantine_keys: ``(shard, key)`` pairs in ``quarantine``.
        kept: recipe -> uids it kept.
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curation.ingest.shards import shard_key

    kinds = [k for k in KINDS if k in set(labels["kind"].to_list())]
    picks = {k: labels.filter(pl.col("kind") == k).head(per_kind) for k in kinds}
    want = {(r["stem"], r["key"]) for g in picks.values() for r in g.iter_rows(named=True)}
    data: dict[tuple[str, str], dict[str, bytes]] = {}
    for stem in sorted({s for s, _ in want}):
        for key, m in _read_groups_any(Path(landing_dir) / f"{stem}.tar"):
            if (stem, key) in want:
                data[(stem, key)] = m
    uid_of = dict(zip(zip(samples["shard"].to_list(), samples["key"].to_list(), strict=True), samples["uid"].to_list(), strict=True))
    fig, axes = plt.subplots(max(1, len(kinds)), per_kind, figsize=(2.6 * per_kind, 2.9 * max(1, len(kinds))), dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, kind in enumerate(kinds):
        for col, r in enumerate(picks[kind].iter_rows(named=True)):
            ax = axes[row][col]
            m = data.get((r["stem"], r["key"]), {})
            img_ext = next((e for e in _IMG_EXTS if e in m), None)
            try:
                im = None
                if img_ext:
                    rgba = Image.open(io.BytesIO(m[img_ext])).convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            except Exception:  # noqa: BLE001 - a corrupt image is drawn as a grey tile
                im = None
            ax.imshow(np.asarray(im) if im is not None else np.full((8, 8, 3), 200, np.uint8))
            sk = shard_key(r["dataset"], r["stem"])
            uid = uid_of.get((sk, r["key"]))
            if (sk, r["key"]) in quarantine_keys:
                verdict = "quarantined"
            elif uid is None:
                verdict = "not in pool"
            else:
                verdict = ", ".join(f"{name}: {'kept' if uid in u else 'dropped'}" for name, u in sorted(kept.items()) if name != "full")
            cap = m.get("txt", b"").decode("utf-8", "replace")[:32]
            ax.set_title(f"{kind}\n{cap}\n{verdict}", fontsize=6)
    fig.suptitle("Filter audit: planted samples and what each recipe did with them", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _read_groups_any(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Key groups of a shard, corrupt images included (``iter_samples`` keeps every member)."""
    from curation.ingest.shards import iter_samples

    return list(iter_samples(tar)) if tar.exists() else []


__all__ = ["DEFAULT_RATES", "KINDS", "PlantResult", "audit_markdown", "blank_image", "near_duplicate", "plant_noise", "plot_examples", "roc_auc", "score_audit"]
