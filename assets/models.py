"""Model assets: the filter CLIP, trained checkpoints per recipe, eval reports, the comparison report.

Thin adapters over ``curation``:

* ``filter_model``: an aligned CLIP for the clipscore / clipcov recipes. A configured
  open_clip checkpoint (``model_name`` + ``pretrained`` path or tag) when the user has one,
  else :func:`curation.training.train_clip` on the FULL pool (captions from ``samples``,
  image bytes from the landing shards). Then the whole pool is embedded with it
  (:func:`curation.encoders.build_encoder`) -> table ``filter_embeddings`` (uid, image_emb,
  text_emb, clip_score = cos(image, caption), model).
* ``trained_checkpoints[recipe]``: :func:`curation.training.train_from_shards` on the
  recipe's webdataset export (one run per seed, matched samples seen) -> checkpoint files
  under ``artifacts/checkpoints/<recipe>/`` and the ``checkpoints`` partition.
* ``eval_reports[recipe]``: :func:`curation.evaluation.evaluate` of every checkpoint of the
  recipe on the held-out splits under ``DatasetsResource.eval_root`` -> ``eval_results``.
* ``curation_report``: :func:`curation.report.build_comparison` + ``write_report`` over all
  recipes -> ``artifacts/reports/`` (HTML, markdown, PNG plots).
"""


import json
import logging
import time
from pathlib import Path
from typing import Optional

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa

from assets.metadata import md_table
from assets.partitions import recipe_partitions
from curation.lake import Lake, matrix_to_list_column
from curation.training import TrainConfig
from resources import ComputeResource, DatasetsResource, LakeResource

log = logging.getLogger(__name__)

GROUP = "models"
ALL_SHARDS = dg.AllPartitionMapping()
ALL_RECIPES = dg.AllPartitionMapping()


# --------------------------------------------------------------------------- filter_model


class FilterModelConfig(dg.Config):
    """The aligned CLIP that scores image-caption pairs for clipscore / clipcov.

    With ``pretrained`` set (a local checkpoint path, or an open_clip pretrained tag where a
    model hub is reachable) that checkpoint of ``model_name`` is used as is. Without it the
    platform trains ``model_name`` on the full pool with the CLIP objective.
    """

    model_name: str = TrainConfig.model
    pretrained: Optional[str] = None
    samples_seen: int = TrainConfig.samples_seen
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    seed: int = 0


def read_pool_samples(db: Lake) -> pl.DataFrame:
    """The pool: uids of ``embeddings`` joined with their ``samples`` rows (shard, member, caption)."""
    pool_uids = db.read("embeddings", columns=["uid"]).unique(maintain_order=True)
    samples = db.read("samples", columns=["uid", "dataset", "shard", "key", "caption", "member"])
    return pool_uids.join(samples, on="uid", how="inner", maintain_order="left")


def load_pool_images(pool: pl.DataFrame, landing: str) -> tuple[list[str], list, list[str], int]:
    """Decode the images of ``pool`` rows from their landing shards (one pass per shard).

    Returns:
        ``(uids, images, captions, n_missing)`` for the rows whose image decoded.
    """
    import io

    from PIL import Image

    from curation.shards import load_members, shard_path

    uids, images, captions = [], [], []
    missing = 0
    for (shard,), rows in pool.group_by("shard", maintain_order=True):
        members = load_members(shard_path(landing, str(shard)), rows["member"].to_list())
        for uid, member, cap in zip(rows["uid"].to_list(), rows["member"].to_list(), rows["caption"].to_list()):
            data = members.get(member)
            if data is None:
                missing += 1
                continue
            try:
                im = Image.open(io.BytesIO(data))
                im.load()
            except Exception as e:  # noqa: BLE001 - a corrupt image is counted, not fatal
                log.warning("cannot decode %s of %s: %s", member, shard, e)
                missing += 1
                continue
            uids.append(uid)
            images.append(im)
            captions.append(cap)
    return uids, images, captions, missing


@dg.asset(
    deps=[dg.AssetDep("samples", partition_mapping=ALL_SHARDS), dg.AssetDep("embeddings", partition_mapping=ALL_SHARDS)],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="An aligned image-text CLIP (a configured open_clip checkpoint, else one trained on the "
    "full pool) and the pool embedded with it: table `filter_embeddings` (uid, image_emb, text_emb, "
    "clip_score, model) for the clipscore and clipcov recipes.",
)
def filter_model(
    context: dg.AssetExecutionContext,
    config: FilterModelConfig,
    lake: LakeResource,
    datasets: DatasetsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from curation.encoders import build_encoder
    from curation.training import train_clip

    t0 = time.perf_counter()
    db = lake.lake()
    spec = compute.spec()
    pool = read_pool_samples(db)
    uids, images, captions, missing = load_pool_images(pool, datasets.landing)
    if not uids:
        raise ValueError(f"filter_model: got 0 decodable pool images (of {pool.height} pool rows); expected a pool")
    load_s = time.perf_counter() - t0
    meta: dict = {"pool_rows": pool.height, "images_missing": missing, "load_seconds": round(load_s, 2)}
    if config.pretrained:
        pretrained, source = config.pretrained, "pretrained"
    else:
        cfg = TrainConfig(
            model=config.model_name, strategy="clip", samples_seen=config.samples_seen,
            batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        )  # fmt: skip
        from curation.training import save_checkpoint

        result = train_clip(images, captions, cfg, spec)
        ck_dir = lake.artifacts("filter_model")
        pretrained = str(save_checkpoint(result, ck_dir / f"{config.model_name}-full-seed{config.seed}.pt", extra={"role": "filter_model"}))
        source = "trained on the full pool"
        meta.update(
            {
                "train_seconds": round(result.seconds, 2),
                "train_samples_per_s": round(result.samples_per_s, 1),
                "samples_seen": result.samples_seen,
                "final_loss": round(result.final_loss, 4),
                "checkpoint": dg.MetadataValue.path(pretrained),
            }
        )
    t1 = time.perf_counter()
    encoder = build_encoder("open_clip", spec, model_name=config.model_name, pretrained=pretrained)
    img = encoder.encode_images(images)
    txt = encoder.encode_texts(captions)
    score = np.einsum("nd,nd->n", img, txt).astype(np.float32)
    embed_s = time.perf_counter() - t1
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "image_emb": matrix_to_list_column(img),
            "text_emb": matrix_to_list_column(txt),
            "clip_score": pa.array(score, pa.float32()),
            "model": pa.array([encoder.id] * len(uids), pa.string()),
        }
    )
    db.write("filter_embeddings", table)
    order = np.argsort(score)
    preview = pl.DataFrame(
        {
            "clip_score": [float(score[i]) for i in list(order[-5:][::-1]) + list(order[:5])],
            "caption": [captions[i] for i in list(order[-5:][::-1]) + list(order[:5])],
        }
    )
    meta.update(
        {
            "source": source,
            "model": encoder.id,
            "rows": len(uids),
            "embed_seconds": round(embed_s, 2),
            "embed_samples_per_s": round(len(uids) / max(embed_s, 1e-9), 1),
            "clip_score_mean": float(score.mean()),
            "clip_score_p10": float(np.quantile(score, 0.1)),
            "clip_score_p90": float(np.quantile(score, 0.9)),
            "seconds": round(time.perf_counter() - t0, 2),
            "highest_and_lowest": dg.MetadataValue.md(md_table(preview, max_rows=None, max_chars=70, float_fmt=".4f")),
        }
    )
    return dg.MaterializeResult(metadata=meta)


# --------------------------------------------------------------------------- trained_checkpoints


class TrainedCheckpointsConfig(dg.Config):
    """One CLIP per seed on the recipe's subset, at the same samples seen for every recipe."""

    # defaults come from the library's TrainConfig, so the two cannot drift apart
    strategy: str = TrainConfig.strategy
    model_name: str = TrainConfig.model
    samples_seen: int = TrainConfig.samples_seen
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    warmup_fraction: float = TrainConfig.warmup_fraction
    patch_dropout: float = TrainConfig.patch_dropout
    seeds: list[int] = [0]

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            model=self.model_name, strategy=self.strategy, samples_seen=self.samples_seen,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_fraction=self.warmup_fraction, patch_dropout=self.patch_dropout, seed=seed,
        )  # fmt: skip


@dg.asset(
    partitions_def=recipe_partitions,
    deps=[dg.AssetDep("pruned_subsets")],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="open_clip checkpoints trained on the recipe's webdataset export (one per seed, matched "
    "samples seen) under artifacts/checkpoints/<recipe>/, and the `checkpoints` partition.",
)
def trained_checkpoints(
    context: dg.AssetExecutionContext, config: TrainedCheckpointsConfig, lake: LakeResource, compute: ComputeResource
) -> dg.MaterializeResult:
    from curation.training import train_from_shards

    recipe = context.partition_key
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds: got {config.seeds}; expected a non-empty list of distinct ints")
    cfgs = [config.train_config(s) for s in config.seeds]  # validates before any work
    shard_dir = Path(lake.artifacts_root) / "subsets" / recipe / "shards"
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(
            f"recipe {recipe!r}: got no webdataset shards in {shard_dir}; expected pruned_subsets exported with write_shards=True"
        )
    out_dir = lake.artifacts("checkpoints", recipe)
    rows, history_md = [], []
    t0 = time.perf_counter()
    for cfg in cfgs:
        path = out_dir / f"{cfg.model}-{cfg.strategy}-seed{cfg.seed}.pt"
        res, path = train_from_shards(tars, cfg, path, compute.spec(), extra={"recipe": recipe})
        info = {**cfg.to_dict(), "steps": res.steps, "batch_size_used": res.batch_size, "n_train": res.n_train,
                "samples_per_s": res.samples_per_s, "final_loss": res.final_loss}  # fmt: skip
        rows.append(
            {
                "recipe": recipe,
                "strategy": cfg.strategy,
                "model": cfg.model,
                "path": str(path),
                "samples_seen": int(res.samples_seen),
                "seconds": float(res.seconds),
                "config_json": json.dumps(info, sort_keys=True),
            }
        )
        hist = pl.DataFrame(res.history).select("step", "samples_seen", "loss", "lr", "samples_per_s")
        history_md.append(f"seed {cfg.seed}\n\n" + md_table(hist.gather_every(max(1, hist.height // 8)), max_rows=None, max_chars=70, float_fmt=".4f"))
    frame = pl.DataFrame(rows, schema={"recipe": pl.String, "strategy": pl.String, "model": pl.String, "path": pl.String,
                                       "samples_seen": pl.Int64, "seconds": pl.Float64, "config_json": pl.String})  # fmt: skip
    lake.lake().write("checkpoints", frame, partition=recipe)
    last = json.loads(rows[-1]["config_json"])
    return dg.MaterializeResult(
        metadata={
            "recipe": recipe,
            "strategy": config.strategy,
            "model": config.model_name,
            "seeds": dg.MetadataValue.json(list(config.seeds)),
            "n_train": last["n_train"],
            "samples_seen": rows[-1]["samples_seen"],
            "epochs": round(rows[-1]["samples_seen"] / max(1, last["n_train"]), 2),
            "train_seconds": round(float(np.mean([r["seconds"] for r in rows])), 2),
            "samples_per_s": round(float(np.mean([json.loads(r["config_json"])["samples_per_s"] for r in rows])), 1),
            "final_loss": round(last["final_loss"], 4),
            "checkpoint": dg.MetadataValue.path(rows[-1]["path"]),
            "seconds": round(time.perf_counter() - t0, 2),
            "loss_curve": dg.MetadataValue.md("\n\n".join(history_md)),
        }
    )


# --------------------------------------------------------------------------- eval_reports


class EvalReportsConfig(dg.Config):
    """Which tasks (empty: every task of every split under the eval root) and prompt templates."""

    tasks: list[str] = []
    templates: str = "emoji"


@dg.asset(
    partitions_def=recipe_partitions,
    deps=[dg.AssetDep("trained_checkpoints")],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="Zero-shot classification and image<->text retrieval of every checkpoint of the recipe on "
    "the held-out eval splits: the `eval_results` partition (task, metric, value per seed).",
)
def eval_reports(
    context: dg.AssetExecutionContext,
    config: EvalReportsConfig,
    lake: LakeResource,
    datasets: DatasetsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from curation.encoders import build_encoder
    from curation.evaluation import AVERAGE_TASK, EvalTask, evaluate, main_metric, results_to_rows, template_set

    template_set(config.templates)  # validate before any work
    recipe = context.partition_key
    db = lake.lake()
    cks = db.read("checkpoints", partitions=[recipe]) if db.exists("checkpoints") else pl.DataFrame()
    if cks.height == 0:
        raise ValueError(f"recipe {recipe!r}: got no rows in `checkpoints`; expected trained_checkpoints materialized")
    t0 = time.perf_counter()
    rows = []
    per_seed = []
    for ck in cks.iter_rows(named=True):
        seed = int(json.loads(ck["config_json"]).get("seed", 0))
        enc = build_encoder("open_clip", compute.spec(), model_name=ck["model"], pretrained=ck["path"])
        res = evaluate(enc, datasets.eval_root, config.tasks or None, templates=config.templates)
        per_seed.append((seed, res))
        for r in results_to_rows(res):
            rows.append({"recipe": recipe, "checkpoint": ck["path"], **r, "seed": seed})
    frame = pl.DataFrame(rows, schema={"recipe": pl.String, "checkpoint": pl.String, "task": pl.String,
                                       "metric": pl.String, "value": pl.Float64, "seed": pl.Int64})  # fmt: skip
    db.write("eval_results", frame, partition=recipe)
    summary = []
    for seed, res in per_seed:
        for task, m in res.items():
            key = "main" if task == AVERAGE_TASK else main_metric(EvalTask.parse(task).kind)
            summary.append({"seed": seed, "task": task, "metric": key, "value": float(m[key])})
    avg = [float(res[AVERAGE_TASK]["main"]) for _, res in per_seed]
    return dg.MaterializeResult(
        metadata={
            "recipe": recipe,
            "checkpoints": len(per_seed),
            "tasks": int(per_seed[0][1][AVERAGE_TASK]["tasks"]),
            "average": float(np.mean(avg)),
            "average_std": float(np.std(avg)),
            "rows": frame.height,
            "seconds": round(time.perf_counter() - t0, 2),
            "results": dg.MetadataValue.md(md_table(pl.DataFrame(summary), max_rows=None, max_chars=70, float_fmt=".4f")),
        }
    )


# --------------------------------------------------------------------------- curation_report


def subset_sizes(db: Lake) -> tuple[dict[str, int], int | None]:
    """``({recipe: kept}, pool size)`` from the ``subsets`` and ``samples`` tables."""
    kept: dict[str, int] = {}
    if db.exists("subsets"):
        counts = db.read("subsets", columns=["recipe", "uid"]).group_by("recipe").len()
        kept = dict(zip(counts["recipe"].to_list(), counts["len"].to_list()))
    pool = db.read("embeddings", columns=["uid"]).height if db.exists("embeddings") else None
    return kept, pool


@dg.asset(
    deps=[dg.AssetDep("eval_reports", partition_mapping=ALL_RECIPES)],
    group_name=GROUP,
    kinds={"html", "markdown"},
    description="Every recipe side by side at matched compute: samples kept, kept fraction, samples seen, "
    "training time, each task's metric and their mean, difference from `full` and from `random` of the "
    "same size. HTML + markdown + PNG plots under artifacts/reports/.",
)
def curation_report(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    from curation.report import build_comparison, write_report

    db = lake.lake()
    if not db.exists("eval_results"):
        raise ValueError("curation_report: got no `eval_results` table; expected eval_reports materialized")
    ev = db.read("eval_results")
    cks = db.read("checkpoints") if db.exists("checkpoints") else pl.DataFrame()
    ev = ev.join(cks.select(pl.col("path").alias("checkpoint")), on="checkpoint", how="semi") if cks.height else ev
    kept, pool = subset_sizes(db)
    comparison = build_comparison(ev, cks, kept, pool_size=pool)
    expected = list(recipe_partitions.get_partition_keys())
    missing = sorted(set(expected) - set(comparison["recipe"].to_list()))
    notes = [
        f"pool: {pool} samples; recipes: {comparison.height}" + (f" (not evaluated yet: {', '.join(missing)})" if missing else ""),
        "metrics: zero-shot mean per-class recall per label task (chance = 1 / classes), mean of "
        "image->text and text->image recall@1, and their average (DataComp style); all recipes train "
        "for the same number of samples seen.",
        "Δ random compares with the random recipe of the nearest size (named in parentheses).",
    ]
    out = write_report(comparison, lake.artifacts("reports"), notes=notes)
    best = comparison.sort("average", descending=True, nulls_last=True).row(0, named=True) if "average" in comparison.columns else None
    meta = {
        "recipes": comparison.height,
        "missing_recipes": dg.MetadataValue.json(missing),
        "report_html": dg.MetadataValue.path(str(out["html"])),
        "report_markdown": dg.MetadataValue.path(str(out["markdown"])),
        "plots": dg.MetadataValue.json([str(p) for p in out["plots"]]),
        "markdown": dg.MetadataValue.md(out["markdown_text"]),
    }
    if best is not None:
        meta["best_recipe"] = best["recipe"]
        meta["best_average"] = float(best["average"])
    return dg.MaterializeResult(metadata=meta)


ASSETS = [filter_model, trained_checkpoints, eval_reports, curation_report]
