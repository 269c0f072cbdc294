"""Peak memory of training, filter_model and evaluation on a large synthetic subset (issue 11, item 5).

Writes ``--n`` synthetic image-caption pairs (32x32 PNGs of coloured shapes, distinct keys and
captions) as webdataset shards of 10,000, then runs each phase in its OWN child process:

* ``train-platform``: the platform loop streaming all ``--n`` pairs' shards
  (:class:`curation.train.data.ShardPairs`: one counting pass over every shard, then
  ``--samples-seen`` samples through a shuffle buffer; memory does not grow with samples seen);
* ``train-open_clip_train``: open_clip_train as a subprocess over the same shards
  (``--dataset-resampled``; the platform counts the ``--n`` pairs first);
* ``filter_model``: the Dagster asset on a lake whose pool is the first ``--pool-n`` samples
  (the pool read from the lake, training on it streamed shard by shard, then every pool image
  decoded, embedded and appended to ``filter_embeddings`` one shard at a time);
* ``evaluate``: the ``train-platform`` checkpoint (trained on the ``--n`` subset) through
  clip_benchmark on a synthetic held-out split of ``--eval-n`` images. Evaluation reads only
  the checkpoint (its size is the model's, not the subset's) and the eval set, so its memory
  depends on the eval-set size (clip_benchmark's retrieval holds the texts x images score
  matrix), not on the subset's.

Memory is the peak of the phase's whole process tree: the orchestrating process samples the
summed ``VmRSS`` (and ``Pss``) of the phase process and all its descendants every 0.2 s, and
the phase reports its exact ``ru_maxrss`` (self, largest child); the tree peak is the larger.
Summed RSS counts shared pages (libtorch, forked copies) once per process, so it is an upper
bound of the physical memory; PSS splits them. The printout states the target (``--target-gib``,
3 GiB) and PASS/FAIL per phase.

    python benchmarks/train_memory.py --n 1000000 --pool-n 1000000 --work /tmp/train-memory
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
          "purple": (140, 40, 160), "orange": (240, 140, 20)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
PER_SHARD = 10_000


def _pngs() -> dict[tuple[str, str], bytes]:
    from PIL import Image, ImageDraw

    out = {}
    for c, rgb in COLORS.items():
        for s in SHAPES:
            im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
            d = ImageDraw.Draw(im)
            if s == "circle":
                d.ellipse([4, 4, 28, 28], fill=rgb)
            elif s == "square":
                d.rectangle([4, 4, 28, 28], fill=rgb)
            else:
                d.polygon([(4, 28), (28, 28), (16, 4)], fill=rgb)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            out[(c, s)] = buf.getvalue()
    return out


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(d: Path, n: int) -> list[Path]:
    """``n`` pairs in shards of 10,000 under ``d`` (reused when already complete)."""
    import numpy as np

    d.mkdir(parents=True, exist_ok=True)
    done = d / "done.json"
    if done.exists() and json.loads(done.read_text())["n"] == n:
        return sorted(d.glob("*.tar"))
    pngs = _pngs()
    keys = list(pngs)
    rng = np.random.default_rng(0)
    for s in range(0, n, PER_SHARD):
        with tarfile.open(d / f"{s // PER_SHARD:05d}.tar", "w") as tf:
            for i in range(s, min(n, s + PER_SHARD)):
                c, sh = keys[rng.integers(len(keys))]
                _add(tf, f"{i:09d}.png", pngs[(c, sh)])
                _add(tf, f"{i:09d}.txt", f"a {c} {sh} number {i}".encode())
    done.write_text(json.dumps({"n": n}))
    return sorted(d.glob("*.tar"))


def peak_gib() -> tuple[float, float]:
    """(this process, its finished children) peak RSS in GiB (Linux ru_maxrss is KiB)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return me, kids


def checkpoint(work: Path, backend: str) -> Path:
    """Where the ``train-<backend>`` phase writes its checkpoint (the evaluate phase reads platform's)."""
    return work / "ck" / f"{backend}.pt"


def phase(name: str, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from curation.engine.compute import ComputeSpec
    from curation.train.config import TrainConfig

    work = Path(args.work)
    tars = sorted((work / "shards").glob("*.tar"))
    cpu = ComputeSpec(device="cpu", num_workers=0, batch_size=256)
    t0 = time.perf_counter()
    out: dict = {"phase": name}
    if name.startswith("train-"):
        from curation.train.trainer import train_subset

        backend = name.split("-", 1)[1]
        cfg = TrainConfig(model="tiny-rn-32", samples_seen=args.samples_seen, batch_size=128, backend=backend)
        summary, _ = train_subset(tars, cfg, checkpoint(work, backend), cpu)
        out.update(samples_seen=summary.samples_seen, n_train=summary.n_train, samples_per_s=round(summary.samples_per_s))
    elif name == "filter_model":
        import polars as pl
        from dagster import DagsterInstance, materialize

        from assets.train import filter_model
        from curation.ingest.ids import make_uid
        from resources import ComputeResource, DatasetsResource, LakeResource

        home = work / "home"
        landing = home / "landing" / "synth"
        landing.mkdir(parents=True, exist_ok=True)
        lake = LakeResource(root=str(home / "lake"), artifacts_root=str(home / "artifacts"))
        db = lake.lake()
        n_pool = 0
        for t in tars:
            if n_pool >= args.pool_n:
                break
            link = landing / t.name
            if not link.exists():
                link.symlink_to(t)
            shard = f"synth-{t.stem}"
            keys = [f"{i:09d}" for i in range(int(t.stem) * PER_SHARD, min(args.n, (int(t.stem) + 1) * PER_SHARD))]
            keys = keys[: args.pool_n - n_pool]
            n_pool += len(keys)
            frame = pl.DataFrame({"uid": [make_uid("synth", shard, k) for k in keys], "dataset": "synth", "shard": shard,
                                  "key": keys, "caption": [f"caption {k}" for k in keys],
                                  "member": [f"{k}.png" for k in keys]})  # fmt: skip
            db.write("samples", frame, partition=shard)
            db.write("embeddings", frame.select("uid", "shard"), partition=shard)
        res = materialize(
            [filter_model], instance=DagsterInstance.ephemeral(),
            resources={"lake": lake, "datasets": DatasetsResource(landing=str(home / "landing"), eval_root=str(home / "eval")),
                       "compute": ComputeResource(device="cpu", num_workers=0, batch_size=256)},
            run_config={"ops": {"filter_model": {"config": {"samples_seen": args.samples_seen, "batch_size": 128}}}},
        )  # fmt: skip
        md = res.asset_materializations_for_node("filter_model")[0].metadata
        out.update(pool=n_pool, rows=md["rows"].value, asset_seconds=md["seconds"].value,
                   train_seconds=md["train_seconds"].value, embed_seconds=md["embed_seconds"].value,
                   embed_samples_per_s=md["embed_samples_per_s"].value)  # fmt: skip
    elif name == "evaluate":
        import polars as pl

        from curation.evaluate.benchmark import EvalSetSpec, evaluate_checkpoint

        ev = work / "eval" / "synth-heldout"
        ev.mkdir(parents=True, exist_ok=True)
        pngs = _pngs()
        rows = []
        with tarfile.open(ev / "00000.tar", "w") as tf:
            for i in range(args.eval_n):
                c, sh = list(pngs)[i % len(pngs)]
                _add(tf, f"{i:06d}.png", pngs[(c, sh)])
                rows.append({"uid": f"{i:032x}", "key": f"{i:06d}", "tar": "00000.tar", "member": f"{i:06d}.png",
                             "caption": f"a {c} {sh} number {i}", "color": c, "shape": sh})  # fmt: skip
        pl.DataFrame(rows).write_parquet(ev / "manifest.parquet")
        (ev / "tasks.json").write_text(json.dumps({"zero_shot": {"color": list(COLORS), "shape": list(SHAPES)},
                                                  "retrieval": {"caption_column": "caption", "image_column": "member"}}))  # fmt: skip
        ck = checkpoint(work, "platform")
        res = evaluate_checkpoint(ck, [EvalSetSpec("synth-heldout", str(ev), "manifest", "simple")], work / "eval-results")
        out.update(eval_n=args.eval_n, average=round(res["average"]["main"], 4))
    me, kids = peak_gib()
    out.update(seconds=round(time.perf_counter() - t0, 1), peak_rss_gib=round(me, 3), children_peak_rss_gib=round(kids, 3))
    return out


def _tree(root: int) -> list[int]:
    """``root`` and every live descendant (``/proc/<pid>/task/<tid>/children``)."""
    out, i = [root], 0
    while i < len(out):
        pid = out[i]
        i += 1
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(c) for c in f.read().split()]
        except OSError:  # exited between the listing and the read
            pass
    return out


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_phase(argv: list[str], env: dict, log_path: Path, interval: float = 0.2) -> tuple[int, dict]:
    """Run one phase process; sample its process tree every ``interval`` s.

    Returns ``(returncode, sampled)`` with the peak over samples of the tree's summed RSS
    (``VmRSS``: shared pages such as libtorch counted once per process, an upper bound) and
    summed PSS (``smaps_rollup``: shared pages split between the processes mapping them), both
    in GiB, the most processes alive at once, and their command names.
    """
    peak_rss = peak_pss = 0
    most, names = 0, set()
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        while p.poll() is None:
            pids = _tree(p.pid)
            peak_rss = max(peak_rss, sum(_kib(f"/proc/{q}/status", "VmRSS:") for q in pids))
            peak_pss = max(peak_pss, sum(_kib(f"/proc/{q}/smaps_rollup", "Pss:") for q in pids))
            if len(pids) > most:
                most = len(pids)
            for q in pids[1:]:
                try:
                    names.add(Path(f"/proc/{q}/comm").read_text().strip())
                except OSError:
                    pass
            time.sleep(interval)
    return p.returncode, {"tree_rss_sampled_gib": round(peak_rss / 2**20, 3), "tree_pss_sampled_gib": round(peak_pss / 2**20, 3),
                          "max_processes": most, "child_commands": sorted(names)}  # fmt: skip


SAMPLES = {  # what each phase's "samples" column counts
    "train-platform": ("n_train", "subset pairs streamed (counting pass over all shards, then samples seen)"),
    "train-open_clip_train": ("n_train", "subset pairs in the shards open_clip_train resamples"),
    "filter_model": ("rows", "pool samples trained on and embedded shard by shard"),
    "evaluate": ("eval_n", "eval-set images (memory depends on the eval set, not the subset)"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic subset size")
    ap.add_argument("--pool-n", type=int, default=1_000_000, help="filter_model pool size (<= n)")
    ap.add_argument("--eval-n", type=int, default=2_000, help="images in the synthetic held-out eval set")
    ap.add_argument("--samples-seen", type=int, default=4096)
    ap.add_argument("--target-gib", type=float, default=3.0, help="peak RSS goal per phase (issue 11: 3 GiB)")
    ap.add_argument("--work", default="/tmp/curation-train-memory")
    ap.add_argument("--phases", nargs="+", default=["train-platform", "train-open_clip_train", "filter_model", "evaluate"])
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(phase(args.phase, args)), flush=True)
        return 0
    ck = checkpoint(Path(args.work), "platform")
    if "evaluate" in args.phases and not ck.exists() and (
            "train-platform" not in args.phases or args.phases.index("train-platform") > args.phases.index("evaluate")):
        print(f"train_memory: the evaluate phase evaluates the train-platform phase's checkpoint ({ck}): got no such file; "
              "expected --phases train-platform ... evaluate (or a --work where it ran)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tars = write_shards(Path(args.work) / "shards", args.n)
    size = sum(t.stat().st_size for t in tars) / 2**30
    print(f"{args.n} samples in {len(tars)} shards ({size:.2f} GiB) ready in {time.perf_counter() - t0:.0f}s", flush=True)
    results, failed = [], []
    for name in args.phases:
        argv = [sys.executable, __file__, "--phase", name, "--n", str(args.n), "--pool-n", str(args.pool_n),
                "--eval-n", str(args.eval_n), "--samples-seen", str(args.samples_seen), "--work", args.work]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        log_path = Path(args.work) / f"{name}.log"
        rc, sampled = run_phase(argv, env, log_path)
        text = log_path.read_text(errors="replace")
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        if rc != 0 or line is None:
            print(f"{name}: FAILED (rc {rc}; log {log_path})\n{text[-3000:]}", flush=True)
            failed.append(name)
            continue
        r = {**json.loads(line[len("RESULT "):]), **sampled}
        # the tree's peak: the sampled sum, or a single process's exact ru_maxrss if higher
        r["tree_peak_rss_gib"] = max(r["tree_rss_sampled_gib"], r["peak_rss_gib"], r["children_peak_rss_gib"])
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\nload average {os.getloadavg()}; target: peak RSS < {args.target_gib} GiB per phase, the phase's whole "
          "process tree (its children, e.g. open_clip_train's subprocess, included)")
    print("tree peak RSS = max(sampled sum of VmRSS over the tree every 0.2 s, exact ru_maxrss of the phase process, "
          "of its largest child); PSS splits shared pages (libtorch) between processes")
    print(f"{'phase':<24} {'samples':>9}  {'tree peak RSS':>13}  {'tree PSS':>8}  {'procs':>5}  {'seconds':>8}  result")
    for r in results:
        key, _ = SAMPLES[r["phase"]]
        ok = r["tree_peak_rss_gib"] < args.target_gib
        print(f"{r['phase']:<24} {r[key]:>9}  {r['tree_peak_rss_gib']:>9.2f} GiB  {r['tree_pss_sampled_gib']:>4.2f} GiB  "
              f"{r['max_processes']:>5}  {r['seconds']:>8}  {'PASS' if ok else 'FAIL'} (< {args.target_gib} GiB)")
    for r in results:
        print(f"  {r['phase']}: samples = {SAMPLES[r['phase']][1]}")
    print(f"ALL PHASES {'PASS' if results and len(results) == len(args.phases) and all(r['tree_peak_rss_gib'] < args.target_gib for r in results) else 'DO NOT ALL PASS'}")
    return 1 if failed else 0  # a phase that crashed (not one above the memory target)


if __name__ == "__main__":
    sys.exit(main())
