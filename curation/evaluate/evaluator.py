"""Zero-shot classification and image<->text retrieval on held-out evaluation sets.

ALGORITHMS.md section 10, DataComp style:

* Zero-shot classification: each class name goes through every prompt template; the
  L2-normalized text embeddings of a class are averaged and re-normalized into one
  classifier row; an image is assigned the class of highest cosine. Metrics: top-1
  accuracy (``acc1``), top-5 (``acc5``, when there are more than 5 classes) and mean
  per-class recall (``mean_per_class_recall``, the mean over classes present of the
  fraction of their images classified correctly).
* Retrieval: image->text (``text_retrieval_recall@k``: for an image, is a caption of it in
  the top k captions) and text->image (``image_retrieval_recall@k``: for a caption, is one
  of its images in the top k images), k = 1, 5, 10 (clip_benchmark names). Identical
  caption strings are one text, positive for all of their images. Blocked: no n x n matrix.
* Aggregate: every task has a main metric (``mean_per_class_recall`` for zero-shot, as
  DataComp uses for its class-imbalanced sets: chance is ``1 / n_classes`` whatever the
  imbalance, while top-1 rewards always answering the majority class; ``mean_recall@1`` =
  mean of the two recall@1 values for retrieval); the task ``average`` (metric ``main``)
  is the mean of the main metrics over tasks.

Eval set layouts under an eval root (``eval/<split>/``):

* Manifest layout (``curation datasets build``): ``manifest.parquet`` (uid, key, tar,
  member, caption, label columns ...), the tars it names, and ``tasks.json`` with
  ``{"zero_shot": {label_column: [class names in order]}, "retrieval": {"caption_column":
  ..., "image_column": ...}}`` (optionally ``"templates": [...]``).
* clip_benchmark webdataset layout: ``*.tar`` (in the split dir or its ``test/``) holding
  ``KEY.<png|jpg|jpeg|webp>`` and ``KEY.cls`` (class index) and optionally ``KEY.txt``,
  plus ``classnames.txt`` (one per line) and optionally
  ``zeroshot_classification_templates.txt``. Tasks: zero-shot on ``cls``, and retrieval
  when captions are present.

Task names: ``<split>/zeroshot/<label>`` and ``<split>/retrieval``.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import polars as pl
from PIL import Image

log = logging.getLogger(__name__)

TASK_KINDS = ("zeroshot", "retrieval")
RECALL_KS = (1, 5, 10)
AVERAGE_TASK = "average"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Short emoji-style templates (the default for the embedded dataset: its captions are emoji
# names with "emoji" / "icon" words, not photos); "simple" and "openai" are open_clip's sets.
EMOJI_TEMPLATES = ("{c}", "{c} emoji", "an emoji of {c}", "{c} emoji icon", "a {c} emoji")


class TextImageEncoder(Protocol):
    """The part of ``curation.embed.encoders.Encoder`` evaluation needs (both return unit rows)."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def template_set(name: str | Sequence[str]) -> tuple[str, ...]:
    """Prompt templates by name (``"simple"``, ``"openai"``, ``"emoji"``, ``"identity"``) or as given.

    Templates use ``{c}`` for the class name (open_clip's callables are converted).

    Raises:
        ValueError: unknown name (lists the valid names) or a template without ``{c}``.
    """
    if isinstance(name, str):
        from open_clip import zero_shot_metadata as zsm

        sets: dict[str, Sequence[Any]] = {
            "simple": zsm.SIMPLE_IMAGENET_TEMPLATES,
            "openai": zsm.OPENAI_IMAGENET_TEMPLATES,
            "emoji": EMOJI_TEMPLATES,
            "identity": ("{c}",),
        }
        if name not in sets:
            raise ValueError(f"templates: got {name!r}; expected one of {sorted(sets)} or a list of '{{c}}' strings")
        out = tuple(t("{c}") if callable(t) else t for t in sets[name])
    else:
        out = tuple(name)
    if not out or any("{c}" not in t for t in out):
        raise ValueError(f"templates: got {list(out)!r}; expected a non-empty list of strings containing '{{c}}'")
    return out


# --------------------------------------------------------------------------------------------
# pure functions on embeddings
# --------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(prompt_emb: np.ndarray, n_classes: int) -> np.ndarray:
    """Zero-shot classifier rows from prompt embeddings.

    Args:
        prompt_emb: ``(n_classes * n_templates, d) float32``, class-major (all templates of
            class 0, then class 1, ...).
        n_classes: number of classes.

    Returns:
        ``(n_classes, d) float32``: per class the mean of its normalized prompt embeddings,
        re-normalized.
    """
    prompt_emb = np.asarray(prompt_emb, dtype=np.float32)
    if n_classes < 1 or prompt_emb.shape[0] % n_classes:
        raise ValueError(f"prompt_emb: got {prompt_emb.shape[0]} rows; expected a multiple of n_classes={n_classes}")
    t = prompt_emb.shape[0] // n_classes
    per = _unit(prompt_emb).reshape(n_classes, t, -1).mean(axis=1)
    return _unit(per)


def build_zero_shot_classifier(
    encode_texts: Callable[[Sequence[str]], np.ndarray], classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """Encode ``template.format(c=name)`` for every class and template -> ``(C, d) float32`` unit rows."""
    prompts = [t.format(c=c) for c in classnames for t in templates]
    return class_embeddings(encode_texts(prompts), len(classnames))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies and mean per-class recall.

    Args:
        logits: ``(n, C)`` scores (higher is better).
        labels: ``(n,)`` int class indices in ``[0, C)``.
        ks: top-k accuracies to report (``k >= C`` is skipped, it is trivially 1).

    Returns:
        ``{"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}`` as floats in [0, 1]
        (ties are broken toward the lower class index, as ``argmax`` does).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: got shape {labels.shape}; expected ({n},)")
    if n == 0:
        raise ValueError("logits: got 0 rows; expected at least one sample")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels: got values in [{labels.min()}, {labels.max()}]; expected [0, {c})")
    true = logits[np.arange(n), labels]
    # rank of the true class: classes scoring higher, plus equal ones with a lower index
    higher = (logits > true[:, None]).sum(1) + ((logits == true[:, None]) & (np.arange(c)[None, :] < labels[:, None])).sum(1)
    out: dict[str, float] = {}
    for k in ks:
        if k == 1 or k < c:
            out[f"acc{k}"] = float((higher < k).mean())
    correct = higher == 0
    present = np.unique(labels)
    out["mean_per_class_recall"] = float(np.mean([correct[labels == k].mean() for k in present]))
    return out


def zero_shot_metrics(image_emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``image_emb (n, d)`` unit rows, ``classifier (C, d)`` unit rows, ``labels (n,)`` -> metrics."""
    logits = np.asarray(image_emb, dtype=np.float32) @ np.asarray(classifier, dtype=np.float32).T
    return classification_metrics(logits, labels)


def _hits_at_k(
    queries: np.ndarray, targets: np.ndarray, q_ids: np.ndarray, t_ids: np.ndarray, ks: Sequence[int], block: int
) -> dict[int, float]:
    """Fraction of queries with a positive target (same id) among their top-k targets."""
    hits = {k: 0 for k in ks}
    n = queries.shape[0]
    for s in range(0, n, block):
        sims = queries[s : s + block] @ targets.T  # (b, n_t)
        pos = q_ids[s : s + block, None] == t_ids[None, :]
        has_pos = pos.any(1)
        best_pos = np.where(pos, sims, -np.inf).max(1)
        rank = (np.where(pos, -np.inf, sims) > best_pos[:, None]).sum(1)  # negatives above the best positive
        for k in ks:
            hits[k] += int(((rank < k) & has_pos).sum())
    return {k: hits[k] / n for k in ks}


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    image_ids: np.ndarray,
    text_ids: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    block: int = 1024,
) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval, in blocks of ``block`` queries.

    Args:
        image_emb: ``(n_i, d) float32`` unit rows.
        text_emb: ``(n_t, d) float32`` unit rows.
        image_ids, text_ids: ``(n_i,)``, ``(n_t,)`` ints; an image and a text are a positive
            pair when their ids are equal (several images may share one caption).
        ks: the k of recall@k.

    Returns:
        ``text_retrieval_recall@k`` (image queries), ``image_retrieval_recall@k`` (text
        queries) for every k, and ``mean_recall@1`` (their mean at k=1; present when 1 in ks).
        A positive ranks ahead of negatives with exactly equal similarity.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    image_ids = np.asarray(image_ids)
    text_ids = np.asarray(text_ids)
    if image_emb.shape[0] != image_ids.shape[0] or text_emb.shape[0] != text_ids.shape[0]:
        raise ValueError(
            f"ids: got {image_ids.shape[0]} image ids for {image_emb.shape[0]} images and {text_ids.shape[0]} "
            f"text ids for {text_emb.shape[0]} texts; expected one id per row"
        )
    i2t = _hits_at_k(image_emb, text_emb, image_ids, text_ids, ks, block)
    t2i = _hits_at_k(text_emb, image_emb, text_ids, image_ids, ks, block)
    out: dict[str, float] = {}
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = i2t[k]
        out[f"image_retrieval_recall@{k}"] = t2i[k]
    if 1 in ks:
        out["mean_recall@1"] = (i2t[1] + t2i[1]) / 2
    return out


def main_metric(kind: str) -> str:
    """The metric of a task kind that enters the average."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind: got {kind!r}; expected one of {list(TASK_KINDS)}")
    return "mean_per_class_recall" if kind == "zeroshot" else "mean_recall@1"


def aggregate(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """DataComp-style aggregate: ``{"main": mean over tasks of their main metric, "tasks": n}``.

    Args:
        results: task name -> metrics; the task kind is read from the name
            (``<split>/zeroshot/<label>`` or ``<split>/retrieval``).
    """
    mains = [float(m[main_metric(EvalTask.parse(name).kind)]) for name, m in results.items()]
    if not mains:
        raise ValueError("results: got no tasks; expected at least one")
    return {"main": float(np.mean(mains)), "tasks": float(len(mains))}


# --------------------------------------------------------------------------------------------
# tasks and eval sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task on one split.

    Attributes:
        split: the eval set's folder name under the eval root.
        kind: ``"zeroshot"`` or ``"retrieval"``.
        label: the label column of a zero-shot task (``"cls"`` for a clip_benchmark set);
            ``None`` for retrieval.
    """

    split: str
    kind: str
    label: str | None = None

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind: got {self.kind!r}; expected one of {list(TASK_KINDS)}")
        if (self.kind == "zeroshot") != (self.label is not None):
            raise ValueError(f"label: got {self.label!r} for a {self.kind} task; expected a label only for zeroshot")
        if not self.split or "/" in self.split:
            raise ValueError(f"split: got {self.split!r}; expected a folder name without '/'")

    @property
    def name(self) -> str:
        return f"{self.split}/zeroshot/{self.label}" if self.kind == "zeroshot" else f"{self.split}/retrieval"

    @classmethod
    def parse(cls, name: str) -> "EvalTask":
        """``"<split>/zeroshot/<label>"`` or ``"<split>/retrieval"`` -> task."""
        parts = name.split("/")
        if len(parts) == 3 and parts[1] == "zeroshot":
            return cls(parts[0], "zeroshot", parts[2])
        if len(parts) == 2 and parts[1] == "retrieval":
            return cls(parts[0], "retrieval")
        raise ValueError(f"task: got {name!r}; expected '<split>/zeroshot/<label>' or '<split>/retrieval'")


@dataclass
class EvalSet:
    """A loaded eval split.

    Attributes:
        split: folder name.
        images: decoded images, ``n``.
        captions: ``n`` captions (``None`` where a set has none).
        labels: label column -> ``(n,) int64`` class indices.
        classnames: label column -> class names in index order.
        templates: templates the set ships (``None``: use the configured ones).
    """

    split: str
    images: list[Image.Image]
    captions: list[str] | None
    labels: dict[str, np.ndarray]
    classnames: dict[str, list[str]]
    templates: tuple[str, ...] | None = None

    def tasks(self) -> list[EvalTask]:
        out = [EvalTask(self.split, "zeroshot", label) for label in self.classnames]
        if self.captions is not None:
            out.append(EvalTask(self.split, "retrieval"))
        return out


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _read_tar_members(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                f = tf.extractfile(m)
                if f is not None:
                    out[m.name] = f.read()
    return out


def _load_manifest_set(d: Path) -> EvalSet:
    tasks = json.loads((d / "tasks.json").read_text(encoding="utf-8"))
    man = pl.read_parquet(d / "manifest.parquet")
    retr = tasks.get("retrieval") or {}
    image_col = retr.get("image_column", "member")
    caption_col = retr.get("caption_column", "caption")
    images: list[Image.Image] = []
    for tar_name, rows in man.with_row_index("_i").group_by("tar", maintain_order=True):
        members = _read_tar_members(d / str(tar_name[0]))
        for i, member in zip(rows["_i"].to_list(), rows[image_col].to_list()):
            if member not in members:
                raise FileNotFoundError(f"{d / str(tar_name[0])}: member {member!r} of the manifest is missing")
            images.append((i, _decode(members[member])))  # type: ignore[arg-type]
    images.sort(key=lambda t: t[0])  # type: ignore[union-attr]
    labels: dict[str, np.ndarray] = {}
    classnames: dict[str, list[str]] = {}
    for label, names in (tasks.get("zero_shot") or {}).items():
        names = list(names)
        index = {n: i for i, n in enumerate(names)}
        values = man[label].to_list()
        missing = sorted({v for v in values if v not in index})
        if missing:
            raise ValueError(f"{d}: label {label!r} values {missing[:5]} are not in tasks.json's class names")
        labels[label] = np.array([index[v] for v in values], dtype=np.int64)
        classnames[label] = names
    captions = man[caption_col].to_list() if retr and caption_col in man.columns else None
    templates = tuple(tasks["templates"]) if tasks.get("templates") else None
    return EvalSet(d.name, [im for _, im in images], captions, labels, classnames, templates)  # type: ignore[misc]


def _load_wds_set(d: Path) -> EvalSet:
    tars = sorted(d.glob("*.tar")) or sorted((d / "test").glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{d}: no *.tar shards (expected a clip_benchmark-style webdataset)")
    classnames = [ln.strip() for ln in (d / "classnames.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    images, labels, captions = [], [], []
    for tar in tars:
        groups: dict[str, dict[str, bytes]] = {}
        for name, data in _read_tar_members(tar).items():
            base = name.rsplit("/", 1)[-1]
            if "." in base:
                key, ext = base.split(".", 1)
                groups.setdefault(key, {})[ext.lower()] = data
        for key in sorted(groups):
            g = groups[key]
            img_ext = next((e for e in IMAGE_EXTENSIONS if e in g), None)
            if img_ext is None or "cls" not in g:
                continue
            images.append(_decode(g[img_ext]))
            labels.append(int(g["cls"].decode().strip()))
            captions.append(g["txt"].decode("utf-8").strip() if "txt" in g else None)
    tpl_file = d / "zeroshot_classification_templates.txt"
    templates = None
    if tpl_file.exists():
        templates = tuple(ln.strip() for ln in tpl_file.read_text(encoding="utf-8").splitlines() if ln.strip())
    has_caps = bool(captions) and all(c is not None for c in captions)
    return EvalSet(
        d.name, images, captions if has_caps else None, {"cls": np.array(labels, dtype=np.int64)}, {"cls": classnames},
        templates,
    )  # fmt: skip


def load_eval_set(split_dir: str | Path) -> EvalSet:
    """Load an eval split in either layout (see the module docstring)."""
    d = Path(split_dir)
    if (d / "manifest.parquet").exists() and (d / "tasks.json").exists():
        return _load_manifest_set(d)
    if (d / "classnames.txt").exists():
        return _load_wds_set(d)
    raise FileNotFoundError(
        f"{d}: not an eval set; expected manifest.parquet + tasks.json, or classnames.txt + *.tar (clip_benchmark)"
    )


def list_eval_splits(eval_root: str | Path) -> list[str]:
    """Folders under ``eval_root`` that hold an eval set, sorted."""
    root = Path(eval_root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith((".", "_"))
        and (((p / "manifest.parquet").exists() and (p / "tasks.json").exists()) or (p / "classnames.txt").exists())
    )


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


def evaluate_set(
    encoder: TextImageEncoder,
    eval_set: EvalSet,
    tasks: Sequence[EvalTask] | None = None,
    templates: str | Sequence[str] = "emoji",
) -> dict[str, dict[str, float]]:
    """Run the tasks of one eval set (default: all it offers). Images are encoded once.

    Args:
        templates: used when the set ships none (name for :func:`template_set` or a list).

    Returns:
        task name -> metrics.
    """
    tasks = list(tasks) if tasks is not None else eval_set.tasks()
    offered = {t.name for t in eval_set.tasks()}
    bad = [t.name for t in tasks if t.name not in offered]
    if bad:
        raise ValueError(f"tasks: got {bad} for split {eval_set.split!r}; expected some of {sorted(offered)}")
    tpl = eval_set.templates or template_set(templates)
    t0 = time.perf_counter()
    img = encoder.encode_images(eval_set.images)
    log.info("%s: encoded %d images in %.1fs", eval_set.split, len(eval_set.images), time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        if task.kind == "zeroshot":
            clf = build_zero_shot_classifier(encoder.encode_texts, eval_set.classnames[task.label], tpl)
            out[task.name] = zero_shot_metrics(img, clf, eval_set.labels[task.label])
            out[task.name]["n_classes"] = float(len(eval_set.classnames[task.label]))
        else:
            caps = eval_set.captions or []
            uniq = {c: i for i, c in enumerate(dict.fromkeys(caps))}
            text_emb = encoder.encode_texts(list(uniq))
            out[task.name] = retrieval_metrics(img, text_emb, np.array([uniq[c] for c in caps]), np.arange(len(uniq)))
            out[task.name]["n_texts"] = float(len(uniq))
        out[task.name]["n_samples"] = float(len(eval_set.images))
        log.info("%s: %s", task.name, {k: round(v, 4) for k, v in out[task.name].items()})
    return out


def resolve_tasks(eval_root: str | Path, names: Sequence[str] | None = None) -> dict[str, list[EvalTask]]:
    """Tasks to run, grouped by split: all tasks of every split (``names`` empty / None) or the named ones.

    Raises:
        ValueError: a named task's split is not under ``eval_root`` (lists the splits there).
    """
    splits = list_eval_splits(eval_root)
    if not names:
        return {s: load_eval_set(Path(eval_root) / s).tasks() for s in splits}
    out: dict[str, list[EvalTask]] = {}
    for n in names:
        t = EvalTask.parse(n)
        if t.split not in splits:
            raise ValueError(f"task {n!r}: got split {t.split!r}; expected one of {splits} (under {eval_root})")
        out.setdefault(t.split, []).append(t)
    return out


def evaluate(
    encoder: TextImageEncoder,
    eval_root: str | Path,
    task_names: Sequence[str] | None = None,
    templates: str | Sequence[str] = "emoji",
) -> dict[str, dict[str, float]]:
    """Evaluate one model on the eval sets under ``eval_root``.

    Args:
        encoder: the model (e.g. ``curation.embed.encoders.build_encoder("open_clip", ...)``).
        eval_root: folder of eval splits.
        task_names: tasks to run (``<split>/zeroshot/<label>``, ``<split>/retrieval``);
            empty or None: every task of every split.
        templates: prompt templates for sets that ship none.

    Returns:
        task name -> metrics, plus :data:`AVERAGE_TASK` -> ``{"main": ..., "tasks": n}``.
    """
    plan = resolve_tasks(eval_root, task_names)
    if not plan:
        raise FileNotFoundError(f"no eval sets under {eval_root}")
    results: dict[str, dict[str, float]] = {}
    for split, tasks in plan.items():
        results.update(evaluate_set(encoder, load_eval_set(Path(eval_root) / split), tasks, templates))
    results[AVERAGE_TASK] = aggregate(results)
    return results


def results_to_rows(results: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Flatten ``{task: {metric: value}}`` into ``[{"task", "metric", "value"}]`` (sorted)."""
    return [
        {"task": task, "metric": metric, "value": float(value)}
        for task in sorted(results)
        for metric, value in sorted(results[task].items())
    ]


__all__ = [
    "AVERAGE_TASK",
    "EMOJI_TEMPLATES",
    "EvalSet",
    "EvalTask",
    "TASK_KINDS",
    "aggregate",
    "build_zero_shot_classifier",
    "class_embeddings",
    "classification_metrics",
    "evaluate",
    "evaluate_set",
    "list_eval_splits",
    "load_eval_set",
    "main_metric",
    "resolve_tasks",
    "results_to_rows",
    "retrieval_metrics",
    "template_set",
    "zero_shot_metrics",
]
