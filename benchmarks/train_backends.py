"""Side by side: the two training backends on the same subset, samples seen and seeds.

Trains ``clip`` on the embedded emoji pool (its landing shards are webdataset shards, used as
the subset) with ``open_clip_train`` (subprocess) and with the platform loop, same model,
samples seen, batch, learning rate and seed, for several seeds; evaluates every checkpoint
through clip_benchmark on the held-out split; prints accuracy and samples/s per backend
(mean and std over seeds) as a markdown table.

    python benchmarks/train_backends.py --home /tmp/emoji-home --seeds 0 1 2

Flags: ``--home`` (a data home; built with ``build_default_dataset`` when it has no landing
shards), ``--samples-seen`` (16384), ``--batch-size`` (the platform default, 64), ``--model`` (tiny-rn-32),
``--threads`` (torch / OMP threads for both backends, 1), ``--device`` (cpu | cuda),
``--precision`` (fp32 | bf16).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default="/tmp/curation-train-backends")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples-seen", type=int, default=16_384)
    from curation.train.config import DEFAULT_BATCH_SIZE

    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--model", default="tiny-rn-32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--backends", nargs="+", default=["open_clip_train", "platform"])
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from curation.engine.compute import ComputeSpec
    from curation.evaluate.benchmark import EvalSetSpec, evaluate_checkpoint
    from curation.ingest.emoji_dataset import build_default_dataset
    from curation.train.config import TrainConfig
    from curation.train.trainer import train_subset

    home = Path(args.home)
    tars = sorted((home / "landing" / "emoji").glob("*.tar"))
    if not tars:
        t0 = time.perf_counter()
        build_default_dataset(home, workers=1)
        tars = sorted((home / "landing" / "emoji").glob("*.tar"))
        print(f"built the default dataset in {time.perf_counter() - t0:.0f}s", flush=True)
    spec = EvalSetSpec("emoji-heldout", str(home / "eval" / "emoji-heldout"), "manifest", "emoji")
    compute = ComputeSpec(device=args.device, precision=args.precision, num_workers=0, batch_size=256)
    rows = []
    for backend in args.backends:
        for seed in args.seeds:
            cfg = TrainConfig(model=args.model, strategy="clip", samples_seen=args.samples_seen,
                              batch_size=args.batch_size, seed=seed, backend=backend)  # fmt: skip
            ck = home / "bench-checkpoints" / f"{backend}-seed{seed}.pt"
            summary, path = train_subset(tars, cfg, ck, compute)
            res = evaluate_checkpoint(path, [spec], home / "bench-eval" / f"{backend}-seed{seed}",
                                      device=args.device, precision=args.precision)  # fmt: skip
            rt = res["emoji-heldout/retrieval"]
            row = {
                "backend": backend, "seed": seed, "samples_seen": summary.samples_seen, "n_train": summary.n_train,
                "samples_per_s": summary.samples_per_s, "wall_s": summary.seconds,
                "average": res["average"]["main"],
                "retrieval_mean_recall@1": rt["mean_recall@1"],
                # nan on a held-out split of fewer than 10 images (a small --home): recall@10 is not scored there
                "retrieval_recall@10": (rt.get("image_retrieval_recall@10", math.nan)
                                        + rt.get("text_retrieval_recall@10", math.nan)) / 2,
                "group_mpcr": res["emoji-heldout/zeroshot/group"]["mean_per_class_recall"],
                "subgroup_mpcr": res["emoji-heldout/zeroshot/subgroup"]["mean_per_class_recall"],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = ["samples_per_s", "wall_s", "average", "retrieval_mean_recall@1", "retrieval_recall@10", "group_mpcr", "subgroup_mpcr"]
    print(f"\nload average: {os.getloadavg()}; {len(args.seeds)} seeds; {args.samples_seen} samples seen; "
          f"batch {args.batch_size}; {args.model}; {args.threads} thread(s); {args.device}/{args.precision}")  # fmt: skip
    print("| backend | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for backend in args.backends:
        sel = [r for r in rows if r["backend"] == backend]
        cells = []
        for k in keys:
            v = [r[k] for r in sel]
            sd = statistics.pstdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}" if k not in ("samples_per_s", "wall_s") else f"{statistics.median(v):.0f}")
        print(f"| {backend} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
