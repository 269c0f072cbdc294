"""``python -m curation.train.open_clip_entry ARGS``: open_clip_train's ``main`` with the platform's
model configs registered first (so ``--model tiny-rn-32`` resolves) and four adaptations, each
explained below: no webdataset end marker, decoding on white, a seeded sample shuffle, fused AdamW.

webdataset 1.0 (pinned by the platform) ends every shard with an empty ``{}`` marker that
open_clip_train 3.3.0's ``group_by_keys_nothrow`` does not expect (``KeyError: 'fname'``); the
entry asks webdataset's ``tar_file_expander`` for no end marker (``eof_value=None``), the
pre-1.0 behaviour open_clip_train was written for (samples are still split at key changes).

Images: open_clip_train decodes with webdataset's ``"pilrgb"`` (``convert("RGB")``), which
drops transparency and exposes whatever colour transparent pixels hold (black for most
emoji). The entry decodes with the platform's :func:`curation.embed.encoders.to_rgb` instead
(alpha composited on white), so both backends and the evaluation see the same pixels.

Sample order: see :class:`_WebdatasetOnWhite` (open_clip_train's shuffle buffer was seeded from
``pid + time``). Optimizer: see :class:`_OptimWithFusedAdamW` (the fused AdamW kernel, as the
platform loop uses).

Run under ``torchrun --nproc_per_node N -m curation.train.open_clip_entry ...`` for N GPUs;
plain ``python -m`` runs one process (open_clip_train sees no distributed environment).

``python -m curation.train.open_clip_entry --runs RUNS.json`` runs several trainings in one
process, one after the other (RUNS.json: a list of open_clip_train argument lists), so the
process start (interpreter, torch and open_clip imports) is paid once per recipe instead of once
per seed and budget. open_clip_train re-seeds everything from its own ``--seed`` at the start of
each ``main``; between runs the entry removes the log handlers ``main`` added (each run logs to its
own ``out.log``) and tears down a distributed process group, so run k gives the weights it gives
alone (tests/test_training.py checks bitwise equality).
"""

from __future__ import annotations

import sys

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def decode_on_white(key: str, data: bytes):
    """webdataset decoder: image members -> RGB ``PIL.Image`` with alpha composited on white."""
    import io

    from PIL import Image

    from curation.embed.encoders import to_rgb

    if key.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
        return None
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


# open_clip_train's --seed of the run in progress (set by run_all before each main)
_RUN_SEED = {"seed": 0}


class _WebdatasetOnWhite:
    """The ``webdataset`` module as open_clip_train sees it: ``"pilrgb"`` decodes on white, and
    the sample shuffle buffer is seeded from the run's ``--seed``.

    open_clip_train 3.3.0 calls ``wds.shuffle(bufsize, initial)`` without a seed, and webdataset
    then seeds the buffer from ``pid + time``: two runs of the same config and seed saw the
    samples in different orders and gave different weights. With ``seed`` passed, webdataset
    builds the generator inside each loader worker when iteration starts, so the order is a
    function of the seed (and of the shards each worker draws, which open_clip_train already
    seeds per rank and worker)."""

    def __init__(self, wds):
        self._wds = wds

    def __getattr__(self, name):
        return getattr(self._wds, name)

    def decode(self, *handlers, **kw):
        return self._wds.decode(*(decode_on_white if h == "pilrgb" else h for h in handlers), **kw)

    def shuffle(self, *args, **kw):
        if kw.get("rng") is None and kw.get("seed") is None:
            kw.pop("rng", None)
            kw["seed"] = _RUN_SEED["seed"]
        return self._wds.shuffle(*args, **kw)


def _seed_of(args: list[str]) -> int:
    """open_clip_train's ``--seed`` in an argument list (its default: 0)."""
    for i, a in enumerate(args):
        if a == "--seed" and i + 1 < len(args):
            return int(args[i + 1])
        if a.startswith("--seed="):
            return int(a.split("=", 1)[1])
    return 0


RUNS_FLAG = "--runs"


class _OptimWithFusedAdamW:
    """``torch.optim`` as open_clip_train's ``main`` sees it, with ``AdamW`` built on the fused
    kernel (``fused=True``) where the device supports it, as the platform loop builds it.

    open_clip_train 3.3.0 constructs ``optim.AdamW(param_groups, lr, betas, eps)``: on CPU that is
    the per-parameter for-loop implementation, which spent 0.15 s of a 0.62 s step of tiny-rn-32
    (batch 128, one thread) updating the 49,408-row token embedding; the fused kernel did the same
    update in 0.011 s. Same algorithm, same hyper-parameters; fused and for-loop AdamW agree to
    float rounding, and each is deterministic."""

    def __init__(self, optim):
        self._optim = optim

    def __getattr__(self, name):
        return getattr(self._optim, name)

    def AdamW(self, params, *args, **kw):  # noqa: N802 - the torch.optim name
        from curation.train.loop import adamw

        return adamw(params, *args, optim_module=self._optim, **kw)


def _patch_open_clip_train() -> None:
    from curation.embed.model_registry import register_model_configs

    register_model_configs()
    import functools

    import open_clip_train.data as oct_data

    if isinstance(oct_data.wds, _WebdatasetOnWhite):
        return
    import open_clip_train.main as oct_main

    oct_main.optim = _OptimWithFusedAdamW(oct_main.optim)
    if "eof_value" in oct_data.tar_file_expander.__code__.co_varnames:
        oct_data.tar_file_expander = functools.partial(oct_data.tar_file_expander, eof_value=None)
    oct_data.wds = _WebdatasetOnWhite(oct_data.wds)


def _reset_between_runs(handlers_before: list) -> None:
    """Undo what one open_clip_train ``main`` leaves behind: its log handlers, a process group."""
    import logging

    for h in list(logging.root.handlers):
        if h not in handlers_before:
            logging.root.removeHandler(h)
            h.close()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_all(runs: list[list[str]]) -> None:
    """open_clip_train's ``main`` on each argument list in turn; stops at the first that fails."""
    import logging

    _patch_open_clip_train()
    from open_clip_train.main import main as open_clip_train_main

    for i, args in enumerate(runs):
        before = list(logging.root.handlers)
        _RUN_SEED["seed"] = _seed_of(args)
        print(f"[open_clip_entry] run {i + 1}/{len(runs)}", flush=True)
        try:
            status = open_clip_train_main(list(args))
        finally:
            _reset_between_runs(before)
        if status is not None and status < 0:  # open_clip_train reports refusals by returning -1
            raise SystemExit(f"open_clip_train run {i + 1}/{len(runs)} returned {status}; expected a completed run")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RUNS_FLAG]:
        import json
        from pathlib import Path

        if len(argv) != 2:
            raise SystemExit(f"usage: {RUNS_FLAG} RUNS.json (a JSON list of open_clip_train argument lists); got {argv[1:]}")
        runs = json.loads(Path(argv[1]).read_text())
        if not isinstance(runs, list) or not all(isinstance(r, list) for r in runs):
            raise SystemExit(f"{argv[1]}: expected a JSON list of argument lists")
        run_all(runs)
    else:
        run_all([argv])


if __name__ == "__main__":
    main()
