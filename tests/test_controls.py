"""Size-matched random controls: derived for every pruning recipe, exactly its size, same candidates."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from curation.select.controls import (
    control_map,
    control_names,
    finalize_control,
    partition_names,
    resolve_recipe,
)
from curation.select.recipes import Pool, apply_recipe, candidates, load_recipes

RECIPES = {
    "full": {"method": "full"},
    "random@0.5": {"method": "random", "keep_fraction": 0.5},
    "semdedup@eps=0.1": {"method": "semdedup", "eps": 0.1},
    "ssp@0.3": {"method": "ssp", "keep_fraction": 0.3, "after_semdedup_eps": 0.1},
    "dbp@0.3": {"method": "dbp", "keep_fraction": 0.3, "after_semdedup_eps": 0.1},
    "clipscore@0.5": {"method": "clipscore", "keep_fraction": 0.5},
    "clipscore>0.2": {"method": "clipscore", "threshold": 0.2},
}


@pytest.fixture()
def recipe_file(tmp_path, monkeypatch):
    p = tmp_path / "recipes.yaml"
    p.write_text(yaml.safe_dump({"recipes": RECIPES}, sort_keys=False))
    monkeypatch.setenv("CURATION_RECIPES", str(p))
    return str(p)


def make_pool(n=200, k=4, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cid = (np.arange(n) % k).astype(np.int32)
    cent = np.stack([emb[cid == j].mean(0) for j in range(k)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    cos = np.einsum("nd,nd->n", emb, cent[cid]).astype(np.float32)
    max_sim = rng.uniform(0.5, 1.0, size=n).astype(np.float32)  # ~20% duplicates at eps 0.1
    txt = rng.normal(size=(n, 8)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return Pool(uids=np.array([f"{i:032x}" for i in range(n)]), cluster_ids=cid, cos_to_centroid=cos,
                centroids=cent, max_sim=max_sim, embeddings=emb, image_aligned=emb, text_aligned=txt)  # fmt: skip


def test_every_pruning_recipe_gets_a_control_without_declaring_it(recipe_file):
    cm = control_map()
    assert set(cm) == {"semdedup@eps=0.1", "ssp@0.3", "dbp@0.3", "clipscore@0.5", "clipscore>0.2"}
    # same fraction and chain -> one shared control; a declared equivalent random recipe is reused
    assert cm["ssp@0.3"] == cm["dbp@0.3"] == "control:random@0.3+semdedup@eps=0.1"
    assert cm["clipscore@0.5"] == "random@0.5"
    assert cm["semdedup@eps=0.1"] == "control:semdedup@eps=0.1"
    assert control_names() == ["control:semdedup@eps=0.1", "control:random@0.3+semdedup@eps=0.1", "control:clipscore>0.2"]
    assert partition_names() == list(RECIPES) + control_names()


def test_controls_off(recipe_file, monkeypatch):
    monkeypatch.setenv("CURATION_CONTROLS", "off")
    assert partition_names() == list(RECIPES)
    monkeypatch.setenv("CURATION_CONTROLS", "maybe")
    with pytest.raises(ValueError, match="expected 'on' or 'off'"):
        partition_names()


def test_controls_have_exactly_the_target_size_and_draw_from_its_candidates(recipe_file):
    pool = make_pool()
    recipes = load_recipes()
    sizes = {name: apply_recipe(r, pool).uids.size for name, r in recipes.items()}
    for target, ctrl in control_map().items():
        rec = finalize_control(resolve_recipe(ctrl), pool, subset_size=lambda name: sizes[name])
        sel = apply_recipe(rec, pool)
        assert sel.uids.size == sizes[target], (target, ctrl)
        cand_target = set(candidates(recipes[target], pool).tolist()) if recipes[target].method != "semdedup" else set(range(pool.n))
        assert set(sel.index.tolist()) <= cand_target
        # a random draw, not the target itself
        assert set(sel.index.tolist()) != set(apply_recipe(recipes[target], pool).index.tolist())


def test_threshold_control_needs_the_target_materialized(recipe_file):
    with pytest.raises(ValueError, match="materialized first"):
        finalize_control(resolve_recipe("control:clipscore>0.2"), make_pool())
    with pytest.raises(ValueError, match="unknown control"):
        resolve_recipe("control:nope")


def test_a_control_trains_with_its_targets_strategy(tmp_path, monkeypatch):
    p = tmp_path / "recipes.yaml"
    recipes = {
        "random@0.5": {"method": "random", "keep_fraction": 0.5},
        "dbp@0.5": {"method": "dbp", "keep_fraction": 0.5},
        "dbp@0.5+slip": {"method": "dbp", "keep_fraction": 0.5, "train_strategy": "slip"},
    }
    p.write_text(yaml.safe_dump({"recipes": recipes}, sort_keys=False))
    monkeypatch.setenv("CURATION_RECIPES", str(p))
    cm = control_map()
    # the clip recipe reuses the declared random@0.5; the slip one gets a slip-trained control
    assert cm == {"dbp@0.5": "random@0.5", "dbp@0.5+slip": "control:random@0.5+train=slip"}
    c = resolve_recipe("control:random@0.5+train=slip")
    assert (c.method, c.keep_fraction, c.train_strategy) == ("random", 0.5, "slip")
