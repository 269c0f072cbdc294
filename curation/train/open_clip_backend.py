"""The ``open_clip_train`` backend: open_clip's own trainer over the subset's webdataset shards.

As DataComp does, the trainer runs as a subprocess: ``torchrun --nproc_per_node <GPUs>`` on a
CUDA box (one process per GPU of the compute spec), one plain process on CPU, both through
:mod:`curation.train.open_clip_entry` (``open_clip_train.main`` after registering the
platform's model configs). One "epoch" of ``--train-num-samples`` samples with
``--dataset-resampled`` (shards sampled with replacement, open_clip_train's way to train a
fixed number of samples on any subset size).

Samples seen are matched EXACTLY: open_clip_train rounds up to whole global batches per data
worker, so ``samples_seen`` must be a multiple of ``batch_size x max(1, workers) x processes``
(checked before the run, with the nearest valid values in the message), and the count is read
back from its log (the last ``Train Epoch: 0 [N/N (100%)]`` line) and compared.

Strategies: ``clip``; ``clip_da`` = ``--aug-cfg`` (random resized crop of scale
``[crop_scale_min, 1]``, colour jitter ``jitter`` with probability 0.8, grayscale
``grayscale_p``; open_clip has no caption-aware flip, so none); ``flip`` =
``--force-patch-dropout``. ``slip`` is not available (use the platform backend).

The result is converted to the platform's checkpoint format (plain state dict + JSON sidecar,
:mod:`curation.train.checkpoints`), so both backends' checkpoints load and evaluate alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.engine.compute import ComputeSpec
from curation.train.config import OPEN_CLIP_TRAIN_STRATEGIES, TrainConfig, warmup_steps

log = logging.getLogger(__name__)

_TRAIN_LINE = re.compile(
    r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \((\d+)%\)\].*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s.*?Loss: ([\d.eE+-]+)"
)
PRECISION_FLAGS = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}


def gpu_count(compute: ComputeSpec) -> int:
    """Processes to launch: every visible GPU for ``cuda``/``auto`` on a CUDA box, 1 for ``cuda:N``, 0 on CPU."""
    import torch

    dev = compute.torch_device()
    if dev.type != "cuda":
        return 0
    return 1 if dev.index is not None else torch.cuda.device_count()


@dataclass
class OpenClipTrainRun:
    """What an open_clip_train run produced (parsed from its log).

    Attributes:
        samples_seen: samples of the last ``Train Epoch`` line (checked == config).
        steps: optimizer steps (``samples_seen / global batch``).
        samples_per_s: median of the logged instantaneous samples/s.
        seconds: wall time of the subprocess (model build and data start included).
        final_loss: the last logged contrastive loss.
        history: one dict per logged line: ``samples_seen``, ``samples_per_s``, ``loss``.
        log_path: open_clip_train's ``out.log``.
        command: the command line run.
    """

    samples_seen: int
    steps: int
    batch_size: int
    samples_per_s: float
    seconds: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    log_path: str = ""
    command: list[str] = field(default_factory=list)


def check_samples_seen(samples_seen: int, batch_size: int, workers: int, processes: int) -> None:
    """Raise unless open_clip_train will see exactly ``samples_seen`` samples.

    Raises:
        ValueError: ``samples_seen`` is not a multiple of ``batch_size * max(1, workers) * processes``
            (the message names the two nearest valid values).
    """
    unit = batch_size * max(1, workers) * max(1, processes)
    if samples_seen % unit:
        lo, hi = (samples_seen // unit) * unit, math.ceil(samples_seen / unit) * unit
        raise ValueError(
            f"samples_seen: got {samples_seen}; expected a multiple of batch_size x workers x processes = "
            f"{batch_size} x {max(1, workers)} x {max(1, processes)} = {unit} for backend open_clip_train "
            f"(e.g. {lo or unit} or {hi}) so that samples seen match exactly"
        )


def build_command(
    cfg: TrainConfig, tar_paths: Sequence[str | Path], logs_dir: Path, name: str, compute: ComputeSpec,
    gpus: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one run.

    Args:
        gpus: processes (GPUs) to launch; ``None`` asks :func:`gpu_count` (the compute spec's
            device on this machine). The global batch ``cfg.batch_size`` is split over them.

    Returns:
        ``(argv, env)``: ``torchrun --nproc_per_node N -m curation.train.open_clip_entry ...``
        with N GPUs, else ``python -m curation.train.open_clip_entry ...``.
    """
    if cfg.strategy not in OPEN_CLIP_TRAIN_STRATEGIES:
        raise ValueError(
            f"backend open_clip_train: got strategy {cfg.strategy!r}; expected one of {list(OPEN_CLIP_TRAIN_STRATEGIES)}"
        )
    gpus = gpu_count(compute) if gpus is None else gpus
    procs = max(1, gpus)
    if cfg.batch_size % procs:
        raise ValueError(f"batch_size: got {cfg.batch_size}; expected a multiple of the {procs} GPUs (global batch)")
    per_proc = cfg.batch_size // procs
    workers = compute.num_workers
    check_samples_seen(cfg.samples_seen, per_proc, workers, procs)
    steps = cfg.samples_seen // cfg.batch_size
    args = [
        "--train-data", "::".join(str(p) for p in sorted(map(str, tar_paths))),
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--train-num-samples", str(cfg.samples_seen),
        "--epochs", "1",
        "--batch-size", str(per_proc),
        "--workers", str(workers),
        "--model", cfg.model,
        "--lr", repr(cfg.lr), "--wd", repr(cfg.weight_decay),
        "--beta1", repr(cfg.beta1), "--beta2", repr(cfg.beta2), "--eps", repr(cfg.eps),
        "--warmup", str(warmup_steps(cfg, steps)),
        "--lr-scheduler", "cosine",
        "--precision", PRECISION_FLAGS[compute.precision],
        "--seed", str(cfg.seed),
        "--logs", str(logs_dir), "--name", name,
        "--save-frequency", "1",
        "--log-every-n-steps", str(cfg.log_every),
        "--report-to", "",
        "--device", "cuda" if gpus > 0 else "cpu",
    ]  # fmt: skip
    if cfg.grad_clip_norm is not None:
        args += ["--grad-clip-norm", repr(cfg.grad_clip_norm)]
    if cfg.strategy == "clip_da":
        j = cfg.jitter
        args += [
            "--aug-cfg", f"scale=({cfg.crop_scale_min}, 1.0)", f"color_jitter=({j}, {j}, {j}, 0.0)",
            "color_jitter_prob=0.8", f"gray_scale_prob={cfg.grayscale_p}",
        ]  # fmt: skip
    if cfg.strategy == "flip":
        args += ["--force-patch-dropout", repr(cfg.patch_dropout)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, torch_threads())))
    if compute.device.startswith("cuda:"):  # one chosen GPU: open_clip_train uses cuda:0 of what it sees
        env["CUDA_VISIBLE_DEVICES"] = compute.device.split(":", 1)[1]
    if gpus > 1:
        exe = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        return exe + ["-m", "curation.train.open_clip_entry"] + args, env
    for v in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        env.pop(v, None)  # one process: open_clip_train must not think it is distributed
    return [sys.executable, "-m", "curation.train.open_clip_entry"] + args, env


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_log(text: str) -> list[dict[str, float]]:
    """The ``Train Epoch`` lines of an open_clip_train log -> ``[{samples_seen, of, samples_per_s, loss}]``."""
    out = []
    for m in _TRAIN_LINE.finditer(text):
        out.append({"samples_seen": int(m.group(2)), "of": int(m.group(3)), "samples_per_s": float(m.group(5)),
                    "loss": float(m.group(6))})  # fmt: skip
    return out


class _LogFollower:
    """Reports the new ``Train Epoch`` lines of a running open_clip_train to a progress callback."""

    def __init__(self, out_log: Path, console: Path | None, config: TrainConfig, progress, t0: float):
        self.paths = [p for p in (out_log, console) if p is not None]
        self.config, self.progress, self.t0, self.done = config, progress, t0, 0

    def poll(self) -> None:
        if self.progress is None:
            return
        from curation.engine.progress import report

        text = next((p.read_text(errors="replace") for p in self.paths if p.exists() and p.stat().st_size), "")
        lines = parse_log(text)
        total = max(1, self.config.samples_seen // self.config.batch_size)
        for rec in lines[self.done :]:
            step = max(1, rec["samples_seen"] // self.config.batch_size)
            report(self.progress, "train", step, total, rec["samples_seen"], time.perf_counter() - self.t0,
                   rec["samples_per_s"], loss=rec["loss"])  # fmt: skip
        self.done = max(self.done, len(lines))


@dataclass
class OpenClipTrainJob:
    """One run of a batch: its config, where its platform checkpoint goes, its sidecar extras and
    an optional progress callback (a :class:`curation.engine.progress.ProgressEvent` callable)."""

    config: TrainConfig
    checkpoint_path: Path
    extra: dict[str, Any] | None = None
    progress: Any = None

    @property
    def logs_dir(self) -> Path:
        return self.checkpoint_path.with_name(self.checkpoint_path.stem + ".open_clip_train")


RUN_NAME = "run"


def run_open_clip_train(
    tar_paths: Sequence[str | Path],
    config: TrainConfig,
    checkpoint_path: str | Path,
    compute: ComputeSpec | None = None,
    extra: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    progress=None,
    poll_s: float = 2.0,
) -> tuple[OpenClipTrainRun, Path]:
    """Train with open_clip_train, check samples seen from its log, save a platform checkpoint.

    Args:
        tar_paths: the subset's webdataset shards.
        config: the run (``strategy`` in clip / clip_da / flip).
        checkpoint_path: where the platform checkpoint goes (``.pt`` + ``.json`` sidecar);
            open_clip_train's own logs and checkpoint go to ``<stem>.open_clip_train/``.
        compute: device, precision (``bf16`` -> ``--precision amp_bf16``), workers, GPU count.
        progress: optional callable of a :class:`curation.engine.progress.ProgressEvent`: its
            log is read every ``poll_s`` seconds while it runs and each new ``Train Epoch``
            line is reported (step, samples seen, samples/s, loss).

    Returns:
        ``(run, checkpoint path)``.

    Raises:
        RuntimeError: the subprocess failed (the tail of its log in the message) or its log
            shows a different number of samples seen than configured.
    """
    job = OpenClipTrainJob(config, Path(checkpoint_path), extra, progress)
    return run_open_clip_train_many(tar_paths, [job], compute, timeout_s=timeout_s, poll_s=poll_s)[0]


def run_open_clip_train_many(
    tar_paths: Sequence[str | Path],
    jobs: Sequence[OpenClipTrainJob],
    compute: ComputeSpec | None = None,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> list[tuple[OpenClipTrainRun, Path]]:
    """Several open_clip_train runs on the same shards in ONE subprocess, one after the other.

    The process start (interpreter, torch, open_clip) is paid once instead of once per run
    (``python -m curation.train.open_clip_entry --runs RUNS.json``; under ``torchrun`` on
    several GPUs likewise). Each run keeps its own logs dir, ``out.log``, samples-seen check
    and platform checkpoint, exactly as :func:`run_open_clip_train` alone would write them;
    ``seconds`` of a run is its own span: from the previous run's last ``out.log`` write (the
    process start for the first run, which so carries the start-up) to its own last write.

    Returns:
        ``[(run, checkpoint path)]`` in the order of ``jobs``.

    Raises:
        RuntimeError: the subprocess failed (runs completed before the failure keep their
            open_clip_train logs; no platform checkpoint is written for any run) or a log shows
            a different number of samples seen than configured.
    """
    compute = compute or ComputeSpec()
    tar_paths = sorted(str(p) for p in tar_paths)
    if not tar_paths:
        raise FileNotFoundError("no webdataset shards to train on (got an empty list of tar files)")
    if not jobs:
        return []
    jobs = [OpenClipTrainJob(j.config, Path(j.checkpoint_path), j.extra, j.progress) for j in jobs]
    if len({j.logs_dir for j in jobs}) != len(jobs):
        raise ValueError("open_clip_train: got two runs with the same checkpoint path; expected one path per run")
    argvs, env = [], None
    for j in jobs:  # every command is built (and checked) before anything runs
        if (j.logs_dir / RUN_NAME).exists():
            shutil.rmtree(j.logs_dir / RUN_NAME)  # a re-run replaces the previous one (open_clip_train refuses to overwrite)
        j.logs_dir.mkdir(parents=True, exist_ok=True)
        argv, env = build_command(j.config, tar_paths, j.logs_dir, RUN_NAME, compute)
        argvs.append(argv)
    prefix = argvs[0][: argvs[0].index("curation.train.open_clip_entry") + 1]
    batch_dir = jobs[0].logs_dir
    console = batch_dir / "subprocess.log"  # streamed, so a long run can be followed live
    if len(jobs) == 1:
        command = argvs[0]
    else:
        runs_file = batch_dir / "runs.json"
        runs_file.write_text(json.dumps([a[len(prefix):] for a in argvs], indent=1))
        command = prefix + ["--runs", str(runs_file)]
    log.info("open_clip_train (%d run%s): %s", len(jobs), "s" * (len(jobs) > 1), " ".join(command))
    t0 = time.perf_counter()
    followers = [_LogFollower(j.logs_dir / RUN_NAME / "out.log", console if len(jobs) == 1 else None, j.config,
                              j.progress, t0) for j in jobs]  # fmt: skip
    with open(console, "w") as f:
        proc = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    for fo in followers:
                        fo.poll()
                    if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                        raise subprocess.TimeoutExpired(command, timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fo in followers:
            fo.poll()
    total = time.perf_counter() - t0
    output = console.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train exited with {proc.returncode}; expected 0. Last output ({console}):\n{output[-3000:]}")
    spans = _run_spans([j.logs_dir / RUN_NAME / "out.log" for j in jobs], t0, total)
    return [
        _finish_run(j, argv, spans[i], output if len(jobs) == 1 else "") for i, (j, argv) in enumerate(zip(jobs, argvs))
    ]


def _run_spans(out_logs: Sequence[Path], t0: float, total: float) -> list[float]:
    """Wall seconds per run of a batch: each ``out.log`` from creation to its last write (the
    first run also carries the process start); the whole subprocess time for a single run."""
    if len(out_logs) == 1:
        return [total]
    start_wall = time.time() - (time.perf_counter() - t0)
    ends = [p.stat().st_mtime if p.exists() else start_wall for p in out_logs]
    spans, prev = [], start_wall
    for end in ends:
        spans.append(max(0.0, end - prev))
        prev = end
    return spans


def _finish_run(job: OpenClipTrainJob, argv: list[str], seconds: float, console_text: str) -> tuple[OpenClipTrainRun, Path]:
    """Check one finished run's log and convert its checkpoint to the platform format."""
    from curation.embed.model_registry import read_state_dict, register_model_configs
    from curation.train.checkpoints import CHECKPOINT_FORMAT

    config, checkpoint_path = job.config, job.checkpoint_path
    out_log = job.logs_dir / RUN_NAME / "out.log"
    text = out_log.read_text() if out_log.exists() else ""
    lines = parse_log(text or console_text)
    if not lines:
        raise RuntimeError(f"open_clip_train: got no 'Train Epoch' lines in {out_log}; expected a training log")
    seen = lines[-1]["samples_seen"]
    if seen != config.samples_seen or lines[-1]["of"] != config.samples_seen:
        raise RuntimeError(
            f"open_clip_train: got {seen} samples seen (of {lines[-1]['of']}) in its log; expected exactly "
            f"{config.samples_seen}"
        )
    ck = job.logs_dir / RUN_NAME / "checkpoints" / "epoch_1.pt"
    if not ck.exists():
        raise RuntimeError(f"open_clip_train: got no checkpoint {ck}; expected one after the epoch")
    import torch

    register_model_configs()
    import open_clip

    state = read_state_dict(ck)
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_path.with_name(checkpoint_path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(checkpoint_path)
    ck.unlink()  # the optimizer state is not needed: keep only the platform checkpoint
    rates = sorted(h["samples_per_s"] for h in lines[1:] or lines)  # the first step includes warm-up
    run = OpenClipTrainRun(
        samples_seen=seen, steps=seen // config.batch_size, batch_size=config.batch_size,
        samples_per_s=rates[len(rates) // 2], seconds=seconds, final_loss=lines[-1]["loss"],
        history=[{k: v for k, v in h.items() if k != "of"} for h in lines], log_path=str(out_log), command=argv,
    )  # fmt: skip
    meta = {
        "format": CHECKPOINT_FORMAT,
        "backend": "open_clip_train",
        "model_name": config.model,
        "model_config": open_clip.get_model_config(config.model),
        "train_config": config.to_dict(),
        "steps": run.steps,
        "batch_size": run.batch_size,
        "samples_seen": run.samples_seen,
        "seconds": run.seconds,
        "samples_per_s": run.samples_per_s,
        "final_loss": run.final_loss,
        "history": run.history,
        "command": argv,
        "extra": job.extra or {},
    }
    checkpoint_path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=float))
    log.info("open_clip_train: %d samples seen, %.0f samples/s, saved %s", seen, run.samples_per_s, checkpoint_path)
    return run, checkpoint_path
