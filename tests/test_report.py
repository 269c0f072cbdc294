"""The comparison report: hand-made eval results -> table, paired tests, controls, curves, verdict, documents."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from curation.evaluate.report import (
    best_per_metric,
    build_comparison,
    compute_curves,
    method_color,
    method_of,
    metric_columns,
    metric_label,
    reach_full,
    to_markdown,
    verdict,
    write_report,
)

RECIPES = {"full": 1000, "random@0.5": 500, "control:random@0.3+semdedup@eps=0.1": 240, "dbp@0.3": 240, "semdedup@eps=0.1": 800}
CANDIDATES = {"full": 1000, "random@0.5": 1000, "control:random@0.3+semdedup@eps=0.1": 800, "dbp@0.3": 800, "semdedup@eps=0.1": 1000}
CONTROLS = {"dbp@0.3": "control:random@0.3+semdedup@eps=0.1"}
CTRL = "control:random@0.3+semdedup@eps=0.1"
# (recipe, seed) -> (group mean_per_class_recall, retrieval mean_recall@1)
SCORES = {
    ("full", 0): (0.40, 0.20), ("full", 1): (0.44, 0.22), ("full", 2): (0.42, 0.21),
    ("random@0.5", 0): (0.30, 0.10), ("random@0.5", 1): (0.34, 0.12), ("random@0.5", 2): (0.32, 0.11),
    (CTRL, 0): (0.20, 0.05), (CTRL, 1): (0.22, 0.06), (CTRL, 2): (0.20, 0.07),
    ("dbp@0.3", 0): (0.38, 0.16), ("dbp@0.3", 1): (0.40, 0.18), ("dbp@0.3", 2): (0.38, 0.20),
    ("semdedup@eps=0.1", 0): (0.42, 0.20), ("semdedup@eps=0.1", 1): (0.42, 0.24), ("semdedup@eps=0.1", 2): (0.40, 0.18),
}  # fmt: skip


def avg(recipe, seed):
    acc, rec = SCORES[(recipe, seed)]
    return (acc + rec) / 2


def eval_frame(scores=SCORES, suffix="") -> pl.DataFrame:
    rows = []
    for (recipe, seed), (acc, rec) in scores.items():
        ck = f"/ck/{recipe}/seed{seed}{suffix}.pt"
        base = {"recipe": recipe, "checkpoint": ck, "seed": seed}
        rows += [
            {**base, "task": "emoji-heldout/zeroshot/group", "metric": "mean_per_class_recall", "value": acc},
            {**base, "task": "emoji-heldout/zeroshot/group", "metric": "acc1", "value": 0.9},
            {**base, "task": "emoji-heldout/retrieval", "metric": "mean_recall@1", "value": rec},
            {**base, "task": "emoji-heldout/retrieval", "metric": "text_retrieval_recall@5", "value": 0.5},
            {**base, "task": "average", "metric": "main", "value": (acc + rec) / 2},
            {**base, "task": "average", "metric": "tasks", "value": 2.0},
        ]
    return pl.DataFrame(rows)


def ckpt_frame(scores=SCORES, suffix="", samples_seen=4096, main=True) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"recipe": r, "strategy": "clip", "model": "tiny-rn-32", "path": f"/ck/{r}/seed{s}{suffix}.pt",
             "samples_seen": samples_seen, "seconds": 10.0 + s, "config_json": json.dumps({"seed": s, "main_budget": main})}
            for (r, s) in scores
        ]  # fmt: skip
    )


def t2_p(d):
    """Two-sided paired t-test p for 3 differences by hand (df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)))."""
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    t = abs(m / (sd / math.sqrt(3)))
    return 2 * (0.5 - t / (2 * math.sqrt(2 + t * t)))


def table():
    return build_comparison(eval_frame(), ckpt_frame(), RECIPES, candidates=CANDIDATES, controls=CONTROLS)


def test_labels_methods_colors():
    assert method_of("dbp@0.5") == "dbp" and method_of("full") == "full" and method_of(CTRL) == "control"
    assert metric_label("emoji-heldout/zeroshot/group") == "zeroshot/group mean_per_class_recall"
    assert metric_label("emoji-heldout/retrieval") == "retrieval mean_recall@1"
    assert method_color("dbp") == "#2ca02c" and method_color("newmethod") == method_color("newmethod")


def test_comparison_hand_computed_means_fractions_and_paired_tests():
    cmp = table()
    assert sorted(cmp["recipe"].to_list()) == sorted(RECIPES)
    assert cmp["recipe"].to_list()[:3] == ["full", "random@0.5", CTRL]  # full, random, controls first
    assert metric_columns(cmp) == ["retrieval mean_recall@1", "zeroshot/group mean_per_class_recall", "average"]
    row = {r["recipe"]: r for r in cmp.iter_rows(named=True)}
    full, dbp = row["full"], row["dbp@0.3"]
    assert full["seeds"] == 3 and full["samples_seen"] == 4096 and full["train_seconds"] == pytest.approx(11.0)
    assert full["zeroshot/group mean_per_class_recall"] == pytest.approx(0.42)
    assert full["zeroshot/group mean_per_class_recall std"] == pytest.approx(math.sqrt((0.02**2 + 0.02**2) / 3))
    # kept fraction of the pool and of the post-dedup candidates, side by side
    assert dbp["fraction"] == pytest.approx(0.24) and dbp["fraction_candidates"] == pytest.approx(0.30)
    # paired tests over seeds 0, 1, 2
    d_full = [avg("dbp@0.3", s) - avg("full", s) for s in range(3)]
    assert dbp["delta_full"] == pytest.approx(sum(d_full) / 3) and dbp["p_full"] == pytest.approx(t2_p(d_full))
    d_ctrl = [avg("dbp@0.3", s) - avg(CTRL, s) for s in range(3)]
    assert dbp["control"] == CTRL and dbp["delta_control"] == pytest.approx(sum(d_ctrl) / 3)
    assert dbp["p_control"] == pytest.approx(t2_p(d_ctrl)) and dbp["p_control"] < 0.01
    assert full["delta_full"] is None and full["control"] is None and row["random@0.5"]["control"] is None
    assert best_per_metric(cmp) == {"retrieval mean_recall@1": "full", "zeroshot/group mean_per_class_recall": "full", "average": "full"}


def test_only_main_budget_checkpoints_enter_the_table():
    ev = pl.concat([eval_frame(), eval_frame({k: (0.9, 0.9) for k in SCORES}, suffix="-big")])
    ck = pl.concat([ckpt_frame(), ckpt_frame(suffix="-big", samples_seen=8192, main=False)])
    cmp = build_comparison(ev, ck, RECIPES, controls=CONTROLS)
    assert cmp.filter(pl.col("recipe") == "full")["average"][0] == pytest.approx(sum(avg("full", s) for s in range(3)) / 3)


def test_one_seed_has_no_test_and_the_verdict_says_so():
    one = {k: v for k, v in SCORES.items() if k[1] == 0}
    cmp = build_comparison(eval_frame(one), ckpt_frame(one), RECIPES, controls=CONTROLS)
    r = cmp.filter(pl.col("recipe") == "dbp@0.3").row(0, named=True)
    assert r["p_full"] is None and r["p_control"] is None and r["delta_control"] == pytest.approx(avg("dbp@0.3", 0) - avg(CTRL, 0))
    assert any("Only one seed" in v for v in verdict(cmp))
    assert "n/a" in to_markdown(cmp)
    with pytest.raises(ValueError, match="got 0 rows"):
        build_comparison(eval_frame().head(0), ckpt_frame(), {})


def test_verdict_is_generated_from_the_numbers():
    lines = verdict(table())
    text = "\n".join(lines)
    assert lines[0].startswith("Highest average: full (")
    assert "dbp@0.3 beats its size-matched random control" in text
    assert "semdedup@eps=0.1" in text and "Within seed noise of full" in text
    # flip the data: now dbp loses to its control
    flipped = {k: ((0.9, 0.9) if k[0] == CTRL else v) for k, v in SCORES.items()}
    flipped[(CTRL, 1)] = (0.8, 0.9)
    cmp = build_comparison(eval_frame(flipped), ckpt_frame(flipped), RECIPES, controls=CONTROLS)
    assert "dbp@0.3 loses to its size-matched random control" in "\n".join(verdict(cmp))


def curve_data():
    # full: 0.10 at 1000, 0.20 at 2000 (main), 0.25 at 4000; dbp: 0.15, 0.18, 0.30; rnd never reaches 0.20
    pts = {"full": [0.10, 0.20, 0.25], "dbp@0.3": [0.15, 0.18, 0.30], "random@0.5": [0.05, 0.10, 0.12]}
    ev, ck = [], []
    for recipe, ys in pts.items():
        for seen, y in zip((1000, 2000, 4000), ys, strict=True):
            scores = {(recipe, s): (y + 0.01 * (s - 1), y - 0.01 * (s - 1)) for s in range(3)}
            ev.append(eval_frame(scores, suffix=f"-{seen}"))
            ck.append(ckpt_frame(scores, suffix=f"-{seen}", samples_seen=seen, main=seen == 2000))
    return pl.concat(ev), pl.concat(ck)


def test_compute_curves_and_the_compute_to_reach_full():
    ev, ck = curve_data()
    cur = compute_curves(ev, ck)
    assert cur.height == 9 and set(cur["seeds"].to_list()) == {3}
    assert cur.filter((pl.col("recipe") == "dbp@0.3") & (pl.col("samples_seen") == 4000))["mean"][0] == pytest.approx(0.30)
    reach = reach_full(cur, 0.20)
    assert reach["full"] == pytest.approx(2000)
    # dbp crosses 0.20 between 2000 (0.18) and 4000 (0.30): 2^(log2 2000 + (0.02 / 0.12) * 1)
    assert reach["dbp@0.3"] == pytest.approx(2000 * 2 ** (1 / 6))
    assert reach["random@0.5"] is None
    cmp = build_comparison(ev, ck, {"full": 1000, "dbp@0.3": 300, "random@0.5": 500})
    text = "\n".join(verdict(cmp, reach, 2000))
    assert "dbp@0.3 at 2,245 samples seen (1.12x full's compute)" in text
    assert "Does not reach full's average within the budgets trained: random@0.5" in text


def test_markdown_html_and_plots(tmp_path):
    cmp = table()
    md = to_markdown(cmp)
    lines = md.splitlines()
    assert len(lines) == 2 + len(RECIPES)
    for r in RECIPES:
        assert any(line.startswith(f"| {r} |") for line in lines)
    assert "±" in md and "**0.420 ± 0.016**" in md  # the best per metric in bold
    assert "of pool" in lines[0] and "of candidates" in lines[0]
    ev, ck = curve_data()
    out = write_report(cmp, tmp_path / "reports", notes=["pool: 1000 samples"], curves=compute_curves(ev, ck),
                       sections=[("Filter audit", "| filter | precision |\n|---|---|\n| semdedup | 0.9 |")])  # fmt: skip
    page = out["html"].read_text()
    assert all(r in page for r in RECIPES) and "pool: 1000 samples" in page and 'class="best"' in page
    assert "paired t-test" in page and "Verdict" in page and "Filter audit" in page and "does not" in page
    assert [p.name for p in out["plots"]] == ["metrics_vs_fraction.png", "compute_curves.png"]
    for p in out["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.name in page
    assert pl.read_parquet(out["table"]).height == len(RECIPES)
    doc = out["markdown"].read_text()
    assert doc.startswith("# Curation report\n\n## Verdict") and out["verdict"][0] in doc


def test_a_difference_below_the_resolution_is_no_difference():
    # identical runs at chance: differences of 1e-4 with zero spread give p = 0 but are not a result
    tiny = {k: (v[0], 0.1 + (1e-4 if k[0] == "dbp@0.3" else 0.0)) for k, v in SCORES.items() if k[0] in ("full", "dbp@0.3")}
    tiny = {k: (0.2, v[1]) for k, v in tiny.items()}
    cmp = build_comparison(eval_frame(tiny), ckpt_frame(tiny), {"full": 1000, "dbp@0.3": 240})
    r = cmp.filter(pl.col("recipe") == "dbp@0.3").row(0, named=True)
    assert r["p_full"] == 0.0 and r["delta_full"] == pytest.approx(5e-5)
    assert "+0.000 ~" in to_markdown(cmp)
    assert any(line.startswith("No subset is significantly better") for line in verdict(cmp))
