"""The pool laid out by cluster (curation.select.layout): out-of-core == in-memory, a bucket above
the memory budget in blocks, incremental == full for every recipe, two-level == flat, compact uids."""

from __future__ import annotations

import os
import threading
import zlib

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curation.embed.pool_reader import partition_fingerprints, read_pool
from curation.ingest.ids import (
    binary_column_to_bytes,
    binary_uid_column,
    bytes_to_uids,
    make_uid,
    u128_to_uids,
    uid_series,
    uid_strings,
    uids_to_bytes,
    uids_to_u128,
)
from curation.select.clustering import (
    assign,
    assign_two_level,
    cluster_complexity,
    coarse_lists,
    train_centroids,
    train_centroids_two_level,
)
from curation.select.layout import (
    DEDUP_STATE_TABLE,
    LAYOUT_TABLE,
    LayoutConfig,
    build_layout,
    compact_layout,
    decode_vectors,
    dedup_scores_by_bucket,
    encode_vectors,
    fit_centroids,
    layout_files_per_bucket,
    training_sample,
    _find,
    _keys,
    update_layout,
    write_dedup_scores,
)
from curation.select.pool_tables import clusters_frame, read_recipe_pool
from curation.select.recipes import Pool, apply_recipe, load_recipes
from curation.select.semdedup import is_duplicate, semdedup_scores
from curation.storage.lake import Lake, matrix_to_list_column

D, K, CONCEPTS = 24, 10, 10


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


class SynPool:
    """Clustered unit vectors with planted near-duplicates, written shard by shard."""

    def __init__(self, root, seed=0):
        self.lake = Lake(str(root))
        rng = np.random.default_rng(99)
        self.centers = _unit(rng.standard_normal((CONCEPTS, D)))
        self.seed = seed

    def shard(self, stem: str, n: int, salt: int = 0) -> None:
        # a stable seed per shard (Python's hash() of strings changes per process: every run drew a
        # different pool, and a test reading boundary rows of it failed in some runs)
        rng = np.random.default_rng(zlib.crc32(f"{stem}/{salt}/{self.seed}".encode()))
        c = rng.integers(0, CONCEPTS, n)
        x = self.centers[c] + rng.uniform(0.3, 0.6) * rng.standard_normal((n, D))
        dup = rng.choice(n, n // 10, replace=False)
        x[dup] = x[rng.integers(0, n, dup.size)] + 0.002 * rng.standard_normal((dup.size, D))
        x = _unit(x)
        y = _unit(x + 0.3 * rng.standard_normal((n, D)))
        key = f"syn-{stem}"
        self.lake.write("embeddings", pa.table({
            "uid": [make_uid("syn", stem, str(i)) for i in range(n)],
            "shard": [key] * n,
            "image_emb": matrix_to_list_column(x),
            "text_emb": matrix_to_list_column(y),
            "encoder": ["openclip:test"] * n,
        }), partition=key)


def _curated(lake: Lake) -> tuple[np.ndarray, LayoutConfig]:
    """A pool curated from scratch: K centroids, the layout (4 clusters per bucket), full scores.
    Updates after changed or removed shards take the incremental path here whatever share of
    the pool they touch (these pools have K clusters: any shard touches most of them);
    ``full_pass_fraction`` has its own test."""
    cent, _ = fit_centroids(lake, K, niter=10)
    cfg = LayoutConfig(clusters_per_bucket=4, full_pass_fraction=2.0)
    build_layout(lake, cent, cfg)
    _finish(lake, cent, cfg, incremental=False)
    return cent, cfg


def _finish(lake: Lake, cent: np.ndarray, cfg: LayoutConfig, incremental: bool):
    du = dedup_scores_by_bucket(lake, config=cfg, incremental=incremental)
    write_dedup_scores(lake, du)
    asg = lake.read("assignments", columns=["cluster_id", "cos_to_centroid"])
    lake.write("clusters", clusters_frame(cent, cluster_complexity(asg["cluster_id"].to_numpy(), asg["cos_to_centroid"].to_numpy(), cent)))
    return du


RECIPES = load_recipes()


def _select_all(lake: Lake) -> dict:
    out = {}
    for name, r in RECIPES.items():
        sel = apply_recipe(r, read_recipe_pool(lake, r))
        out[name] = (uid_series(sel.uids).to_list(), sel.stats.get("budgets"))  # the pool holds S32 uids
    return out


def test_out_of_core_equals_in_memory(tmp_path):
    p = SynPool(tmp_path / "lake")
    for i in range(6):
        p.shard(f"{i:05d}", 700)
    cent, n = fit_centroids(p.lake, K, niter=10)
    assert n == 4200 and cent.shape == (K, D)
    # tiny buckets and flushes so every code path of the writer runs; caption vectors stored,
    # so clipscore / clipcov read one bucket at a time
    cfg = LayoutConfig(clusters_per_bucket=3, flush_rows=1000, with_text=True)
    up = build_layout(p.lake, cent, cfg)
    assert up.n_rows == 4200 and len(p.lake.partitions(LAYOUT_TABLE)) == -(-K // 3)
    du = _finish(p.lake, cent, cfg, incremental=False)
    # the in-memory reference: one matrix, the same centroids
    pe = read_pool(p.lake, columns=("image", "text"))
    ids, cos = assign(pe.image, cent)
    m = semdedup_scores(pe.image, ids, cos, pe.uids)
    ref = pl.DataFrame({"uid": pe.uids, "m": m, "c": ids}).join(du.frame, on="uid")
    assert ref.height == 4200
    assert (ref["m"] == ref["max_sim_to_earlier"]).all() and (ref["c"] == ref["cluster_id"]).all()
    pool = Pool(uids=pe.uids, cluster_ids=ids, cos_to_centroid=cos, centroids=cent, max_sim=m,
                image_aligned=pe.image, text_aligned=pe.text)
    assert read_recipe_pool(p.lake, RECIPES["clipcov@0.5"]).aligned_layout is not None
    got = _select_all(p.lake)
    for name, r in RECIPES.items():
        sel = apply_recipe(r, pool)
        kept, budgets = got[name]
        if r.method == "random":  # row-order dependent by design: compare sizes
            assert len(kept) == sel.stats["n_kept"]
            continue
        assert kept == sel.uids.tolist(), name  # same uids in the same rank order
        if budgets is not None:
            assert np.array_equal(budgets, sel.stats["budgets"]), name


def _two_per_bucket(root, shards: int, rows: int):
    """A pool of ``shards`` x ``rows`` rows, 4 centroids laid out 2 per bucket, its full scores."""
    p = SynPool(root)
    for i in range(shards):
        p.shard(f"{i:05d}", rows)
    cent, _ = fit_centroids(p.lake, 4, niter=10)
    cfg = LayoutConfig(clusters_per_bucket=2)
    build_layout(p.lake, cent, cfg)
    return p, cent, cfg, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame


def test_bucket_above_memory_budget_is_processed_in_blocks(tmp_path, monkeypatch):
    import curation.select.layout as L

    p, cent, _cfg, ref = _two_per_bucket(tmp_path / "lake", 3, 800)
    spilled = []
    spill = L._spill_cluster
    monkeypatch.setattr(L, "_spill_cluster", lambda *a: spilled.append(a[3]) or spill(*a))
    # budget below one cluster's vectors: per-cluster reads, then a memmap scored in blocks
    small = LayoutConfig(clusters_per_bucket=2, memory_budget_bytes=4 * D * 100, block=64)
    got = dedup_scores_by_bucket(p.lake, config=small, incremental=False).frame
    assert sorted(spilled) == [0, 1, 2, 3]
    j = ref.join(got, on="uid")
    assert j.height == ref.height == 2400
    np.testing.assert_allclose(j["max_sim_to_earlier"], j["max_sim_to_earlier_right"], atol=1e-6)
    for eps in (0.01, 0.05):
        assert np.array_equal(is_duplicate(j["max_sim_to_earlier"].to_numpy(), eps), is_duplicate(j["max_sim_to_earlier_right"].to_numpy(), eps))
    # a spilled cluster is read from the pass's table version, like the rest of its bucket: a
    # shard laid out after that version changes nothing the task returns
    v = p.lake.table(LAYOUT_TABLE).version()
    kw = dict(root=p.lake.root, storage_options=None, dtype="float32", d=D, block=64,
              memory_budget_bytes=small.memory_budget_bytes, version=v)
    before = L.bucket_scores(("000000", None, {}), **kw)
    p.shard("00003", 800)
    update_layout(p.lake, cent, small)
    assert p.lake.table(LAYOUT_TABLE).version() > v
    spilled.clear()
    after = L.bucket_scores(("000000", None, {}), **kw)
    assert sorted(spilled) == [0, 1]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)


def test_bucket_tasks_read_the_drivers_table_version_opened_once_per_process(tmp_path, monkeypatch):
    """Every bucket task reads the version the driver saw, from one DeltaTable per process (at
    10M rows an open replays a log of ~24k files; one per bucket was most of a small read)."""
    import curation.select.layout as L

    p, cent, cfg, ref = _two_per_bucket(tmp_path / "lake", 2, 400)
    v = p.lake.table(L.LAYOUT_TABLE).version()
    opened = []
    import deltalake

    class Counting(deltalake.DeltaTable):
        def __init__(self, *a, **k):
            opened.append(k.get("version"))
            super().__init__(*a, **k)

    monkeypatch.setattr(deltalake, "DeltaTable", Counting)
    L._SNAPSHOT.clear()
    assert dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame.equals(ref)
    assert opened == [v]  # two buckets, one pinned open
    p.shard("00002", 400)  # a new version; the pinned snapshot still reads the old one
    update_layout(p.lake, cent, cfg)
    item = ("000000", None, {})
    kw = dict(root=p.lake.root, storage_options=None, dtype="float32", d=D, block=64, memory_budget_bytes=1 << 30)
    old = L.bucket_scores(item, **kw, version=v)[0].shape[0]
    new = L.bucket_scores(item, **kw)[0].shape[0]
    assert 0 < old < new


def test_pinned_bucket_datasets_come_from_one_listing_and_read_what_deltalake_lists(tmp_path, monkeypatch):
    """With a pinned version, a bucket's dataset is made from the snapshot's file listing, built
    once per process and version, instead of deltalake's file pruning per bucket: the same files,
    schema and rows for every bucket (a bucket the snapshot lacks has no file), and the pinned
    snapshot keeps listing its own version's files after the table moves on."""
    import curation.select.layout as L

    p, cent, cfg, ref = _two_per_bucket(tmp_path / "lake", 2, 400)
    p.shard("00002", 300)
    update_layout(p.lake, cent, cfg)  # a second file in every touched bucket
    v = p.lake.table(L.LAYOUT_TABLE).version()
    built = []
    real = L._SnapshotFiles.__init__

    def counting(self, *a, **k):
        built.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(L._SnapshotFiles, "__init__", counting)
    L._SNAPSHOT.clear()
    dt = L._layout_table(p.lake, v)
    cols = ["bucket", "cluster_id", "uid", "cos_to_centroid", "emb_float32"]
    buckets = p.lake.partitions(L.LAYOUT_TABLE)
    assert len(buckets) == 2
    for b in buckets:
        ours, theirs = L._bucket_dataset(p.lake, b, v), L.layout_dataset(p.lake, dt, [("bucket", "=", b)])
        assert sorted(ours.files) == sorted(theirs.files) and len(ours.files) == 2
        assert ours.schema.equals(theirs.schema)
        got = ours.to_table(columns=cols).sort_by([("cluster_id", "ascending"), ("uid", "ascending")])
        assert got.equals(theirs.to_table(columns=cols).sort_by([("cluster_id", "ascending"), ("uid", "ascending")]))
        assert set(got.column("bucket").to_pylist()) == {b}
    assert L._bucket_dataset(p.lake, "999999", v).files == []
    assert built == [1]  # one listing for every bucket of the version
    p.shard("00003", 300)
    update_layout(p.lake, cent, cfg)
    assert sorted(L._bucket_dataset(p.lake, buckets[0], v).files) == sorted(
        L.layout_dataset(p.lake, dt, [("bucket", "=", buckets[0])]).files)  # still the pinned version's
    assert dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame.height == p.lake.count_rows("assignments")


def test_incremental_equals_full_for_every_recipe(tmp_path):
    a, b = SynPool(tmp_path / "a"), SynPool(tmp_path / "b")
    for p in (a, b):
        for i in range(4):
            p.shard(f"{i:05d}", 600)
    cent, cfg = _curated(a.lake)
    fp = partition_fingerprints(a.lake)
    # a new shard (add-only clusters: exact update) ...
    for p in (a, b):
        p.shard("00004", 500)
    up = update_layout(a.lake, cent, cfg)
    assert up.mode == "incremental" and up.added_shards == ["syn-00004"] and up.n_new == 500
    du = _finish(a.lake, cent, cfg, incremental=True)
    assert du.mode == "incremental" and du.updated_clusters > 0 and du.recomputed_clusters == 0 and du.reentered == 0
    assert du.score_seconds > 0  # the touched buckets were scored, and timed
    _assert_same_scores(du.frame, dedup_scores_by_bucket(a.lake, config=cfg, incremental=False).frame)
    # ... then a shard whose content changed re-enters as new content (old rows deleted first)
    for p in (a, b):
        p.shard("00001", 450, salt=1)
    assert partition_fingerprints(a.lake)["syn-00001"] != fp["syn-00001"]
    up = update_layout(a.lake, cent, cfg)
    assert up.added_shards == ["syn-00001"] and up.removed_shards == ["syn-00001"]
    du = _finish(a.lake, cent, cfg, incremental=True)
    # its 450 uids were scored before (same keys): each re-enters as removed + new
    assert du.recomputed_clusters > 0 and du.reentered == 450 and du.rows_scored < a.lake.read("assignments").height + 1
    # nothing changed: nothing recomputed
    assert update_layout(a.lake, cent, cfg).n_new == 0
    assert dedup_scores_by_bucket(a.lake, config=cfg).rows_scored == 0
    # full recompute of the same pool with the same centroids
    build_layout(b.lake, cent, cfg)
    _finish(b.lake, cent, cfg, incremental=False)
    fa, fb = a.lake.read("dedup_scores"), b.lake.read("dedup_scores")
    assert fa["uid"].to_list() == fb["uid"].to_list() and fa.height == 4 * 600 - 150 + 500
    assert fa["cluster_id"].to_list() == fb["cluster_id"].to_list()
    # M equal up to float32 rounding of the dot products (BLAS tile shapes differ: the exact
    # update multiplies only the new rows); every recipe keeps the same uids with the same budgets
    np.testing.assert_allclose(fa["max_sim_to_earlier"], fb["max_sim_to_earlier"], atol=1e-6, rtol=0)
    sa, sb = _select_all(a.lake), _select_all(b.lake)
    for name in RECIPES:
        assert sa[name][0] == sb[name][0], name
        if sa[name][1] is not None:
            assert np.array_equal(sa[name][1], sb[name][1]), name


def test_layout_files_are_sorted_by_cluster_so_a_cluster_read_skips_the_others(tmp_path, monkeypatch):
    """Every pool_by_cluster file holds its rows sorted by cluster in small row groups; an
    update that touches one cluster of a bucket reads that cluster's row groups, not the bucket."""
    import pyarrow.compute as pc

    from curation.select import layout as layout_mod

    monkeypatch.setattr(layout_mod, "LAYOUT_ROW_GROUP_ROWS", 64)
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 900)
    cent, cfg = _curated(p.lake)
    ds = p.lake.table(LAYOUT_TABLE).to_pyarrow_dataset()
    groups = 0
    for frag in ds.get_fragments():
        meta = frag.metadata
        ids = frag.to_table(columns=["cluster_id"]).column("cluster_id").to_numpy()
        assert np.all(np.diff(ids) >= 0), frag.path
        assert all(meta.row_group(g).num_rows <= 64 for g in range(meta.num_row_groups))
        groups += meta.num_row_groups
    # the row groups a one-cluster filter keeps: only those whose cluster_id range holds it
    c = int(p.lake.read("assignments", columns=["cluster_id"])["cluster_id"][0])
    flt = pc.field("cluster_id").isin(pa.array([c], pa.int32()))
    kept = sum(len(f.split_by_row_group(filter=flt)) for f in ds.get_fragments())
    assert 0 < kept < groups / 3
    # an add-only update touching that cluster only: the buckets read only its rows, and the
    # scores still equal a full recompute
    read_rows = []
    orig = layout_mod.read_bucket

    def spy(*a, **kw):
        out = orig(*a, **kw)
        read_rows.append(len(out.cluster_ids))
        return out

    monkeypatch.setattr(layout_mod, "read_bucket", spy)
    _topical_shard(p.lake, c, "new")
    up = update_layout(p.lake, cent, cfg)
    assert up.touched_clusters.tolist() == [c]
    du = _finish(p.lake, cent, cfg, incremental=True)
    assert du.updated_clusters == 1 and du.recomputed_clusters == 0
    members = int((p.lake.read("assignments", columns=["cluster_id"])["cluster_id"] == c).sum())
    assert read_rows == [members]
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)


def _topical_shard(lake: Lake, c: int, stem: str) -> None:
    """A 3-row shard ``syn-<stem>`` of copies of cluster ``c``'s three most central members
    (the layout's first rows of a cluster are its LEAST central, the ones a small shift can
    move into a neighbouring cluster): it touches cluster ``c`` only."""
    x = (lake.read(LAYOUT_TABLE, columns=["emb_float32", "cluster_id", "cos_to_centroid"])
         .filter(pl.col("cluster_id") == c).sort("cos_to_centroid", descending=True).head(3))
    vec = decode_vectors(x["emb_float32"].to_arrow(), "float32")
    lake.write("embeddings", pa.table({
        "uid": [make_uid("syn", stem, str(i)) for i in range(3)], "shard": [f"syn-{stem}"] * 3,
        "image_emb": matrix_to_list_column(_unit(vec + 1e-3)), "text_emb": matrix_to_list_column(_unit(vec)),
        "encoder": ["openclip:test"] * 3,
    }), partition=f"syn-{stem}")


def _assert_same_scores(got: pl.DataFrame, ref: pl.DataFrame) -> None:
    """Incremental == full: same uids, clusters, cos; M within float32 rounding of the dot
    products (BLAS tile shapes differ) and the same SemDeDup decision at every eps of the grid."""
    assert got["uid"].to_list() == ref["uid"].to_list()
    assert got["cluster_id"].to_list() == ref["cluster_id"].to_list()
    assert got["cos_to_centroid"].equals(ref["cos_to_centroid"])
    np.testing.assert_allclose(got["max_sim_to_earlier"], ref["max_sim_to_earlier"], atol=1e-6, rtol=0)
    for eps in (0.001, 0.005, 0.01, 0.02, 0.05, 0.1):
        assert np.array_equal(is_duplicate(got["max_sim_to_earlier"].to_numpy(), eps),
                              is_duplicate(ref["max_sim_to_earlier"].to_numpy(), eps)), eps


def test_add_only_update_falls_back_when_stored_scores_lack_rows(tmp_path, monkeypatch):
    """The add-only update scores the touched buckets while it reads the stored scores; when
    those turn out not to add up (rows lost from dedup_scores), it waits for that scoring,
    drops it and the general path recomputes: still equal to a full recompute."""
    import curation.select.layout as layout

    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 500)
    cent, cfg = _curated(p.lake)
    stored = p.lake.read("dedup_scores")
    p.lake.write("dedup_scores", stored.slice(7))  # 7 scored rows lost (the state still lists their shards)
    p.shard("00003", 400)
    update_layout(p.lake, cent, cfg)
    taken, scored = [], []
    real, real_items = layout._add_only_update, layout._timed_items
    monkeypatch.setattr(layout, "_add_only_update", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    monkeypatch.setattr(layout, "_timed_items", lambda *a, **k: scored.append(1) or real_items(*a, **k))
    du = _finish(p.lake, cent, cfg, incremental=True)
    assert taken == [None] and len(scored) == 2  # the add-only scoring ran, then the general path's
    assert du.mode == "incremental" and du.recomputed_clusters == 0 and du.updated_clusters > 0
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)


def test_recipe_pool_reads_the_scores_alone_only_while_they_carry_the_current_assignments(tmp_path, monkeypatch):
    """``read_recipe_pool`` takes cluster_id and cos_to_centroid from ``dedup_scores`` (no read,
    sort and alignment of ``assignments``) only when the scores were computed from exactly the
    current assignments; the pool is the same either way, and stale scores still fail loudly."""
    import curation.select.layout as layout
    import curation.select.pool_tables as pool_tables

    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 500)
    cent, cfg = _curated(p.lake)
    r = RECIPES["dbp@0.5"]
    assert layout.scores_carry_assignments(p.lake)
    read_assignments = []
    real_read = pool_tables.read_uid_keyed
    monkeypatch.setattr(pool_tables, "read_uid_keyed", lambda db, t, c: read_assignments.append(t) or real_read(db, t, c))
    fast = read_recipe_pool(p.lake, r)
    assert read_assignments == ["dedup_scores"]
    monkeypatch.setattr(layout, "scores_carry_assignments", lambda lake: False)
    slow = read_recipe_pool(p.lake, r)
    assert sorted(read_assignments[1:]) == ["assignments", "dedup_scores"]  # the scores read in a thread
    monkeypatch.undo()
    for f in ("uids", "cluster_ids", "cos_to_centroid", "max_sim", "d_inter"):
        assert np.array_equal(getattr(fast, f), getattr(slow, f)), f
    assert fast.uids.dtype == slow.uids.dtype and fast.cluster_ids.dtype == slow.cluster_ids.dtype
    sel_fast, sel_slow = apply_recipe(r, fast), apply_recipe(r, slow)
    assert np.array_equal(sel_fast.uids, sel_slow.uids) and np.array_equal(sel_fast.score, sel_slow.score)
    # a new shard laid out but not yet scored: the scores no longer carry the assignments, and
    # the recipe names the missing rows instead of selecting from a stale pool
    p.shard("00003", 300)
    update_layout(p.lake, cent, cfg)
    assert not layout.scores_carry_assignments(p.lake)
    with pytest.raises(ValueError, match="dedup_scores: got no rows for 300 of 1800 pool uids"):
        read_recipe_pool(p.lake, r)
    _finish(p.lake, cent, cfg, incremental=True)
    assert layout.scores_carry_assignments(p.lake)
    # any write to assignments after the scoring (here: the same rows rewritten) is noticed
    p.lake.write("assignments", p.lake.read("assignments"))
    assert not layout.scores_carry_assignments(p.lake)
    # a state written before the version was recorded: the two tables are aligned, as before
    _finish(p.lake, cent, cfg, incremental=True)
    p.lake.write(layout.DEDUP_STATE_TABLE, p.lake.read(layout.DEDUP_STATE_TABLE).drop("assignments_version"))
    assert not layout.scores_carry_assignments(p.lake)
    assert read_recipe_pool(p.lake, r).n == 1800
    _finish(p.lake, cent, cfg, incremental=True)
    import shutil

    shutil.rmtree(p.lake.uri("assignments"))  # no assignments at all: False, not an error
    assert not layout.scores_carry_assignments(p.lake)


def test_compaction_keeps_rows_and_scores_and_sorts_buckets_by_cluster(tmp_path, monkeypatch):
    """compact_layout rewrites the buckets with enough files as one file each, row groups in
    cluster order; the rows are the same (so are the scores), and an add-only update after it
    still equals a full recompute."""
    import curation.select.layout as layout

    monkeypatch.setattr(layout, "LAYOUT_ROW_GROUP_ROWS", 64)  # several row groups per compacted file
    p = SynPool(tmp_path / "lake")
    for i in range(2):
        p.shard(f"{i:05d}", 600)
    cent, _ = fit_centroids(p.lake, K, niter=10)
    cfg = LayoutConfig(clusters_per_bucket=4, flush_rows=500)
    build_layout(p.lake, cent, cfg)
    # a build writes each bucket once (from its spill), whatever flush_rows; every update then
    # appends a file to each bucket it touches
    assert set(layout_files_per_bucket(p.lake).values()) == {1}
    for i in (2, 3):
        p.shard(f"{i:05d}", 600)
        update_layout(p.lake, cent, cfg)
    _finish(p.lake, cent, cfg, incremental=False)
    with pytest.raises(ValueError, match="min_files"):
        compact_layout(p.lake, min_files=1)
    before = layout_files_per_bucket(p.lake)
    assert len(before) == 3 and min(before.values()) >= 3

    def rows():
        return p.lake.read(LAYOUT_TABLE).sort("uid")

    rows_before, m_before = rows(), p.lake.read("dedup_scores")
    only = sorted(before)[0]
    r = compact_layout(p.lake, buckets=[only])  # one bucket only
    assert r.buckets == [only] and r.files_before == before[only] and r.files_after == 1
    r = compact_layout(p.lake, min_files=2)  # the others; the compacted one is skipped
    assert sorted(r.buckets) == sorted(before)[1:] and r.files_after == 2
    assert layout_files_per_bucket(p.lake) == {b: 1 for b in before}
    assert rows().equals(rows_before)
    full = dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame
    assert full.equals(m_before)  # the same rows in the same SemDeDup order: the same M
    for frag in p.lake.dataset(LAYOUT_TABLE).get_fragments():  # each file's row groups in cluster order
        md = frag.metadata
        col = md.schema.names.index("cluster_id")
        stats = [(md.row_group(i).column(col).statistics.min, md.row_group(i).column(col).statistics.max)
                 for i in range(md.num_row_groups)]
        assert md.num_row_groups > 3 and all(a[1] <= b[0] for a, b in zip(stats, stats[1:])), stats
    p.shard("00004", 300)
    update_layout(p.lake, cent, cfg)
    du = _finish(p.lake, cent, cfg, incremental=True)
    assert du.updated_clusters > 0 and du.recomputed_clusters == 0
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)


def test_changed_content_with_same_uid_reenters_as_new(tmp_path, monkeypatch):
    """A shard rewritten with the SAME uids (its content changed, e.g. a new image_sha256 in
    samples, then re-embedded) re-enters as removed + new, even where a row's vector, cluster
    and cos_to_centroid come out identical: the stored M is not trusted for it."""
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 500)
    cent, cfg = _curated(p.lake)
    before = p.lake.read("dedup_scores")
    p.shard("00001", 500)  # rewritten: new files, same uids and (here) the same vectors
    up = update_layout(p.lake, cent, cfg)
    assert up.added_shards == ["syn-00001"] and up.removed_shards == ["syn-00001"]
    asg = p.lake.read("assignments")
    moved = asg.filter(pl.col("shard") == "syn-00001")
    du = _finish(p.lake, cent, cfg, incremental=True)
    assert du.reentered == 500 and du.updated_clusters == 0
    assert du.recomputed_clusters == moved["cluster_id"].n_unique()  # every cluster holding one of them
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)
    assert du.frame["max_sim_to_earlier"].equals(before["max_sim_to_earlier"])  # same vectors: same M
    # a lake scored before the shard state existed: the general (uid join) path, still exact
    import shutil

    shutil.rmtree(p.lake.uri(DEDUP_STATE_TABLE))
    p.shard("00003", 400)
    update_layout(p.lake, cent, cfg)
    du = _finish(p.lake, cent, cfg, incremental=True)
    assert du.mode == "incremental" and du.updated_clusters > 0 and du.reentered == 0
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)
    # and with the state written again, the add-only path (no uid join) takes the next shard
    import curation.select.layout as layout

    taken = []
    real = layout._add_only_update
    monkeypatch.setattr(layout, "_add_only_update", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    p.shard("00004", 300)
    update_layout(p.lake, cent, cfg)
    du = _finish(p.lake, cent, cfg, incremental=True)
    assert len(taken) == 1 and taken[0] is du and du.updated_clusters > 0 and du.recomputed_clusters == 0
    # the layout rebuilt on other centroids (retrain): the same shards, but the stored scores
    # belong to the old layout, so they are not updated in place
    cent2, _ = fit_centroids(p.lake, K, niter=10, seed=5)
    build_layout(p.lake, cent2, cfg)
    du = _finish(p.lake, cent2, cfg, incremental=True)
    assert len(taken) == 1 and du.recomputed_clusters > 0
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)


def test_uid_key_lookup_for_every_key_shape():
    """The add-only update matches uids by 16-byte key: hash uids (the high half decides),
    counters (only the low half varies) and the general case give the same positions."""
    rng = np.random.default_rng(0)
    hashed = rng.integers(0, 256, (500, 16), dtype=np.uint8)
    counter = np.zeros((500, 16), np.uint8)
    counter[:, 8:] = np.arange(500, dtype=">u8").view(np.uint8).reshape(500, 8)
    mixed = counter.copy()
    mixed[:, 7] = np.arange(500) % 3  # high halves repeat but differ
    for b in (hashed, counter, mixed):
        k = _keys(b)
        keys = np.sort(k)
        q = np.concatenate([k[rng.permutation(500)[:200]], _keys(rng.integers(0, 256, (5, 16), dtype=np.uint8))])
        pos, found = _find(keys, q)
        assert found[:200].all() and not found[200:].any()
        assert np.array_equal(keys[pos[:200]], q[:200])


def test_float16_layout_keeps_decisions_close(tmp_path):
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 600)
    cent, _ = fit_centroids(p.lake, 6, niter=10)
    build_layout(p.lake, cent, LayoutConfig())
    f32 = dedup_scores_by_bucket(p.lake, incremental=False).frame
    build_layout(p.lake, cent, LayoutConfig(dtype="float16"))
    f16 = dedup_scores_by_bucket(p.lake, incremental=False).frame
    j = f32.join(f16, on="uid")
    assert np.abs(j["max_sim_to_earlier"] - j["max_sim_to_earlier_right"]).max() < 2e-3
    d32 = is_duplicate(j["max_sim_to_earlier"].to_numpy(), 0.01)
    d16 = is_duplicate(j["max_sim_to_earlier_right"].to_numpy(), 0.01)
    assert d32.sum() > 0 and (d32 != d16).mean() < 0.01


def test_vector_and_uid_encodings_round_trip():
    x = _unit(np.random.default_rng(0).standard_normal((5, 7)))
    assert np.array_equal(decode_vectors(encode_vectors(x, "float32"), "float32"), x)
    assert np.abs(decode_vectors(encode_vectors(x, "float16"), "float16") - x).max() < 1e-3
    u = [make_uid("d", "s", str(i)) for i in range(6)]
    b = uids_to_bytes(u)
    assert b.shape == (6, 16) and b.dtype == np.uint8
    assert bytes_to_uids(b).tolist() == u and u128_to_uids(uids_to_u128(u)) == u
    assert int(uids_to_u128(u)[2, 0]) == int(u[2][:16], 16)
    col = binary_uid_column(u)
    assert np.array_equal(binary_column_to_bytes(col), b)
    # byte order == string order, so sorting compact uids sorts like the hex strings
    order = np.lexsort((uids_to_u128(u)[:, 1], uids_to_u128(u)[:, 0]))
    assert [u[i] for i in order] == sorted(u)
    with pytest.raises(ValueError, match="32 hex"):
        uids_to_bytes(["abc"])
    with pytest.raises(ValueError, match="non-hex"):  # the right length, not hex
        uids_to_bytes([u[0], "g" * 32])
    assert np.array_equal(uids_to_bytes([x.upper() for x in u]), b)
    assert np.array_equal(uids_to_bytes(pl.Series(u).slice(2, 3)), b[2:5])  # an offset Arrow buffer


def test_training_sample_is_bounded_and_seeded(tmp_path):
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 300)
    s1, n = training_sample(p.lake, 250, seed=3)
    s2, _ = training_sample(p.lake, 250, seed=3)
    assert n == 900 and s1.shape == (250, D) and np.array_equal(s1, s2)
    full, _ = training_sample(p.lake, 10_000)
    assert full.shape == (900, D)


def test_kmeans_sample_is_bounded_in_memory_not_by_k(tmp_path, monkeypatch):
    from curation.select import layout

    # 10M x 512 at k = 10,000: 1 GiB of sample (52 per centroid), not 256 x k = 2.56M rows (5 GiB)
    assert layout.sample_rows(10_000, 512) == 524_288
    assert layout.sample_rows(1_000, 512) == 256_000  # the 1M regime: the bound does not bind
    assert layout.sample_rows(100_000, 512) == 3_900_000  # never below 39 per centroid
    assert layout.sample_rows(10_000, 512, sample_bytes=None) == 2_560_000
    p = SynPool(tmp_path / "lake")
    p.shard("00000", 400)
    asked = []
    real = layout.training_sample
    monkeypatch.setattr(layout, "training_sample", lambda lake, n, seed=0: asked.append(n) or real(lake, n, seed))
    layout.fit_centroids(p.lake, 4, niter=3, sample_bytes=100 * 4 * D)
    assert layout.embedding_width(p.lake) == D and asked == [max(4 * 39, 100)]


def test_two_level_products_equal_faiss_ivf_search_and_build_once(tmp_path, monkeypatch):
    """The CPU scan (products per probed cell) picks what faiss's IndexIVFFlat picks with the
    same cells and nprobe; the layout builds the assigner once for all its partitions."""
    import faiss

    import curation.select.layout as L
    from curation.select.clustering import TwoLevelAssigner

    rng = np.random.default_rng(4)
    cent = train_centroids(_unit(rng.standard_normal((6000, 24))), 2500, niter=5)
    x = _unit(cent[rng.integers(0, 2500, 3000)] + 0.2 * rng.standard_normal((3000, 24)))
    a = TwoLevelAssigner(cent)
    ids, cos = a(x, block=700)  # several blocks
    quant = faiss.IndexFlatIP(24)
    ivf = faiss.IndexIVFFlat(quant, 24, a.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed, ivf.cp.niter, ivf.cp.spherical = 0, 20, True
    ivf.train(cent)
    ivf.add(cent)
    ivf.nprobe = a.nprobe
    dist, lab = ivf.search(x, 1)
    assert a.nprobe < a.nlist and np.array_equal(ids, lab[:, 0])
    np.testing.assert_allclose(cos, dist[:, 0], atol=1e-5)
    built = []
    real = L.assigner

    def counting(*args, **kw):
        built.append(1)
        return real(*args, **kw)

    lake = Lake(str(tmp_path / "lake"))
    for i in range(3):
        lake.write("embeddings", pa.table({"uid": [make_uid("t", str(i), str(j)) for j in range(50)], "shard": [f"t-{i}"] * 50,
                                           "image_emb": matrix_to_list_column(x[50 * i : 50 * i + 50]),
                                           "encoder": ["e"] * 50}), partition=f"t-{i}")
    monkeypatch.setattr(L, "assigner", counting)
    L.build_layout(lake, cent, LayoutConfig(), assign_method="two-level")
    assert built == [1]
    got = lake.read("assignments", columns=["uid", "cluster_id"]).sort("uid")
    want = pl.DataFrame({"uid": [make_uid("t", str(i), str(j)) for i in range(3) for j in range(50)],
                         "cluster_id": ids[:150]}).sort("uid")
    assert got["cluster_id"].to_list() == want["cluster_id"].to_list()


def test_two_level_assignment_and_kmeans_agree_with_flat():
    rng = np.random.default_rng(1)
    centers = _unit(rng.standard_normal((400, 32)))
    c = rng.integers(0, 400, 40_000)
    x = _unit(centers[c] + 0.08 * rng.standard_normal((40_000, 32)))
    cent = train_centroids(x, 400, niter=8)
    i_flat, c_flat = assign(x, cent)
    i_two, c_two = assign_two_level(x, cent)
    assert (i_two == i_flat).mean() > 0.99
    np.testing.assert_array_less(c_two[i_two != i_flat], c_flat[i_two != i_flat] + 1e-6)  # never better than exact
    i_all, _ = assign_two_level(x, cent, nprobe=coarse_lists(400))  # every cell probed: exact
    assert np.array_equal(i_all, i_flat)
    two = train_centroids_two_level(x, 400, niter=8)
    assert two.shape == (400, 32) and np.allclose(np.linalg.norm(two, axis=1), 1, atol=1e-5)
    _, cos_two = assign(x, two)
    assert cos_two.mean() > c_flat.mean() - 0.02  # about as tight as the flat fit


def test_compact_alignment_sorts_hashed_uids_and_names_missing_rows():
    from curation.select.pool_tables import align_compact, sort_order

    uids = uid_strings([make_uid("d", "s", str(i)) for i in range(500)])  # hashes: not sorted
    order = sort_order(uids)
    assert order is not None and sort_order(uids[order]) is None
    assert list(uids[order]) == sorted(uids.tolist())
    ref = uids[order]
    vals = np.arange(500, dtype=np.float32)
    shuffled = np.random.default_rng(0).permutation(500)
    got = align_compact(ref, uids[shuffled], vals[shuffled], "t")
    np.testing.assert_array_equal(got, vals[order])  # each uid's own value
    assert align_compact(ref, ref, vals, "t") is not None
    with pytest.raises(ValueError, match=r"dedup_scores: got no rows for 2 of 500 pool uids.*\(re-run\)"):
        align_compact(ref, ref[2:], vals[2:], "dedup_scores", "re-run")
    short = uid_strings(["b", "a", "c"])  # other uid shapes take the string sort
    np.testing.assert_array_equal(sort_order(short), [1, 0, 2])


def test_flush_sort_gathers_fixed_width_columns_across_chunks():
    """The layout writer's sort: rows of a chunked table by cluster and inside a cluster in
    SemDeDup order (cos ascending, ties by uid), fixed-width binary columns gathered by numpy,
    a variable-width one through Arrow's take: the same rows as Arrow's own sort."""
    from curation.select.layout import _sorted_by_cluster

    rng = np.random.default_rng(3)
    chunks = []
    for n in (5, 0, 9, 7):
        ids = rng.integers(0, 4, n).astype(np.int32)
        chunks.append(pa.table({
            "cluster_id": pa.array(ids, pa.int32()),
            "cos_to_centroid": pa.array(rng.integers(0, 3, n) / 4, pa.float32()),  # ties: broken by uid
            "uid": pa.array([rng.bytes(16) for _ in range(n)], pa.binary()),
            "emb_float32": encode_vectors(rng.standard_normal((n, 3)).astype(np.float32), "float32"),
            "shard": pa.array([f"s{'x' * int(i)}" for i in rng.integers(0, 3, n)], pa.string()),
            "note": pa.array([rng.bytes(int(i)) for i in rng.integers(1, 4, n)], pa.binary()),
        }))
    t = pa.concat_tables(chunks)
    got = _sorted_by_cluster(t, ["uid", "emb_float32", "note"])
    want = t.sort_by([("cluster_id", "ascending"), ("cos_to_centroid", "ascending"), ("uid", "ascending")])
    assert got.schema == t.schema and got.num_rows == 21
    assert got.combine_chunks().equals(want.combine_chunks())


def test_layout_nprobe_reaches_the_two_level_assignment(tmp_path):
    """``LayoutConfig.nprobe`` sets the cells the two-level assignment scans: every cell is the
    exact (flat) assignment, one cell of three misplaces rows near a cell border."""
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 800)
    cent, _ = fit_centroids(p.lake, K, niter=10)
    got = {}
    for name, method, nprobe in (("flat", "flat", None), ("all", "two-level", coarse_lists(K)), ("one", "two-level", 1)):
        build_layout(p.lake, cent, LayoutConfig(clusters_per_bucket=4, nprobe=nprobe), assign_method=method)
        got[name] = p.lake.read("assignments", columns=["uid", "cluster_id"]).sort("uid")["cluster_id"].to_numpy()
    assert np.array_equal(got["all"], got["flat"])
    assert 0 < (got["one"] != got["flat"]).sum() < got["flat"].size
    with pytest.raises(ValueError, match="nprobe"):
        LayoutConfig(nprobe=0)


def test_recall_curve_is_the_measured_recall_of_every_nprobe_and_calibration_picks_the_fewest():
    """The recall curve from one exact search (rank of each row's true cell) equals, for every
    nprobe, the fraction of rows the scan with that nprobe puts in their exact nearest cluster;
    calibrating for a target picks the fewest cells reaching it."""
    from curation.select.clustering import TwoLevelAssigner, exact_nearest

    rng = np.random.default_rng(7)
    cent = train_centroids(_unit(rng.standard_normal((5000, 16))), 900, niter=5)
    x = _unit(cent[rng.integers(0, 900, 2000)] + 0.35 * rng.standard_normal((2000, 16)))
    a = TwoLevelAssigner(cent)
    curve = a.recall_curve(x)
    exact = exact_nearest(x, cent)[0]
    assert np.array_equal(exact, assign(x, cent)[0])
    assert curve.shape == (a.nlist,) and curve[-1] == 1.0 and np.all(np.diff(curve) >= 0)
    for p in (1, 2, 5, a.nlist // 2, a.nlist):
        ids, _ = TwoLevelAssigner(cent, nprobe=p)(x)
        assert curve[p - 1] == pytest.approx((ids == exact).mean(), abs=1e-12), p
    assert curve[0] < 0.9  # the case is not trivial: one cell misses rows
    target = float(curve[3]) - 1e-6  # reached first at nprobe 4 (or fewer when the curve is flat)
    a.calibrate(x, target)
    assert curve[a.nprobe - 1] >= target and (a.nprobe == 1 or curve[a.nprobe - 2] < target)
    assert (a(x)[0] == exact).mean() >= target
    with pytest.raises(ValueError, match="target_recall"):
        a.calibrate(x, 0.0)


def test_layout_reports_its_assignment_recall_and_a_target_recall_sets_nprobe(tmp_path):
    """Every two-level layout write audits some rows of each shard against the exact search and
    reports the recall; with ``target_recall`` the first shard calibrates nprobe (here every row
    of it, so its audited rows are all found); a flat layout reports recall 1."""
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 600)
    cent, _ = fit_centroids(p.lake, K, niter=10)
    flat = build_layout(p.lake, cent, LayoutConfig(clusters_per_bucket=4), assign_method="flat")
    assert flat.assignment.recall == 1.0 and flat.assignment.metadata() == {"assign_method": "flat", "assign_recall": 1.0}
    one = build_layout(p.lake, cent, LayoutConfig(clusters_per_bucket=4, nprobe=1), assign_method="two-level")
    a = one.assignment
    assert (a.method, a.nprobe, a.audited) == ("two-level", 1, 3 * 32) and a.calibration is None
    # the reported hits are the audited rows whose WRITTEN cluster is the exact nearest one
    from curation.embed.pool_reader import iter_pool_partitions
    from curation.select.layout import _audit_rows

    stored = dict(zip(*p.lake.read("assignments", columns=["uid", "cluster_id"]).to_dict(as_series=False).values()))
    hits = 0
    for shard, uids, mats, _ in iter_pool_partitions(p.lake, columns=("image",)):
        pick = _audit_rows(shard, len(uids), 32)
        exact = assign(mats["image"][pick], cent)[0]
        hits += sum(stored[str(u)] == int(c) for u, c in zip(np.asarray(uids)[pick], exact))
    assert a.hits == hits and 0 < a.recall < 1 and a.recall_stderr > 0
    tuned = build_layout(p.lake, cent, LayoutConfig(clusters_per_bucket=4, target_recall=1.0), assign_method="two-level")
    t = tuned.assignment
    assert t.calibration is not None and t.calibration[t.nprobe - 1] == 1.0 and t.nprobe > 1
    assert t.hits == t.audited == 96  # shards of 600 rows: every row calibrated, so every audited row found
    md = t.metadata()
    assert md["assign_nprobe"] == t.nprobe and md["assign_audited_rows"] == 96
    up = update_layout(p.lake, cent, LayoutConfig(clusters_per_bucket=4, target_recall=1.0), assign_method="two-level")
    assert up.assignment is None  # nothing streamed
    with pytest.raises(ValueError, match="at most one"):
        LayoutConfig(nprobe=3, target_recall=0.9)
    with pytest.raises(ValueError, match="target_recall"):
        LayoutConfig(target_recall=1.5)


def test_calibration_rows_come_from_shards_spread_over_the_pool(tmp_path, monkeypatch):
    """``target_recall`` calibrates on rows of up to CALIBRATION_SHARDS shards spread evenly
    over the streamed ones (the first and the last included), an equal share of each, drawn
    apart from the audit's rows; with fewer shards, from every one of them."""
    from curation.select import layout as layout_mod
    from curation.select.layout import _audit_rows, _calibration_rows

    p = SynPool(tmp_path / "lake")
    for i in range(20):
        p.shard(f"{i:05d}", 100)
    names = [f"syn-{i:05d}" for i in range(20)]
    monkeypatch.setattr(layout_mod, "CALIBRATION_ROWS", 240)
    x, picked = _calibration_rows(p.lake, None)
    assert picked == [names[i] for i in (0, 3, 5, 8, 11, 14, 16, 19)]
    assert x.shape == (8 * 30, D)
    from curation.embed.pool_reader import iter_pool_partitions

    for shard, _u, mats, _ in iter_pool_partitions(p.lake, shards=[picked[0]], columns=("image",)):
        rows = _audit_rows(shard, 100, 30, "calibrate")
        np.testing.assert_array_equal(x[:30], mats["image"][rows])
        assert not np.array_equal(rows, _audit_rows(shard, 100, 30))  # not the audit's rows
    x2, picked2 = _calibration_rows(p.lake, names[5:7])  # an update streaming two shards
    assert picked2 == names[5:7] and x2.shape[0] == 2 * 100  # 120 wanted from each, 100 there


def test_dedup_groups_view_reads_the_chosen_clusters_from_the_layout(tmp_path, monkeypatch):
    """The duplicate-groups view takes its clusters' vectors from pool_by_cluster (only those
    clusters' rows) and shows the same groups as from the embeddings of their shards."""
    from curation.evaluate import views
    from curation.select import layout as layout_mod

    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 600)
    _curated(p.lake)
    reads = []
    orig = layout_mod.read_bucket
    monkeypatch.setattr(layout_mod, "read_bucket", lambda *a, **kw: reads.append(kw.get("clusters")) or orig(*a, **kw))
    got = views.dedup_groups(p.lake, tmp_path / "landing", eps=0.05, n_groups=5)
    assert got["removed"] > 0 and len(got["groups"]) == 5
    assert reads and all(c is not None for c in reads)  # cluster-filtered reads of the layout
    shown = {g["cluster_id"] for g in got["groups"]}
    assert shown <= {c for cs in reads for c in cs}
    monkeypatch.setattr(layout_mod, "layout_dtype", lambda lake: "float16")  # the embeddings path
    reads.clear()
    ref = views.dedup_groups(p.lake, tmp_path / "landing", eps=0.05, n_groups=5)
    assert not reads
    key = lambda d: [(g["cluster_id"], g["kept"]["uid"], [(s["uid"], round(s["cos"], 6), s["m"]) for s in g["removed"]])
                     for g in d["groups"]]
    assert key(got) == key(ref) and got["curve"] == ref["curve"]


def test_two_level_kmeans_refinement_recovers_concepts_cut_by_cell_borders():
    """The hierarchy alone pins each coarse cell's centroids inside it; Lloyd iterations over all
    centroids afterwards find planted concepts about as well as a flat fit."""
    from curation.select.clustering import _lloyd_step

    # the update itself: normalized mean of each centroid's rows, an empty centroid stays
    x = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
    cent = np.array([[1, 0], [0, 1], [0, -1]], np.float32)
    got = _lloyd_step(x, cent, np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(got, [[2 / np.sqrt(5), 1 / np.sqrt(5)], [-1 / np.sqrt(2), 1 / np.sqrt(2)], [0, -1]], atol=1e-6)

    rng = np.random.default_rng(5)
    centers = _unit(rng.standard_normal((300, 32)))
    x = _unit(centers[rng.integers(0, 300, 30_000)] + 0.15 * rng.standard_normal((30_000, 32)))
    recovery = {}
    for refine in (0, 5):
        cent = train_centroids_two_level(x, 300, niter=10, seed=0, refine=refine)
        recovery[refine] = float((centers @ cent.T).max(axis=1).mean())
    assert recovery[0] < 0.93 and recovery[5] > 0.96


def test_reading_some_clusters_picks_their_rows_from_their_row_groups(tmp_path, monkeypatch):
    """``read_bucket(clusters=...)`` reads only the row groups that may hold a wanted cluster and
    picks the wanted rows itself (no row filter in the scan): the same rows, in the same order,
    as a filtered scan, for one cluster, several, all, none and an unknown one; a chunked read
    holds views of the wanted runs; the memory-mapped reads are counted, and reading one
    cluster counts fewer bytes than reading its bucket."""
    import pyarrow.compute as pc
    import pyarrow.fs as pa_fs

    from curation.select import layout as layout_mod
    from curation.select.layout import RowChunks, layout_dataset, mapped_bytes, read_bucket

    monkeypatch.setattr(layout_mod, "LAYOUT_ROW_GROUP_ROWS", 64)
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 900)
    _curated(p.lake)
    assert layout_dataset(p.lake).filesystem.base_fs.equals(pa_fs.LocalFileSystem(use_mmap=True))
    plain = p.lake.table(LAYOUT_TABLE).to_pyarrow_dataset()  # deltalake's own reader, a row filter
    for bucket in p.lake.partitions(LAYOUT_TABLE):
        present = np.unique(plain.to_table(columns=["cluster_id"], filter=pc.field("bucket") == bucket)
                            .column("cluster_id").to_numpy())
        assert present.size >= 2
        for want in ([present[-1]], [present[0], present[-1]], present.tolist(), [], [10_000]):
            flt = (pc.field("bucket") == bucket) & pc.field("cluster_id").isin(pa.array(np.asarray(want, np.int32), pa.int32()))
            ref = plain.to_table(columns=["uid", "cluster_id", "cos_to_centroid", "emb_float32"], filter=flt)
            before = mapped_bytes()
            got = read_bucket(p.lake, bucket, clusters=want, dtype="float32")
            counted = mapped_bytes() - before
            rc = read_bucket(p.lake, bucket, clusters=want, dtype="float32", chunked=True)
            assert got.uids.tolist() == binary_column_to_bytes(ref.column("uid")).tolist() == rc.uids.tolist()
            assert got.cluster_ids.tolist() == ref.column("cluster_id").to_pylist() == rc.cluster_ids.tolist()
            np.testing.assert_array_equal(got.cos, ref.column("cos_to_centroid").to_numpy())
            ref_x = decode_vectors(ref.column("emb_float32"), "float32")
            assert got.x.shape[0] == ref.num_rows and isinstance(rc.x, RowChunks) and rc.x.shape[0] == ref.num_rows
            if ref.num_rows:
                np.testing.assert_array_equal(got.x, ref_x)
                np.testing.assert_array_equal(rc.x[np.arange(ref.num_rows)], ref_x)
                assert all(not c.flags.owndata for c in rc.x.chunks)  # views of the read, not copies
            if want == [present[-1]]:
                one = counted
        before = mapped_bytes()
        whole = read_bucket(p.lake, bucket, dtype="float32")
        assert 0 < one < mapped_bytes() - before
        assert whole.uids.shape[0] == plain.count_rows(filter=pc.field("bucket") == bucket)


@pytest.mark.parametrize("packed, min_files", [(True, 1), (False, 1), (True, 99)])
def test_a_chunked_read_views_the_mapped_pages_or_decodes_through_arrow(tmp_path, monkeypatch, packed, min_files):
    """A chunked read of a local layout holds views of the mapped files' pages (no decoded copy)
    for the vectors, and for the uid, cluster and cos columns when the bucket spans
    ``MAPPED_SMALL_MIN_FILES`` files (here 2: 1 views them, 99 decodes them); a layout written
    before the cluster and cos columns were stored PLAIN (``packed`` False) views its uids and
    vectors and decodes those two through Arrow; when no file is in the layout's own form (here:
    by patching the page check), every column goes through Arrow. Every way gives the same
    rows, vectors and full SemDeDup scores, and add-only scores within float32 rounding."""
    import mmap

    import pyarrow.parquet as pq

    from curation.select import layout as layout_mod
    from curation.select.layout import _bucket_dataset, _fragments, _mapped_columns, read_bucket
    from curation.storage import parquet_pages
    from curation.storage.lake import PACKED_COLUMNS

    monkeypatch.setattr(layout_mod, "LAYOUT_ROW_GROUP_ROWS", 64)
    monkeypatch.setattr(layout_mod, "MAPPED_SMALL_MIN_FILES", min_files)
    if not packed:
        monkeypatch.setitem(PACKED_COLUMNS, LAYOUT_TABLE, ())
    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 600)
    cent, cfg = _curated(p.lake)
    p.shard("00003", 200)  # a new shard: an update file beside each bucket's built one
    update_layout(p.lake, cent, cfg)
    files = [os.path.join(r, f) for r, _, fs in os.walk(p.lake._local_path(LAYOUT_TABLE)) for f in fs
             if f.endswith(".parquet") and "_delta_log" not in r]
    assert len(files) > len(p.lake.partitions(LAYOUT_TABLE))
    for f in files:  # the built files (pyarrow) and the update's (deltalake) alike
        md = pq.ParquetFile(f).metadata
        cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
        assert cols["cluster_id"].statistics.has_min_max  # still prunes row groups
        assert cols["cluster_id"].has_dictionary_page != packed and cols["cos_to_centroid"].has_dictionary_page != packed
    asg = [os.path.join(r, f) for r, _, fs in os.walk(p.lake._local_path("assignments")) for f in fs
           if f.endswith(".parquet") and "_delta_log" not in r]
    assert len(asg) >= 2
    for f in asg:  # the build's assignments (pyarrow) and the update's (deltalake): cosines without a dictionary
        md = pq.ParquetFile(f).metadata
        cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
        assert not cols["cos_to_centroid"].has_dictionary_page and not cols["uid"].has_dictionary_page

    def root(a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    def reads():
        out = {}
        for b in p.lake.partitions(LAYOUT_TABLE):
            r = read_bucket(p.lake, b, clusters=None, dtype="float32", chunked=True)
            some = read_bucket(p.lake, b, clusters=[int(r.cluster_ids[0])], dtype="float32", chunked=True)
            out[b] = (r, some)
        return out

    version = p.lake.table(LAYOUT_TABLE).version()
    b0 = p.lake.partitions(LAYOUT_TABLE)[0]
    ds = _bucket_dataset(p.lake, b0, version)
    kinds = {"uid": "uint8", "cluster_id": "int32", "cos_to_centroid": "float32", "emb_float32": "float32"}
    viewed = {"uid", "emb_float32"} | ({"cluster_id", "cos_to_centroid"} if packed else set())
    assert set(_mapped_columns(ds, _fragments(ds, b0, None)[0], kinds)) == viewed
    seen: list[set] = []
    real = layout_mod._mapped_columns

    def spy(ds, frags, kinds):
        out = real(ds, frags, kinds)
        seen.append(set(out))
        return out

    monkeypatch.setattr(layout_mod, "_mapped_columns", spy)
    mapped = reads()
    assert seen and all(s == (viewed if min_files == 1 else {"emb_float32"}) for s in seen)
    assert all(isinstance(root(c), mmap.mmap) for r, _ in mapped.values() for c in r.x.chunks)
    full = dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame
    update = dedup_scores_by_bucket(p.lake, config=cfg, incremental=True)
    assert update.mode == "incremental"
    monkeypatch.setattr(parquet_pages, "column_views", lambda *a, **k: {})
    assert _mapped_columns(ds, _fragments(ds, b0, None)[0], kinds) == {}
    decoded = reads()
    assert not any(isinstance(root(c), mmap.mmap) for r, _ in decoded.values() for c in r.x.chunks)
    for b, (r, some) in mapped.items():
        for got, ref in ((r, decoded[b][0]), (some, decoded[b][1])):
            assert got.uids.tolist() == ref.uids.tolist() and got.cluster_ids.tolist() == ref.cluster_ids.tolist()
            assert got.uids.dtype == ref.uids.dtype and got.cluster_ids.dtype == ref.cluster_ids.dtype
            np.testing.assert_array_equal(got.cos, ref.cos)
            rows = np.arange(ref.x.shape[0])
            np.testing.assert_array_equal(got.x[rows], ref.x[rows])
    assert dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame.equals(full)
    again = dedup_scores_by_bucket(p.lake, config=cfg, incremental=True)
    # the add-only products run over the rows as they lie (pages viewed vs Arrow's chunks):
    # cut into other products, where BLAS rounds by a product's row split (OpenBLAS's Haswell
    # kernels) M may differ in the last bit; the full pass gathers each cluster: exact
    assert again.mode == "incremental"
    _assert_same_scores(again.frame, update.frame)


def test_kept_runs_are_views_of_consecutive_kept_rows():
    from curation.select.layout import _kept_runs

    a, b = np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(10, 16, dtype=np.float32).reshape(3, 2)
    same = _kept_runs([a, b], None)
    assert len(same) == 2 and same[0] is a and same[1] is b
    keep = np.array([1, 1, 0, 1, 1, 0, 0, 1], bool)
    runs = _kept_runs([a, b], keep)
    assert [r.tolist() for r in runs] == [a[0:2].tolist(), a[3:5].tolist(), b[2:3].tolist()]
    assert all(r.base is not None and (np.shares_memory(r, a) or np.shares_memory(r, b)) for r in runs)
    whole = _kept_runs([a, b], np.array([1] * 5 + [0] * 3, bool))
    assert len(whole) == 1 and whole[0] is a
    assert _kept_runs([a, b], np.zeros(8, bool)) == []


def test_row_chunks_gather_runs_and_scattered_rows():
    """``RowChunks[idx]`` equals indexing the concatenated chunks, whether a chunk's wanted rows
    form one run in order (copied whole), are out of order, or repeat; float16 chunks (a
    float16 layout, held as stored) gather into float32 with the values of a float32 decode."""
    from curation.select.layout import RowChunks

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float16):
        chunks = [rng.standard_normal((n, 4)).astype(dtype) for n in (6, 1, 9)]
        whole = np.concatenate(chunks).astype(np.float32)
        rc = RowChunks(chunks)
        for idx in ([7, 0, 1, 2, 8, 9, 3], [2, 1, 0, 6, 15, 14], [3, 3, 10], [6], list(range(16)), [12, 9, 10, 11, 13]):
            got = rc[np.array(idx)]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, whole[idx])


def test_float16_bucket_is_held_as_stored_and_gathered_as_float32(tmp_path):
    """A float16 layout's bucket read in chunks holds the stored float16 (half the memory of
    a float32 decode) and gathers/multiplies the same float32 values as the whole decode."""
    from curation.select.layout import RowChunks, read_bucket

    p = SynPool(tmp_path / "lake")
    for i in range(2):
        p.shard(f"{i:05d}", 300)
    cent, _ = fit_centroids(p.lake, 4, niter=5)
    build_layout(p.lake, cent, LayoutConfig(dtype="float16", flush_rows=200, spill=False))  # a file per flush
    bucket = p.lake.partitions("pool_by_cluster")[0]
    whole = read_bucket(p.lake, bucket, dtype="float16")
    rc = read_bucket(p.lake, bucket, dtype="float16", chunked=True).x
    assert isinstance(rc, RowChunks) and len(rc.chunks) > 1
    assert all(c.dtype == np.float16 for c in rc.chunks) and whole.x.dtype == np.float32
    idx = np.random.default_rng(0).permutation(rc.shape[0])
    np.testing.assert_array_equal(rc[idx], whole.x[idx])
    rows = np.arange(rc.shape[0])
    np.testing.assert_allclose(rc.matmul_rows(rows, whole.x[:3], min_run=1), whole.x @ whole.x[:3].T, atol=1e-6, rtol=0)



def test_update_in_place_equals_gathered_update():
    """The add-only update's products straight from a bucket's chunks (``members``: the
    cluster's row numbers in SemDeDup order, runs of whole chunks and short scattered runs)
    equal the products of the gathered cluster: the same M within float32 rounding, the same
    positions gaining nothing; ``matmul_rows`` equals the gathered product on either path."""
    from curation.select.layout import RowChunks, _update_m

    rng = np.random.default_rng(9)
    chunks = []
    for n in (70, 3, 120, 45):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        chunks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    rc = RowChunks(chunks)
    whole = np.concatenate(chunks)
    y = whole[[5, 80, 200]]
    for idx in (np.arange(0, 238), np.r_[0:60, 73:193, 200:238], np.array([1, 4, 9, 70, 71, 100])):
        for min_run in (1, 32, 10**6):  # run by run, and gathered
            np.testing.assert_allclose(rc.matmul_rows(idx, y, min_run=min_run), whole[idx] @ y.T, atol=1e-6, rtol=0)
    members = rng.permutation(np.r_[0:60, 73:193, 200:238])  # a cluster's rows, in its SemDeDup order
    is_new = np.zeros(members.size, bool)
    is_new[rng.choice(members.size, 12, replace=False)] = True
    x_ord = whole[members].astype(np.float64)
    sims = x_ord @ x_ord.T
    for old_m in (np.full(members.size, -np.inf, np.float32), rng.uniform(-1, 1, members.size).astype(np.float32)):
        ref = _update_m(whole[members], is_new, old_m, block=5)
        got = _update_m(rc, is_new, old_m, block=5, members=members)
        assert np.array_equal(np.isneginf(ref), np.isneginf(got))
        fin = ~np.isneginf(ref)
        np.testing.assert_allclose(got[fin], ref[fin], atol=1e-6, rtol=0)
        # by the definition, member by member: a new one's M is its max over every earlier member
        # (-1 for the first); an old one keeps max(old M, its max over the NEW members before it)
        want = np.empty(members.size)
        for i in range(members.size):
            if is_new[i]:
                want[i] = sims[i, :i].max() if i else -1.0
            else:
                earlier_new = sims[i, :i][is_new[:i]]
                want[i] = max(float(old_m[i]), earlier_new.max() if earlier_new.size else -np.inf)
        assert np.array_equal(np.isneginf(want), np.isneginf(got))
        np.testing.assert_allclose(got[fin], want[fin], atol=1e-6, rtol=0)

def test_bucket_gains_equal_the_per_cluster_update_bit_for_bit(monkeypatch):
    """The gain mode for a whole bucket at once (``_bucket_gains``) returns, for every cluster,
    exactly what ``_update_m`` returns for that cluster alone (the same products, so the same
    bits): clusters lying in long runs (cut into pieces), in short scattered runs (gathered),
    split across chunks, with a new member first (M = -1), with none new (no gain); and it
    matches the definition member by member. Too wide for the budget: None."""
    import curation.select.layout as L
    from curation.select.layout import RowChunks, _bucket_gains, _update_m

    # pieces of ~70 rows for 9 new members of 24 dims (the default is sized for 512 dims), as
    # where numpy's OpenBLAS multiplies small products directly; elsewhere every run is whole
    monkeypatch.setattr(L, "MATMUL_PIECE_MNK", 70 * 9 * 24)
    monkeypatch.setattr(L, "MATMUL_MIN_PIECE_ROWS", 16)
    monkeypatch.setattr(L.native_blas, "direct_sgemm", lambda: False)
    assert L.piece_rows(9, 24) is None
    monkeypatch.setattr(L.native_blas, "direct_sgemm", lambda: True)
    assert L.piece_rows(9, 24) == 70 and L.piece_rows(40, 24) is None
    rng = np.random.default_rng(21)
    chunks = []
    for n in (230, 4, 1, 150, 3, 90):
        x = rng.standard_normal((n, 24)).astype(np.float32)
        chunks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    rc = RowChunks(chunks)
    whole = np.concatenate(chunks)
    rows_all = rng.permutation(whole.shape[0])
    # cluster 0: one long run (rows 0..229) and chunk 3; cluster 1: scattered single rows
    # (gathered); cluster 2: chunk 5 and the small chunks; cluster 3: nothing new
    clusters = [np.r_[0:230, 235:385], rows_all[:40], np.r_[230:235, 385:388, 388:478], np.r_[478:whole.shape[0]]]
    clusters[1] = np.setdiff1d(clusters[1], np.concatenate([clusters[0], clusters[2], clusters[3]]))
    members, is_new = [], []
    for k, c in enumerate(clusters):
        order = rng.permutation(c)  # the cluster's SemDeDup order
        new = np.zeros(order.size, bool)
        if k < 3:
            new[rng.choice(order.size, min(9, order.size // 2), replace=False)] = True
        if k == 2:
            new[0] = True  # a new member first in its cluster
        members.append(order)
        is_new.append(new)
    rows = np.concatenate(members)
    seg = np.concatenate([[0], np.cumsum([m.size for m in members])])
    for piece in (None, 7):
        got = _bucket_gains(rc, rows, seg, np.concatenate(is_new), budget_bytes=1 << 30, block=64, piece=piece)
        ref = np.concatenate([
            _update_m(rc, new, np.full(m.size, -np.inf, np.float32), block=64, members=m) if piece is None
            else _update_m(whole[m], new, np.full(m.size, -np.inf, np.float32), block=64)
            for m, new in zip(members, is_new)])
        if piece is None:  # the per-cluster path's own pieces: the same bits
            assert np.array_equal(got, ref)
        else:
            assert np.array_equal(np.isneginf(got), np.isneginf(ref))
            np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], atol=1e-6, rtol=0)
        for m, new, a in zip(members, is_new, seg[:-1]):
            x = whole[m].astype(np.float64)
            sims = x @ x.T
            for i in range(m.size):  # the definition: a new member's M, an old member's gain
                if new[i]:
                    want = sims[i, :i].max() if i else -1.0
                else:
                    earlier_new = sims[i, :i][new[:i]]
                    want = earlier_new.max() if earlier_new.size else -np.inf
                assert (np.isneginf(want) and np.isneginf(got[a + i])) or abs(got[a + i] - want) < 1e-6
    assert got[seg[2]] == -1.0 and np.isneginf(got[seg[3]:]).all()
    assert _bucket_gains(rc, rows, seg, np.concatenate(is_new), budget_bytes=4 * rows.size * 9 * 4 - 1, block=64) is None
    assert _bucket_gains(rc, rows, seg, np.concatenate(is_new), budget_bytes=1 << 30, block=8) is None  # 9 new > block


def test_add_only_update_scores_buckets_whole_or_cluster_by_cluster_alike(tmp_path, monkeypatch):
    """A new shard's add-only update takes the whole-bucket gain pass, and its in-process tasks
    that end after the driver published the stored scores return only the new members and the
    old ones whose gain beats their stored M. With that pass refused (``_bucket_gains`` -> None:
    the cluster-by-cluster path), or with the tasks ending before the publication (every gain
    returned, the driver keeps the max), the update is the same table, bit for bit."""
    import curation.select.layout as L

    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 500)
    cent, cfg = _curated(p.lake)
    p.shard("00003", 300)
    update_layout(p.lake, cent, cfg)
    calls, returned = [], []
    orig, orig_items = L._bucket_gains, L._run_items
    monkeypatch.setattr(L, "_bucket_gains", lambda *a, **kw: calls.append(1) or orig(*a, **kw))

    def spy_items(*a, **kw):
        out = orig_items(*a, **kw)
        returned.append(out[0].shape[0])
        return out

    monkeypatch.setattr(L, "_run_items", spy_items)

    class Published(L._StoredScores):  # the tasks end after the driver published the stored scores
        def __init__(self):
            super().__init__()
            self.ready = threading.Event()

        def publish(self, *a):
            super().publish(*a)
            self.ready.set()

        def get(self):
            self.ready.wait(10)
            return super().get()

    monkeypatch.setattr(L, "_StoredScores", Published)
    whole = dedup_scores_by_bucket(p.lake, config=cfg)
    assert whole.mode == "incremental" and len(calls) == len(p.lake.partitions(LAYOUT_TABLE))
    monkeypatch.setattr(L, "_bucket_gains", lambda *a, **kw: None)
    by_cluster = dedup_scores_by_bucket(p.lake, config=cfg)
    assert whole.table.equals(by_cluster.table) and whole.table.num_rows == 1800

    class Withheld(L._StoredScores):  # the tasks end before the publication: every gain returned
        def get(self):
            return None

    monkeypatch.setattr(L, "_bucket_gains", orig)
    monkeypatch.setattr(L, "_StoredScores", Withheld)
    every_gain = dedup_scores_by_bucket(p.lake, config=cfg)
    assert every_gain.table.equals(whole.table)
    # the filtered tasks returned the 300 new rows and fewer old ones than every gain
    assert 300 <= returned[0] == returned[1] < returned[2]


def test_find_locates_hashed_and_counter_uids_in_any_query_order():
    """``_find``: positions of query uids in sorted keys (and whether each is there), for hashed
    uids (the high half decides), counters (the low half decides) and the general case."""
    from curation.select.layout import _find, _keys

    rng = np.random.default_rng(11)
    hashed = rng.integers(0, 256, (5000, 16), dtype=np.uint8)
    counters = np.zeros((5000, 16), np.uint8)
    counters[:, 8:] = np.arange(5000, dtype=">u8").view(np.uint8).reshape(-1, 8)
    mixed = hashed.copy()
    mixed[:, :8] = rng.integers(0, 3, (5000, 1), dtype=np.uint8)  # the high half repeats: general path
    for raw in (hashed, counters, mixed):
        keys = np.unique(_keys(raw))
        q = np.concatenate([rng.permutation(keys)[:3000], _keys(rng.integers(0, 256, (50, 16), dtype=np.uint8))])
        pos, hit = _find(keys, q)
        want_hit = np.isin(q, keys)
        assert np.array_equal(hit, want_hit)
        assert np.array_equal(keys[pos[hit]], q[hit])


def test_clip_recipe_bucket_tasks_read_the_pinned_layout_version_one_bucket_each(tmp_path, monkeypatch):
    """CLIP score and CLIPCov bucket tasks read the layout version their LayoutRef pinned (a
    shard re-laid out with new content afterwards changes nothing they return), each from its
    own bucket's files (no task lists the whole table)."""
    import curation.select.layout as L

    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 300)
    cent, _ = fit_centroids(p.lake, K, niter=10)
    cfg = LayoutConfig(clusters_per_bucket=4, with_text=True)
    build_layout(p.lake, cent, cfg)
    ref = L.LayoutRef.of(p.lake)
    assert ref.version == p.lake.table(LAYOUT_TABLE).version()
    asg = p.lake.read("assignments", columns=["uid", "cluster_id"]).sort("uid")
    uids, cids = asg["uid"].to_numpy(), asg["cluster_id"].to_numpy()
    scores = ref.clip_scores(uids)
    cov = ref.clipcov(uids, cids, 300, max_dense=4096, large="exact", factorized=False)
    p.shard("00001", 300, salt=1)  # same uids, new vectors: its rows are replaced in the layout
    update_layout(p.lake, cent, cfg)
    assert p.lake.table(LAYOUT_TABLE).version() > ref.version
    assert not np.array_equal(L.LayoutRef.of(p.lake).clip_scores(uids), scores)  # the latest differs
    predicates = []
    opened = L.layout_dataset
    monkeypatch.setattr(L, "layout_dataset", lambda lake, dt=None, pred=None: predicates.append(pred) or opened(lake, dt, pred))
    assert np.array_equal(ref.clip_scores(uids), scores)
    for a, b in zip(ref.clipcov(uids, cids, 300, max_dense=4096, large="exact", factorized=False), cov, strict=True):
        assert np.array_equal(a, b)
    assert predicates and all(pr and pr[0][0] == "bucket" for pr in predicates)


def test_score_items_pair_clusters_with_buckets_without_reading_rows(tmp_path, monkeypatch):
    """An update's items come from ``cluster_id // clusters_per_bucket`` and the partition list,
    not from a read of the layout's rows; a wanted cluster with no rows is scored as nothing."""
    import curation.select.layout as L

    p, _cent, cfg, _ref = _two_per_bucket(tmp_path / "lake", 2, 300)  # 4 clusters, 2 per bucket
    assert p.lake.partitions(LAYOUT_TABLE) == ["000000", "000001"]
    monkeypatch.setattr(L.Lake, "dataset", lambda *a, **k: pytest.fail("the layout's rows were read"))
    state = L.layout_state(p.lake)
    items = L._score_items(p.lake, state, {0, 3, 2, 9}, {3, 9}, {0: "a0", 2: "a2"})
    assert items == [("000000", [], {0: "a0"}), ("000001", [3], {2: "a2"})]  # cluster 9's bucket 000004 is absent
    monkeypatch.undo()
    # without the layout state (a build killed before writing it) the rows pair them: the same items
    assert L._score_items(p.lake, None, {0, 3, 2, 9}, {3, 9}, {0: "a0", 2: "a2"}) == items
    v = p.lake.table(LAYOUT_TABLE).version()
    kw = dict(root=p.lake.root, storage_options=None, dtype="float32", d=D, block=64, memory_budget_bytes=1 << 30,
              version=v)
    none = L.bucket_scores(("000000", [7], {}), **kw)  # no rows of cluster 7 in this bucket
    assert [a.shape[0] for a in none] == [0, 0, 0, 0]
    some = L.bucket_scores(("000000", [0, 7], {}), **kw)
    assert some[0].shape[0] > 0 and set(some[1].tolist()) == {0}


def _table_files_keep_their_format(lake: Lake, table: str = LAYOUT_TABLE) -> None:
    """Every file of ``table`` as its writer makes it: uncompressed, no view types; the
    layout's in row groups of at most 1,024 rows in cluster order."""
    import pyarrow.parquet as pq

    for frag in lake.dataset(table).get_fragments():
        md = pq.ParquetFile(frag.path, filesystem=frag.filesystem).metadata
        types = [str(t) for t in pq.read_schema(frag.path, filesystem=frag.filesystem).types]
        assert not any("view" in t for t in types), (frag.path, types)
        groups = [md.row_group(i) for i in range(md.num_row_groups)]
        assert all(g.column(c).compression == "UNCOMPRESSED" for g in groups for c in range(g.num_columns))
        if table != LAYOUT_TABLE:
            continue
        col = md.schema.names.index("cluster_id")
        assert all(g.num_rows <= 1024 for g in groups)
        bounds = [(g.column(col).statistics.min, g.column(col).statistics.max) for g in groups]
        assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:])), bounds


def test_replaced_and_removed_shards_keep_the_layout_and_the_scores_exact(tmp_path, monkeypatch):
    """Shards replaced one after the other, then one removed: every update exact (== a full
    recompute), the layout and assignments keep their file format (deltalake's DELETE rewrote
    their files ZSTD-compressed with view types, and the second replaced shard then failed to
    read its rows from assignments), and a run killed between the layout's commit and the
    assignments' is finished by the next one."""
    import deltalake

    p = SynPool(tmp_path / "lake")
    for i in range(4):
        p.shard(f"{i:05d}", 400)
    cent, cfg = _curated(p.lake)

    def update_and_check(expect_removed):
        up = update_layout(p.lake, cent, cfg)
        assert sorted(up.removed_shards) == expect_removed
        du = _finish(p.lake, cent, cfg, incremental=True)
        _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=cfg, incremental=False).frame)
        assert p.lake.count_rows(LAYOUT_TABLE) == p.lake.count_rows("assignments") == du.frame.height
        _table_files_keep_their_format(p.lake)

    for stem in ("00001", "00002", "00001"):  # the third replaces a shard whose rows a DELETE rewrote
        p.shard(stem, 400, salt=len(stem) + int(stem))
        update_and_check([f"syn-{stem}"])
    p.lake.delete_partition("embeddings", "syn-00003")
    update_and_check(["syn-00003"])
    # killed after the layout dropped the replaced shard's rows, before assignments did
    p.shard("00000", 400, salt=9)
    real = deltalake.DeltaTable.create_write_transaction
    commits = []

    def killed_second(self, *a, **k):
        commits.append(self.table_uri)
        if len(commits) == 2:
            raise RuntimeError("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(deltalake.DeltaTable, "create_write_transaction", killed_second)
    with pytest.raises(RuntimeError, match="killed"):
        update_layout(p.lake, cent, cfg)
    assert [u.rstrip("/").rsplit("/", 1)[-1] for u in commits] == [LAYOUT_TABLE, "assignments"]
    assert p.lake.count_rows(LAYOUT_TABLE) == p.lake.count_rows("assignments") - 400
    monkeypatch.setattr(deltalake.DeltaTable, "create_write_transaction", real)
    update_and_check(["syn-00000"])
    _table_files_keep_their_format(p.lake, "assignments")
    # a lake an older version updated: a shard removed by deltalake's DELETE from files it
    # shared with another (they come back view-typed, ZSTD); the next update reads them and
    # rewrites the ones it touches in format
    p.shard("00005", 300)
    p.shard("00006", 300)
    update_and_check([])  # laid out together: one file per bucket holds both
    p.lake.delete_partition("embeddings", "syn-00005")
    for table in (LAYOUT_TABLE, "assignments"):
        p.lake.table(table).delete("shard = 'syn-00005'")
    with pytest.raises(AssertionError):
        _table_files_keep_their_format(p.lake)
    p.shard("00006", 300, salt=10)
    update_and_check(["syn-00005", "syn-00006"])


def test_an_update_touching_most_of_the_pool_recomputes_every_bucket(tmp_path, caplog):
    """Changed or removed shards whose clusters hold at least ``full_pass_fraction`` of the
    scored rows are scored by a full pass (no uid join of the pool); its scores equal the
    general path's. A topical removal keeps the general path. A removed shard's old clusters
    come from the ``assignments`` version the scores were computed from; once a vacuum has
    taken that version's files, only the new rows count (a lower bound: the general path)."""
    import dataclasses
    import logging

    from curation.select.layout import _touched_share

    p = SynPool(tmp_path / "lake")
    for i in range(4):
        p.shard(f"{i:05d}", 400)
    cent, general = _curated(p.lake)  # full_pass_fraction above 1: never a full pass
    auto = dataclasses.replace(general, full_pass_fraction=0.8)
    # a replaced shard drawn from every concept: its old and new rows touch every cluster
    p.shard("00001", 400, salt=1)
    update_layout(p.lake, cent, auto)
    assert _touched_share(p.lake, p.lake.read(DEDUP_STATE_TABLE), [], ["syn-00001"], []) == 1.0
    ref = dedup_scores_by_bucket(p.lake, config=general)
    assert ref.mode == "incremental" and ref.reentered == 400 and ref.recomputed_clusters == K
    with caplog.at_level(logging.INFO, logger="curation.select.layout"):
        du = _finish(p.lake, cent, auto, incremental=True)
    assert du.mode == "full" and du.recomputed_clusters == K and du.touched_share == 1.0
    assert "every bucket is recomputed" in caplog.text and ref.touched_share is None  # fraction 2: not measured
    _assert_same_scores(du.frame, ref.frame)
    assert du.table.equals(dedup_scores_by_bucket(p.lake, config=general, incremental=False).table)
    # a topical shard (copies of one cluster's most central members), added, then removed: its
    # old rows' cluster is found at the scores' assignments version, a small share of the pool
    _topical_shard(p.lake, 3, "topic")
    assert update_layout(p.lake, cent, auto).touched_clusters.tolist() == [3]
    assert _finish(p.lake, cent, auto, incremental=True).updated_clusters == 1
    p.lake.delete_partition("embeddings", "syn-topic")
    update_layout(p.lake, cent, auto)
    members = int((p.lake.read("dedup_scores", columns=["cluster_id"])["cluster_id"] == 3).sum())
    assert _touched_share(p.lake, p.lake.read(DEDUP_STATE_TABLE), [], [], ["syn-topic"]) == pytest.approx(members / p.lake.count_rows("dedup_scores"))
    du = _finish(p.lake, cent, auto, incremental=True)
    assert du.mode == "incremental" and du.recomputed_clusters == 1 and 0 < du.touched_share < 0.8
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=general, incremental=False).frame)
    # a crawl-like shard removed, and the files of the scores' assignments version vacuumed
    p.lake.delete_partition("embeddings", "syn-00002")
    update_layout(p.lake, cent, auto)
    assert _touched_share(p.lake, p.lake.read(DEDUP_STATE_TABLE), [], [], ["syn-00002"]) == 1.0
    p.lake.table("assignments").vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    assert _touched_share(p.lake, p.lake.read(DEDUP_STATE_TABLE), [], [], ["syn-00002"]) == 0.0
    du = _finish(p.lake, cent, auto, incremental=True)
    assert du.mode == "incremental" and du.recomputed_clusters == K
    _assert_same_scores(du.frame, dedup_scores_by_bucket(p.lake, config=general, incremental=False).frame)
    with pytest.raises(ValueError, match="full_pass_fraction: got 0"):
        LayoutConfig(full_pass_fraction=0)


def test_a_build_writes_each_bucket_once_from_its_spill(tmp_path, monkeypatch):
    """A full build spills the layout's rows per bucket and writes each bucket as one file in
    cluster / SemDeDup order, its row groups holding whole clusters, in one commit: the same
    rows (float16 vectors and caption vectors included) and the same SemDeDup scores as a
    build that appends every flush, and as the Delta-writer path an object store takes; a
    bucket above the memory budget is written in pieces; a rebuild replaces the schema too;
    the assignments are committed once, beside the layout; the temporary files are gone after
    a build, and after a failed one, which leaves the old layout and assignments as they were
    (a failed layout commit: the assignments, committed right before it, are new)."""
    import tempfile

    import curation.select.layout as layout

    monkeypatch.setattr(layout, "LAYOUT_ROW_GROUP_ROWS", 200)  # clusters of ~150 rows: several per group
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    pools = {name: SynPool(tmp_path / name) for name in ("spilled", "groups", "flushed", "pieces")}
    for p in pools.values():
        for i in range(3):
            p.shard(f"{i:05d}", 500)
    cent, _ = fit_centroids(pools["spilled"].lake, K, niter=10)
    base = dict(clusters_per_bucket=4, flush_rows=300, dtype="float16", with_text=True)
    cfgs = {"spilled": LayoutConfig(**base), "groups": LayoutConfig(**base), "flushed": LayoutConfig(**base, spill=False),
            "pieces": LayoutConfig(**base, memory_budget_bytes=20_000)}  # ~160 rows of 124 bytes
    commits = {}
    for name, p in pools.items():
        with monkeypatch.context() as m:
            if name == "groups":  # the Delta writer's path (a lake on an object store)
                m.setattr(layout._BucketSpill, "write", layout._BucketSpill._write_groups)
            assert build_layout(p.lake, cent, cfgs[name]).rows_written == 1500
        commits[name] = p.lake.table(LAYOUT_TABLE).version()
        assert list(tmp.iterdir()) == []
    assert commits["spilled"] == commits["pieces"] == 0  # the whole layout in one commit
    # and the assignments in one commit beside it (without the spill: a commit per flush, one per 500-row shard)
    assert [pools[n].lake.table("assignments").version() for n in ("spilled", "pieces", "flushed")] == [0, 0, 2]
    files = {name: layout_files_per_bucket(p.lake) for name, p in pools.items()}
    assert set(files["spilled"].values()) == set(files["groups"].values()) == {1} and max(files["flushed"].values()) > 1
    assert max(files["pieces"].values()) > 1  # buckets of more than flush_rows rows: a file per piece
    rows = {name: p.lake.read(LAYOUT_TABLE).sort("uid") for name, p in pools.items()}
    assert all(r.equals(rows["flushed"]) for r in rows.values())
    for frag in pools["spilled"].lake.dataset(LAYOUT_TABLE).get_fragments():
        t = frag.to_table(columns=["cluster_id", "cos_to_centroid", "uid"])
        order = layout.semdedup_order(t.column("cos_to_centroid").to_numpy(), binary_column_to_bytes(t.column("uid")),
                                      t.column("cluster_id").to_numpy())
        assert np.array_equal(order, np.arange(t.num_rows))
        md, sizes = frag.metadata, pl.Series(t.column("cluster_id").to_numpy()).value_counts()
        col = md.schema.names.index("cluster_id")
        groups = [(md.row_group(g).column(col).statistics.min, md.row_group(g).column(col).statistics.max)
                  for g in range(md.num_row_groups)]
        assert all(md.row_group(g).num_rows <= 200 for g in range(md.num_row_groups))
        for c, n in sizes.iter_rows():  # a cluster of <= 200 rows lies in one row group
            assert sum(lo <= c <= hi for lo, hi in groups) == (1 if n <= 200 else -(-n // 200))
    scores = {name: dedup_scores_by_bucket(p.lake, config=cfgs[name], incremental=False).frame
              for name, p in pools.items()}
    assert all(f.equals(scores["flushed"]) for f in scores.values())
    # a rebuild with another dtype, without caption vectors: the table's schema follows
    lake = pools["spilled"].lake
    build_layout(lake, cent, LayoutConfig(clusters_per_bucket=4))
    assert "emb_float32" in lake.read(LAYOUT_TABLE).columns and "emb_float16" not in lake.read(LAYOUT_TABLE).columns
    assert lake.count_rows(LAYOUT_TABLE) == 1500
    # a build failing while it writes (an assignments file of its second flush, the second bucket's
    # layout file, the layout's commit after the assignments' files): no temporary file left, and
    # the layout and the assignments unchanged, their versions included
    def state():
        return {t: (lake.read(t).sort("uid"), lake.table(t).version()) for t in (LAYOUT_TABLE, "assignments")}

    before = state()
    real = layout._write_data_file
    for where in ("assignments", "layout", "commit"):
        written = []

        def failing(root, pv, *a, **k):
            if (where == "assignments" and written) or (where == "layout" and len([w for w in written if w]) > 1):
                raise OSError("disk full")
            written.append(bool(pv))  # a layout file (partitioned by bucket)
            return real(root, pv, *a, **k)

        def failing_commit(lake_, table, *a, **k):
            if table == LAYOUT_TABLE:
                raise OSError("disk full")
            return real_commit(lake_, table, *a, **k)

        real_commit = layout.replace_table_files
        with monkeypatch.context() as m:
            m.setattr(layout, "_write_data_file", failing)
            if where == "commit":
                m.setattr(layout, "replace_table_files", failing_commit)
            with pytest.raises(OSError, match="disk full"):
                build_layout(lake, cent, LayoutConfig(clusters_per_bucket=4, flush_rows=600))
        assert list(tmp.iterdir()) == []
        assert written.count(False) == (1 if where == "assignments" else 2) and written.count(True) == {
            "assignments": 0, "layout": 2, "commit": len(lake.partitions(LAYOUT_TABLE))}[where]
        after = state()
        for t, (rows, version) in before.items():
            if where == "commit" and t == "assignments":  # committed right before the layout's commit failed
                assert after[t][1] == version + 1 and after[t][0].equals(rows)
                continue
            assert after[t][1] == version and after[t][0].equals(rows), (where, t)


_KILLED_BUILD = """
import os, signal, sys
import numpy as np
import curation.select.layout as layout
from curation.storage.lake import Lake

real = layout._write_data_file

def write_then_die(root, pv, *a, **k):
    if pv:  # the first layout file: every assignments file of the build is written, none committed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(root, pv, *a, **k)

layout._write_data_file = write_then_die
layout.build_layout(Lake(sys.argv[1]), np.load(sys.argv[2]), layout.LayoutConfig(clusters_per_bucket=4, flush_rows=600))
"""


def test_a_killed_build_leaves_both_tables_and_its_spill_is_removed_by_the_next(tmp_path, monkeypatch):
    """A build process SIGKILLed after writing its assignments files and spilling its rows (no
    cleanup runs): ``assignments`` and ``pool_by_cluster`` keep their rows and versions, and its
    spill directory is left behind; the next build removes that spill (its owner lock is free)
    and commits both tables once each; a live build's spill is never removed."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from curation.select import layout

    p = SynPool(tmp_path / "lake")
    for i in range(3):
        p.shard(f"{i:05d}", 500)
    cent, cfg = _curated(p.lake)
    before = {t: (p.lake.read(t).sort("uid"), p.lake.table(t).version()) for t in (LAYOUT_TABLE, "assignments")}
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    np.save(tmp_path / "cent.npy", cent)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def killed_build() -> Path:
        proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(p.lake.root), str(tmp_path / "cent.npy")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, proc.stderr[-2000:]
        (left,) = list(tmp.iterdir())
        assert left.name.startswith(layout.SPILL_PREFIX) and len(list(left.iterdir())) > 1  # spilled rows + owner file
        return left

    left = killed_build()
    for t, (rows, version) in before.items():
        assert p.lake.table(t).version() == version and p.lake.read(t).sort("uid").equals(rows), t
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    build_layout(p.lake, cent, LayoutConfig(clusters_per_bucket=4, flush_rows=600))
    assert not left.exists() and list(tmp.iterdir()) == []  # the killed build's spill is gone, and this build's own
    for t, (rows, version) in before.items():
        assert p.lake.table(t).version() == version + 1 and p.lake.read(t).sort("uid").equals(rows), t

    left = killed_build()
    live = layout._BucketSpill(cfg)  # a build starting: removes the killed one's spill ...
    try:
        assert not left.exists() and Path(live.dir).exists()
        assert layout.remove_stale_spills() == [] and Path(live.dir).exists()  # ... and a build beside keeps its own
    finally:
        live.discard()
    assert list(tmp.iterdir()) == []
    # a TMPDIR whose filesystem refuses flock: the build goes on without a lock, and no cleanup
    # removes a spill it cannot lock (live or not)
    import fcntl

    def no_flock(*a, **k):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    unlocked = layout._BucketSpill(cfg)
    try:
        assert unlocked._owner is None
        assert layout.remove_stale_spills(grace_s=0.0) == [] and Path(unlocked.dir).exists()
    finally:
        unlocked.discard()
    assert list(tmp.iterdir()) == []
