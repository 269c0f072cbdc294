"""The embeddings asset and its checks, materialized on a temp lake with the small dataset."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from dagster import DagsterInstance, materialize

from assets.checks.embed import (
    CHECKS,
    evaluate_finite,
    evaluate_one_row_per_sample,
    evaluate_unit_norm,
)
from assets.embed import ASSETS, embeddings
from assets.ingest import ASSETS as INGEST_ASSETS
from assets.partitions import SHARDS
from curation.storage.lake import Lake, list_column_to_matrix, matrix_to_list_column
from curation.embed.pool_reader import read_pool
from curation.ingest.shards import find_shards
from resources import ComputeResource, EncoderResource

TINY = "tiny-embed-asset-test"
ALL = [*INGEST_ASSETS, *ASSETS, *CHECKS]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip config registered with open_clip and a checkpoint of it."""
    import open_clip

    d = tmp_path_factory.mktemp("tiny_clip_assets")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (d / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY).state_dict(), d / "tiny.pt")
    return str(d / "tiny.pt")


@pytest.fixture
def env(small_dataset, lake_resources, tmp_path):
    landing = tmp_path / "landing"
    shutil.copytree(small_dataset / "landing", landing)
    res = lake_resources(landing=landing)
    res["compute"] = ComputeResource(device="cpu", batch_size=32, num_workers=1)
    instance = DagsterInstance.ephemeral()
    keys = list(find_shards(landing))
    instance.add_dynamic_partitions(SHARDS, keys)
    return res, instance, keys


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def _metadata(result, asset: str) -> dict:
    for e in result.get_asset_materialization_events():
        if e.materialization.asset_key.path[-1] == asset:
            return {k: v.value for k, v in e.materialization.metadata.items()}
    raise KeyError(asset)


def _evaluate_checks(res, key) -> dict[str, dg.AssetCheckResult]:
    """The embeddings checks' evaluations of one partition, without re-materializing the asset
    (Dagster cannot run partitioned checks alone; the Dagster-run path is covered above)."""
    return {
        "embeddings_finite": evaluate_finite(res["lake"], key),
        "embeddings_unit_norm": evaluate_unit_norm(res["lake"], key),
        "embeddings_one_row_per_sample": evaluate_one_row_per_sample(res["lake"], key),
    }


def test_embeddings_fill_delta_with_the_default_encoder(env):
    res, instance, keys = env
    res["encoder"] = EncoderResource(kind="default", image_size=64)
    key = keys[0]
    result = materialize(ALL, partition_key=key, instance=instance, resources=res)
    assert result.success
    md = _metadata(result, "embeddings")
    assert md["rows"] == md["samples_in"] == 100 and md["failures"] == 0
    assert md["encoder"] == "default:efficientnet-lite0@64+all-MiniLM-L6-v2"
    assert (md["image_dim"], md["text_dim"], md["aligned"]) == (1280, 384, False)
    assert md["samples_per_second"] > 0 and "| phase | seconds |" in md["timings"]
    checks = _checks(result)
    assert set(checks) == {"embeddings_finite", "embeddings_unit_norm", "embeddings_one_row_per_sample"}
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}
    assert checks["embeddings_unit_norm"].metadata["threshold"].value == 1e-3

    lake = Lake(res["lake"].root)
    emb = lake.read("embeddings", partitions=[key])
    samples = lake.read("samples", partitions=[key])
    assert sorted(emb["uid"]) == sorted(samples["uid"])
    assert set(emb["encoder"]) == {md["encoder"]} and set(emb["shard"]) == {key}
    pool = read_pool(lake)
    assert pool.image.shape == (100, 1280) and pool.text.shape == (100, 384)
    np.testing.assert_allclose(np.linalg.norm(pool.image, axis=1), 1.0, atol=1e-5)
    # the same caption gets the same vector (deterministic text tower)
    caps = samples.join(pl.DataFrame({"uid": pool.uids, "row": np.arange(len(pool))}), on="uid")
    dup = caps.group_by("caption").agg(pl.col("row")).filter(pl.col("row").list.len() > 1)
    for rows in dup["row"].to_list():
        np.testing.assert_allclose(pool.text[rows], np.repeat(pool.text[rows[:1]], len(rows), 0), atol=1e-5)


def test_embed_failures_go_to_quarantine_and_rerun_is_idempotent(env, tiny_clip):
    res, instance, keys = env
    res["encoder"] = EncoderResource(kind="open_clip", model_name=TINY, pretrained=tiny_clip)
    key = keys[1]
    assert materialize(INGEST_ASSETS, partition_key=key, instance=instance, resources=res).success
    lake = Lake(res["lake"].root)
    samples = lake.read("samples", partitions=[key])
    # a sample whose image member vanished from the tar after ingest
    ghost = samples.head(1).with_columns(
        pl.lit("f" * 32).alias("uid"), pl.lit("ghost").alias("key"), pl.lit("ghost.png").alias("member")
    )
    lake.write("samples", pl.concat([samples, ghost]), partition=key)
    for _ in range(2):
        result = materialize(
            ALL, selection=dg.AssetSelection.assets(embeddings) | dg.AssetSelection.checks_for_assets(embeddings),
            partition_key=key, instance=instance, resources=res,
        )
        assert result.success
        md = _metadata(result, "embeddings")
        assert md["encoder"] == f"openclip:{TINY}:{tiny_clip}" and md["aligned"] is True
        assert (md["rows"], md["failures"]) == (samples.height, 1)
        assert md["failure_reasons"] == {"missing_member": 1}
        assert all(c.passed for c in _checks(result).values())
        q = lake.read("quarantine", partitions=[key])
        embed_q = q.filter(pl.col("stage") == "embed")
        assert embed_q.select("key", "reason").rows() == [("ghost", "missing_member")]
        assert lake.read("embeddings", partitions=[key]).height == samples.height  # replaced, not appended


def _rewrite_embeddings(lake: Lake, key: str, mutate) -> None:
    emb = lake.read("embeddings", partitions=[key])
    img = list_column_to_matrix(emb["image_emb"])
    txt = list_column_to_matrix(emb["text_emb"])
    uids, img, txt = mutate(emb["uid"].to_list(), img.copy(), txt.copy())
    n = len(uids)
    lake.write(
        "embeddings",
        pa.table({
            "uid": pa.array(uids, pa.string()),
            "shard": pa.array([key] * n, pa.string()),
            "image_emb": matrix_to_list_column(img),
            "text_emb": matrix_to_list_column(txt),
            "encoder": pa.array([emb["encoder"][0]] * n, pa.string()),
        }),
        partition=key,
    )


def test_checks_fail_on_planted_nans_norms_and_missing_rows(env, tiny_clip):
    res, instance, keys = env
    res["encoder"] = EncoderResource(kind="open_clip", model_name=TINY, pretrained=tiny_clip)
    key = keys[2]
    assert materialize(ALL, partition_key=key, instance=instance, resources=res).success
    lake = Lake(res["lake"].root)

    def plant_nan(uids, img, txt):
        img[3, 5] = np.nan
        txt[7, 0] = np.inf
        return uids, img, txt

    _rewrite_embeddings(lake, key, plant_nan)
    checks = _evaluate_checks(res, key)
    assert not checks["embeddings_finite"].passed
    md = checks["embeddings_finite"].metadata
    assert md["observed_nonfinite_rows"].value == 2 and md["threshold"].value == 0
    assert not checks["embeddings_unit_norm"].passed
    assert checks["embeddings_one_row_per_sample"].passed

    def fix_and_scale(uids, img, txt):
        img = np.nan_to_num(img, nan=0.0)
        txt = np.nan_to_num(txt, posinf=0.0)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        img[0] *= 1.01  # one vector off the unit sphere by 1e-2
        return uids, img, txt

    _rewrite_embeddings(lake, key, fix_and_scale)
    checks = _evaluate_checks(res, key)
    assert checks["embeddings_finite"].passed
    assert not checks["embeddings_unit_norm"].passed
    md = checks["embeddings_unit_norm"].metadata
    assert md["rows_off_unit_norm"].value == 1
    assert md["observed_max_abs_norm_deviation"].value == pytest.approx(0.01, abs=1e-4)

    def drop_one_and_duplicate(uids, img, txt):
        img[0] /= np.linalg.norm(img[0])
        keep = list(range(1, len(uids))) + [5]  # row 0 missing, row 5 twice
        return [uids[i] for i in keep], img[keep], txt[keep]

    _rewrite_embeddings(lake, key, drop_one_and_duplicate)
    checks = _evaluate_checks(res, key)
    assert checks["embeddings_unit_norm"].passed and checks["embeddings_finite"].passed
    one = checks["embeddings_one_row_per_sample"]
    assert not one.passed
    assert one.metadata["missing_uids"].value == 1 and one.metadata["duplicate_rows"].value == 1
    n = lake.read("samples", columns=["uid"], partitions=[key]).height
    assert one.metadata["observed_rows"].value == one.metadata["expected_rows"].value == n


def test_a_broken_checkpoint_fails_the_blocking_checks_in_the_run(env, tiny_clip, tmp_path):
    """NaN weights -> NaN vectors: the blocking checks fail inside the Dagster run."""
    res, instance, keys = env
    sd = torch.load(tiny_clip, weights_only=True)
    sd["visual.proj"] = torch.full_like(sd["visual.proj"], float("nan"))
    broken = tmp_path / "broken.pt"
    torch.save(sd, broken)
    res["encoder"] = EncoderResource(kind="open_clip", model_name=TINY, pretrained=str(broken))
    result = materialize(ALL, partition_key=keys[0], instance=instance, resources=res, raise_on_error=False)
    checks = _checks(result)
    assert not checks["embeddings_finite"].passed
    assert checks["embeddings_finite"].metadata["observed_nonfinite_rows"].value == 100
    assert not checks["embeddings_unit_norm"].passed
    assert checks["embeddings_one_row_per_sample"].passed
