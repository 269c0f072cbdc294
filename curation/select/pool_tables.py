"""The pool-wide tables as recipe inputs: one reader, one uid-alignment helper, the clusters rows.

* :func:`align_to` is the ONE uid alignment: values of a uid-keyed frame, in the order of a
  uid list, with a clear error naming the table when some uids have no row.
* :func:`read_recipe_pool` reads exactly what a recipe needs (assignments always; SemDeDup
  ``M`` from ``dedup_scores`` when the recipe dedups; the stored DBP complexity of
  ``clusters``; aligned image/caption embeddings for CLIP recipes) and returns a
  :class:`curation.select.recipes.Pool` whose rows are sorted by uid (so the result never
  depends on the order the tables were appended in, e.g. by an incremental update).
* :func:`centroids_frame` / :func:`read_centroids`: the ``centroids`` table (one writer:
  concept_clusters); :func:`clusters_frame`: the ``clusters`` rows (one writer:
  complexity_scores).
* The auto/retrain/assign merge of assignments lives in :func:`curation.select.layout.update_layout`
  (only new or changed shards are assigned; stored rows stay).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from curation.embed.pool_reader import read_pool
from curation.engine.sorting import lex_order
from curation.ingest.ids import UID_DTYPE, uid_series, uid_strings, uids_to_bytes
from curation.select.clustering import Complexity
from curation.select.recipes import Pool, Recipe
from curation.storage.lake import Lake, list_column_to_matrix, matrix_to_list_column, release_memory

ALIGNED_ENCODER_PREFIX = "openclip:"


def clusters_frame(centroids: np.ndarray, comp: Complexity) -> pa.Table:
    """The ``clusters`` table rows (schema in docs/architecture.md) plus ``n_neighbors`` and
    ``tau``, so a reader can tell which complexity settings produced them."""
    k = centroids.shape[0]
    return pa.table(
        {
            "cluster_id": pa.array(np.arange(k, dtype=np.int32)),
            "centroid": matrix_to_list_column(centroids),
            "size": pa.array(comp.size.astype(np.int64)),
            "d_intra": pa.array(comp.d_intra.astype(np.float64)),
            "d_inter": pa.array(comp.d_inter.astype(np.float64)),
            "complexity": pa.array(comp.complexity.astype(np.float64)),
            "weight": pa.array(comp.weight.astype(np.float64)),
            "n_neighbors": pa.array(np.full(k, comp.n_neighbors, np.int32)),
            "tau": pa.array(np.full(k, comp.tau, np.float64)),
        }
    )


def centroids_frame(centroids: np.ndarray) -> pa.Table:
    """The ``centroids`` table rows (written by concept_clusters only): cluster_id, centroid."""
    return pa.table({"cluster_id": pa.array(np.arange(centroids.shape[0], dtype=np.int32)),
                     "centroid": matrix_to_list_column(centroids)})


def read_centroids(db: Lake, table: str | None = None) -> np.ndarray:
    """(k, d) float32 centroids, row ``j`` = cluster ``j``: the ``centroids`` table
    (concept_clusters' output), or ``clusters`` on a lake written before it existed."""
    table = table or ("centroids" if db.exists("centroids") else "clusters")
    df = db.read(table, columns=["cluster_id", "centroid"]).sort("cluster_id")
    if not np.array_equal(df["cluster_id"].to_numpy(), np.arange(df.height)):
        raise ValueError(f"{table} table: got cluster ids that are not 0..k-1; expected a dense range")
    return list_column_to_matrix(df["centroid"])


def align_to(uids, frame: pl.DataFrame, columns, table: str, hint: str = "") -> pl.DataFrame:
    """``frame``'s ``columns`` for ``uids``, in that order (the one uid-alignment join).

    Args:
        uids: (n,) uids (array, list or polars Series).
        frame: a uid-keyed frame (column ``uid``).
        columns: the columns to return.
        table: the table name, for the error message; hint: what to re-run.

    Raises:
        ValueError: some uids have no row in ``frame``.
    """
    cols = [columns] if isinstance(columns, str) else list(columns)
    want = pl.DataFrame({"uid": uids if isinstance(uids, pl.Series) else pl.Series(values=np.asarray(uids, dtype=str), dtype=pl.String)})
    if frame.height == want.height and not want["uid"].null_count() and frame["uid"].equals(want["uid"], check_names=False):
        return frame.select(cols)  # already aligned (both sorted by uid, the usual case): no join
    j = want.join(frame.select(["uid", *cols]).with_columns(pl.lit(True).alias("_hit")), on="uid", how="left",
                  maintain_order="left")
    missing = j["_hit"].null_count()
    if missing:
        raise ValueError(f"{table}: got no rows for {missing} of {want.height} pool uids; expected every pool sample"
                         + (f" ({hint})" if hint else ""))
    return j.select(cols)


def read_aligned(db: Lake, uids) -> tuple[np.ndarray, np.ndarray, str]:
    """ALIGNED image/caption embeddings for ``uids`` (in that order) and where they came from.

    ``filter_embeddings`` (the filter_model's CLIP) when it exists, else ``embeddings`` when
    its encoder is a CLIP (``openclip:...``).

    Raises:
        ValueError: no aligned source, or some uids have no aligned embeddings.
    """
    if db.exists("filter_embeddings"):
        fe = db.read("filter_embeddings", columns=["uid", "image_emb", "text_emb", "model"])
        j = align_to(uids, fe, ["image_emb", "text_emb", "model"], "filter_embeddings", "re-materialize filter_model")
        models = j["model"].unique().to_list()
        return list_column_to_matrix(j["image_emb"]), list_column_to_matrix(j["text_emb"]), f"filter_embeddings:{','.join(models)}"
    pe = read_pool(db, columns=("image", "text"))
    if not (pe.encoder or "").startswith(ALIGNED_ENCODER_PREFIX):
        raise ValueError(
            f"aligned embeddings: got no filter_embeddings table and embeddings encoder {pe.encoder!r}; "
            f"expected filter_model to be materialized or an '{ALIGNED_ENCODER_PREFIX}' embeddings encoder"
        )
    src = align_to(uids, pl.DataFrame({"uid": pl.Series(pe.uids, dtype=pl.String), "src": np.arange(len(pe.uids))}),
                   "src", "embeddings")["src"].to_numpy()
    return pe.image[src], pe.text[src], f"embeddings:{pe.encoder}"


def read_recipe_pool(db: Lake, recipe: Recipe, needs_dedup: bool | None = None) -> Pool:
    """Everything ``recipe`` needs from the lake, as a :class:`Pool` sorted by uid.

    ``needs_dedup`` overrides ``recipe.needs_dedup`` (a size-matched control reads the SemDeDup
    scores its target's chain needs, :func:`curation.select.controls.needs_dedup_scores`).

    Reads ``assignments`` (uid, cluster_id, cos_to_centroid) and the centroids; for recipes
    that dedup, ``max_sim_to_earlier`` of ``dedup_scores`` (and only ``dedup_scores``, which
    carries the same cluster_id and cos_to_centroid sorted by uid, when it was computed from
    the current assignments: :func:`curation.select.layout.scores_carry_assignments`; 1M rows of
    hashed uids 0.35 -> 0.17 s, no sort); for ``dbp``, the stored
    ``d_inter`` of ``clusters`` (what complexity_scores wrote) when it was computed with the
    recipe's ``n_neighbors``; for CLIP recipes, the aligned embeddings (:func:`read_aligned`).
    No embedding matrix is read otherwise.

    Raises:
        ValueError: a needed table is missing or does not cover every assigned uid.
    """
    from concurrent.futures import ThreadPoolExecutor

    from curation.select.layout import scores_carry_assignments

    dedup = recipe.needs_dedup if needs_dedup is None else needs_dedup
    if dedup and not db.exists("dedup_scores"):
        raise ValueError(f"recipe {recipe.name!r} needs SemDeDup scores: got no dedup_scores table; expected it materialized")
    # one table holds everything when the scores carry the current assignments
    source, cols = ("dedup_scores", ["cluster_id", "cos_to_centroid", "max_sim_to_earlier"]) \
        if dedup and scores_carry_assignments(db) else ("assignments", ["cluster_id", "cos_to_centroid"])
    with ThreadPoolExecutor(max_workers=1) as pool:
        # else the scores are read while the assignments are read and sorted (Arrow's reads release the GIL)
        scores = pool.submit(read_uid_keyed, db, "dedup_scores", ["max_sim_to_earlier"]) \
            if dedup and source == "assignments" else None
        uids, asg = read_uid_keyed(db, source, cols)
        order = sort_order(uids)
        if order is not None:  # assignments are written in shard order: hashed uids are not sorted
            uids, asg = uids[order], {c: v[order] for c, v in asg.items()}
        max_sim = asg.pop("max_sim_to_earlier", None)
        cent = read_centroids(db)
        if scores is not None:
            du, dm = scores.result()
            max_sim = align_compact(uids, du, dm["max_sim_to_earlier"], "dedup_scores", "re-materialize dedup_scores")
            del du, dm
    d_inter = None
    if recipe.method == "dbp":
        cl = clusters_of(db, cent)
        if cl is None:
            raise ValueError(f"recipe {recipe.name!r} needs cluster complexity: got no clusters rows for the current "
                             "centroids; expected complexity_scores materialized after concept_clusters")
        d_inter = _d_inter_of(cl, recipe.n_neighbors)
    img = txt = None
    layout = None
    if recipe.needs_aligned:
        from curation.select.layout import LayoutRef, layout_has_text

        if (not db.exists("filter_embeddings") and layout_has_text(db)
                and db.count_rows("pool_by_cluster") == len(uids)):
            layout = LayoutRef.of(db)  # aligned vectors read one bucket at a time
        else:
            img, txt, _ = read_aligned(db, uid_series(uids))
    return Pool(uids=uids, cluster_ids=asg["cluster_id"].astype(np.int32),
                cos_to_centroid=asg["cos_to_centroid"].astype(np.float32), centroids=cent,
                max_sim=max_sim, image_aligned=img, text_aligned=txt, d_inter=d_inter, aligned_layout=layout)


def clusters_of(db: Lake, centroids: np.ndarray) -> pl.DataFrame | None:
    """The ``clusters`` rows (sorted by cluster_id) when they were written for exactly
    ``centroids``; None when the table is missing or holds other centroids."""
    if not db.exists("clusters"):
        return None
    cl = db.read("clusters").sort("cluster_id")
    if cl.height != centroids.shape[0] or not np.array_equal(list_column_to_matrix(cl["centroid"]), centroids):
        return None
    return cl


def _d_inter_of(cl: pl.DataFrame | None, n_neighbors: int) -> np.ndarray | None:
    """The stored ``d_inter`` of ``cl`` when it was computed with ``l = min(n_neighbors, k - 1)``."""
    if cl is None or "n_neighbors" not in cl.columns or "d_inter" not in cl.columns or cl.height < 2:
        return None
    if int(cl["n_neighbors"][0]) != min(int(n_neighbors), cl.height - 1):
        return None
    return cl["d_inter"].to_numpy().astype(np.float64)


def stored_d_inter(db: Lake, centroids: np.ndarray, n_neighbors: int) -> np.ndarray | None:
    """``d_inter`` as ``complexity_scores`` last wrote it, when it was computed for exactly these
    ``centroids`` and ``n_neighbors`` (it depends on nothing else: an incremental update keeps
    the centroids, so it is reused instead of the top-l search over all centroid pairs, 2.8 s
    at k = 10,000); None otherwise (the caller computes it)."""
    return _d_inter_of(clusters_of(db, centroids), n_neighbors)


def read_uid_keyed(db: Lake, table: str, columns) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A uid-keyed table's uids as 32-byte strings (``S32``: 0.3 GB at 10M rows, not ``<U32``'s
    1.3 GB or a polars string column's ~0.5 GB) and its numeric ``columns`` as arrays, read
    through Arrow without a polars frame (whose string buffers the allocators keep after use)."""
    t = db.dataset(table).to_table(columns=["uid", *columns])
    uids = uid_strings(t.column("uid"))
    cols = {c: t.column(c).to_numpy() for c in columns}
    del t
    release_memory()
    return uids, cols


def sort_order(uids: np.ndarray) -> np.ndarray | None:
    """The permutation sorting ``uids`` (S32), or None when they are strictly increasing
    already. 32-hex-character uids sort by their two uint64 halves (a numeric lexsort)."""
    if uids.size < 2 or bool(np.all(uids[1:] > uids[:-1])):
        return None
    if uids.dtype == np.dtype(UID_DTYPE):
        from curation.select.layout import uid_sort_keys

        hi, lo = uid_sort_keys(uids_to_bytes(uids))
        return lex_order((lo, hi))
    return np.argsort(uids, kind="stable")


def _same_strings(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` for two ``S`` arrays of one width, compared as bytes (a string
    compare per element is ~8x slower: 31 ms vs 4 ms for 1M uids)."""
    if a.dtype == b.dtype and a.dtype.kind == "S":
        return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))
    return np.array_equal(a, b)


def align_compact(uids: np.ndarray, keys: np.ndarray, values: np.ndarray, table: str, hint: str = "") -> np.ndarray:
    """``values`` (one per uid of ``keys``) in the order of ``uids`` (both ``S32`` arrays).

    Raises:
        ValueError: some uids have no row in ``table`` (the same message as :func:`align_to`).
    """
    if keys.shape == uids.shape and _same_strings(keys, uids):
        return np.asarray(values)  # both sorted by uid, the usual case: no search
    order = sort_order(keys)
    sk = keys if order is None else keys[order]
    pos = np.minimum(np.searchsorted(sk, uids), max(0, sk.size - 1))
    hit = sk[pos] == uids if sk.size else np.zeros(uids.size, bool)
    if not hit.all():
        missing = int((~hit).sum())
        raise ValueError(f"{table}: got no rows for {missing} of {uids.size} pool uids; expected every pool sample"
                         + (f" ({hint})" if hint else ""))
    src = pos if order is None else order[pos]
    return np.asarray(values)[src]


def read_kept_samples(db: Lake, uids: pl.Series, columns) -> pl.DataFrame:
    """The ``samples`` rows (``columns``, uid first) of the kept ``uids`` (unique), IN THE ORDER
    of ``uids``, streamed: memory holds the kept rows, never the pool's. A uid without a
    ``samples`` row has no row here (the result is then shorter than ``uids``).

    The order lets :func:`curation.select.export.export_subset` put the rows beside the
    selection instead of joining them (one join of 500k uids, not two: 0.22 vs 0.30 s)."""
    return db.read_uids("samples", uids, columns, ordered=True)


def store_selection(db: Lake, name: str, table: pa.Table, sample_columns) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Write a selection's ``subsets`` rows (``table``, from ``Selection.to_arrow``) to the
    partition ``name`` WHILE the kept ``samples`` rows (``sample_columns``) are read: both run
    in Rust (the Delta writer, the polars scan) with the GIL released, so on two cores the
    write hides partly behind the read (1M pool, 500k kept: 0.37 -> 0.29 s, medians of 4).

    Returns:
        ``(frame, kept)``: the selection's uid, rank, score (in rank order, as written) and
        :func:`read_kept_samples` of its uids (in that order).
    """
    from curation.engine.executor import run_beside

    frame = pl.from_arrow(table.select(["uid", "rank", "score"]))
    kept = run_beside(lambda: db.write("subsets", table, partition=name),
                      lambda: read_kept_samples(db, frame["uid"], sample_columns))
    return frame, kept


def aligned_source(db: Lake) -> str:
    """Where :func:`read_aligned` takes aligned embeddings from (for asset metadata)."""
    if db.exists("filter_embeddings"):
        models = db.read("filter_embeddings", columns=["model"])["model"].unique().to_list()
        return f"filter_embeddings:{','.join(models)}"
    enc = db.read("embeddings", columns=["encoder"])["encoder"].unique().to_list() if db.exists("embeddings") else []
    return f"embeddings:{enc[0]}" if len(enc) == 1 else ""
