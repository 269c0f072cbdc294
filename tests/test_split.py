"""`curation datasets split`: whole concepts (or a uniform slice) leave the pool for an eval set."""

from __future__ import annotations

import io
import json
import tarfile

import polars as pl
import pytest
from PIL import Image

from curation.ingest.datasets_cli import main as datasets_main
from curation.ingest.shard_writer import Record, write_shards
from curation.ingest.split import split_dataset


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (v, v, v)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def home(tmp_path):
    """landing/mine/: 2 shards, 30 samples, concepts c0..c5 (5 each), one key without caption."""
    recs = [Record(key=f"s{i:03d}", image=_png(i), ext="png", caption=f"photo {i}", metadata={"label": f"c{i % 6}"}) for i in range(30)]
    write_shards(recs, tmp_path / "landing" / "mine", samples_per_shard=15, rekey=False)
    with tarfile.open(tmp_path / "landing" / "mine" / "00001.tar", "a") as tf:  # an image without caption
        data = _png(255)
        ti = tarfile.TarInfo("orphan.png")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return tmp_path


def _keys(tar) -> set[str]:
    with tarfile.open(tar) as tf:
        return {m.name.split(".")[0] for m in tf}


def test_split_by_concept_holds_out_whole_concepts(home):
    st = split_dataset(home, "mine", "mine-heldout", by="concept", column="label", fraction=0.3, seed=1)
    man = pl.read_parquet(home / "eval" / "mine-heldout" / "manifest.parquet")
    tasks = json.loads((home / "eval" / "mine-heldout" / "tasks.json").read_text())
    held = set(man["concept"].unique().to_list())
    assert st.eval_concepts == len(held) == 2 and st.eval_samples == man.height == 10  # 2 concepts x 5 >= 30% of 30
    assert tasks["zero_shot"] == {"concept": sorted(held)} and "templates" not in tasks
    pool = _keys(home / "landing" / "mine" / "00000.tar") | _keys(home / "landing" / "mine" / "00001.tar")
    assert not pool & set(man["key"].to_list())  # held-out samples left the pool
    assert "orphan" in pool and len(pool) == 30 - 10 + 1  # the rest stays, incomplete samples too
    orig = _keys(home / "original" / "mine" / "00000.tar") | _keys(home / "original" / "mine" / "00001.tar")
    assert len(orig) == 31  # nothing lost
    pq = pl.read_parquet(home / "landing" / "mine" / "00000.parquet")
    assert not set(pq["key"].to_list()) & set(man["key"].to_list())
    from curation.evaluate.benchmark import EvalSetSpec, resolve_eval_sets, shipped_templates

    split = home / "eval" / "mine-heldout"
    sets = resolve_eval_sets([EvalSetSpec("mine", str(split), "manifest")])  # a valid manifest eval set
    assert set(sets) == {"mine/zeroshot/concept", "mine/retrieval"}
    assert shipped_templates(split) is None  # a user's split ships no prompts: generic ones are used


def test_split_uniform_is_seeded_and_refuses_a_second_split(home, tmp_path):
    st = split_dataset(home, "mine", "u", by="uniform", fraction=0.2, seed=0)
    assert st.eval_samples == 6 and st.eval_concepts == 0
    with pytest.raises(ValueError, match="already split"):
        split_dataset(home, "mine", "other", by="uniform")
    with pytest.raises(ValueError, match="exists; expected a new split name"):
        split_dataset(home, "mine", "u", by="uniform")


def test_split_errors_name_the_valid_choices(home, capsys):
    with pytest.raises(ValueError, match=r"expected one of \['mine'\]"):
        split_dataset(home, "nope", "x")
    with pytest.raises(ValueError, match="no sample carries"):
        split_dataset(home, "mine", "x", by="concept", column="missing")
    assert datasets_main(["datasets", "split", "nope", "--out", str(home)]) == 2
    assert "expected one of ['mine']" in capsys.readouterr().err


def test_the_emoji_set_ships_its_templates_and_others_get_generic_ones(small_dataset, home):
    from assets.evaluate import DEFAULT_EVAL_SETS, EvalSetConfig
    from curation.evaluate.benchmark import EvalSetSpec, resolve_eval_sets, shipped_templates
    from curation.ingest.emoji_dataset import EMOJI_PROMPT_TEMPLATES

    split = small_dataset / "eval" / "emoji-heldout"
    assert shipped_templates(split) == tuple(EMOJI_PROMPT_TEMPLATES)
    sets = resolve_eval_sets([EvalSetSpec("emoji", str(split), "manifest", templates="simple")])
    for task, (path, _) in sets.items():  # the set's own prompts win over the declared fallback
        f = path / "zeroshot_classification_templates.txt"
        if "zeroshot" in task:
            assert f.read_text(encoding="utf-8").splitlines() == list(EMOJI_PROMPT_TEMPLATES)
    # for sets that ship none (like a user's split) the fallback is generic
    assert EvalSetConfig(name="mine", path="mine").templates == "simple"
    assert all(e["templates"] == "simple" for e in DEFAULT_EVAL_SETS)
