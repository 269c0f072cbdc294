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

Running: :mod:`curation.evaluate.benchmark` writes every eval set in clip_benchmark's
webdataset layout and scores it with clip_benchmark; the functions here are the platform's
reference implementation of the same metrics (a test checks both agree on a fixed
checkpoint) plus the task names and the aggregate.

Task names: ``<split>/zeroshot/<label>`` and ``<split>/retrieval``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from curation.ingest.emoji_dataset import EMOJI_PROMPT_TEMPLATES

log = logging.getLogger(__name__)

TASK_KINDS = ("zeroshot", "retrieval")
RECALL_KS = (1, 5, 10)
AVERAGE_TASK = "average"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Short emoji-style templates (the default for the embedded dataset: its captions are emoji
# names with "emoji" / "icon" words, not photos); "simple" and "openai" are open_clip's sets.
EMOJI_TEMPLATES = EMOJI_PROMPT_TEMPLATES  # what the emoji eval set ships in its tasks.json


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
        ks: the k of recall@k. A k above either side's size (the images a text query ranks,
            or the texts an image query ranks) measures nothing (every positive is in the top
            k) and is left out, as the clip_benchmark path skips it (``recall_ks_skipped``).

    Returns:
        ``text_retrieval_recall@k`` (image queries), ``image_retrieval_recall@k`` (text
        queries) for every k kept, and ``mean_recall@1`` (their mean at k=1; present when 1 is
        kept). A positive ranks ahead of negatives with exactly equal similarity.
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
    ks = [k for k in ks if k <= min(image_emb.shape[0], text_emb.shape[0])]
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
    "EvalTask",
    "TASK_KINDS",
    "aggregate",
    "build_zero_shot_classifier",
    "class_embeddings",
    "classification_metrics",
    "main_metric",
    "results_to_rows",
    "retrieval_metrics",
    "template_set",
    "zero_shot_metrics",
]
