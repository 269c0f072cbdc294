"""Embeddings asset: ``samples[shard]`` -> ``embeddings[shard]`` (+ embed-stage quarantine).

A thin adapter over :func:`curation.embed.shard_embedding.embed_shard`: read the shard's ``samples`` partition
from Delta, embed its images (from the tar in the landing zone) and captions with the
configured encoder on the configured device, replace the shard's ``embeddings`` partition and
its stage-``embed`` rows of ``quarantine``.
"""


import time
from collections import Counter

import dagster as dg
import numpy as np

from assets import previews
from assets.partitions import shard_partitions
from curation.embed.shard_embedding import EMBED_STAGE, embed_shard, embeddings_frame, failures_frame
from curation.ingest.shards import parse_shard_key, shard_path
from resources import ComputeResource, DatasetsResource, LakeResource
from resources.encoder import EncoderResource

GROUP = "embed"
SAMPLE_COLUMNS = ["uid", "key", "member", "caption"]


def _preview(uids: np.ndarray, image: np.ndarray, text: np.ndarray, rows: int = 5) -> str:
    """A markdown preview: uid, the first image/text coordinates and the norms."""
    if len(uids) == 0:
        return "_no rows_"
    lines = ["| uid | image_emb[:4] | text_emb[:4] | ‖image‖ | ‖text‖ |", "|---|---|---|---|---|"]
    for i in range(min(rows, len(uids))):
        img = ", ".join(f"{v:+.3f}" for v in image[i, :4])
        txt = ", ".join(f"{v:+.3f}" for v in text[i, :4])
        lines.append(
            f"| {uids[i]} | {img} | {txt} | {np.linalg.norm(image[i]):.4f} | {np.linalg.norm(text[i]):.4f} |"
        )
    return "\n".join(lines)


@dg.asset(
    partitions_def=shard_partitions,
    deps=[dg.AssetKey("samples")],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="L2-normalized image and caption embeddings of every sample of the shard "
    "(`embeddings` Delta table, List(Float32) columns, encoder id per row); samples whose image "
    "fails to decode/preprocess go to `quarantine` with stage `embed`.",
)
def embeddings(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    compute: ComputeResource,
    encoder: EncoderResource,
    datasets: DatasetsResource,
) -> dg.MaterializeResult:
    key = context.partition_key
    dataset, _ = parse_shard_key(key)
    tar = shard_path(datasets.landing, key)
    db = lake.lake()
    if not db.exists("samples"):
        raise dg.Failure(description=f"shard {key!r}: the samples table does not exist; materialize samples first")
    t0 = time.perf_counter()
    samples_df = db.read("samples", columns=SAMPLE_COLUMNS, partitions=[key])
    if samples_df.height and not tar.is_file():
        raise dg.Failure(
            description=f"shard {key!r}: {tar} does not exist but samples has {samples_df.height} rows",
            metadata={"path": dg.MetadataValue.path(str(tar))},
        )
    spec = compute.spec()
    t_load = time.perf_counter()
    enc = encoder.build(spec)
    load_s = time.perf_counter() - t_load
    res = embed_shard(tar, samples_df, enc, spec, max_pixels=datasets.max_pixels, progress=previews.dagster_progress(context, "embed"))
    t_write = time.perf_counter()
    rows = db.write("embeddings", embeddings_frame(key, res), partition=key)
    db.write("quarantine", failures_frame(dataset, key, res.failures), partition=key, where={"stage": EMBED_STAGE})
    write_s = time.perf_counter() - t_write
    seconds = time.perf_counter() - t0
    reasons = dict(sorted(Counter(f["reason"] for f in res.failures).items()))
    if res.failures:
        context.log.warning("shard %s: %d samples failed to embed: %s", key, len(res.failures), reasons)
    n_in = samples_df.height
    embed_s = res.timings.get("total", 0.0)
    timing_md = "\n".join(
        ["| phase | seconds |", "|---|---|"]
        + [f"| model load | {load_s:.3f} |"]
        + [f"| {k} | {v:.3f} |" for k, v in res.timings.items()]
        + [f"| delta write | {write_s:.3f} |", f"| asset total | {seconds:.3f} |"]
    )
    return dg.MaterializeResult(
        metadata=previews.rounded({
            "rows": rows,
            "samples_in": n_in,
            "failures": len(res.failures),
            "failure_reasons": dg.MetadataValue.json(reasons),
            "encoder": res.encoder,
            "aligned": bool(enc.aligned),
            "image_dim": int(enc.image_dim),
            "text_dim": int(enc.text_dim),
            "device": str(spec.torch_device()),
            "precision": spec.precision,
            "batch_size": spec.batch_size,
            "num_workers": spec.num_workers,
            "seconds": round(seconds, 4),
            "embed_seconds": round(embed_s, 4),
            "samples_per_second": round(n_in / embed_s, 2) if embed_s > 0 else 0.0,
            "end_to_end_samples_per_second": round(n_in / seconds, 2) if seconds > 0 else 0.0,
            "timings": dg.MetadataValue.md(timing_md),
            "preview": dg.MetadataValue.md(_preview(res.uids, res.image_emb, res.text_emb)),
        })
    )


ASSETS = [embeddings]
