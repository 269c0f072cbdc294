"""Train-stage assets: the filter CLIP and the trained checkpoints per recipe.

Thin adapters over ``curation``:

* ``filter_model``: an aligned CLIP for the clipscore / clipcov recipes. A configured
  open_clip checkpoint (``model_name`` + ``pretrained`` path or tag) when the user has one,
  else :func:`curation.train.trainer.train_clip` on the FULL pool (captions from ``samples``,
  image bytes from the landing shards). Then the whole pool is embedded with it
  (:func:`curation.embed.encoders.build_encoder`) -> table ``filter_embeddings`` (uid, image_emb,
  text_emb, clip_score = cos(image, caption), model).
* ``trained_checkpoints[recipe]``: :func:`curation.train.trainer.train_from_shards` on the
  recipe's webdataset export (one run per seed, matched samples seen) -> checkpoint files
  under ``artifacts/checkpoints/<recipe>/`` and the ``checkpoints`` partition.
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
from curation.storage.lake import Lake, matrix_to_list_column
from curation.train.determinism import determinism_record, set_deterministic
from curation.train.trainer import TrainConfig
from resources import ComputeResource, DatasetsResource, LakeResource


log = logging.getLogger(__name__)


GROUP = "models"


ALL_SHARDS = dg.AllPartitionMapping()


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

    from curation.ingest.shards import load_members, shard_path

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
    from curation.embed.encoders import build_encoder
    from curation.train.trainer import train_clip

    t0 = time.perf_counter()
    set_deterministic()  # fixed torch threads + deterministic kernels (docs/evidence.md)
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
        from curation.train.trainer import save_checkpoint

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
    # compute curves: besides the main run at ``samples_seen``, each seed also trains at
    # round(m * pool size) samples seen for every multiple m (e.g. [0.25, 0.5, 1.0, 2.0])
    samples_seen_multiples: list[float] = []

    def train_config(self, seed: int, samples_seen: int | None = None) -> TrainConfig:
        return TrainConfig(
            model=self.model_name, strategy=self.strategy, samples_seen=samples_seen or self.samples_seen,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_fraction=self.warmup_fraction, patch_dropout=self.patch_dropout, seed=seed,
        )  # fmt: skip


def curve_configs(config: TrainedCheckpointsConfig, db: Lake) -> list[TrainConfig]:
    """The compute-curve runs: per seed, ``round(m * pool size)`` samples seen per multiple ``m``
    (runs equal to the main ``samples_seen`` are not repeated)."""
    if not config.samples_seen_multiples:
        return []
    bad = [m for m in config.samples_seen_multiples if not m > 0]
    if bad:
        raise ValueError(f"samples_seen_multiples: got {bad}; expected positive multiples of the pool size")
    pool = db.read("embeddings", columns=["uid"]).height if db.exists("embeddings") else 0
    if pool == 0:
        raise ValueError("samples_seen_multiples: got an empty pool (no embeddings rows); expected the pool materialized")
    budgets = sorted({max(1, round(m * pool)) for m in config.samples_seen_multiples} - {config.samples_seen})
    return [config.train_config(s, b) for s in config.seeds for b in budgets]


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
    from curation.train.trainer import train_from_shards

    recipe = context.partition_key
    set_deterministic()  # fixed torch threads + deterministic kernels (docs/evidence.md)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds: got {config.seeds}; expected a non-empty list of distinct ints")
    cfgs = [config.train_config(s) for s in config.seeds]  # validates before any work
    cfgs += curve_configs(config, lake.lake())  # compute-curve runs (samples_seen_multiples)
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
        main = cfg.samples_seen == config.samples_seen
        path = out_dir / (f"{cfg.model}-{cfg.strategy}-seed{cfg.seed}" + ("" if main else f"-seen{cfg.samples_seen}") + ".pt")
        res, path = train_from_shards(tars, cfg, path, compute.spec(), extra={"recipe": recipe})
        info = {**cfg.to_dict(), "steps": res.steps, "batch_size_used": res.batch_size, "n_train": res.n_train,
                "samples_per_s": res.samples_per_s, "final_loss": res.final_loss, "main_budget": main,
                **determinism_record()}  # fmt: skip
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
    rows_main = [r for r in rows if json.loads(r["config_json"]).get("main_budget", True)] or rows
    last = json.loads(rows_main[-1]["config_json"])
    return dg.MaterializeResult(
        metadata={
            "recipe": recipe,
            "strategy": config.strategy,
            "model": config.model_name,
            "seeds": dg.MetadataValue.json(list(config.seeds)),
            "n_train": last["n_train"],
            "samples_seen": rows_main[-1]["samples_seen"],
            "epochs": round(rows_main[-1]["samples_seen"] / max(1, last["n_train"]), 2),
            "curve_runs": len(rows) - len(rows_main),
            "train_seconds": round(float(np.mean([r["seconds"] for r in rows])), 2),
            "samples_per_s": round(float(np.mean([json.loads(r["config_json"])["samples_per_s"] for r in rows])), 1),
            "final_loss": round(last["final_loss"], 4),
            "checkpoint": dg.MetadataValue.path(rows[-1]["path"]),
            "seconds": round(time.perf_counter() - t0, 2),
            "loss_curve": dg.MetadataValue.md("\n\n".join(history_md)),
        }
    )

ASSETS = [filter_model, trained_checkpoints]
