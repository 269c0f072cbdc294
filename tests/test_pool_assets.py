"""Pool-wide assets with dagster.materialize on a temp lake with synthetic tables."""

import hashlib
import io
import json
import tarfile

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from dagster import DagsterInstance, materialize
from PIL import Image

from assets.checks.select import CHECKS, CLUSTER_CHECKS, SUBSET_CHECKS, budget_result
from assets.select import ASSETS, complexity_scores, concept_clusters, dedup_scores, pruned_subsets
from curation.ingest.ids import make_uid, u128_to_uids
from curation.storage.lake import list_column_to_matrix, matrix_to_list_column
from curation.select.recipes import expected_keep, get_recipe, recipe_names
from resources import ComputeResource, DatasetsResource, LakeResource
from resources.distributed import DistributedResource

D = 16
PER_SHARD = 40
N_CONCEPTS = 4


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


class Pool:
    """A synthetic pool: landing tars, samples/embeddings/filter_embeddings rows per shard."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.landing = tmp_path / "landing"
        self.eval_root = tmp_path / "eval"
        self.rng = np.random.default_rng(0)
        self.centers = _unit(self.rng.standard_normal((N_CONCEPTS, D)))
        self.resources = {
            "lake": LakeResource(root=str(tmp_path / "lake"), artifacts_root=str(tmp_path / "artifacts")),
            "datasets": DatasetsResource(landing=str(self.landing), eval_root=str(self.eval_root)),
            "compute": ComputeResource(device="cpu", num_workers=0),
            "distributed": DistributedResource(),
        }
        self.db = self.resources["lake"].lake()
        self.samples = {}

    def add_shard(self, stem):
        shard = f"toy-{stem}"
        (self.landing / "toy").mkdir(parents=True, exist_ok=True)
        rows, n = [], PER_SHARD
        concept = self.rng.integers(0, N_CONCEPTS, n)
        x = _unit(3 * self.centers[concept] + self.rng.standard_normal((n, D)))
        x[1] = _unit(x[:1] + 1e-4)[0]  # a planted near-duplicate per shard
        y = _unit(x + 0.3 * self.rng.standard_normal((n, D)))
        with tarfile.open(self.landing / "toy" / f"{stem}.tar", "w") as tf:
            for i in range(n):
                key = f"{stem}{i:04d}"
                img = _png(int(stem) * 100 + i)
                cap = f"concept {concept[i]} sample {key}"
                for name, data in ((f"{key}.png", img), (f"{key}.txt", cap.encode()), (f"{key}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                rows.append(dict(uid=make_uid("toy", shard, key), dataset="toy", shard=shard, key=key, caption=cap,
                                 width=4, height=4, format="png", image_sha256=hashlib.sha256(img).hexdigest(),
                                 n_bytes=len(img), member=f"{key}.png"))
        sdf = pl.DataFrame(rows, schema_overrides={"width": pl.Int32, "height": pl.Int32, "n_bytes": pl.Int64})
        self.samples[shard] = sdf
        self.db.write("samples", sdf, partition=shard)
        self.db.write("embeddings", pa.table({
            "uid": sdf["uid"].to_arrow(), "shard": pa.array([shard] * n),
            "image_emb": matrix_to_list_column(x), "text_emb": matrix_to_list_column(y),
            "encoder": pa.array(["synthetic:test"] * n)}), partition=shard)
        self._write_filter()
        return shard

    def _write_filter(self):
        emb = self.db.read("embeddings")
        x = list_column_to_matrix(emb["image_emb"])
        y = list_column_to_matrix(emb["text_emb"])
        self.db.write("filter_embeddings", pa.table({
            "uid": emb["uid"].to_arrow(), "image_emb": matrix_to_list_column(x), "text_emb": matrix_to_list_column(y),
            "clip_score": pa.array((x * y).sum(1).astype(np.float32)), "model": pa.array(["synthetic-clip"] * len(x))}))

    def all_samples(self):
        return pl.concat(list(self.samples.values()))


@pytest.fixture()
def pool(tmp_path):
    p = Pool(tmp_path)
    p.add_shard("00000")
    p.add_shard("00001")
    return p


def _run(pool, assets, partition=None, config=None, raise_on_error=True):
    return materialize(
        [*ASSETS, *CHECKS] if assets is None else assets,
        selection=None,
        resources=pool.resources,
        partition_key=partition,
        run_config={"ops": config} if config else None,
        instance=DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )


def _pool_assets():
    return [concept_clusters, dedup_scores, complexity_scores, *CLUSTER_CHECKS]


def test_pool_assets_write_tables_and_metadata(pool):
    res = _run(pool, _pool_assets(), config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    assert res.success
    db = pool.db
    cl = db.read("clusters").sort("cluster_id")
    asg = db.read("assignments")
    ds = db.read("dedup_scores")
    assert cl.height == 4 and asg.height == 2 * PER_SHARD and ds.height == 2 * PER_SHARD
    assert cl["size"].sum() == 2 * PER_SHARD
    assert not np.isnan(cl["complexity"].to_numpy()).any()
    assert cl["weight"].sum() == pytest.approx(1.0)
    # every planted near-duplicate is flagged at eps 0.01
    dup_uids = [make_uid("toy", s, f"{s[-5:]}0001") for s in ("toy-00000", "toy-00001")]
    orig_uids = [make_uid("toy", s, f"{s[-5:]}0000") for s in ("toy-00000", "toy-00001")]
    m = dict(zip(ds["uid"], ds["max_sim_to_earlier"]))
    assert all(max(m[a], m[b]) > 0.99 for a, b in zip(dup_uids, orig_uids))
    mats = res.asset_materializations_for_node("concept_clusters")[0].metadata
    assert mats["k"].value == 4 and mats["mode"].value == "retrain"
    assert "cluster_size_histogram" in mats
    dm = res.asset_materializations_for_node("dedup_scores")[0].metadata
    assert 0 < dm["removed_fraction@eps=0.01"].value < 0.2
    cm = res.asset_materializations_for_node("complexity_scores")[0].metadata
    assert "concept" in cm["most_complex"].value  # example captions
    evals = res.get_asset_check_evaluations()
    assert evals and all(e.passed for e in evals)


def test_ray_engine_gives_the_same_dedup_scores_and_clipcov_subset(pool):
    """The assets' Ray path (a local Ray, 2 CPUs) equals the in-process path."""
    _run(pool, [concept_clusters, dedup_scores], config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    ref_scores = pool.db.read("dedup_scores").sort("uid")
    _run(pool, [pruned_subsets], partition="clipcov@0.5")
    ref_subset = pool.db.read("subsets", partitions=["clipcov@0.5"]).sort("rank")
    pool.resources["distributed"] = DistributedResource(address="local", num_cpus=2)
    import shutil

    shutil.rmtree(pool.db.uri("dedup_scores"))  # a full recompute on Ray: every bucket is a task reading the lake
    _run(pool, [dedup_scores])
    _run(pool, [pruned_subsets], partition="clipcov@0.5")
    assert pool.db.read("dedup_scores").sort("uid").equals(ref_scores)
    got = pool.db.read("subsets", partitions=["clipcov@0.5"]).sort("rank")
    assert got["uid"].to_list() == ref_subset["uid"].to_list()
    np.testing.assert_allclose(got["score"].to_numpy(), ref_subset["score"].to_numpy(), rtol=1e-6)


def test_incremental_assignment_and_retrain(pool, monkeypatch):
    _run(pool, [concept_clusters], config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    db = pool.db
    cent0 = list_column_to_matrix(db.read("centroids").sort("cluster_id")["centroid"])
    asg0 = db.read("assignments")
    pool.add_shard("00002")
    res = _run(pool, [concept_clusters])  # mode auto, k unset: keeps k, assigns only the new shard
    md = res.asset_materializations_for_node("concept_clusters")[0].metadata
    assert md["mode"].value == "assign" and md["newly_assigned"].value == PER_SHARD
    assert md["assign_method"].value == "flat" and md["assign_recall"].value == 1.0  # k = 4: exact
    cent1 = list_column_to_matrix(db.read("centroids").sort("cluster_id")["centroid"])
    np.testing.assert_array_equal(cent0, cent1)
    asg1 = db.read("assignments")
    assert asg1.height == 3 * PER_SHARD
    same = asg0.join(asg1, on="uid", suffix="_new")
    assert same.height == asg0.height and (same["cluster_id"] == same["cluster_id_new"]).all()
    emb = db.read("embeddings", partitions=["toy-00002"]).join(asg1, on="uid")
    sims = list_column_to_matrix(emb["image_emb"]) @ cent1.T
    np.testing.assert_array_equal(emb["cluster_id"].to_numpy(), sims.argmax(1))
    np.testing.assert_allclose(emb["cos_to_centroid"].to_numpy(), sims.max(1), atol=1e-5)
    assert db.read("assignments").height == 3 * PER_SHARD
    # a different k retrains in auto mode; the build spills its layout (layout_spill) unless told not to
    import curation.select.layout as layout_mod

    spills = []
    real_spill = layout_mod._BucketSpill
    monkeypatch.setattr(layout_mod, "_BucketSpill", lambda cfg: spills.append(cfg) or real_spill(cfg))
    res = _run(pool, [concept_clusters], config={"concept_clusters": {"config": {"k": 3, "niter": 10}}})
    md = res.asset_materializations_for_node("concept_clusters")[0].metadata
    assert md["mode"].value == "retrain" and db.read("centroids").height == 3 and len(spills) == 1
    _run(pool, [concept_clusters], config={"concept_clusters": {"config": {"mode": "retrain", "layout_spill": False}}})
    assert len(spills) == 1 and db.read("assignments").height == 3 * PER_SHARD
    # the two-level assignment, nprobe calibrated for full recall on the first shard: audited
    res = _run(pool, [concept_clusters], config={"concept_clusters": {"config": {
        "k": 3, "niter": 10, "mode": "retrain", "method": "two-level", "target_recall": 1.0}}})
    md = res.asset_materializations_for_node("concept_clusters")[0].metadata
    assert md["assign_method"].value == "two-level" and md["assign_audited_rows"].value == 3 * min(32, PER_SHARD)
    assert 1 <= md["assign_nprobe"].value <= md["assign_nlist"].value and 0 < md["assign_recall"].value <= 1


def test_new_shard_recomputes_only_touched_clusters(pool):
    from curation.select.layout import dedup_scores_by_bucket

    _run(pool, _pool_assets(), config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    pool.add_shard("00002")
    files = len(pool.db.dataset("pool_by_cluster").files)
    res = _run(pool, [concept_clusters, dedup_scores])
    cm = res.asset_materializations_for_node("concept_clusters")[0].metadata
    assert cm["layout_update"].value == "incremental" and cm["shards_streamed"].value == 1
    assert cm["layout_files"].value > files and "buckets_compacted" not in cm  # the update appended files
    # compacting on request: one file per bucket after it, the same rows
    rows = pool.db.read("pool_by_cluster").sort("uid")
    cm = _run(pool, [concept_clusters], config={"concept_clusters": {"config": {"compact_min_files": 2}}}
              ).asset_materializations_for_node("concept_clusters")[0].metadata
    assert cm["buckets_compacted"].value >= 1 and cm["layout_files"].value == len(pool.db.partitions("pool_by_cluster"))
    assert pool.db.read("pool_by_cluster").sort("uid").equals(rows)
    dm = res.asset_materializations_for_node("dedup_scores")[0].metadata
    assert dm["update"].value == "incremental" and dm["rows"].value == 3 * PER_SHARD
    full = dedup_scores_by_bucket(pool.db, incremental=False).frame
    got = pool.db.read("dedup_scores").sort("uid")
    assert got["uid"].to_list() == full["uid"].to_list()
    np.testing.assert_allclose(got["max_sim_to_earlier"], full["max_sim_to_earlier"], atol=1e-6, rtol=0)
    # nothing new: nothing recomputed
    dm = _run(pool, [dedup_scores]).asset_materializations_for_node("dedup_scores")[0].metadata
    assert dm["rows_scored"].value == 0


@pytest.mark.parametrize("recipe", recipe_names())
def test_pruned_subsets_every_recipe(pool, recipe):
    _run(pool, _pool_assets(), config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    res = _run(pool, [pruned_subsets, *SUBSET_CHECKS], partition=recipe)
    assert res.success
    evals = res.get_asset_check_evaluations()
    assert len(evals) == 3 and all(e.passed for e in evals)
    sub = pool.db.read("subsets", partitions=[recipe])
    r = get_recipe(recipe)
    md = res.asset_materializations_for_node("pruned_subsets")[0].metadata
    assert md["kept"].value == sub.height and md["recipe_hash"].value
    # the preview: the top ranks with their own captions (taken from the kept rows the export read)
    top = sub.sort("rank").head(10).join(pool.db.read("samples", columns=["uid", "caption"]), on="uid", how="left")
    lines = md["preview"].value.splitlines()
    assert len(lines) == 2 + top.height
    for uid, cap, line in zip(top["uid"], top["caption"], lines[2:]):
        assert uid in line and (cap or "") in line
    if r.method in ("full",):
        assert sub.height == 2 * PER_SHARD
    if r.keep_fraction is not None and r.after_semdedup_eps is None:
        assert sub.height == expected_keep(r, 2 * PER_SHARD)
    out = pool.tmp / "artifacts" / "subsets" / recipe
    assert sorted(u128_to_uids(np.load(out / "uids.npy"))) == sorted(sub["uid"].to_list())
    man = pl.read_parquet(out / "manifest.parquet")
    assert man.height == sub.height
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["recipe"]["name"] == recipe and rec["n_missing"] == 0
    assert rec["recipe_hash"] == md["recipe_hash"].value and rec["n_kept"] == sub.height
    names = [m for t in sorted((out / "shards").glob("*.tar")) for m in tarfile.open(t).getnames()]
    assert len(names) == 3 * sub.height


def test_heldout_leak_fails_the_check(pool):
    _run(pool, _pool_assets(), config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    leaked = pool.all_samples().head(2)
    (pool.eval_root / "heldout").mkdir(parents=True)
    pl.DataFrame({"uid": ["0" * 32, leaked["uid"][0]], "image_sha256": [leaked["image_sha256"][1], "x"]}).write_parquet(
        pool.eval_root / "heldout" / "manifest.parquet")
    res = _run(pool, [pruned_subsets, *SUBSET_CHECKS], partition="full", raise_on_error=False)
    by_name = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert not by_name["no_heldout_samples"].passed
    assert by_name["no_heldout_samples"].metadata["observed_overlap"].value == 2
    assert by_name["budgets_sum_to_n_keep"].passed and by_name["kept_uids_in_samples"].passed


def test_clip_recipes_need_aligned_embeddings(pool):
    _run(pool, _pool_assets(), config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    pool.db.table("filter_embeddings").delete()
    import shutil

    shutil.rmtree(pool.tmp / "lake" / "filter_embeddings")
    with pytest.raises(Exception, match="expected filter_model to be materialized"):
        _run(pool, [pruned_subsets], partition="clipscore@0.5")


def test_checks_report_budget_mismatch(pool):
    _run(pool, _pool_assets(), config={"concept_clusters": {"config": {"k": 4, "niter": 10}}})
    _run(pool, [pruned_subsets], partition="random@0.5")
    sub = pool.db.read("subsets", partitions=["random@0.5"])
    pool.db.write("subsets", sub.head(sub.height - 1), partition="random@0.5")
    res = budget_result(pool.db, "random@0.5")
    assert not res.passed
    assert res.metadata["observed"].value == PER_SHARD - 1
    assert res.metadata["threshold"].value == f"== {PER_SHARD}"


def test_complexity_reuses_d_inter_only_for_the_same_centroids_and_neighbors(pool):
    """d_inter depends only on the centroids and l: after an incremental assignment (same
    centroids) complexity_scores reuses the stored one, and the rows equal a full computation;
    new centroids or another n_neighbors compute it again."""
    from curation.select.clustering import cluster_complexity

    cfg = {"concept_clusters": {"config": {"k": 4, "niter": 10}}}
    first = _run(pool, [concept_clusters, complexity_scores], config=cfg)
    assert first.asset_materializations_for_node("complexity_scores")[0].metadata["d_inter"].value == "computed"
    pool.add_shard("00002")
    res = _run(pool, [concept_clusters, complexity_scores])  # auto: the same centroids, one new shard
    assert res.asset_materializations_for_node("complexity_scores")[0].metadata["d_inter"].value == "stored (same centroids)"
    db = pool.db
    cent = list_column_to_matrix(db.read("centroids").sort("cluster_id")["centroid"])
    asg = db.read("assignments")
    ref = cluster_complexity(asg["cluster_id"].to_numpy(), asg["cos_to_centroid"].to_numpy(), cent)
    cl = db.read("clusters").sort("cluster_id")
    np.testing.assert_array_equal(cl["d_inter"].to_numpy(), ref.d_inter)
    np.testing.assert_array_equal(cl["size"].to_numpy(), ref.size)
    np.testing.assert_array_equal(cl["weight"].to_numpy(), ref.weight)
    res = _run(pool, [complexity_scores], config={"complexity_scores": {"config": {"n_neighbors": 2}}})
    assert res.asset_materializations_for_node("complexity_scores")[0].metadata["d_inter"].value == "computed"
    res = _run(pool, [concept_clusters, complexity_scores], config={"concept_clusters": {"config": {"k": 3, "niter": 10}}})
    assert res.asset_materializations_for_node("complexity_scores")[0].metadata["d_inter"].value == "computed"
