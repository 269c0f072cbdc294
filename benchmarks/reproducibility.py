"""Same config + seed twice: are the numbers identical? Which knob breaks it?

Trains the default tiny CLIP on the first N samples of one landing shard (a separate process
per run, as two demo runs are) and prints a sha256 of the trained weights, the final loss and
the default embedding encoder's vectors of the same images, for:

* ``--threads`` torch intra-op threads (the demo's default is every core);
* ``--deterministic`` :func:`curation.train.determinism.set_deterministic` on or off.

Usage (from the repo root, CURATION_HOME with the default dataset built)::

    python benchmarks/reproducibility.py --threads 2 --runs 2
    python benchmarks/reproducibility.py --threads 1 --runs 1
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import time


def emoji_landing():
    """The default dataset's shard directory in the data home (``CURATION_HOME``)."""
    from curation.storage.data_home import data_home

    return data_home() / "landing" / "emoji"


def emoji_shards() -> list:
    """Its shards, sorted (empty without the default dataset)."""
    return sorted(emoji_landing().glob("*.tar"))


def one_run(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from curation.embed.encoders import build_encoder
    from curation.engine.compute import ComputeSpec
    from curation.ingest.shards import iter_samples
    from curation.train.determinism import determinism_record, set_deterministic
    from curation.train.trainer import TrainConfig, train_clip

    if args.deterministic:
        set_deterministic(threads=args.threads)
    else:
        torch.set_num_threads(args.threads)
    shard = emoji_shards()[0]
    images, captions = [], []
    for _key, members in iter_samples(shard):
        img = next((members[e] for e in ("png", "jpg", "webp") if e in members), None)
        if img is None or "txt" not in members:
            continue
        im = Image.open(io.BytesIO(img))
        im.load()
        images.append(im)
        captions.append(members["txt"].decode().strip())
        if len(images) >= args.n:
            break
    t0 = time.perf_counter()
    res = train_clip(images, captions, TrainConfig(samples_seen=args.samples_seen, seed=0), ComputeSpec(device="cpu"))
    train_s = time.perf_counter() - t0
    h = hashlib.sha256()
    for k, v in sorted(res.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    enc = build_encoder("default", ComputeSpec(device="cpu"))
    emb = enc.encode_images(images[:256])
    return {
        "weights_sha256": h.hexdigest()[:16],
        "final_loss": res.final_loss,
        "embeddings_sha256": hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest()[:16],
        "train_s": round(train_s, 1),
        "steps": res.steps,
        **determinism_record(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--n", type=int, default=512, help="training samples")
    p.add_argument("--samples-seen", type=int, default=2048)
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(args)))
        return 0
    from curation.storage.data_home import data_home

    if not emoji_shards():
        print(f"reproducibility: got no shards in {emoji_landing()}; expected the default dataset: "
              f"`curation datasets build default --out {data_home()}` (or set CURATION_HOME)", file=sys.stderr)
        return 2
    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--n", str(args.n),
           "--samples-seen", str(args.samples_seen)] + ([] if args.deterministic else ["--no-deterministic"])  # fmt: skip
    for i in range(args.runs):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # the run's own error, not only its exit status
            sys.stderr.write(proc.stderr)
            return proc.returncode
        print(f"run {i}: {proc.stdout.strip().splitlines()[-1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
