"""Thumbnails from shards, the data views, the per-sample explanation and the HTML explorer,
on a hand-built lake whose answers are known (no models)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from curation.evaluate import views
from curation.evaluate.explain import explain, format_explanation
from curation.evaluate.explorer import render_explorer, shown_uids, write_explorer
from curation.ingest.ids import make_uid
from curation.ingest.shard_writer import Record, write_shards
from curation.ingest.thumbnails import (
    load_key_thumbnails,
    load_thumbnails,
    thumbnail_bytes,
)
from curation.storage.lake import Lake, matrix_to_list_column

COLORS = [(255, 0, 0), (250, 5, 0), (0, 0, 255), (245, 10, 5), (0, 200, 0), (10, 190, 0)]
EVIL = '<script>alert("x")</script> & </script>'


def _png(color, size=(40, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture
def toy(tmp_path):
    """6 samples in one shard (+ one corrupt image quarantined), 2 clusters, SemDeDup
    scores where samples 1 and 3 duplicate sample 0, recipes full / semdedup / random."""
    landing = tmp_path / "landing"
    recs = [Record(key=f"k{i}", image=_png(c), ext="png", caption=f"caption {i}" if i else EVIL) for i, c in enumerate(COLORS)]
    recs.append(Record(key="bad", image=_png((1, 1, 1)), ext="png", caption="corrupt"))
    write_shards(recs, landing / "toy", rekey=False)
    # corrupt the 'bad' image in place: rewrite the tar with garbage bytes for bad.png
    import tarfile

    tar = landing / "toy" / "00000.tar"
    members = []
    with tarfile.open(tar) as tf:
        for m in tf:
            members.append((m, tf.extractfile(m).read()))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == "bad.png":
                data = b"\x89PNG not really"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))

    db = Lake(str(tmp_path / "lake"))
    shard = "toy-00000"
    uids = [make_uid("toy", shard, f"k{i}") for i in range(6)]
    db.write("samples", pl.DataFrame({
        "uid": uids, "dataset": ["toy"] * 6, "shard": [shard] * 6, "key": [f"k{i}" for i in range(6)],
        "caption": [r.caption for r in recs[:6]], "width": pl.Series([40] * 6, dtype=pl.Int32),
        "height": pl.Series([20] * 6, dtype=pl.Int32), "format": ["png"] * 6, "image_sha256": ["0" * 64] * 6,
        "n_bytes": [100] * 6, "member": [f"k{i}.png" for i in range(6)],
    }), partition=shard)
    db.write("quarantine", pl.DataFrame({"dataset": ["toy"], "shard": [shard], "key": ["bad"], "stage": ["ingest"],
                                         "reason": ["corrupt_image"], "detail": ["cannot identify image file"]}), partition=shard)
    # embeddings: 0, 1, 3 nearly equal (red); 2 alone; 4, 5 a green pair (cos 0.8: not duplicates)
    x = np.zeros((6, 4), np.float32)
    x[0] = [1, 0, 0, 0]
    x[1] = [0.999, 0.0447, 0, 0]
    x[3] = [0.998, 0, 0.0632, 0]
    x[2] = [0, 1, 0, 0]
    x[4] = [0, 0, 0, 1]
    x[5] = [0, 0, 0.6, 0.8]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    db.write("embeddings", pa.table({"uid": uids, "shard": [shard] * 6, "image_emb": matrix_to_list_column(x),
                                     "text_emb": matrix_to_list_column(x), "encoder": ["test"] * 6}), partition=shard)
    cid = [0, 0, 0, 0, 1, 1]
    cos = [0.5, 0.6, 0.9, 0.7, 0.8, 0.85]  # SemDeDup order in cluster 0: 0 (0.5), 1, 3, 2
    cent = np.eye(2, 4, dtype=np.float32)
    db.write("clusters", pa.table({"cluster_id": pa.array([0, 1], pa.int32()), "centroid": matrix_to_list_column(cent),
                                   "size": pa.array([4, 2], pa.int64()), "d_intra": [0.2, 0.1], "d_inter": [0.5, 0.4],
                                   "complexity": [0.1, 0.04], "weight": [0.6, 0.4]}))
    db.write("assignments", pl.DataFrame({"uid": uids, "shard": [shard] * 6, "cluster_id": pl.Series(cid, dtype=pl.Int32),
                                          "cos_to_centroid": pl.Series(cos, dtype=pl.Float32)}))
    from curation.select.semdedup import semdedup_scores

    m = semdedup_scores(x, np.array(cid), np.array(cos, np.float32), np.array(uids))
    db.write("dedup_scores", pl.DataFrame({"uid": uids, "cluster_id": pl.Series(cid, dtype=pl.Int32),
                                           "max_sim_to_earlier": pl.Series(m, dtype=pl.Float32)}))
    dup = [uids[1], uids[3]]
    for recipe, kept in (("full", uids), ("semdedup@eps=0.05", [u for u in uids if u not in dup]), ("random@0.5", uids[::2])):
        db.write("subsets", pl.DataFrame({"recipe": [recipe] * len(kept), "uid": kept, "rank": list(range(len(kept))),
                                          "score": [0.0] * len(kept)}), partition=recipe)
    return {"db": db, "landing": landing, "uids": uids, "m": m, "x": x}


def test_thumbnail_is_bounded_jpeg_and_undecodable_is_none():
    big = _png((10, 20, 30), size=(800, 400))
    t = thumbnail_bytes(big, size=64)
    img = Image.open(io.BytesIO(t))
    assert img.format == "JPEG" and max(img.size) == 64 and img.size == (64, 32)
    assert thumbnail_bytes(b"not an image") is None
    assert thumbnail_bytes(big, max_pixels=1000) is None  # checked before decoding


def test_thumbnails_read_from_the_shard_on_demand(toy):
    reqs = [{"uid": u, "shard": "toy-00000", "member": f"k{i}.png"} for i, u in enumerate(toy["uids"])]
    out = load_thumbnails(toy["landing"], reqs, size=32, max_count=4)
    assert list(out) == toy["uids"][:4]  # bounded in number
    px = _decode(out[toy["uids"][2]]).convert("RGB").getpixel((5, 5))
    assert px[2] > 200 and px[0] < 60  # sample 2 is blue
    missing = load_thumbnails(toy["landing"], [{"uid": "x", "shard": "toy-00000", "member": "nope.png"}])
    assert missing == {"x": None}
    q = load_key_thumbnails(toy["landing"], [("toy-00000", "bad"), ("toy-00000", "k0")])
    assert q[("toy-00000", "bad")] is None and q[("toy-00000", "k0")].startswith("data:image/jpeg")
    with pytest.raises(ValueError, match="expected 8 <= size"):
        load_thumbnails(toy["landing"], reqs, size=4)


def test_duplicate_groups_keep_the_first_member_in_semdedup_order():
    x = np.array([[1, 0], [0.999, 0.0447], [0, 1], [0.998, 0.0632]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = views.duplicate_groups_in_cluster(x, eps=0.01)
    assert [(k, [j for j, _ in rem]) for k, rem in groups] == [(0, [1, 3])]
    assert groups[0][1][0][1] == pytest.approx(float(x[0] @ x[1]))
    assert views.duplicate_groups_in_cluster(x, eps=1e-6) == []


def test_dedup_groups_view_and_curve(toy):
    d = views.dedup_groups(toy["db"], toy["landing"], eps=0.05)
    assert d["n"] == 6 and d["removed"] == 2
    (g,) = d["groups"]
    assert g["kept"]["uid"] == toy["uids"][0] and {s["uid"] for s in g["removed"]} == {toy["uids"][1], toy["uids"][3]}
    assert all(s["thumb"] for s in [g["kept"], *g["removed"]])
    curve = dict(d["curve"])
    assert curve[0.05] == pytest.approx(2 / 6) and all(a <= b for a, b in zip(list(curve.values()), list(curve.values())[1:]))


def test_cluster_gallery_rows_and_recipe_counts(toy):
    (c0, c1) = sorted(views.cluster_gallery(toy["db"], toy["landing"], per=1), key=lambda c: c["cluster_id"])
    u = toy["uids"]
    assert c0["central"][0]["uid"] == u[2] and c0["peripheral"][0]["uid"] == u[0]  # cos 0.9 / 0.5
    assert c0["random"][0]["uid"] in (u[1], u[3])
    assert c0["recipes"]["semdedup@eps=0.05"] == {"kept": 2, "keep_fraction": 0.5}
    assert c0["recipes"]["full"]["kept"] == 4 and c1["size"] == 2
    only = views.cluster_gallery(toy["db"], toy["landing"], per=1, recipes=["full"])
    assert set(only[0]["recipes"]) == {"full"}
    assert views.cluster_gallery(toy["db"], toy["landing"], recipes=[])[0]["recipes"] == {}


def test_kept_removed_reasons_and_waterfall(toy):
    rows = {r["recipe"]: r for r in views.kept_removed(toy["db"], toy["landing"], n=3)}
    sd = rows["semdedup@eps=0.05"]
    assert sd["n_kept"] == 4 and {s["uid"] for s in sd["removed"]} == {toy["uids"][1], toy["uids"][3]}
    assert all(s["reason"].startswith("SemDeDup duplicate: M=") for s in sd["removed"])
    assert rows["full"]["removed"] == []
    wf = {r["recipe"]: r for r in views.waterfall(toy["db"])}
    assert wf["semdedup@eps=0.05"] == {"recipe": "semdedup@eps=0.05", "seen": 7, "quarantine": 1, "dedup": 2,
                                       "pruning": 0, "kept": 4, "eps": 0.05}
    assert wf["random@0.5"]["pruning"] == 3 and wf["random@0.5"]["dedup"] == 0


def test_kept_removed_draws_rows_without_reading_the_pool(tmp_path):
    """On a pool larger than the pick, kept and removed samples are drawn by position: every
    removed pick is a pool uid the recipe did not keep, every kept pick one it kept, the same
    seed gives the same picks; when almost nothing was removed the draw grows until it finds
    exactly those rows."""
    db = Lake(str(tmp_path / "lake"))
    uids = [make_uid("big", "s", str(i)) for i in range(3000)]
    db.write("assignments", pl.DataFrame({"uid": uids, "shard": ["s"] * 3000, "cluster_id": [0] * 3000,
                                          "cos_to_centroid": [0.5] * 3000}))
    kept = set(uids[::3]) | set(uids[1::3])  # 2,000 kept
    db.write("subsets", pl.DataFrame({"recipe": ["two-thirds"] * 2000, "uid": sorted(kept)}), partition="two-thirds")
    almost = set(uids) - {uids[17], uids[2900]}
    db.write("subsets", pl.DataFrame({"recipe": ["almost-all"] * 2998, "uid": sorted(almost)}), partition="almost-all")
    rows = {r["recipe"]: r for r in views.kept_removed(db, tmp_path / "landing", n=6)}
    tt = rows["two-thirds"]
    assert (tt["n_pool"], tt["n_kept"]) == (3000, 2000)
    got_k, got_r = [s["uid"] for s in tt["kept"]], [s["uid"] for s in tt["removed"]]
    assert len(set(got_k)) == 6 and set(got_k) <= kept
    assert len(set(got_r)) == 6 and set(got_r) <= set(uids) - kept
    assert all(s["reason"] == "pruned by two-thirds" for s in tt["removed"])
    again = {r["recipe"]: r for r in views.kept_removed(db, tmp_path / "landing", n=6)}
    assert [s["uid"] for s in again["two-thirds"]["removed"]] == got_r and [s["uid"] for s in again["two-thirds"]["kept"]] == got_k
    other = {r["recipe"]: r for r in views.kept_removed(db, tmp_path / "landing", n=6, seed=1)}
    assert [s["uid"] for s in other["two-thirds"]["removed"]] != got_r
    assert {s["uid"] for s in rows["almost-all"]["removed"]} == {uids[17], uids[2900]}


def test_quarantine_examples_show_the_reason(toy):
    (q,) = views.quarantine_examples(toy["db"], toy["landing"])
    assert (q["reason"], q["count"]) == ("corrupt_image", 1)
    assert q["examples"][0]["key"] == "bad" and q["examples"][0]["thumb"] is None


def test_explain_reads_only_the_explained_samples_rows(toy, monkeypatch):
    """One explanation reads its uid's rows of the uid-keyed tables (streamed), never a whole
    pool table; the explorer's cache holds only the shown samples' rows and gives the same."""
    from curation.evaluate.explain import explain_cache

    whole = []
    real = Lake.read

    def spy(self, table, *a, **k):
        whole.append(table)
        return real(self, table, *a, **k)

    monkeypatch.setattr(Lake, "read", spy)
    e = explain(toy["db"], toy["uids"][1])
    assert e["found"] and e["M"] == pytest.approx(float(toy["m"][1]))
    assert not set(whole) & {"samples", "assignments", "dedup_scores", "filter_embeddings", "subsets"}, whole
    cache = explain_cache(toy["db"], toy["uids"][:2])
    assert cache["samples"]["uid"].sort().to_list() == sorted(toy["uids"][:2])
    assert cache["assignments"].height == 2
    assert explain(toy["db"], toy["uids"][1], cache) == e


def test_explain_a_removed_duplicate_and_a_quarantined_sample(toy):
    e = explain(toy["db"], toy["uids"][1])
    assert e["found"] and e["source"]["key"] == "k1" and e["cluster"]["cluster_id"] == 0
    assert e["M"] == pytest.approx(float(toy["m"][1]))
    by = {r["recipe"]: r for r in e["recipes"]}
    assert by["full"]["kept"] and not by["semdedup@eps=0.05"]["kept"]
    assert "SemDeDup duplicate" in by["semdedup@eps=0.05"]["why"]
    assert "KEPT    full" in format_explanation(e)
    q = explain(toy["db"], make_uid("toy", "toy-00000", "bad"))
    assert q["found"] and q["quarantine"][0]["reason"] == "corrupt_image"
    assert all("not in the pool" in r["why"] for r in q["recipes"])
    with pytest.raises(ValueError, match="expected 32 hex"):
        explain(toy["db"], "xyz")


def test_explorer_is_self_contained_and_escapes_captions(toy, tmp_path):
    res = write_explorer(toy["db"], toy["landing"], tmp_path / "reports")
    text = res["path"].read_text()
    assert res["images"] >= 6
    assert EVIL not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "</script> &" not in text  # the embedded JSON cannot close its script element
    assert "http://" not in text and "https://" not in text  # nothing fetched
    blob = text.split('id="explanations">', 1)[1].split("</script>", 1)[0]
    ex = json.loads(blob)
    assert set(ex) == set(shown_uids(res["data"])) and toy["uids"][0] in ex
    for anchor in ('id="clusters"', 'id="semdedup"', 'id="recipes"', 'id="quarantine"', "image does not decode"):
        assert anchor in text


def test_render_explorer_with_an_empty_lake():
    empty = {"waterfall": [], "clusters": [], "dedup": {"eps": 0.05, "n": 0, "removed": 0, "curve": [], "groups": []},
             "kept_removed": [], "quarantine": []}
    html = render_explorer(empty, {})
    assert "No recipe has run yet" in html and "No sample was quarantined" in html
