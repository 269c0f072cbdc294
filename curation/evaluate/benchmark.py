"""Evaluation through clip_benchmark: eval sets in its webdataset layout, its metrics, its JSON.

Every eval set is declared (:class:`EvalSetSpec`: a name, a path and its layout; nothing is
found by convention) and evaluated in clip_benchmark's webdataset layout, so a user can run
``clip_benchmark eval --dataset wds/<name> --dataset_root <dir> ...`` on the same files by hand:

```
<dataset dir>/
    test/nshards.txt          number of shards N
    test/0.tar .. test/N-1.tar  KEY.png + KEY.cls (class index) | KEY.png + KEY.txt (captions, one a line)
    classnames.txt            one class name a line (classification)
    zeroshot_classification_templates.txt   one prompt a line, '{c}' for the class (classification)
    dataset_type.txt          'retrieval' for a retrieval set
```

Layouts (:data:`LAYOUTS`):

* ``clip_benchmark``: one dataset dir as above (classification or retrieval).
* ``manifest``: the platform's eval split (``manifest.parquet`` + tars + ``tasks.json``,
  written by ``curation datasets build``). :func:`write_clip_benchmark_sets` converts it, one
  image at a time, into one clip_benchmark dataset per zero-shot label and one retrieval
  dataset under ``<split>/clip_benchmark/<split>__<label>`` / ``<split>__retrieval``. Images are
  re-encoded as RGB PNG with transparency composited on white (the platform's ``to_rgb``),
  because clip_benchmark's loader drops the alpha channel.

:func:`run_clip_benchmark` builds the dataset with ``clip_benchmark.datasets.builder.build_dataset``
and scores it with ``clip_benchmark.metrics.zeroshot_classification.evaluate`` /
``zeroshot_retrieval.evaluate`` (its Python API, offline, in process: the model comes from the
platform's one checkpoint loader, so the platform's model configs resolve), writes
clip_benchmark's result JSON (``{"dataset", "model", "pretrained", "task", "metrics", ...}``, the
``clip_benchmark eval`` dump format) and :func:`read_result_json` reads it back.

Task names stay ``<set>/zeroshot/<label>`` and ``<set>/retrieval``
(:class:`curation.evaluate.evaluator.EvalTask`); a native clip_benchmark classification set
has the label ``cls``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAYOUTS = ("clip_benchmark", "manifest")
CLIP_BENCHMARK_LAYOUT = (
    "clip_benchmark's webdataset layout: test/nshards.txt, test/0.tar .. test/<N-1>.tar with KEY.<png|jpg|webp> "
    "and KEY.cls (or KEY.txt for retrieval), classnames.txt (classification) or dataset_type.txt = 'retrieval', "
    "optional zeroshot_classification_templates.txt"
)
MANIFEST_LAYOUT = "the platform's manifest layout: manifest.parquet + tasks.json + the tars the manifest names"
RECALL_KS = (1, 5, 10)
SHARD_SIZE = 10_000


@dataclass(frozen=True)
class EvalSetSpec:
    """A declared eval set.

    Attributes:
        name: the task prefix (no ``/``).
        path: its directory.
        layout: one of :data:`LAYOUTS`.
        templates: prompt templates for classification sets that ship none (a name for
            :func:`curation.evaluate.evaluator.template_set` or a list); a set's own templates
            (``templates`` in a manifest set's tasks.json, or clip_benchmark's
            zeroshot_classification_templates.txt) always win.
    """

    name: str
    path: str
    layout: str = "manifest"
    templates: str | tuple[str, ...] = "simple"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"eval set {self.name!r}: got layout {self.layout!r}; expected one of {list(LAYOUTS)}")
        if not self.name or "/" in self.name:
            raise ValueError(f"eval set name: got {self.name!r}; expected a name without '/'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSetSpec:
        valid = {"name", "path", "layout", "templates"}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"eval set keys: got unknown {unknown}; expected a subset of {sorted(valid)}")
        t = d.get("templates", "simple")
        return cls(d["name"], str(d["path"]), d.get("layout", "manifest"), t if isinstance(t, str) else tuple(t))


def shipped_templates(split_dir: str | Path) -> tuple[str, ...] | None:
    """The zero-shot prompt templates a manifest set ships (``templates`` in its tasks.json), or
    None when it ships none."""
    f = Path(split_dir) / "tasks.json"
    if not f.exists():
        return None
    t = json.loads(f.read_text(encoding="utf-8")).get("templates")
    return tuple(t) if t else None


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def check_layout(path: str | Path, layout: str, name: str = "") -> None:
    """Raise unless ``path`` holds an eval set in ``layout``.

    Raises:
        ValueError: naming what was found and the expected layout.
    """
    d = Path(path)
    label = f"eval set {name!r} at {d}" if name else f"eval set at {d}"
    if layout not in LAYOUTS:
        raise ValueError(f"{label}: got layout {layout!r}; expected one of {list(LAYOUTS)}")
    found = sorted(p.name for p in d.iterdir())[:10] if d.is_dir() else "no such directory"
    if layout == "manifest":
        if not ((d / "manifest.parquet").is_file() and (d / "tasks.json").is_file()):
            raise ValueError(f"{label}: got {found}; expected {MANIFEST_LAYOUT} (layout 'manifest')")
        return
    nshards = d / "test" / "nshards.txt"
    ok = nshards.is_file()
    if ok:
        try:
            n = int(nshards.read_text().strip())
        except ValueError:
            n = 0
        ok = n >= 1 and all((d / "test" / f"{i}.tar").is_file() for i in range(n))
        kind = _dataset_type(d)
        ok = ok and (kind == "retrieval" or (d / "classnames.txt").is_file())
    if not ok:
        raise ValueError(f"{label}: got {found}; expected {CLIP_BENCHMARK_LAYOUT} (layout 'clip_benchmark')")


def _dataset_type(d: Path) -> str:
    f = d / "dataset_type.txt"
    return f.read_text().strip().lower() if f.is_file() else "classification"


class _ShardWriter:
    """Writes ``test/<i>.tar`` shards of at most ``shard_size`` samples and ``test/nshards.txt``."""

    def __init__(self, out: Path, shard_size: int = SHARD_SIZE):
        self.dir = out / "test"
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.tar"):
            old.unlink()
        self.shard_size, self.n, self.tar = shard_size, 0, None
        self.shards = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None or self.n % self.shard_size == 0:
            if self.tar is not None:
                self.tar.close()
            self.tar = tarfile.open(self.dir / f"{self.shards}.tar", "w", format=tarfile.USTAR_FORMAT)
            self.shards += 1
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.n += 1

    def close(self) -> int:
        if self.tar is not None:
            self.tar.close()
        (self.dir / "nshards.txt").write_text(f"{self.shards}\n")
        return self.n


def _rgb_png(data: bytes) -> bytes:
    from PIL import Image

    from curation.embed.encoders import to_rgb

    im = Image.open(io.BytesIO(data))
    im.load()
    buf = io.BytesIO()
    to_rgb(im).save(buf, format="PNG")
    return buf.getvalue()


def write_clip_benchmark_sets(
    split_dir: str | Path, templates: Sequence[str], out_root: str | Path | None = None, shard_size: int = SHARD_SIZE
) -> dict[str, Path]:
    """Convert a manifest-layout split into clip_benchmark datasets (streamed, one image at a time).

    Args:
        split_dir: the split (``manifest.parquet``, ``tasks.json``, tars).
        templates: prompt templates (``{c}``) written for every classification set.
        out_root: where the datasets go (default ``<split_dir>/clip_benchmark``).

    Returns:
        task name (``<split>/zeroshot/<label>``, ``<split>/retrieval``) -> dataset dir. A
        re-run whose inputs are unchanged (same manifest, tasks and templates) reuses the files.
    """
    import polars as pl

    from curation.ingest.shards import iter_samples

    d = Path(split_dir)
    check_layout(d, "manifest", d.name)
    out_root = Path(out_root) if out_root is not None else d / "clip_benchmark"
    tasks = json.loads((d / "tasks.json").read_text(encoding="utf-8"))
    man = pl.read_parquet(d / "manifest.parquet")
    retr = tasks.get("retrieval") or {}
    image_col = retr.get("image_column", "member")
    caption_col = retr.get("caption_column", "caption")
    zs = {label: list(names) for label, names in (tasks.get("zero_shot") or {}).items()}
    plan: dict[str, Path] = {f"{d.name}/zeroshot/{label}": out_root / f"{d.name}__{label}" for label in zs}
    if retr and caption_col in man.columns:
        plan[f"{d.name}/retrieval"] = out_root / f"{d.name}__retrieval"
    stamp = json.dumps({"manifest": (d / "manifest.parquet").stat().st_mtime_ns, "tasks": tasks,
                        "templates": list(templates), "shard_size": shard_size}, sort_keys=True)  # fmt: skip
    stamp_file = out_root / "source.json"
    if stamp_file.is_file() and stamp_file.read_text() == stamp and all((p / "test" / "nshards.txt").is_file() for p in plan.values()):
        return plan
    index = {label: {n: i for i, n in enumerate(names)} for label, names in zs.items()}
    for label, names in zs.items():
        bad = sorted({v for v in man[label].to_list() if v not in index[label]})
        if bad:
            raise ValueError(f"{d}: label {label!r} values {bad[:5]} are not in tasks.json's class names")
    writers = {task: _ShardWriter(path, shard_size) for task, path in plan.items()}
    n_rows = 0
    for (tar_name,), rows in man.group_by("tar", maintain_order=True):
        by_member = {m: r for m, r in zip(rows[image_col].to_list(), rows.iter_rows(named=True))}
        for key, members in iter_samples(d / str(tar_name)):
            for ext, data in members.items():
                row = by_member.get(f"{key}.{ext}")
                if row is None:
                    continue
                png = _rgb_png(data)
                k = f"{n_rows:09d}"
                n_rows += 1
                for label in zs:
                    writers[f"{d.name}/zeroshot/{label}"].add(k, {"png": png, "cls": str(index[label][row[label]]).encode()})
                if f"{d.name}/retrieval" in writers:
                    writers[f"{d.name}/retrieval"].add(k, {"png": png, "txt": str(row[caption_col]).encode("utf-8")})
    if n_rows != man.height:
        raise FileNotFoundError(f"{d}: got {n_rows} of the manifest's {man.height} images in its tars; expected all")
    for task, w in writers.items():
        w.close()
        out = plan[task]
        if "/zeroshot/" in task:
            label = task.rsplit("/", 1)[1]
            (out / "classnames.txt").write_text("\n".join(zs[label]) + "\n", encoding="utf-8")
            (out / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n", encoding="utf-8")
            (out / "dataset_type.txt").write_text("classification\n")
        else:
            (out / "dataset_type.txt").write_text("retrieval\n")
    stamp_file.write_text(stamp)
    log.info("%s: wrote %d images into %d clip_benchmark datasets under %s", d.name, n_rows, len(plan), out_root)
    return plan


def resolve_eval_sets(specs: Sequence[EvalSetSpec]) -> dict[str, tuple[Path, EvalSetSpec]]:
    """Every task of the declared sets -> ``(clip_benchmark dataset dir, spec)``; converts manifest sets.

    Raises:
        ValueError: a set is not in its declared layout (names the expected one), or two
            sets share a name.
    """
    from curation.evaluate.evaluator import template_set

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"eval sets: got names {names}; expected distinct names")
    out: dict[str, tuple[Path, EvalSetSpec]] = {}
    for spec in specs:
        check_layout(spec.path, spec.layout, spec.name)
        if spec.layout == "manifest":
            for task, path in write_clip_benchmark_sets(spec.path, shipped_templates(spec.path) or template_set(spec.templates)).items():
                out[spec.name + task[task.index("/"):]] = (path, spec)
        else:
            kind = _dataset_type(Path(spec.path))
            out[f"{spec.name}/retrieval" if kind == "retrieval" else f"{spec.name}/zeroshot/cls"] = (Path(spec.path), spec)
    return out


# --------------------------------------------------------------------------------------------
# running clip_benchmark
# --------------------------------------------------------------------------------------------


def run_clip_benchmark(
    model,
    preprocess,
    tokenizer,
    dataset_dir: str | Path,
    output_json: str | Path,
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int = 64,
    templates: Sequence[str] | None = None,
    model_name: str = "",
    pretrained: str = "",
    recall_ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """Score one clip_benchmark dataset with clip_benchmark and write its result JSON.

    Args:
        model, preprocess, tokenizer: from :func:`curation.embed.model_registry.load_checkpoint`.
        dataset_dir: a dataset in clip_benchmark's layout (checked).
        output_json: where clip_benchmark's dump goes.
        device: ``cpu`` or ``cuda[:N]``; precision ``fp32`` (no autocast) or ``bf16``/``fp16``
            (clip_benchmark's ``amp``).
        templates: override the set's templates (classification only).

    Returns:
        The dump dict (``metrics`` holds clip_benchmark's numbers).
    """
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_retrieval

    d = Path(dataset_dir)
    check_layout(d, "clip_benchmark", d.name)
    kind = _dataset_type(d)
    task = "zeroshot_retrieval" if kind == "retrieval" else "zeroshot_classification"
    dev = str(device)
    if dev.startswith("cuda:"):  # clip_benchmark autocasts on the device string: it must be a device type
        torch.cuda.set_device(dev)
        dev = "cuda"
    amp = precision != "fp32"
    t0 = time.perf_counter()
    ds = build_dataset(f"wds/{d.name}", root=str(d), transform=preprocess, split="test", download=False, task=task)
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    if task == "zeroshot_classification":
        tpl = list(templates) if templates else list(ds.templates or [])
        if not tpl:
            raise ValueError(f"{d}: got no zero-shot templates; expected zeroshot_classification_templates.txt or templates")
        metrics = _zeroshot_classification(model, loader, tokenizer, list(ds.classes), tpl, dev, amp)
        n = sum(1 for _ in _iter_keys(d))
        metrics["n_classes"] = float(len(ds.classes))
    else:
        n = sum(1 for _ in _iter_keys(d))
        # recall@k ranks the n images for each caption: a k above n is no measurement (clip_benchmark's
        # top-k raises "selected index k out of range" on it), so it is skipped and the dump says so
        ks = [k for k in recall_ks if k <= n]
        skipped = [k for k in recall_ks if k > n]
        if skipped:
            log.warning("%s: %d images; recall@%s skipped (k above the set's size)", d.name, n, skipped)
        metrics = zeroshot_retrieval.evaluate(model, loader, tokenizer, device=dev, amp=amp, recall_k_list=ks)
    dump = {"dataset": f"wds/{d.name}", "model": model_name, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en", "n_samples": n, "seconds": time.perf_counter() - t0}  # fmt: skip
    if task == "zeroshot_retrieval":
        dump["recall_ks"], dump["recall_ks_skipped"] = ks, skipped
    if task == "zeroshot_classification":
        dump["classnames"] = list(ds.classes)
        dump["templates"] = tpl
    Path(output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(output_json).write_text(json.dumps(dump))
    return dump


def _zeroshot_classification(model, loader, tokenizer, classnames, templates, device, amp) -> dict[str, float]:
    """clip_benchmark's ``zeroshot_classification.evaluate`` for single-label sets, step by step.

    The same calls (its ``zero_shot_classifier``, ``run_classification``, sklearn's
    ``balanced_accuracy_score`` for the mean per-class recall) except top-k accuracy: its
    ``accuracy`` calls ``float()`` on a 1-element array, which NumPy 2.x rejects
    (``TypeError: only 0-dimensional arrays can be converted``), so the identical count is taken
    with ``.item()`` here. ``acc5`` is NaN below 5 classes, as clip_benchmark reports it.
    """
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    classifier = zsc.zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=amp)
    logits, target = zsc.run_classification(model, classifier, loader, device, amp=amp)
    pred = logits.argmax(axis=1)
    ks = (1, 5) if len(classnames) >= 5 else (1,)
    top = logits.topk(max(ks), 1, True, True)[1].t()
    correct = top.eq(target.view(1, -1).expand_as(top))
    acc = {k: correct[:k].reshape(-1).float().sum().item() / len(target) for k in ks}
    return {"acc1": acc[1], "acc5": acc.get(5, float("nan")),
            "mean_per_class_recall": float(balanced_accuracy_score(target, pred))}  # fmt: skip


def _iter_keys(d: Path):
    from curation.ingest.shards import iter_samples

    n = int((d / "test" / "nshards.txt").read_text().strip())
    for i in range(n):
        for key, _ in iter_samples(d / "test" / f"{i}.tar"):
            yield key


def read_result_json(path: str | Path) -> dict[str, float]:
    """clip_benchmark's result JSON -> the platform's metric names for one task.

    Classification: ``acc1``, ``acc5`` (dropped when clip_benchmark reports NaN, < 5
    classes), ``mean_per_class_recall``, ``n_classes``, ``n_samples``. Retrieval:
    ``image_retrieval_recall@k``, ``text_retrieval_recall@k`` (k up to the set's image count:
    larger k are skipped, ``recall_ks_skipped`` in the dump), ``mean_recall@1`` (their mean at
    k = 1), ``n_samples``.
    """
    dump = json.loads(Path(path).read_text())
    out = {k: float(v) for k, v in dump["metrics"].items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    if dump["task"] == "zeroshot_retrieval" and "image_retrieval_recall@1" in out:
        out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    out["n_samples"] = float(dump.get("n_samples", 0))
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    specs: Sequence[EvalSetSpec],
    results_dir: str | Path,
    model_name: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int = 64,
    task_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate one checkpoint on every task of the declared sets through clip_benchmark.

    The model is loaded once (:func:`curation.embed.model_registry.load_checkpoint`); each
    task's clip_benchmark JSON goes to ``results_dir/<task with '/' -> '__'>.json`` and is read
    back with :func:`read_result_json`.

    Returns:
        task name -> metrics, plus ``average`` -> ``{"main", "tasks"}``
        (:func:`curation.evaluate.evaluator.aggregate`).
    """
    from curation.embed.model_registry import load_checkpoint
    from curation.evaluate.evaluator import AVERAGE_TASK, aggregate

    plan = resolve_eval_sets(specs)
    if task_names:
        unknown = sorted(set(task_names) - set(plan))
        if unknown:
            raise ValueError(f"tasks: got {unknown}; expected some of {sorted(plan)}")
        plan = {t: plan[t] for t in task_names}
    if not plan:
        raise ValueError("eval sets: got no tasks; expected at least one declared eval set")
    model, preprocess, tokenizer, meta = load_checkpoint(checkpoint, model_name, device=device, precision=precision)
    results: dict[str, dict[str, float]] = {}
    for task, (path, _spec) in plan.items():
        out = Path(results_dir) / (task.replace("/", "__") + ".json")
        run_clip_benchmark(model, preprocess, tokenizer, path, out, device=device, precision=precision,
                           batch_size=batch_size, model_name=model_name or meta.get("model_name", ""),
                           pretrained=str(checkpoint))  # fmt: skip
        results[task] = read_result_json(out)
        log.info("%s: %s", task, {k: round(v, 4) for k, v in results[task].items()})
    results[AVERAGE_TASK] = aggregate(results)
    return results
