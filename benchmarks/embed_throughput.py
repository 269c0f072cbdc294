"""Embedding throughput: bare model forward versus the end-to-end embedding path.

Both sides use the same encoder object, batch size and resolution:

* ``bare``: images already decoded and preprocessed into ``(n, 3, H, W)`` tensors and captions
  already in memory; timed: ``encode_image_batch`` over batches of ``batch_size`` plus
  ``encode_texts`` of all captions (the model's forward passes, nothing else).
* ``e2e``: what the ``embeddings`` asset does per shard: read the shard's ``samples``
  partition from Delta, read the tar, decode (Pillow) + preprocess in ``num_workers`` loader
  processes overlapping the forward passes, encode captions, write the ``embeddings``
  partition and the embed-stage ``quarantine`` rows to Delta.

Rounds alternate bare and e2e over all shards (so background load hits both alike); the
report gives medians over rounds and the median per-round ratio e2e / bare (target >= 0.85).
It also measures the bare image forward at several input resolutions (to choose the default
encoder's) and, in a separate process, the peak memory of :func:`curation.embed.pool_reader.read_pool`
loading a synthetic ``--pool-rows x --pool-dim`` embeddings table.

Usage::

    python benchmarks/embed_throughput.py                      # ~1,000 samples, 3 rounds
    python benchmarks/embed_throughput.py --limit 100 --rounds 2 --pool-rows 0   # quick
    python benchmarks/embed_throughput.py --kind open_clip --model-name ViT-B-32 --pretrained ckpt.pt
    python benchmarks/embed_throughput.py --json out.json

The dataset (``curation.ingest.emoji_dataset.build_default_dataset`` with ``--limit`` concepts) and the
lake are built in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

log = logging.getLogger("embed_throughput")


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def ingest(home: Path, lake) -> dict[str, tuple[Path, int]]:
    """Write the ``samples`` partitions of every pool shard (not timed). -> {key: (tar, rows)}."""
    from curation.ingest.shards import find_shards, parse_shard_key, read_shard

    out = {}
    for key, tar in find_shards(home / "landing").items():
        dataset, _ = parse_shard_key(key)
        res = read_shard(tar, dataset, key)
        lake.write("samples", res.samples_frame(), partition=key)
        out[key] = (tar, len(res.samples))
    return out


def bare_round(encoder, shards, lake, batch_size: int, cache: dict) -> tuple[float, int]:
    """Seconds of forward passes only (inputs prepared beforehand, cached across rounds)."""
    import torch
    from PIL import Image
    import io

    from curation.ingest.shards import load_members

    total_s, n = 0.0, 0
    for key, (tar, _) in shards.items():
        if key not in cache:
            df = lake.read("samples", columns=["member", "caption"], partitions=[key])
            blobs = load_members(tar, df["member"].to_list())
            x = torch.stack([encoder.preprocess(Image.open(io.BytesIO(blobs[m]))) for m in df["member"]])
            cache[key] = (x, df["caption"].to_list())
        x, caps = cache[key]
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            encoder.encode_image_batch(x[i : i + batch_size])
        encoder.encode_texts(caps)
        total_s += time.perf_counter() - t
        n += len(x)
    return total_s, n


def e2e_round(encoder, shards, lake, compute) -> tuple[float, int, dict]:
    """Seconds of the whole per-shard embedding path, as the asset runs it."""
    from curation.embed.shard_embedding import EMBED_STAGE, embed_shard, embeddings_frame, failures_frame
    from curation.ingest.shards import parse_shard_key

    total_s, n = 0.0, 0
    phases: dict[str, float] = {}
    for key, (tar, _) in shards.items():
        t = time.perf_counter()
        df = lake.read("samples", columns=["uid", "key", "member", "caption"], partitions=[key])
        t_read = time.perf_counter() - t
        res = embed_shard(tar, df, encoder, compute)
        t_w = time.perf_counter()
        lake.write("embeddings", embeddings_frame(key, res), partition=key)
        lake.write("quarantine", failures_frame(parse_shard_key(key)[0], key, res.failures), partition=key,
                   where={"stage": EMBED_STAGE})
        t_write = time.perf_counter() - t_w
        total_s += time.perf_counter() - t
        n += df.height
        for k, v in {**res.timings, "delta_read": t_read, "delta_write": t_write}.items():
            phases[k] = phases.get(k, 0.0) + v
    return total_s, n, phases


def resolution_sweep(sizes, batch_size: int, compute, reps: int = 3) -> dict[int, float]:
    """Bare image-forward samples/s of the default encoder's image tower per input size."""
    import torch

    from curation.embed.encoders import _load_efficientnet_lite0

    out = {}
    for s in sizes:
        model = _load_efficientnet_lite0(s).eval()
        x = torch.randn(batch_size, 3, s, s)
        with torch.inference_mode(), compute.autocast():
            model.extract_features(x)  # warm-up
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                model.extract_features(x)
                times.append(time.perf_counter() - t)
        out[s] = batch_size / statistics.median(times)
    return out


_POOL_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from curation.storage.lake import Lake
from curation.embed.pool_reader import read_pool

def hwm_mib():  # VmHWM: this process's own peak RSS (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

lake = Lake({lake!r})
base = hwm_mib()
t = time.perf_counter()
pool = read_pool(lake, columns={cols!r})
sec = time.perf_counter() - t
peak = hwm_mib()
out_mib = sum(a.nbytes for a in (pool.image, pool.text, pool.uids, pool.shards) if a is not None) / 2**20
print(json.dumps({{"rows": len(pool), "seconds": sec, "baseline_mib": base, "peak_mib": peak,
                  "output_mib": out_mib, "image_shape": list(pool.image.shape) if pool.image is not None else None}}))
"""


def pool_memory(tmp: Path, rows: int, dim: int, parts: int, cols: list[str]) -> dict:
    """Write a synthetic embeddings table, then measure read_pool in a fresh process."""
    import pyarrow as pa

    from curation.storage.lake import Lake, matrix_to_list_column

    lake = Lake(str(tmp / "poollake"))
    rng = np.random.default_rng(0)
    per = -(-rows // parts)
    t = time.perf_counter()
    for p in range(parts):
        n = min(per, rows - p * per)
        if n <= 0:
            break
        key = f"syn-{p:05d}"
        img = rng.standard_normal((n, dim), dtype=np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        table = {
            "uid": pa.array([f"{p:08x}{i:024x}" for i in range(n)], pa.string()),
            "shard": pa.array([key] * n, pa.string()),
            "image_emb": matrix_to_list_column(img),
            "text_emb": matrix_to_list_column(img if "text" in cols else img[:, :1]),
            "encoder": pa.array(["synthetic"] * n, pa.string()),
        }
        lake.write("embeddings", pa.table(table), partition=key)
        del img, table
    write_s = time.perf_counter() - t
    code = _POOL_CHILD.format(root=str(Path(__file__).resolve().parents[1]), lake=lake.root, cols=cols)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update({"write_seconds": write_s, "partitions": parts, "dim": dim, "columns": cols})
    res["overhead_mib"] = res["peak_mib"] - res["baseline_mib"] - res["output_mib"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=300, help="concepts of the default dataset (None-like: 0 = all)")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--kind", default="default")
    ap.add_argument("--model-name", default=None)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--image-size", type=int, default=None, help="default encoder resolution (None: its default)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="96,128,160,224", help="resolution sweep ('' to skip)")
    ap.add_argument("--pool-rows", type=int, default=1_000_000, help="read_pool memory test rows (0 to skip)")
    ap.add_argument("--pool-dim", type=int, default=512)
    ap.add_argument("--pool-parts", type=int, default=100)
    ap.add_argument("--pool-columns", default="image", help="comma list of image,text")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    from curation.engine.compute import ComputeSpec
    from curation.ingest.emoji_dataset import build_default_dataset
    from curation.embed.encoders import build_encoder
    from curation.storage.lake import Lake

    compute = ComputeSpec(device="cpu", precision=args.precision, batch_size=args.batch_size,
                          num_workers=args.workers)
    results: dict = {"machine": f"{os.cpu_count()} CPU cores, torch threads {args.threads}, "
                                f"cuda={torch.cuda.is_available()}", "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmpd:
        tmp = Path(tmpd)
        t = time.perf_counter()
        stats = build_default_dataset(tmp, limit=args.limit or None, samples_per_shard=args.samples_per_shard)
        lake = Lake(str(tmp / "lake"))
        shards = ingest(tmp, lake)
        n_samples = sum(n for _, n in shards.values())
        print(f"dataset: {n_samples} samples in {len(shards)} shards (built in {time.perf_counter() - t:.1f} s)")

        t = time.perf_counter()
        encoder = build_encoder(args.kind, compute, model_name=args.model_name, pretrained=args.pretrained,
                                image_size=args.image_size)
        print(f"encoder: {encoder.id} (loaded in {time.perf_counter() - t:.1f} s), batch {args.batch_size}, "
              f"workers {args.workers}, {args.precision}, torch threads {args.threads}")

        cache: dict = {}
        bare_round(encoder, shards, lake, args.batch_size, cache)  # warm-up + input preparation
        e2e_round(encoder, shards, lake, compute)  # warm-up (first Delta writes, worker fork)
        bare, e2e, ratios, phases_all = [], [], [], []
        for r in range(args.rounds):
            # shard by shard, alternating which side goes first, so load changes hit both alike
            b_s = e_s = 0.0
            n = n2 = 0
            phases: dict[str, float] = {}
            for key in shards:
                one = {key: shards[key]}
                order = ("bare", "e2e") if r % 2 == 0 else ("e2e", "bare")
                for side in order:
                    if side == "bare":
                        sec, k = bare_round(encoder, one, lake, args.batch_size, cache)
                        b_s, n = b_s + sec, n + k
                    else:
                        sec, k, ph = e2e_round(encoder, one, lake, compute)
                        e_s, n2 = e_s + sec, n2 + k
                        for name, v in ph.items():
                            phases[name] = phases.get(name, 0.0) + v
            bare.append(n / b_s)
            e2e.append(n2 / e_s)
            ratios.append((n2 / e_s) / (n / b_s))
            phases_all.append(phases)
            print(f"round {r + 1}: bare {n / b_s:7.1f} samples/s   e2e {n2 / e_s:7.1f} samples/s   "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        med_phases = {k: statistics.median(p[k] for p in phases_all) for k in phases_all[0]}
        results.update(
            samples=n_samples,
            shards=len(shards),
            encoder=encoder.id,
            bare_samples_per_s=statistics.median(bare),
            e2e_samples_per_s=statistics.median(e2e),
            ratio=statistics.median(ratios),
            rounds={"bare": bare, "e2e": e2e, "ratio": ratios},
            e2e_phase_seconds=med_phases,
            peak_rss_mib=peak_rss_mib(),
            peak_rss_workers_mib=peak_rss_mib(children=True),
        )
        print(f"\nmedian over {args.rounds} rounds: bare {results['bare_samples_per_s']:.1f} samples/s, "
              f"e2e {results['e2e_samples_per_s']:.1f} samples/s, ratio {results['ratio']:.3f} (target >= 0.85)")
        print("e2e phases (median seconds per round): "
              + ", ".join(f"{k} {v:.2f}" for k, v in med_phases.items()))
        print(f"peak RSS: main {results['peak_rss_mib']:.0f} MiB, largest loader worker "
              f"{results['peak_rss_workers_mib']:.0f} MiB")
        del cache

        if args.sizes and args.kind == "default":
            sizes = [int(s) for s in args.sizes.split(",") if s]
            sweep = resolution_sweep(sizes, args.batch_size, compute)
            results["resolution_sweep_image_forward_samples_per_s"] = sweep
            print("image forward by resolution (samples/s): "
                  + ", ".join(f"{s}px {v:.1f}" for s, v in sweep.items()))

        if args.pool_rows:
            cols = [c for c in args.pool_columns.split(",") if c]
            pm = pool_memory(tmp, args.pool_rows, args.pool_dim, args.pool_parts, cols)
            results["read_pool"] = pm
            print(f"read_pool {pm['rows']} x {args.pool_dim} ({','.join(cols)}, {pm['partitions']} partitions): "
                  f"{pm['seconds']:.1f} s, output {pm['output_mib']:.0f} MiB, peak RSS {pm['peak_mib']:.0f} MiB "
                  f"(baseline {pm['baseline_mib']:.0f} MiB, overhead beyond output {pm['overhead_mib']:.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
