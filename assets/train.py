"""Train-stage assets: the filter CLIP and the trained checkpoints per recipe.

Thin adapters over ``curation``:

* ``filter_model``: an aligned CLIP for the clipscore / clipcov recipes. A configured
  open_clip checkpoint (``model_name`` + ``pretrained`` path or tag) when the user has one,
  else the platform loop (:func:`curation.train.loop.run_training`) on the FULL pool, streamed
  shard by shard from the landing tars. Then the pool is embedded with it shard by shard
  (:func:`curation.embed.encoders.build_encoder`) -> table ``filter_embeddings`` (uid, image_emb,
  text_emb, clip_score = cos(image, caption), model).
* ``trained_checkpoints[recipe]``: :func:`curation.train.trainer.train_runs` on the recipe's
  webdataset export (one run per seed and budget, matched samples seen; the open_clip_train runs
  share one subprocess) with the configured backend
  (``open_clip_train`` subprocess or the ``platform`` loop; ``auto``: open_clip_train for
  clip / clip_da / flip, platform for slip) -> checkpoint files under
  ``artifacts/checkpoints/<recipe>/`` and typed rows in the ``checkpoints`` partition (paths
  relative to the artifacts root, so a data home can move).
"""


import logging
import time
from pathlib import Path
from typing import Optional

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa

from assets import previews
from assets.metadata import md_table
from assets.settings import filter_model_needed
from assets.partitions import recipe_partitions
from curation.storage.lake import Lake, matrix_to_list_column
from curation.train.config import TrainConfig
from curation.train.determinism import determinism_record, set_deterministic
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


def pool_shards(pool: pl.DataFrame, landing: str) -> list[tuple[str, pl.DataFrame]]:
    """``[(landing tar path, pool rows of that shard)]`` keeping only members the tar holds."""
    from curation.ingest.shards import list_keys, shard_path, split_member_name

    out = []
    for (shard,), rows in pool.group_by("shard", maintain_order=True):
        path = shard_path(landing, str(shard))
        keys = list_keys(path, manifest=False) if path.exists() else set()
        present = rows.filter(pl.col("member").map_elements(lambda m: split_member_name(m)[0] in keys, return_dtype=pl.Boolean))
        if present.height < rows.height:
            log.warning("%s: %d pool members missing from the tar", shard, rows.height - present.height)
        out.append((str(path), present))
    return out


def keep_extremes(kept: list[tuple[float, str]], scores: np.ndarray, captions: list[str], k: int = 5) -> list[tuple[float, str]]:
    """The ``k`` highest and ``k`` lowest ``(score, caption)`` of ``kept`` plus one more shard's
    rows, sorted by score: what the preview shows, without holding every caption of the pool."""
    order = np.argsort(scores, kind="stable")
    idx = sorted(set(order[:k].tolist()) | set(order[-k:].tolist()))
    merged = sorted(kept + [(float(scores[i]), captions[i]) for i in idx], key=lambda t: t[0])
    return merged if len(merged) <= 2 * k else merged[:k] + merged[-k:]


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
    from curation.train.checkpoints import save_checkpoint
    from curation.train.data import SelectedShardPairs, decode_image
    from curation.train.loop import run_training

    if not config.pretrained and not (need := filter_model_needed())[0]:
        return dg.MaterializeResult(metadata={"skipped": need[1]})
    t0 = time.perf_counter()
    set_deterministic()  # fixed torch threads + deterministic kernels (docs/evidence.md)
    db = lake.lake()
    spec = compute.spec()
    pool = read_pool_samples(db)
    pool_rows = pool.height
    shards = pool_shards(pool, datasets.landing)
    del pool  # the per-shard frames hold what is needed
    n_pool = sum(rows.height for _, rows in shards)
    if not n_pool:
        raise ValueError(f"filter_model: got 0 readable pool images (of {pool_rows} pool rows); expected a pool")
    meta: dict = {"pool_rows": pool_rows, "images_missing": pool_rows - n_pool, "shards": len(shards)}
    if config.pretrained:
        pretrained, source = config.pretrained, "pretrained"
    else:
        cfg = TrainConfig(
            model=config.model_name, strategy="clip", samples_seen=config.samples_seen,
            batch_size=config.batch_size, lr=config.lr, seed=config.seed, backend="platform",
        )  # fmt: skip
        pairs = SelectedShardPairs(
            [(p, list(zip(rows["member"].to_list(), rows["caption"].to_list()))) for p, rows in shards]
        )
        result = run_training(pairs, cfg, spec, progress=previews.dagster_progress(context, "filter_model training"))
        del pairs  # the pool's (member, caption) lists are not needed for embedding
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
    # one shard's images decoded, embedded and written at a time (append after the first), so
    # memory stays flat in the pool size: only the scores (4 bytes a sample) and the preview's
    # 10 extreme captions are kept
    from curation.ingest.shards import load_members

    extremes: list[tuple[float, str]] = []
    scores, bad, written = [], 0, 0
    for path, rows in shards:
        blobs = load_members(path, rows["member"].to_list())
        keep, images = [], []
        for i, member in enumerate(rows["member"].to_list()):
            try:
                images.append(decode_image(blobs[member]))
                keep.append(i)
            except Exception as e:  # noqa: BLE001 - a corrupt image is counted, not fatal
                log.warning("cannot decode %s of %s: %s", member, path, e)
                bad += 1
        del blobs
        if not keep:
            continue
        sub = rows[keep]
        img = encoder.encode_images(images)
        txt = encoder.encode_texts(sub["caption"].to_list())
        score = np.einsum("nd,nd->n", img, txt).astype(np.float32)
        table = pa.table(
            {
                "uid": pa.array(sub["uid"].to_list(), pa.string()),
                "image_emb": matrix_to_list_column(img),
                "text_emb": matrix_to_list_column(txt),
                "clip_score": pa.array(score, pa.float32()),
                "model": pa.array([encoder.id] * sub.height, pa.string()),
            }
        )
        db.write("filter_embeddings", table, mode="overwrite" if written == 0 else "append")
        written += sub.height
        extremes = keep_extremes(extremes, score, sub["caption"].to_list())
        scores.append(score)
    if not written:
        raise ValueError(f"filter_model: got 0 decodable pool images (of {pool_rows} pool rows); expected a pool")
    score = np.concatenate(scores)
    meta["images_missing"] += bad
    embed_s = time.perf_counter() - t1
    shown = extremes[::-1][:5] + extremes[:5]  # the 5 highest (descending), then the 5 lowest
    preview = pl.DataFrame({"clip_score": [sc for sc, _ in shown], "caption": [c for _, c in shown]})
    meta.update(
        {
            "source": source,
            "model": encoder.id,
            "rows": written,
            "embed_seconds": round(embed_s, 2),
            "embed_samples_per_s": round(written / max(embed_s, 1e-9), 1),
            "clip_score_mean": float(score.mean()),
            "clip_score_p10": float(np.quantile(score, 0.1)),
            "clip_score_p90": float(np.quantile(score, 0.9)),
            "seconds": round(time.perf_counter() - t0, 2),
            "highest_and_lowest": dg.MetadataValue.md(md_table(preview, max_rows=None, max_chars=70, float_fmt=".4f")),
        }
    )
    return dg.MaterializeResult(metadata=previews.rounded(meta))


class TrainedCheckpointsConfig(dg.Config):
    """One CLIP per seed on the recipe's subset, at the same samples seen for every recipe.

    ``backend``: ``auto`` (open_clip_train for clip / clip_da / flip, the platform loop for
    slip), ``open_clip_train`` or ``platform``. ``preset``: a named config
    (``tiny-cpu``, ``datacomp-small``, ``datacomp-medium``) whose values replace the defaults
    below; fields set explicitly here still win.
    """

    # defaults come from the library's TrainConfig, so the two cannot drift apart
    strategy: str = TrainConfig.strategy
    backend: str = TrainConfig.backend
    preset: Optional[str] = None
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

    def train_config(self, seed: int, samples_seen: int | None = None, strategy: str | None = None) -> TrainConfig:
        """The run of ``seed`` (at ``samples_seen``, default the main budget); ``strategy``: the
        recipe's ``train_strategy``, which wins over this config and its preset."""
        from curation.train.config import NAMED_CONFIGS

        values = dict(
            model=self.model_name, strategy=self.strategy, samples_seen=samples_seen or self.samples_seen,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_fraction=self.warmup_fraction, patch_dropout=self.patch_dropout, seed=seed, backend=self.backend,
        )  # fmt: skip
        if self.preset is not None:
            if self.preset not in NAMED_CONFIGS:
                raise ValueError(f"preset: got {self.preset!r}; expected one of {sorted(NAMED_CONFIGS)}")
            explicit = self.model_fields_set
            key = {"model_name": "model"}
            for k, v in NAMED_CONFIGS[self.preset].items():
                field_name = next((f for f, t in key.items() if t == k), k)
                if field_name not in explicit:
                    values[k] = v
        if strategy is not None:
            values["strategy"] = strategy
        return TrainConfig(**values)


def curve_configs(config: TrainedCheckpointsConfig, db: Lake, workers: int = 0, strategy: str | None = None) -> list[TrainConfig]:
    """The compute-curve runs: per seed, ``m * pool size`` samples seen per multiple ``m``, rounded
    to whole steps of all loader workers (``batch_size x max(1, workers)``: what open_clip_train
    needs to see exactly that many, whatever the GPU count); runs equal to the main
    ``samples_seen`` are not repeated."""
    if not config.samples_seen_multiples:
        return []
    bad = [m for m in config.samples_seen_multiples if not m > 0]
    if bad:
        raise ValueError(f"samples_seen_multiples: got {bad}; expected positive multiples of the pool size")
    pool = db.count_rows("embeddings") if db.exists("embeddings") else 0
    if pool == 0:
        raise ValueError("samples_seen_multiples: got an empty pool (no embeddings rows); expected the pool materialized")
    # every recipe's curve point is the same compute, and open_clip_train sees exactly that many
    unit = config.batch_size * max(1, workers)
    budgets = sorted({max(1, round(m * pool / unit)) * unit for m in config.samples_seen_multiples} - {config.samples_seen})
    return [config.train_config(s, b, strategy) for s in config.seeds for b in budgets]


@dg.asset(
    partitions_def=recipe_partitions,
    deps=[dg.AssetDep("pruned_subsets")],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="open_clip checkpoints trained on the recipe's webdataset export (one per seed, matched "
    "samples seen; open_clip_train or the platform loop) under artifacts/checkpoints/<recipe>/, and typed "
    "rows in the `checkpoints` partition.",
)
def trained_checkpoints(
    context: dg.AssetExecutionContext, config: TrainedCheckpointsConfig, lake: LakeResource, compute: ComputeResource
) -> dg.MaterializeResult:
    from curation.train.checkpoints import checkpoint_record, checkpoint_schema
    from curation.select.controls import resolve_recipe
    from curation.train.trainer import TrainRun, train_runs

    recipe = context.partition_key
    set_deterministic()  # fixed torch threads + deterministic kernels (docs/evidence.md)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds: got {config.seeds}; expected a non-empty list of distinct ints")
    # a recipe may name its own training strategy (recipes.yaml `train_strategy`, e.g. full+slip)
    strategy = resolve_recipe(recipe).train_strategy
    cfgs = [config.train_config(s, strategy=strategy) for s in config.seeds]  # validates before any work
    cfgs += curve_configs(config, lake.lake(), compute.spec().num_workers, strategy)  # compute-curve runs
    shard_dir = Path(lake.artifacts_root) / "subsets" / recipe / "shards"
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(
            f"recipe {recipe!r}: got no webdataset shards in {shard_dir}; expected pruned_subsets exported with write_shards=True"
        )
    out_dir = lake.artifacts("checkpoints", recipe)
    rows, history_md, histories = [], [], {}
    t0 = time.perf_counter()
    runs = []
    for cfg in cfgs:
        main = cfg.samples_seen == config.samples_seen
        path = out_dir / (f"{cfg.model}-{cfg.strategy}-seed{cfg.seed}" + ("" if main else f"-seen{cfg.samples_seen}") + ".pt")
        label = f"train seed {cfg.seed}" + ("" if main else f" at {cfg.samples_seen} samples seen")
        runs.append(TrainRun(cfg, path, {"recipe": recipe, "main_budget": main}, previews.dagster_progress(context, label)))
    # all seeds and budgets of the recipe in one call: open_clip_train's process start is paid once
    for run, (summary, path) in zip(runs, train_runs(tars, runs, compute.spec())):
        cfg, main = run.config, run.extra["main_budget"]
        rows.append(checkpoint_record(recipe, cfg, summary.backend, path, lake.artifacts_root, main_budget=main,
                                      torch_threads=determinism_record()["torch_threads"], **summary.measures()))
        if main:
            histories[f"seed {cfg.seed}"] = summary.history
        hist = pl.DataFrame(summary.history)
        cols = [c for c in ("step", "samples_seen", "loss", "lr", "samples_per_s") if c in hist.columns]
        label = f"seed {cfg.seed} ({summary.backend})" + ("" if main else f", {cfg.samples_seen} samples seen")
        history_md.append(label + "\n\n" + md_table(hist.select(cols).gather_every(max(1, hist.height // 8)), max_rows=None, max_chars=70, float_fmt=".4f"))
    frame = pl.DataFrame(rows, schema=checkpoint_schema())
    lake.lake().write("checkpoints", frame, partition=recipe)
    rows_main = [r for r in rows if r["main_budget"]] or rows
    last = rows_main[-1]
    return dg.MaterializeResult(
        metadata=previews.rounded({
            "recipe": recipe,
            "strategy": cfgs[-1].strategy,
            "backend": last["backend"],
            "model": cfgs[-1].model,
            "seeds": dg.MetadataValue.json(list(config.seeds)),
            "n_train": last["n_train"],
            "samples_seen": last["samples_seen"],
            "epochs": round(last["samples_seen"] / max(1, last["n_train"]), 2),
            "curve_runs": len(rows) - len(rows_main),
            "train_seconds": round(float(np.mean([r["seconds"] for r in rows])), 2),
            "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in rows])), 1),
            "final_loss": round(last["final_loss"], 4),
            "checkpoint": dg.MetadataValue.path(str(Path(lake.artifacts_root) / last["path"])),
            "seconds": round(time.perf_counter() - t0, 2),
            "loss_curve": dg.MetadataValue.md("\n\n".join(history_md)),
            **previews.loss_plot(histories),
        })
    )

ASSETS = [filter_model, trained_checkpoints]
