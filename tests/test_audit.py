"""The filter audit: planted noise on a tiny landing dataset, and precision/recall by hand."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation.evaluate.audit import audit_markdown, plant_noise, plot_examples, roc_auc, score_audit
from curation.ingest.shards import iter_samples, shard_key


def make_landing(root, shards=2, per=40):
    d = root / "landing" / "toy"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for s in range(shards):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tf:
            for i in range(per):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
                concept = f"c{i % 5}"
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", f"a {concept} thing".encode()),
                                   (f"{key}.json", json.dumps({"concept": concept}).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return d


def test_plant_noise_writes_labelled_noise(tmp_path):
    src = make_landing(tmp_path)
    rates = {"exact_dup": 0.1, "near_dup": 0.1, "swapped": 0.2, "blank": 0.05, "corrupt": 0.05}
    res = plant_noise(src, tmp_path / "out" / "toy_audit", "toy_audit", rates=rates, seed=0)
    counts = dict(res.labels.group_by("kind").len().iter_rows())
    # per shard of 40: 4 exact, 4 near, 2 blank, 2 corrupt, 4 swap pairs = 8 swapped
    assert counts == {"exact_dup": 8, "near_dup": 8, "blank": 4, "corrupt": 4, "swapped": 16}
    assert res.n_clean == 80 - 16
    again = plant_noise(src, tmp_path / "again" / "toy_audit", "toy_audit", rates=rates, seed=0)
    assert again.labels.equals(res.labels)  # seeded
    groups = dict(kv for t in sorted(res.out_dir.glob("*.tar")) for kv in iter_samples(t))
    orig = dict(kv for t in sorted(src.glob("*.tar")) for kv in iter_samples(t))
    for r in res.labels.iter_rows(named=True):
        g = groups[r["key"]]
        if r["kind"] == "exact_dup":
            assert g["png"] == orig[r["source_key"]]["png"] and g["txt"] == orig[r["source_key"]]["txt"]
        elif r["kind"] == "near_dup":
            a = np.asarray(Image.open(io.BytesIO(g["jpg"])).convert("RGB"), dtype=float)
            assert a.shape == (16, 16, 3)
        elif r["kind"] == "corrupt":
            with pytest.raises(OSError):
                Image.open(io.BytesIO(g["png"])).load()
        elif r["kind"] == "swapped":
            concept = json.loads(g["json"])["concept"]
            assert g["txt"].decode() != f"a {concept} thing"  # carries another concept's caption
        elif r["kind"] == "blank":
            assert len(np.unique(np.asarray(Image.open(io.BytesIO(g["png"]))).reshape(-1, 3), axis=0)) == 1
    with pytest.raises(ValueError, match="expected any of"):
        plant_noise(src, tmp_path / "x", "x", rates={"typo": 0.1})
    # the images: planted samples per kind with each recipe's decision
    samples = pl.DataFrame({"uid": ["u1"], "shard": [shard_key("toy_audit", "00000")], "key": [res.labels["key"][0]]})
    png = plot_examples(res.labels, res.out_dir, samples, set(), {"full": {"u1"}, "clipscore@0.5": set()}, tmp_path / "ex.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_roc_auc_by_hand():
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), np.array([1, 0, 0, 1])) == 0.75  # 3 of 4 pairs won:: (0.9>0.1),(0.9>0.8),(0.2>0.1),(0.2<0.8)
    assert roc_auc(np.array([1.0]), np.array([1])) is None


def test_score_audit_by_hand():
    sh = shard_key("toy_audit", "00000")
    labels = pl.DataFrame({
        "dataset": ["toy_audit"] * 5, "stem": ["00000"] * 5,
        "key": ["a_dup0", "b_near0", "c", "d", "e_bad0"],
        "kind": ["exact_dup", "near_dup", "swapped", "swapped", "corrupt"],
        "source_key": ["a", "b", "c", "d", "e"],
    })  # fmt: skip
    keys = ["a", "a_dup0", "b", "b_near0", "c", "d", "e", "f"]
    samples = pl.DataFrame({"uid": [f"u_{k}" for k in keys], "dataset": "toy_audit", "shard": sh, "key": keys})
    quarantine = pl.DataFrame({"dataset": ["toy_audit"] * 2, "shard": [sh, sh], "key": ["e_bad0", "zzz"], "stage": "ingest", "reason": "corrupt_image"})
    # M: a_dup0 flagged (exact), b pair not flagged, f flagged (a natural duplicate of the source)
    dedup = pl.DataFrame({"uid": [f"u_{k}" for k in keys], "max_sim_to_earlier": [0.1, 1.0, 0.2, 0.9, 0.1, 0.1, 0.1, 0.99]})
    clip = pl.DataFrame({"uid": [f"u_{k}" for k in keys], "clip_score": [0.5, 0.5, 0.5, 0.5, 0.1, 0.6, 0.5, 0.2]})
    subsets = pl.DataFrame({"recipe": ["clipscore@0.75"] * 6, "uid": [f"u_{k}" for k in ["a", "a_dup0", "b", "b_near0", "d", "e"]]})
    res = score_audit(labels, samples, quarantine, dedup, clip, subsets, dedup_eps=[0.05], clipscore_recipes=["clipscore@0.75"])
    f = {(r["filter"], r["catches"]): r for r in res["filters"].iter_rows(named=True)}
    q = f[("quarantine", "corrupt")]
    assert q["precision"] == 0.5 and q["recall"] == 1.0 and q["flagged"] == 2  # 'zzz' is not planted
    ex = f[("semdedup@eps=0.05", "exact_dup")]
    assert ex["recall"] == 1.0 and ex["flagged"] == 2 and ex["precision"] == 0.5  # a_dup0 and f flagged
    nd = f[("semdedup@eps=0.05", "near_dup")]
    assert nd["recall"] == 0.0 and nd["precision"] == 0.0
    cs = f[("clipscore@0.75", "swapped")]
    # dropped: c (swapped), f (clean) -> precision 1/2; swapped c, d -> recall 1/2
    assert cs["precision"] == 0.5 and cs["recall"] == 0.5
    assert "ROC AUC" in f[("clip_score (threshold-free)", "swapped")]["note"]
    kept = res["kept"].row(0, named=True)
    assert kept["recipe"] == "clipscore@0.75" and kept["swapped"] == 0.5 and kept["clean"] == pytest.approx(3 / 4)
    md = audit_markdown(res, pl.DataFrame({"recipe": ["full"], "average": [0.1]}))
    assert "| quarantine | corrupt | 0.500 | 1.000 |" in md and "noisy pool" in md


@pytest.mark.e2e
def test_curation_audit_end_to_end(tmp_path, monkeypatch, capsys, one_torch_thread):
    """`curation audit` on a tiny built dataset: plants noise, curates the copy in its own home, scores."""
    from assets.cli import main

    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("CURATION_TORCH_THREADS", "1")
    assert main(["datasets", "build", "default", "--limit", "60", "--samples-per-shard", "100"]) == 0
    rc = main(["audit", "--shards", "1", "--samples-seen", "128", "--recipes", "full", "semdedup@eps=0.05"])
    out = capsys.readouterr().out
    assert rc == 0, out
    audit = tmp_path / "data" / "artifacts" / "audit"
    md = (audit / "audit.md").read_text()
    assert "| quarantine | corrupt |" in md and "semdedup@eps=0.05" in md and "noisy pool" in md
    assert "![audit_examples](audit_examples.png)" in md and (audit / "audit_examples.png").exists()
    filters = pl.read_parquet(audit / "filters.parquet")
    q = filters.filter(pl.col("filter") == "quarantine").row(0, named=True)
    assert q["planted"] >= 1 and q["recall"] == 1.0  # a truncated PNG never passes ingest
    labels = pl.read_parquet(audit / "labels.parquet")
    assert set(labels["kind"].unique()) <= {"exact_dup", "near_dup", "swapped", "blank", "corrupt"}
    assert main(["audit", "--dataset", "nope"]) == 2
