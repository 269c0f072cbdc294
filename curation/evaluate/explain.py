"""Per-sample lookup: where a sample came from and what every recipe did with it.

``curation explain UID`` prints :func:`format_explanation` of :func:`explain`; the HTML
explorer embeds the same record for every sample it shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import polars as pl

from curation.evaluate.views import _recipes_in_lake, recipe_eps
from curation.ingest.ids import make_uid
from curation.storage.lake import Lake

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9a-f]{32}$")
_COLUMNS = {"filter_embeddings": ["uid", "clip_score"], "clusters": ["cluster_id", "size", "complexity", "weight"]}


#: the uid-keyed tables an explanation reads (quarantine is keyed by dataset/shard/key, clusters by cluster)
_UID_TABLES = ("samples", "assignments", "dedup_scores", "filter_embeddings", "subsets")


def _read(db: Lake, table: str, uids: Sequence[str] | None) -> pl.DataFrame | None:
    """``table`` (None if absent): for a uid-keyed table with ``uids`` only their rows, streamed
    (a 10M-row pool is never read whole to explain a few samples); else the whole table."""
    if not db.exists(table):
        return None
    if uids is not None and table in _UID_TABLES:
        cols = _COLUMNS.get(table) or db.dataset(table).schema.names
        return db.read_uids(table, list(uids), [c for c in cols if c != "uid"])
    df = db.read(table, columns=_COLUMNS.get(table))
    if table == "quarantine":
        df = df.with_columns(
            pl.struct("dataset", "shard", "key").map_elements(lambda r: make_uid(r["dataset"], r["shard"], r["key"]), return_dtype=pl.String).alias("uid")
        )
    return df


def explain_cache(db: Lake, uids: Sequence[str]) -> dict:
    """The tables :func:`explain` reads, restricted to ``uids`` (one streamed read per table):
    pass it as ``cache`` to explain each of those uids."""
    uids = list(dict.fromkeys(uids))
    return {t: _read(db, t, uids) for t in (*_UID_TABLES, "quarantine", "clusters")}


def _table(db: Lake, table: str, cache: dict | None, uid: str) -> pl.DataFrame | None:
    """``table`` for explaining ``uid``: from ``cache`` (filled on first use), else its rows of ``uid``."""
    if cache is not None and table in cache:
        return cache[table]
    df = _read(db, table, [uid] if cache is None else None)
    if cache is not None:
        cache[table] = df
    return df


def _one(db: Lake, table: str, uid: str, columns: Sequence[str] | None = None, cache: dict | None = None) -> dict | None:
    df = _table(db, table, cache, uid)
    if df is None:
        return None
    df = df.filter(pl.col("uid") == uid)
    if columns:
        df = df.select(list(columns))
    return df.row(0, named=True) if df.height else None


def find_uids(db: Lake, prefix: str, limit: int = 10) -> list[str]:
    """Sample uids starting with ``prefix`` (at most ``limit``, sorted; a streamed scan)."""
    if not db.exists("samples"):
        return []
    s = db.read_where("samples", ["uid"], pl.col("uid").str.starts_with(prefix.lower()))
    return sorted(s["uid"].to_list())[:limit]


def explain(db: Lake, uid: str, cache: dict | None = None) -> dict:
    """Everything the lake knows about one sample.

    Args:
        db: the lake.
        uid: 32 hex chars (``curation.ingest.ids.make_uid``).
        cache: a dict to keep the tables read between calls (explaining many samples; from
            :func:`explain_cache` it holds only those samples' rows). Without it only
            ``uid``'s rows of the uid-keyed tables are read.

    Returns:
        ``{"uid", "found", "source": {dataset, shard, key, member, caption, width, height,
        format, n_bytes} | None, "quarantine": [{stage, reason, detail}], "cluster":
        {cluster_id, cos_to_centroid, size, complexity, weight} | None, "M": float | None,
        "clip_score": float | None, "recipes": [{recipe, kept, rank, score, why}]}``.

    Raises:
        ValueError: ``uid`` is not 32 lowercase hex characters.
    """
    uid = uid.strip().lower()
    if not UID_RE.match(uid):
        raise ValueError(f"uid: got {uid!r}; expected 32 hex characters (see `curation explain --find PREFIX`)")
    out: dict = {"uid": uid, "found": False, "source": None, "quarantine": [], "cluster": None, "M": None,
                 "clip_score": None, "recipes": []}
    src = _one(db, "samples", uid, ["uid", "dataset", "shard", "key", "member", "caption", "width", "height", "format", "n_bytes"], cache)
    if src is not None:
        out["found"] = True
        out["source"] = {k: v for k, v in src.items() if k != "uid"}
    q = _table(db, "quarantine", cache, uid)
    if q is not None:
        hits = list(q.filter(pl.col("uid") == uid).iter_rows(named=True))
        if hits:
            out["found"] = True
            out["quarantine"] = [{k: r[k] for k in ("stage", "reason", "detail")} for r in hits]
            if out["source"] is None:
                r = hits[0]
                out["source"] = {"dataset": r["dataset"], "shard": r["shard"], "key": r["key"]}
    a = _one(db, "assignments", uid, ["uid", "cluster_id", "cos_to_centroid"], cache)
    if a is not None:
        cl = _table(db, "clusters", cache, uid).filter(pl.col("cluster_id") == a["cluster_id"])
        out["cluster"] = {"cluster_id": int(a["cluster_id"]), "cos_to_centroid": float(a["cos_to_centroid"]),
                          **({k: cl.row(0, named=True)[k] for k in ("size", "complexity", "weight")} if cl.height else {})}
    d = _one(db, "dedup_scores", uid, ["uid", "max_sim_to_earlier"], cache)
    if d is not None:
        out["M"] = float(d["max_sim_to_earlier"])
    f = _one(db, "filter_embeddings", uid, ["uid", "clip_score"], cache)
    if f is not None:
        out["clip_score"] = float(f["clip_score"])
    in_pool = a is not None
    kept_rows = {}
    subsets = _table(db, "subsets", cache, uid)
    if subsets is not None:
        for r in subsets.filter(pl.col("uid") == uid).iter_rows(named=True):
            kept_rows[r["recipe"]] = r
    recipes = cache.get("_recipes") if cache is not None else None
    if recipes is None:
        recipes = _recipes_in_lake(db)
        if cache is not None:
            cache["_recipes"] = recipes
    for name, rec in recipes.items():
        if name in kept_rows:
            r = kept_rows[name]
            out["recipes"].append({"recipe": name, "kept": True, "rank": int(r["rank"]), "score": float(r["score"]),
                                   "why": f"kept at rank {r['rank']} (score {r['score']:.4g})"})
            continue
        if not in_pool:
            why = "not in the pool (quarantined or not embedded/assigned yet)"
        else:
            eps = recipe_eps(rec)
            if eps is not None and out["M"] is not None and out["M"] > 1.0 - eps:
                why = f"SemDeDup duplicate: M={out['M']:.3f} > 1-eps={1 - eps:.3f}"
            elif rec is not None and rec.method in ("clipscore",) and out["clip_score"] is not None:
                why = f"CLIP score {out['clip_score']:.4f} below the kept fraction's cut"
            elif rec is not None and rec.method in ("dbp", "ssp"):
                why = f"pruned by {rec.method}: its cluster's budget was spent on other members"
            else:
                why = f"pruned by {rec.method if rec else name}"
        out["recipes"].append({"recipe": name, "kept": False, "rank": None, "score": None, "why": why})
    return out


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def format_explanation(e: dict) -> str:
    """The explanation as plain text lines (``curation explain``)."""
    lines = [f"sample {e['uid']}"]
    if not e["found"]:
        lines.append("  not found in `samples` or `quarantine`")
        return "\n".join(lines)
    s = e["source"] or {}
    lines.append(f"  source      {s.get('dataset')} shard {s.get('shard')} key {s.get('key')}" + (f" member {s['member']}" if s.get("member") else ""))
    if s.get("caption") is not None:
        lines.append(f"  caption     {s['caption']!r}")
    if s.get("width"):
        lines.append(f"  image       {s['width']}x{s['height']} {s.get('format')} {s.get('n_bytes')} bytes")
    for q in e["quarantine"]:
        lines.append(f"  quarantine  [{q['stage']}] {q['reason']}: {q['detail']}")
    c = e["cluster"]
    if c:
        lines.append(
            f"  cluster     {c['cluster_id']} (size {c.get('size')}, complexity {_f(c.get('complexity'))}, "
            f"weight {_f(c.get('weight'))}); cos to centroid {_f(c['cos_to_centroid'])}"
        )
    lines.append(f"  SemDeDup M  {_f(e['M'])} (max cosine to an earlier member of its cluster)")
    lines.append(f"  CLIP score  {_f(e['clip_score'])}")
    for r in e["recipes"]:
        lines.append(f"  {'KEPT   ' if r['kept'] else 'removed'} {r['recipe']:<24s} {r['why']}")
    return "\n".join(lines)
