"""The comparison report: hand-made eval results -> table, deltas, markdown, HTML, PNG plots."""

from __future__ import annotations

import polars as pl
import pytest

from curation.evaluate.report import (
    build_comparison,
    method_of,
    metric_columns,
    metric_label,
    to_markdown,
    write_report,
)

RECIPES = {"full": 1000, "random@0.5": 500, "random@0.25": 250, "dbp@0.5": 500, "semdedup@eps=0.05": 800}
# (recipe, seed) -> (group mean_per_class_recall, retrieval mean_recall@1)
SCORES = {
    ("full", 0): (0.40, 0.20), ("full", 1): (0.44, 0.22),
    ("random@0.5", 0): (0.30, 0.10), ("random@0.5", 1): (0.34, 0.12),
    ("random@0.25", 0): (0.20, 0.05), ("random@0.25", 1): (0.20, 0.05),
    ("dbp@0.5", 0): (0.38, 0.16), ("dbp@0.5", 1): (0.40, 0.18),
    ("semdedup@eps=0.05", 0): (0.42, 0.20), ("semdedup@eps=0.05", 1): (0.42, 0.24),
}  # fmt: skip


def eval_frame() -> pl.DataFrame:
    rows = []
    for (recipe, seed), (acc, rec) in SCORES.items():
        ck = f"/ck/{recipe}/seed{seed}.pt"
        base = {"recipe": recipe, "checkpoint": ck, "seed": seed}
        rows += [
            {**base, "task": "emoji-heldout/zeroshot/group", "metric": "mean_per_class_recall", "value": acc},
            {**base, "task": "emoji-heldout/zeroshot/group", "metric": "acc1", "value": 0.9},
            {**base, "task": "emoji-heldout/zeroshot/group", "metric": "n_classes", "value": 9.0},
            {**base, "task": "emoji-heldout/retrieval", "metric": "mean_recall@1", "value": rec},
            {**base, "task": "emoji-heldout/retrieval", "metric": "text_retrieval_recall@5", "value": 0.5},
            {**base, "task": "average", "metric": "main", "value": (acc + rec) / 2},
            {**base, "task": "average", "metric": "tasks", "value": 2.0},
        ]
    return pl.DataFrame(rows)


def ckpt_frame() -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"recipe": r, "strategy": "clip", "model": "tiny-vit-p8-32", "path": f"/ck/{r}/seed{s}.pt",
             "samples_seen": 4096, "seconds": 10.0 + s, "config_json": "{}"}
            for (r, s) in SCORES
        ]  # fmt: skip
    )


def test_labels_and_methods():
    assert method_of("dbp@0.5") == "dbp" and method_of("full") == "full"
    assert metric_label("emoji-heldout/zeroshot/group") == "zeroshot/group mean_per_class_recall"
    assert metric_label("emoji-heldout/retrieval") == "retrieval mean_recall@1"


def test_comparison_holds_every_recipe_with_hand_computed_numbers():
    cmp = build_comparison(eval_frame(), ckpt_frame(), RECIPES)
    assert sorted(cmp["recipe"].to_list()) == sorted(RECIPES)
    assert metric_columns(cmp) == ["retrieval mean_recall@1", "zeroshot/group mean_per_class_recall", "average"]
    row = {r["recipe"]: r for r in cmp.iter_rows(named=True)}
    full, dbp, sd = row["full"], row["dbp@0.5"], row["semdedup@eps=0.05"]
    assert full["kept"] == 1000 and full["fraction"] == 1.0 and dbp["fraction"] == 0.5
    assert full["seeds"] == 2 and full["samples_seen"] == 4096 and full["train_seconds"] == pytest.approx(10.5)
    assert full["zeroshot/group mean_per_class_recall"] == pytest.approx(0.42) and full["zeroshot/group mean_per_class_recall std"] == pytest.approx(0.02)
    full_avg = (0.30 + 0.33) / 2  # seed means of (acc + rec)/2: 0.30, 0.33
    assert full["average"] == pytest.approx(full_avg)
    dbp_avg = ((0.38 + 0.16) / 2 + (0.40 + 0.18) / 2) / 2
    rnd_avg = ((0.30 + 0.10) / 2 + (0.34 + 0.12) / 2) / 2
    assert dbp["delta_full"] == pytest.approx(dbp_avg - full_avg)
    assert dbp["random_ref"] == "random@0.5" and dbp["delta_random"] == pytest.approx(dbp_avg - rnd_avg)
    # 800 kept: the nearest random recipe is random@0.5 (500), not random@0.25
    assert sd["random_ref"] == "random@0.5"
    assert row["random@0.25"]["random_ref"] == "random@0.25" and row["random@0.25"]["delta_random"] == 0.0
    assert row["random@0.25"]["average std"] == 0.0


def test_comparison_without_full_or_random_has_null_deltas():
    ev = eval_frame().filter(pl.col("recipe") == "dbp@0.5")
    cmp = build_comparison(ev, ckpt_frame(), {"dbp@0.5": 500}, pool_size=1000)
    r = cmp.row(0, named=True)
    assert r["delta_full"] is None and r["delta_random"] is None and r["fraction"] == 0.5
    with pytest.raises(ValueError, match="got 0 rows"):
        build_comparison(ev.head(0), ckpt_frame(), {})


def test_markdown_html_and_plots(tmp_path):
    cmp = build_comparison(eval_frame(), ckpt_frame(), RECIPES)
    md = to_markdown(cmp)
    lines = md.splitlines()
    assert len(lines) == 2 + len(RECIPES)
    for r in RECIPES:
        assert any(line.startswith(f"| {r} |") for line in lines)
    assert "±" in md  # several seeds: mean ± std
    out = write_report(cmp, tmp_path / "reports", notes=["pool: 1000 samples"])
    html = out["html"].read_text()
    assert all(r in html for r in RECIPES) and "pool: 1000 samples" in html
    assert len(out["plots"]) == 3
    for p in out["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.name in html
    assert pl.read_parquet(out["table"]).height == len(RECIPES)
    assert out["markdown"].read_text().startswith("# Curation report")
