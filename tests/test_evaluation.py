"""Evaluation: metrics on hand-made embeddings, zero-shot on planted sets, eval-set layouts."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation.evaluate.evaluator import (
    AVERAGE_TASK,
    EvalTask,
    aggregate,
    build_zero_shot_classifier,
    class_embeddings,
    classification_metrics,
    results_to_rows,
    retrieval_metrics,
    template_set,
    zero_shot_metrics,
)


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ classification


def test_classification_metrics_hand_computed():
    logits = np.array(
        [
            [0.9, 0.1, 0.0],  # label 0: correct
            [0.2, 0.7, 0.1],  # label 1: correct
            [0.5, 0.4, 0.1],  # label 1: wrong, rank 2
            [0.1, 0.5, 0.4],  # label 2: wrong, rank 2
        ]
    )
    labels = np.array([0, 1, 1, 2])
    m = classification_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(0.5)
    assert "acc5" not in m  # 3 classes: top-5 is trivial
    # per-class recall: class 0 1/1, class 1 1/2, class 2 0/1 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    m2 = classification_metrics(logits, labels, ks=(1, 2))
    assert m2["acc2"] == pytest.approx(1.0)


def test_classification_ties_go_to_lower_index_like_argmax():
    logits = np.array([[0.5, 0.5], [0.5, 0.5]])
    m = classification_metrics(logits, np.array([0, 1]))
    assert m["acc1"] == pytest.approx(0.5)


def test_classification_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels: got values in \[0, 3\]; expected \[0, 3\)"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]))


def test_class_embeddings_average_normalized_prompts():
    # class 0: two prompts along x and y -> mean direction (1,1)/sqrt2; class 1: one direction twice
    prompts = np.array([[2.0, 0.0], [0.0, 5.0], [0.0, -1.0], [0.0, -3.0]])
    c = class_embeddings(prompts, 2)
    np.testing.assert_allclose(c[0], [2**-0.5, 2**-0.5], atol=1e-6)
    np.testing.assert_allclose(c[1], [0.0, -1.0], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of n_classes=3"):
        class_embeddings(prompts, 3)


def _planted(n_per_class=40, n_classes=5, d=16, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(n_classes, d)))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    imgs = unit(centers[labels] + noise * rng.normal(size=(labels.size, d)) / np.sqrt(d))
    return centers, imgs, labels


class _DictTextEncoder:
    """Prompt '<template> <class>' -> the planted class direction (plus template noise)."""

    def __init__(self, classnames, centers, seed=0):
        self.map = dict(zip(classnames, centers))
        self.rng = np.random.default_rng(seed)

    def encode_texts(self, texts):
        out = []
        for t in texts:
            name = t.split(" ")[-1]
            out.append(self.map[name] + 0.1 * self.rng.normal(size=self.map[name].shape))
        return unit(np.array(out))


def test_zero_shot_high_on_separable_set_and_chance_with_shuffled_labels():
    centers, imgs, labels = _planted()
    names = [f"class{i}" for i in range(5)]
    enc = _DictTextEncoder(names, centers)
    clf = build_zero_shot_classifier(enc.encode_texts, names, ["a photo of {c}", "{c}"])
    good = zero_shot_metrics(imgs, clf, labels)
    assert good["acc1"] > 0.95 and good["mean_per_class_recall"] > 0.95
    shuffled = np.random.default_rng(1).permutation(labels)
    bad = zero_shot_metrics(imgs, clf, shuffled)
    assert abs(bad["acc1"] - 0.2) < 0.1


# ------------------------------------------------------------------ retrieval


def test_retrieval_hand_made():
    # 3 images, 3 texts; image 0 -> text 0 best; image 1's own text is its 2nd; image 2's own is 3rd
    img = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    txt = unit([[1, 0.1, 0], [0.2, 1, 0.9], [0.0, 1, 0.1]])
    # image 1 (e_y): sims text0 0.1/.., text1 ~0.74, text2 ~0.995 -> own text (1) ranks 2nd
    # image 2 (e_z): sims text0 0, text1 ~0.67, text2 ~0.0995 -> own text (2) ranks 2nd
    m = retrieval_metrics(img, txt, np.arange(3), np.arange(3), ks=(1, 2, 3))
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    # text queries: text0 -> image0 (rank 1); text1 -> sims (0.16, 0.74, 0.67) rank 1;
    # text2 -> (0, 0.995, 0.0995): own image 2 ranks 2nd
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    assert m["mean_recall@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_retrieval_shared_caption_is_positive_for_all_its_images_and_blocking_agrees():
    rng = np.random.default_rng(0)
    img = unit(rng.normal(size=(50, 8)))
    caption_of_image = rng.integers(0, 20, size=50)
    txt = unit(rng.normal(size=(20, 8)))
    full = retrieval_metrics(img, txt, caption_of_image, np.arange(20), block=1024)
    blocked = retrieval_metrics(img, txt, caption_of_image, np.arange(20), block=7)
    assert full == blocked
    # brute force reference
    sims = img @ txt.T
    for k in (1, 5, 10):
        top = np.argsort(-sims, axis=1)[:, :k]
        ref = np.mean([caption_of_image[i] in top[i] for i in range(50)])
        assert full[f"text_retrieval_recall@{k}"] == pytest.approx(ref)
        topi = np.argsort(-sims.T, axis=1)[:, :k]
        ref_t = np.mean([np.any(caption_of_image[topi[j]] == j) for j in range(20)])
        assert full[f"image_retrieval_recall@{k}"] == pytest.approx(ref_t)


def test_perfect_embeddings_give_recall_one_and_a_k_above_the_set_is_left_out():
    e = unit(np.eye(6))
    m = retrieval_metrics(e, e, np.arange(6), np.arange(6))  # ks 1, 5, 10 of six pairs: 10 ranks nothing
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)} | {"mean_recall@1"}
    assert all(v == 1.0 for v in m.values())
    # the smaller side decides: 12 images whose 6 captions are shared by two each
    m = retrieval_metrics(unit(np.tile(np.eye(6), (2, 1))), e, np.tile(np.arange(6), 2), np.arange(6), ks=(1, 6, 7))
    assert {k for k in m if k.startswith("text_")} == {"text_retrieval_recall@1", "text_retrieval_recall@6"}


# ------------------------------------------------------------------ tasks, aggregate


def test_task_names_parse_and_validate():
    t = EvalTask.parse("emoji-heldout/zeroshot/group")
    assert (t.split, t.kind, t.label) == ("emoji-heldout", "zeroshot", "group") and t.name == "emoji-heldout/zeroshot/group"
    assert EvalTask.parse("x/retrieval").kind == "retrieval"
    with pytest.raises(ValueError, match="expected '<split>/zeroshot/<label>' or '<split>/retrieval'"):
        EvalTask.parse("x/linear/group")
    with pytest.raises(ValueError, match="task kind: got 'linear'"):
        EvalTask("x", "linear")


def test_aggregate_is_mean_of_main_metrics():
    res = {"a/zeroshot/g": {"acc1": 0.9, "mean_per_class_recall": 0.4}, "a/retrieval": {"mean_recall@1": 0.2}}
    assert aggregate(res) == {"main": pytest.approx(0.3), "tasks": 2.0}
    rows = results_to_rows(res)
    assert {"task": "a/retrieval", "metric": "mean_recall@1", "value": 0.2} in rows and len(rows) == 3


def test_template_sets():
    assert "itap of a {c}." in template_set("simple")
    assert len(template_set("openai")) > 50
    with pytest.raises(ValueError, match="templates: got 'imagenet'; expected one of"):
        template_set("imagenet")
    with pytest.raises(ValueError, match="containing"):
        template_set(["a photo"])


# ------------------------------------------------------------------ eval-set layouts, end to end

COLORS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), color + (255,)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_manifest_set(d):
    d.mkdir(parents=True)
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        for i, color in enumerate(["red", "green", "blue", "red", "blue", "green"]):
            key = f"{i:05d}"
            _add(tf, f"{key}.png", _png(COLORS[color]))
            _add(tf, f"{key}.txt", f"a {color} square".encode())
            rows.append({"uid": f"{i:032x}", "key": key, "tar": "00000.tar", "member": f"{key}.png",
                         "caption": f"a {color} square", "image_sha256": "", "group": color, "subgroup": "square",
                         "concept": color})  # fmt: skip
    pl.DataFrame(rows).write_parquet(d / "manifest.parquet")
    tasks = {"zero_shot": {"group": ["red", "green", "blue"]}, "retrieval": {"caption_column": "caption", "image_column": "member"}}
    (d / "tasks.json").write_text(json.dumps(tasks))


def _write_wds_set(d):
    (d / "test").mkdir(parents=True)
    (d / "classnames.txt").write_text("red\ngreen\nblue\n")
    with tarfile.open(d / "test" / "0.tar", "w") as tf:
        for i, cls in enumerate([0, 1, 2, 2]):
            _add(tf, f"s{i}.webp", _png(list(COLORS.values())[cls]))
            _add(tf, f"s{i}.cls", str(cls).encode())


def test_manifest_set_is_written_in_clip_benchmark_layout(tmp_path):
    from curation.evaluate.benchmark import EvalSetSpec, check_layout, resolve_eval_sets

    _write_manifest_set(tmp_path / "colors")
    plan = resolve_eval_sets([EvalSetSpec("colors", str(tmp_path / "colors"), "manifest", "simple")])
    assert sorted(plan) == ["colors/retrieval", "colors/zeroshot/group"]
    zs, _ = plan["colors/zeroshot/group"]
    check_layout(zs, "clip_benchmark")
    assert (zs / "test" / "nshards.txt").read_text().strip() == "1"
    assert (zs / "classnames.txt").read_text().split() == ["red", "green", "blue"]
    assert len((zs / "zeroshot_classification_templates.txt").read_text().splitlines()) == len(template_set("simple"))
    with tarfile.open(zs / "test" / "0.tar") as tf:
        cls = [tf.extractfile(m).read().decode() for m in tf if m.name.endswith(".cls")]
        png = [m for m in tf if m.name.endswith(".png")]
        im = Image.open(io.BytesIO(tf.extractfile(png[0]).read()))
    assert cls == ["0", "1", "2", "0", "2", "1"] and im.mode == "RGB"
    rt, _ = plan["colors/retrieval"]
    assert (rt / "dataset_type.txt").read_text().strip() == "retrieval"
    with tarfile.open(rt / "test" / "0.tar") as tf:
        assert [tf.extractfile(m).read().decode() for m in tf if m.name.endswith(".txt")][:2] == ["a red square", "a green square"]
    # a re-run with the same inputs reuses the files
    before = (zs / "test" / "0.tar").stat().st_mtime_ns
    resolve_eval_sets([EvalSetSpec("colors", str(tmp_path / "colors"), "manifest", "simple")])
    assert (zs / "test" / "0.tar").stat().st_mtime_ns == before


def test_native_clip_benchmark_set_and_wrong_layouts_fail_clearly(tmp_path):
    from curation.evaluate.benchmark import EvalSetSpec, resolve_eval_sets

    _write_wds_set(tmp_path / "bench")
    (tmp_path / "bench" / "test" / "nshards.txt").write_text("1\n")
    plan = resolve_eval_sets([EvalSetSpec("bench", str(tmp_path / "bench"), "clip_benchmark")])
    assert list(plan) == ["bench/zeroshot/cls"]
    # a loose folder of tars (the old convention) is not the clip_benchmark layout
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "classnames.txt").write_text("red\n")
    (loose / "0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"eval set 'loose' at .*: got \['0.tar', 'classnames.txt'\]; expected clip_benchmark's webdataset layout: test/nshards.txt"):
        resolve_eval_sets([EvalSetSpec("loose", str(loose), "clip_benchmark")])
    # a clip_benchmark dataset declared as a manifest set names the manifest layout
    with pytest.raises(ValueError, match="expected the platform's manifest layout: manifest.parquet \\+ tasks.json"):
        resolve_eval_sets([EvalSetSpec("bench", str(tmp_path / "bench"), "manifest")])
    with pytest.raises(ValueError, match=r"got layout 'coco'; expected one of \['clip_benchmark', 'manifest'\]"):
        EvalSetSpec("x", str(loose), "coco")


# ------------------------------------------------------------------ clip_benchmark == the reference


@pytest.fixture(scope="module")
def fixed_checkpoint(small_dataset, tmp_path_factory):
    """tiny-rn-32 trained for 128 samples on the small emoji pool (seed 0): a fixed checkpoint."""
    import torch

    from curation.engine.compute import ComputeSpec
    from curation.train.checkpoints import save_checkpoint
    from curation.train.config import TrainConfig
    from curation.train.data import read_webdataset_pairs
    from curation.train.loop import train_clip

    torch.set_num_threads(1)
    _, images, captions = read_webdataset_pairs(sorted((small_dataset / "landing" / "emoji").glob("*.tar")))
    res = train_clip(images, captions, TrainConfig(model="tiny-rn-32", samples_seen=128, batch_size=32, seed=0),
                     ComputeSpec(device="cpu"))  # fmt: skip
    return save_checkpoint(res, tmp_path_factory.mktemp("ck") / "fixed.pt")


def _reference_metrics(checkpoint, split_dir, templates):
    """The platform's own metric code (the pre-clip_benchmark evaluator's computation) on the set."""
    from curation.embed.encoders import build_encoder
    from curation.engine.compute import ComputeSpec
    from curation.ingest.shards import load_members

    enc = build_encoder("open_clip", ComputeSpec(device="cpu"), model_name="tiny-rn-32", pretrained=str(checkpoint))
    man = pl.read_parquet(split_dir / "manifest.parquet")
    tasks = json.loads((split_dir / "tasks.json").read_text())
    images = []
    for (tar,), rows in man.group_by("tar", maintain_order=True):
        blobs = load_members(split_dir / tar, rows["member"].to_list())
        images += [Image.open(io.BytesIO(blobs[m])) for m in rows["member"].to_list()]
    img = enc.encode_images(images)
    out = {}
    for label, names in tasks["zero_shot"].items():
        clf = build_zero_shot_classifier(enc.encode_texts, names, templates)
        labels = np.array([names.index(v) for v in man[label].to_list()])
        out[f"{split_dir.name}/zeroshot/{label}"] = zero_shot_metrics(img, clf, labels)
    caps = man["caption"].to_list()
    assert len(set(caps)) == len(caps)  # clip_benchmark: a caption is positive for its own image only
    out[f"{split_dir.name}/retrieval"] = retrieval_metrics(img, enc.encode_texts(caps), np.arange(len(caps)), np.arange(len(caps)))
    return out


def test_clip_benchmark_gives_the_reference_numbers_on_a_fixed_checkpoint(small_dataset, fixed_checkpoint, tmp_path):
    from curation.evaluate.benchmark import EvalSetSpec, evaluate_checkpoint

    split = small_dataset / "eval" / "emoji-heldout"
    got = evaluate_checkpoint(fixed_checkpoint, [EvalSetSpec("emoji-heldout", str(split), "manifest")], tmp_path / "res")
    ref = _reference_metrics(fixed_checkpoint, split, template_set("emoji"))
    assert set(got) == set(ref) | {AVERAGE_TASK}
    for task, metrics in ref.items():
        for name, value in metrics.items():
            assert got[task][name] == pytest.approx(value, abs=1e-6), (task, name)
    # the clip_benchmark JSON is on disk, in its dump format
    dump = json.loads((tmp_path / "res" / "emoji-heldout__retrieval.json").read_text())
    assert dump["task"] == "zeroshot_retrieval" and "image_retrieval_recall@5" in dump["metrics"]


def test_a_retrieval_set_smaller_than_k_scores_the_ks_it_can(fixed_checkpoint, tmp_path, caplog):
    """Six images: recall@10 ranks nothing (clip_benchmark's top-k raised "selected index k out
    of range" and the evaluation failed); it is skipped, recall@1 and @5 are scored, and the
    dump and the log say what was skipped."""
    from curation.evaluate.benchmark import EvalSetSpec, evaluate_checkpoint

    _write_manifest_set(tmp_path / "colors")
    with caplog.at_level("WARNING", logger="curation.evaluate.benchmark"):
        got = evaluate_checkpoint(fixed_checkpoint, [EvalSetSpec("colors", str(tmp_path / "colors"), "manifest", "simple")],
                                  tmp_path / "res", task_names=["colors/retrieval"])
    rt = got["colors/retrieval"]
    assert {k for k in rt if "@" in k} == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)} | {"mean_recall@1"}
    assert rt["n_samples"] == 6
    dump = json.loads((tmp_path / "res" / "colors__retrieval.json").read_text())
    assert dump["recall_ks"] == [1, 5] and dump["recall_ks_skipped"] == [10]
    assert "6 images; recall@[10] skipped" in caplog.text
    for d in ("image", "text"):  # (the numbers themselves: the reference test above, on unique captions)
        assert 0 <= rt[f"{d}_retrieval_recall@1"] <= rt[f"{d}_retrieval_recall@5"] <= 1
