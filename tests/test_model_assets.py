"""Model assets with dagster.materialize on tiny synthetic exports, landing shards and eval sets."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from dagster import DagsterInstance, materialize
from PIL import Image

from assets.checks.evaluate import CHECKS as EVALUATE_CHECKS
from assets.checks.train import CHECKS as TRAIN_CHECKS
from assets.evaluate import curation_report, eval_reports
from assets.train import filter_model, trained_checkpoints
from curation.ingest.ids import make_uid
from resources import ComputeResource, DatasetsResource, LakeResource

CHECKS = [*TRAIN_CHECKS, *EVALUATE_CHECKS]

COLORS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 220, 20)}
RECIPES = ("full", "random@0.5")
TINY_TRAIN = {"samples_seen": 16, "batch_size": 8, "seeds": [0], "model_name": "tiny-rn-32"}
EVAL_SET = {"name": "toy-heldout", "path": "toy-heldout", "layout": "manifest", "templates": "simple"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(color, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (size, size), color + (255,)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _samples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    return [(names[i], f"a {names[i]} square icon") for i in rng.integers(0, len(names), n)]


def write_export(artifacts: Path, recipe: str, items: list[tuple[str, str]]) -> list[str]:
    """A subset export's webdataset shard: ``<uid>.png``, ``<uid>.txt``, ``<uid>.json``."""
    d = artifacts / "subsets" / recipe / "shards"
    d.mkdir(parents=True)
    uids = [make_uid("toy", "toy-00000", f"{i:05d}") for i in range(len(items))]
    with tarfile.open(d / "00000.tar", "w") as tf:
        for uid, (color, cap) in zip(uids, items):
            _add(tf, f"{uid}.png", _png(COLORS[color]))
            _add(tf, f"{uid}.txt", cap.encode())
            _add(tf, f"{uid}.json", json.dumps({"uid": uid}).encode())
    return uids


def write_eval_set(eval_root: Path) -> None:
    d = eval_root / "toy-heldout"
    d.mkdir(parents=True)
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        for i, (color, cap) in enumerate(_samples(12, seed=1)):
            key = f"{i:05d}"
            _add(tf, f"{key}.png", _png(COLORS[color]))
            _add(tf, f"{key}.txt", cap.encode())
            rows.append({"uid": f"{i:032x}", "key": key, "tar": "00000.tar", "member": f"{key}.png", "caption": cap,
                         "image_sha256": "", "group": color, "subgroup": "square", "concept": color})  # fmt: skip
    pl.DataFrame(rows).write_parquet(d / "manifest.parquet")
    tasks = {"zero_shot": {"group": list(COLORS)}, "retrieval": {"caption_column": "caption", "image_column": "member"}}
    (d / "tasks.json").write_text(json.dumps(tasks))


@pytest.fixture
def resources(tmp_path):
    return {
        "lake": LakeResource(root=str(tmp_path / "lake"), artifacts_root=str(tmp_path / "artifacts")),
        "datasets": DatasetsResource(landing=str(tmp_path / "landing"), eval_root=str(tmp_path / "eval")),
        "compute": ComputeResource(device="cpu", precision="fp32", batch_size=16, num_workers=0),
    }


def _checks_for(asset_key: str):
    return [c for c in CHECKS if any(k.asset_key.to_user_string() == asset_key for k in c.check_keys)]


def test_train_eval_report_lineage(tmp_path, resources):
    artifacts = tmp_path / "artifacts"
    full_uids = write_export(artifacts, "full", _samples(12))
    write_export(artifacts, "random@0.5", _samples(8, seed=2))
    write_eval_set(tmp_path / "eval")
    lake = resources["lake"].lake()
    for recipe, n in (("full", 12), ("random@0.5", 8)):
        lake.write("subsets", pl.DataFrame({"recipe": [recipe] * n, "uid": full_uids[:n], "rank": list(range(n)),
                                            "score": [0.0] * n}), partition=recipe)  # fmt: skip
    instance = DagsterInstance.ephemeral()
    # both backends: open_clip_train (a subprocess) for `full`, the platform loop for `random@0.5`
    backends = {"full": "open_clip_train", "random@0.5": "platform"}
    for recipe in RECIPES:
        run_config = {"ops": {"trained_checkpoints": {"config": {**TINY_TRAIN, "backend": backends[recipe]}},
                              "eval_reports": {"config": {"eval_sets": [EVAL_SET]}}}}  # fmt: skip
        res = materialize(
            [trained_checkpoints, eval_reports, *_checks_for("trained_checkpoints"), *_checks_for("eval_reports")],
            partition_key=recipe, resources=resources, instance=instance, run_config=run_config,
        )  # fmt: skip
        assert res.success
        evals = res.get_asset_check_evaluations()
        assert len(evals) == 3 and all(e.passed for e in evals), [(e.check_name, e.metadata) for e in evals]
        md = res.asset_materializations_for_node("trained_checkpoints")[0].metadata
        assert md["samples_seen"].value == 16 and md["n_train"].value in (12, 8)
        assert md["backend"].value == backends[recipe]

    cks = lake.read("checkpoints")
    assert sorted(cks["recipe"].to_list()) == sorted(RECIPES) and set(cks["samples_seen"].to_list()) == {16}
    # typed columns, not a JSON string; paths relative to the artifacts root
    assert cks.schema["seed"] == pl.Int64 and cks.schema["samples_per_s"] == pl.Float64 and "config_json" not in cks.columns
    assert sorted(cks["backend"].to_list()) == ["open_clip_train", "platform"]
    for rel, recipe in zip(cks["path"].to_list(), cks["recipe"].to_list()):
        assert not Path(rel).is_absolute() and Path(rel).parent == Path("checkpoints") / recipe
        p = artifacts / rel
        assert p.exists() and p.with_suffix(".json").exists()
        # open_clip itself loads either backend's checkpoint
        import open_clip

        from curation.embed.model_registry import register_model_configs

        register_model_configs()
        open_clip.create_model_and_transforms("tiny-rn-32", pretrained=str(p), weights_only=True)
    # clip_benchmark's JSON results are kept beside the checkpoints' evaluations
    assert list((artifacts / "eval" / "full").glob("*/toy-heldout__retrieval.json"))
    ev = lake.read("eval_results")
    assert set(ev["task"].to_list()) == {"toy-heldout/zeroshot/group", "toy-heldout/retrieval", "average"}
    assert ev.filter(pl.col("task") == "average")["recipe"].n_unique() == 2

    res = materialize([curation_report, *_checks_for("curation_report")], resources=resources, instance=instance)
    assert res.success and all(e.passed for e in res.get_asset_check_evaluations())
    md = res.asset_materializations_for_node("curation_report")[0].metadata
    html = Path(md["report_html"].value)
    assert html.exists() and html.parent == artifacts / "reports"
    text = md["markdown"].value
    assert "| full |" in text and "| random@0.5 |" in text
    assert list((artifacts / "reports").glob("*.png"))


def test_trained_checkpoints_without_export_fails_clearly(resources):
    with pytest.raises(FileNotFoundError, match="got no webdataset shards"):
        materialize([trained_checkpoints], partition_key="full", resources=resources,
                    instance=DagsterInstance.ephemeral(), run_config={"ops": {"trained_checkpoints": {"config": TINY_TRAIN}}})  # fmt: skip


def test_filter_model_trains_on_the_pool_and_writes_filter_embeddings(tmp_path, resources):
    landing = tmp_path / "landing" / "toy"
    landing.mkdir(parents=True)
    shard = "toy-00000"
    items = _samples(10, seed=3)
    rows = []
    with tarfile.open(landing / "00000.tar", "w") as tf:
        for i, (color, cap) in enumerate(items):
            key = f"{i:05d}"
            _add(tf, f"{key}.png", _png(COLORS[color]))
            _add(tf, f"{key}.txt", cap.encode())
            rows.append({"uid": make_uid("toy", shard, key), "dataset": "toy", "shard": shard, "key": key,
                         "caption": cap, "member": f"{key}.png"})  # fmt: skip
    lake = resources["lake"].lake()
    samples = pl.DataFrame(rows)
    lake.write("samples", samples, partition=shard)
    # the pool = uids with embeddings; one sample has none (quarantined at embedding time)
    lake.write("embeddings", samples.head(9).select("uid", "shard"), partition=shard)
    res = materialize(
        [filter_model, *_checks_for("filter_model")], resources=resources, instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"filter_model": {"config": {"samples_seen": 16, "batch_size": 8}}}},
    )  # fmt: skip
    assert res.success and all(e.passed for e in res.get_asset_check_evaluations())
    fe = lake.read("filter_embeddings")
    assert fe.height == 9 and set(fe["uid"].to_list()) == set(samples.head(9)["uid"].to_list())
    assert fe["clip_score"].dtype == pl.Float32 and fe["model"][0].startswith("openclip:tiny-rn-32:")
    md = res.asset_materializations_for_node("filter_model")[0].metadata
    assert md["source"].value == "trained on the full pool" and md["rows"].value == 9
    ck = Path(md["checkpoint"].value)
    assert ck.exists() and ck.parent == tmp_path / "artifacts" / "filter_model"

    # a configured checkpoint is used as is (no training)
    res2 = materialize(
        [filter_model], resources=resources, instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"filter_model": {"config": {"pretrained": str(ck)}}}},
    )  # fmt: skip
    md2 = res2.asset_materializations_for_node("filter_model")[0].metadata
    assert md2["source"].value == "pretrained" and "train_seconds" not in md2
    fe2 = lake.read("filter_embeddings")
    assert np.allclose(np.sort(fe2["clip_score"].to_numpy()), np.sort(fe["clip_score"].to_numpy()), atol=1e-5)


@pytest.mark.parametrize("sizes", [[7], [3, 1, 4], [50, 20, 1, 33]])
def test_keep_extremes_shard_by_shard_equals_the_whole_pool_sorted(sizes):
    from assets.train import keep_extremes

    rng = np.random.default_rng(sum(sizes))
    kept, all_scores, all_caps = [], [], []
    for n in sizes:
        scores = rng.normal(size=n).astype(np.float32)
        caps = [f"caption {len(all_caps) + i}" for i in range(n)]
        kept = keep_extremes(kept, scores, caps)
        all_scores += scores.tolist()
        all_caps += caps
    order = np.argsort(all_scores)
    total = len(all_scores)
    want = sorted({int(i) for i in list(order[:5]) + list(order[-5:])}, key=lambda i: all_scores[i])
    assert [c for _, c in kept] == [all_caps[i] for i in want]
    assert len(kept) == min(10, total) and kept == sorted(kept, key=lambda t: t[0])
