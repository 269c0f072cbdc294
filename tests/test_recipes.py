"""Recipes: config validation, lookup errors, hashing, and every method through apply_recipe."""

import dataclasses

import numpy as np
import pytest

from curation.select.clustering import assign, train_centroids
from curation.select.semdedup import is_duplicate, semdedup_scores
from curation.select.recipes import (
    Pool,
    Recipe,
    apply_recipe,
    expected_keep,
    get_recipe,
    load_recipes,
    parse_recipe,
    recipe_config_path,
    recipe_hash,
    recipe_names,
)

PACKAGED = ["full", "full+slip", "random@0.5", "random@0.5+semdedup", "semdedup@eps=0.05", "ssp@0.5", "dbp@0.5", "clipscore@0.5", "clipcov@0.5"]


def test_packaged_recipes_load():
    assert recipe_names() == PACKAGED
    r = get_recipe("dbp@0.5")
    assert r.method == "dbp" and r.keep_fraction == 0.5 and r.after_semdedup_eps == 0.05 and r.tau == 0.5
    assert get_recipe("clipcov@0.5").needs_aligned and not r.needs_aligned
    assert r.needs_dedup and not get_recipe("random@0.5").needs_dedup
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.tau = 1.0  # type: ignore[misc]


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown recipe 'dbp@0.9'; expected one of \['full', 'full\+slip', 'random@0.5'"):
        get_recipe("dbp@0.9")


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"method": "dbp", "keep_fraction": 0.5, "temperature": 1}, r"unknown keys \['temperature'\]"),
        ({"method": "random", "keep_fraction": 0.5, "tau": 1}, r"unknown keys \['tau'\] for method 'random'"),
        ({"method": "dbp"}, r"missing keys \['keep_fraction'\]"),
        ({"method": "prune", "keep_fraction": 0.5}, r"method: got 'prune'; expected one of"),
        ({"keep_fraction": 0.5}, r"got no 'method'"),
        ({"method": "dbp", "keep_fraction": 1.5}, r"keep_fraction: got 1.5; expected 0 < f <= 1"),
        ({"method": "ssp", "keep_fraction": 0.5, "order": "medium"}, r"order: got 'medium'"),
        ({"method": "semdedup", "eps": "small"}, r"eps: got 'small'; expected a number"),
        ({"method": "clipscore"}, r"expected exactly one of them"),
        ({"method": "clipscore", "keep_fraction": 0.3, "threshold": 0.2}, r"expected exactly one of them"),
        ({"method": "dbp", "keep_fraction": 0.5, "seed": 1.5}, r"seed: got 1.5; expected an integer"),
        ({"method": "clipcov", "keep_fraction": 0.5, "classes": "imagenet"}, r"classes: got 'imagenet'"),
    ],
)
def test_invalid_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe("r", spec)


def test_env_var_points_at_another_file(tmp_path, monkeypatch):
    p = tmp_path / "r.yaml"
    p.write_text("recipes:\n  tiny: {method: random, keep_fraction: 0.1, seed: 3}\n")
    monkeypatch.setenv("CURATION_RECIPES", str(p))
    assert recipe_config_path() == str(p)
    assert recipe_names() == ["tiny"]
    assert get_recipe("tiny").seed == 3
    p.write_text("recipe:\n  tiny: {method: full}\n")
    with pytest.raises(ValueError, match="expected exactly one key 'recipes'"):
        load_recipes()


def test_recipe_hash_stable_and_sensitive():
    a = parse_recipe("a", {"method": "dbp", "keep_fraction": 0.5})
    b = parse_recipe("b", {"method": "dbp", "keep_fraction": 0.5})
    c = parse_recipe("c", {"method": "dbp", "keep_fraction": 0.5, "tau": 0.1})
    assert recipe_hash(a) == recipe_hash(b) and len(recipe_hash(a)) == 12
    assert recipe_hash(a) != recipe_hash(c)


def test_train_strategy_is_a_training_setting_of_any_recipe():
    from curation.select.recipes import TRAIN_STRATEGIES
    from curation.train.config import STRATEGIES

    assert TRAIN_STRATEGIES == STRATEGIES  # select may not import train: the two lists must agree
    full = parse_recipe("full", {"method": "full"})
    slip = parse_recipe("full+slip", {"method": "full", "train_strategy": "slip"})
    dbp = parse_recipe("d", {"method": "dbp", "keep_fraction": 0.5, "train_strategy": "flip"})
    assert slip.train_strategy == "slip" and dbp.train_strategy == "flip" and full.train_strategy is None
    # the same samples: the subset's hash does not depend on how it is trained
    assert recipe_hash(slip) == recipe_hash(full)
    with pytest.raises(ValueError, match=r"train_strategy: got 'simclr'; expected one of \('clip', 'clip_da', 'flip', 'slip'\)"):
        parse_recipe("x", {"method": "full", "train_strategy": "simclr"})
    with pytest.raises(ValueError, match="train_strategy: got 1; expected a string"):
        parse_recipe("x", {"method": "full", "train_strategy": 1})


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    n, d, k = 600, 16, 6
    centers = rng.standard_normal((k, d)).astype(np.float32)
    x = centers[rng.integers(0, k, n)] * 2 + rng.standard_normal((n, d)).astype(np.float32)
    x[:40] = x[100:140] + 1e-3  # planted near-duplicates
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    uids = np.array([f"{i:032x}" for i in range(n)])
    cent = train_centroids(x, k, niter=20, seed=0)
    ids, cos = assign(x, cent)
    m = semdedup_scores(x, ids, cos, uids)
    return Pool(uids=uids, cluster_ids=ids, cos_to_centroid=cos, centroids=cent, max_sim=m,
                embeddings=x, image_aligned=x, text_aligned=y.astype(np.float32))


@pytest.mark.parametrize("name", PACKAGED)
def test_every_packaged_recipe_applies(pool, name):
    r = get_recipe(name)
    sel = apply_recipe(r, pool)
    assert len(set(sel.uids.tolist())) == len(sel.uids)
    np.testing.assert_array_equal(sel.rank, np.arange(len(sel.uids)))
    np.testing.assert_array_equal(sel.uids, pool.uids[sel.index])
    if sel.stats["n_keep"] is not None:
        assert sel.stats["n_kept"] == sel.stats["n_keep"]
    if "budgets" in sel.stats:
        assert sel.stats["budgets"].sum() == sel.stats["n_kept"]
        assert np.all(sel.stats["budgets"] <= sel.stats["sizes"])
    frame = sel.to_frame()
    assert frame.columns == ["recipe", "uid", "rank", "score"] and frame.height == len(sel.uids)


def test_chaining_runs_on_the_pool_after_dedup(pool):
    dup = is_duplicate(pool.max_sim, 0.05)
    assert dup.sum() >= 40
    for name in ("ssp@0.5", "dbp@0.5"):
        sel = apply_recipe(get_recipe(name), pool)
        assert not dup[sel.index].any()
        assert sel.stats["n_candidates"] == (~dup).sum()
        assert sel.stats["n_kept"] == expected_keep(get_recipe(name), int((~dup).sum()))
    sd = apply_recipe(get_recipe("semdedup@eps=0.05"), pool)
    assert set(sd.index.tolist()) == set(np.flatnonzero(~dup).tolist())


def test_dbp_keeps_hard_examples_and_follows_complexity(pool):
    r = parse_recipe("d", {"method": "dbp", "keep_fraction": 0.3})
    sel = apply_recipe(r, pool)
    # In every cluster the kept members are the least prototypical ones.
    for c in range(pool.k):
        mem = np.flatnonzero(pool.cluster_ids == c)
        kept = np.intersect1d(mem, sel.index)
        if 0 < kept.size < mem.size:
            dropped = np.setdiff1d(mem, kept)
            assert pool.cos_to_centroid[kept].max() <= pool.cos_to_centroid[dropped].min()
    easy = apply_recipe(parse_recipe("e", {"method": "dbp", "keep_fraction": 0.3, "order": "easy"}), pool)
    np.testing.assert_array_equal(np.sort(easy.stats["budgets"]), np.sort(sel.stats["budgets"]))
    assert set(easy.index.tolist()) != set(sel.index.tolist())


def test_random_is_seeded(pool):
    a = apply_recipe(parse_recipe("r", {"method": "random", "keep_fraction": 0.25, "seed": 1}), pool)
    b = apply_recipe(parse_recipe("r", {"method": "random", "keep_fraction": 0.25, "seed": 1}), pool)
    c = apply_recipe(parse_recipe("r", {"method": "random", "keep_fraction": 0.25, "seed": 2}), pool)
    np.testing.assert_array_equal(a.index, b.index)
    assert set(a.index.tolist()) != set(c.index.tolist())
    assert a.stats["n_kept"] == 150


def test_clipscore_keeps_best_aligned(pool):
    sel = apply_recipe(get_recipe("clipscore@0.5"), pool)
    score = (pool.image_aligned * pool.text_aligned).sum(1)
    dropped = np.setdiff1d(np.arange(pool.n), sel.index)
    assert score[sel.index].min() >= score[dropped].max() - 1e-6
    thr = apply_recipe(parse_recipe("t", {"method": "clipscore", "threshold": 0.9}), pool)
    assert set(thr.index.tolist()) == set(np.flatnonzero(score > 0.9).tolist())


def test_aligned_and_dedup_inputs_are_required(pool):
    bare = Pool(uids=pool.uids, cluster_ids=pool.cluster_ids, cos_to_centroid=pool.cos_to_centroid, centroids=pool.centroids)
    with pytest.raises(ValueError, match="expected both for clipscore/clipcov"):
        apply_recipe(get_recipe("clipcov@0.5"), bare)
    with pytest.raises(ValueError, match="neither max_sim nor embeddings"):
        apply_recipe(get_recipe("semdedup@eps=0.05"), bare)
    # M is computed from the embeddings when not given
    no_m = dataclasses.replace(pool, max_sim=None)
    a = apply_recipe(get_recipe("semdedup@eps=0.05"), no_m)
    b = apply_recipe(get_recipe("semdedup@eps=0.05"), pool)
    np.testing.assert_array_equal(a.index, b.index)
    with pytest.raises(ValueError, match="Pool.cluster_ids: got 2 rows"):
        Pool(uids=pool.uids, cluster_ids=np.zeros(2), cos_to_centroid=pool.cos_to_centroid, centroids=pool.centroids)


def test_recipe_defaults_are_resolved():
    r = Recipe(name="x", method="ssp", keep_fraction=0.5)
    d = r.to_dict()
    assert d["order"] == "hard" and d["seed"] == 0 and d["name"] == "x"
