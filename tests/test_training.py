"""Training: config validation, schedule, data order, augmentations, losses, strategies, checkpoints."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from curation.engine.compute import ComputeSpec
from curation.train.trainer import (
    STRATEGIES,
    TrainConfig,
    batch_index_stream,
    color_jitter_grayscale,
    cosine_lr,
    load_checkpoint,
    mentions_left_right,
    nt_xent_loss,
    batch_sizes,
    plan_steps,
    random_resized_crop,
    read_sidecar,
    read_webdataset_pairs,
    save_checkpoint,
    train_clip,
    train_from_shards,
)

CPU = ComputeSpec(device="cpu", precision="fp32")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square", "triangle")


def toy_pairs(n: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Colored shapes on transparent 40x40 canvases with captions naming color and shape."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        x0, y0 = (int(v) for v in rng.integers(0, 10, 2))
        box = [x0, y0, x0 + 28, y0 + 28]
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
        images.append(im)
        captions.append(f"a {color} {shape} pointing left" if i % 5 == 0 else f"a {color} {shape}")
    return images, captions


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**kw) -> TrainConfig:
    base = dict(model="tiny-vit-p8-32", samples_seen=64, batch_size=16, lr=2e-3, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ config / schedule / data order


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"strategy": "moco"}, "strategy: got 'moco'; expected one of"),
        ({"samples_seen": 0}, "samples_seen: got 0; expected an int >= 1"),
        ({"batch_size": 2.5}, "batch_size: got 2.5"),
        ({"lr": -1.0}, "lr: got -1.0; expected a finite float > 0"),
        ({"patch_dropout": 1.0}, "patch_dropout: got 1.0"),
        ({"warmup_fraction": 1.5}, "warmup_fraction: got 1.5"),
        ({"crop_scale_min": 0.0}, "crop_scale_min: got 0.0"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm: got 0.0"),
    ],
)
def test_config_rejects_bad_values_with_got_expected(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kw)


def test_config_from_dict_rejects_unknown_keys_and_round_trips():
    cfg = TrainConfig(strategy="slip", samples_seen=1000)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown \\['sample_seen'\\]"):
        TrainConfig.from_dict({"sample_seen": 3})


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="model: got 'no-such-net'; expected one of .*tiny-vit-p8-32"):
        train_clip(*toy_pairs(2), small_cfg(model="no-such-net"), CPU)


def test_flip_needs_a_vit():
    with pytest.raises(ValueError, match="not a ViT"):
        train_clip(*toy_pairs(2), small_cfg(model="tiny-rn-32", strategy="flip"), CPU)


def test_cosine_lr_warmup_peak_and_decay():
    lrs = [cosine_lr(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # start of the cosine
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_batch_stream_epochs_are_permutations_without_repeats_in_a_batch():
    g = torch.Generator().manual_seed(0)
    batches = list(batch_index_stream(10, 3, 7, g))
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    for b in batches:
        assert len(set(b.tolist())) == 3
    # 3 batches per epoch (the tail of 1 is dropped): each epoch's 9 indices are distinct
    for e in range(2):
        idx = torch.cat(batches[3 * e : 3 * e + 3]).tolist()
        assert len(set(idx)) == 9
    again = list(batch_index_stream(10, 3, 7, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_batch_sizes_sum_exactly_to_samples_seen():
    assert batch_sizes(1024, 128, 8) == [128] * 8
    assert batch_sizes(1000, 128, 8) == [128] * 7 + [104]
    assert batch_sizes(100, 40, 3) == [40, 40, 20]
    assert batch_sizes(81, 40, 3) == [40, 39, 2]  # never a batch of one
    with pytest.raises(ValueError, match="samples_seen: got 1"):
        batch_sizes(1, 40, 1)
    with pytest.raises(ValueError, match="samples_seen: got 1; expected >= 2"):
        TrainConfig(samples_seen=1)


def test_compute_is_matched_whatever_the_subset_size():
    """Recipes with subsets smaller than the batch, or a budget that is no multiple of it,
    still see exactly samples_seen pairs."""
    images, captions = toy_pairs(24)
    for n in (5, 24):
        res = train_clip(images[:n], captions[:n], small_cfg(samples_seen=37, batch_size=16), CPU)
        assert res.samples_seen == 37 and res.history[-1]["samples_seen"] == 37


def test_plan_steps_matches_samples_seen():
    assert plan_steps(1000, 128, 5000) == (128, 8)
    assert plan_steps(1024, 128, 5000) == (128, 8)
    assert plan_steps(100, 128, 40) == (40, 3)  # a tiny subset lowers the batch
    with pytest.raises(ValueError, match="got 1 samples"):
        plan_steps(100, 128, 1)


def test_left_right_detection():
    assert mentions_left_right("arrow pointing Left") and mentions_left_right("right-facing fist")
    assert mentions_left_right("drifting leftwards")
    assert not mentions_left_right("a bright red apple") and not mentions_left_right("leftover pizza")


# ------------------------------------------------------------------ augmentations and losses


def test_random_resized_crop_full_scale_is_identity_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_resized_crop(x, (1.0, 1.0), g, ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-4)
    flips = torch.ones(2, dtype=torch.bool)
    seen_flip = False
    for _ in range(8):
        out = random_resized_crop(x, (1.0, 1.0), g, flip_ok=flips, ratio=(1.0, 1.0))
        for i in range(2):
            assert torch.allclose(out[i], x[i], atol=1e-4) or torch.allclose(out[i], x[i].flip(-1), atol=1e-4)
            seen_flip |= torch.allclose(out[i], x[i].flip(-1), atol=1e-4)
    assert seen_flip
    never = torch.zeros(2, dtype=torch.bool)
    for _ in range(8):
        assert torch.allclose(random_resized_crop(x, (1.0, 1.0), g, flip_ok=never, ratio=(1.0, 1.0)), x, atol=1e-4)


def test_color_jitter_range_and_grayscale():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = color_jitter_grayscale(x, 0.4, 1.0, g)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert torch.allclose(color_jitter_grayscale(x, 0.0, 0.0, g), x, atol=1e-6)


def test_nt_xent_matches_hand_computed_value():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # anchor 0 (z1[0]): others = z1[1] (cos 0), z2[0] (cos 1, positive), z2[1] (cos 0)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0.0)))
    assert float(nt_xent_loss(z1, z2, t)) == pytest.approx(expected, rel=1e-5)
    # swapping the positives makes every anchor's positive orthogonal: a larger loss
    assert float(nt_xent_loss(z1, z2.flip(0), t)) > expected


# ------------------------------------------------------------------ training runs


def test_a_few_steps_lower_the_loss_on_a_tiny_batch():
    images, captions = toy_pairs(8)
    cfg = small_cfg(samples_seen=8 * 12, batch_size=8, lr=5e-3, warmup_fraction=0.0, log_every=3)
    res = train_clip(images, captions, cfg, CPU)
    assert res.steps == 12 and res.samples_seen == 96
    assert res.history[-1]["loss"] < 0.6 * res.history[0]["loss"]
    for rec in res.history:
        assert {"step", "samples_seen", "loss", "lr", "samples_per_s", "elapsed_s"} <= set(rec)
        assert rec["samples_per_s"] > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_runs_two_steps(strategy):
    images, captions = toy_pairs(6)
    res = train_clip(images, captions, small_cfg(strategy=strategy, samples_seen=8, batch_size=4), CPU)
    assert res.steps == 2 and len(res.history) == 2 and all(math.isfinite(r["loss"]) for r in res.history)
    if strategy == "slip":
        assert res.history[0]["ssl_loss"] > 0 and res.history[0]["loss"] > res.history[0]["clip_loss"]
    else:
        assert res.history[0]["ssl_loss"] == 0
    assert not res.model.training


def test_training_is_deterministic_given_the_seed():
    images, captions = toy_pairs(6)
    cfg = small_cfg(strategy="clip_da", samples_seen=8, batch_size=4)
    a = train_clip(images, captions, cfg, CPU).model.state_dict()
    b = train_clip(images, captions, cfg, CPU).model.state_dict()
    c = train_clip(images, captions, small_cfg(strategy="clip_da", samples_seen=8, batch_size=4, seed=1), CPU)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["text_projection"], c.model.state_dict()["text_projection"])


def test_resnet_config_trains():
    images, captions = toy_pairs(4)
    res = train_clip(images, captions, small_cfg(model="tiny-rn-32", samples_seen=8, batch_size=4), CPU)
    assert res.steps == 2 and math.isfinite(res.final_loss)


# ------------------------------------------------------------------ checkpoints and shards


def test_checkpoint_round_trip_and_open_clip_loads_it(tmp_path):
    import open_clip

    images, captions = toy_pairs(8)
    res = train_clip(images, captions, small_cfg(samples_seen=4, batch_size=4), CPU)
    path = save_checkpoint(res, tmp_path / "ck" / "seed0.pt", extra={"recipe": "full"})
    meta = read_sidecar(path)
    assert meta["model_name"] == "tiny-vit-p8-32" and meta["train_config"]["samples_seen"] == 4
    assert meta["model_config"]["vision_cfg"]["patch_size"] == 8 and meta["extra"] == {"recipe": "full"}
    json.dumps(meta)  # plain JSON
    model, meta2 = load_checkpoint(path)
    model2, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-p8-32", pretrained=str(path))
    ref = res.model.state_dict()
    for m in (model, model2):
        sd = m.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    x = preprocess(images[0].convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), res.model.encode_image(x), atol=1e-6)
    # the weights file is a plain tensor dict: loadable with weights_only=True
    sd = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def _write_wds(path, images, captions, keys):
    with tarfile.open(path, "w") as tf:
        for k, im, cap in zip(keys, images, captions):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            for name, data in ((f"{k}.png", buf.getvalue()), (f"{k}.txt", cap.encode()), (f"{k}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_train_from_webdataset_shards(tmp_path):
    images, captions = toy_pairs(6)
    keys = [f"{i:032x}" for i in range(6)]
    _write_wds(tmp_path / "00000.tar", images[:4], captions[:4], keys[:4])
    _write_wds(tmp_path / "00001.tar", images[4:], captions[4:], keys[4:])
    k2, im2, cap2 = read_webdataset_pairs(sorted(tmp_path.glob("*.tar")))
    assert k2 == keys and cap2 == captions and im2[3].size == (40, 40)
    res, path = train_from_shards(
        sorted(tmp_path.glob("*.tar")), small_cfg(samples_seen=4, batch_size=4), tmp_path / "out.pt", CPU
    )
    assert path.exists() and res.n_train == 6 and res.samples_seen == 4
    with pytest.raises(FileNotFoundError):
        train_from_shards([], small_cfg(), tmp_path / "x.pt", CPU)


# ------------------------------------------------------------------ streaming, strategies, backends


def _write_toy_shards(d, n, per_shard=25, seed=0):
    """Webdataset shards of toy pairs with unique captions ``... #<i>``."""
    images, captions = toy_pairs(n, seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        p = d / f"{s // per_shard:05d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                images[i].save(buf, format="PNG")
                for name, data in ((f"k{i:05d}.png", buf.getvalue()), (f"k{i:05d}.txt", f"{captions[i]} #{i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(p)
    return paths


def test_shard_stream_gives_exact_samples_seen_epochs_and_no_repeat_in_a_batch(tmp_path):
    from curation.train.data import ShardPairs, batch_stream

    src = ShardPairs(_write_toy_shards(tmp_path, 70), shuffle_buffer=16)
    assert src.n == 70
    batch, steps = plan_steps(200, 16, src.n)
    sizes = batch_sizes(200, batch, steps)
    batches = list(batch_stream(src, sizes, batch, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == sizes and sum(sizes) == 200
    for b in batches:
        caps = [c for _, c in b]
        assert len(set(caps)) == len(caps)
    # one epoch = 70 // 16 = 4 batches of distinct samples (the ragged tail of 6 dropped)
    first_epoch = [c for b in batches[:4] for _, c in b]
    assert len(set(first_epoch)) == 64
    # seeded: the same order again, a different one for another seed
    again = list(batch_stream(src, sizes, batch, torch.Generator().manual_seed(0)))
    other = list(batch_stream(src, sizes, batch, torch.Generator().manual_seed(1)))
    assert [c for b in again for _, c in b] == [c for b in batches for _, c in b]
    assert [c for b in other for _, c in b] != [c for b in batches for _, c in b]


def test_one_strategy_object_per_objective():
    from curation.train.strategies import Batch, ClipDAStrategy, FlipStrategy, SlipStrategy, Strategy, make_strategy

    kinds = {s: type(make_strategy(small_cfg(strategy=s))) for s in STRATEGIES}
    assert kinds == {"clip": Strategy, "clip_da": ClipDAStrategy, "flip": FlipStrategy, "slip": SlipStrategy}
    torch.manual_seed(0)
    cfg = small_cfg(strategy="slip")
    from curation.train.strategies import build_model

    model, preprocess, tok = build_model(cfg)
    slip = make_strategy(cfg)
    extra = slip.setup(model, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    images, caps = toy_pairs(8)
    from curation.embed.encoders import to_rgb

    b = Batch(torch.stack([preprocess(to_rgb(im)) for im in images]), tok(caps), torch.ones(8, dtype=torch.bool))
    out = slip.loss(model, b, torch.Generator().manual_seed(0))
    assert len(extra) == 1 and float(out["ssl_loss"]) > 0
    assert float(out["loss"]) == pytest.approx(float(out["clip_loss"]) + float(out["ssl_loss"]), rel=1e-5)
    clip = make_strategy(small_cfg())
    assert clip.setup(model, (0.5,) * 3, (0.5,) * 3, torch.device("cpu")) == []
    assert float(clip.loss(model, b, torch.Generator())["ssl_loss"]) == 0.0
    with pytest.raises(ValueError, match="not a ViT"):
        make_strategy(small_cfg(model="tiny-rn-32", strategy="flip")).model_kwargs()


def test_backends_named_configs_and_their_validation():
    from curation.train.config import NAMED_CONFIGS, named_config

    assert TrainConfig(strategy="clip").resolved_backend() == "open_clip_train"
    assert TrainConfig(strategy="slip").resolved_backend() == "platform"
    assert TrainConfig(strategy="clip", backend="platform").resolved_backend() == "platform"
    with pytest.raises(ValueError, match=r"backend 'open_clip_train': got strategy 'slip'; expected one of \['clip', 'clip_da', 'flip'\]"):
        TrainConfig(strategy="slip", backend="open_clip_train")
    with pytest.raises(ValueError, match="backend: got 'deepspeed'; expected one of"):
        TrainConfig(backend="deepspeed")
    small = named_config("datacomp-small", strategy="clip_da", seed=2)
    assert (small.model, small.batch_size, small.samples_seen, small.lr, small.weight_decay) == ("ViT-B-32", 4096, 12_800_000, 5e-4, 0.2)
    assert round(small.warmup_fraction * (small.samples_seen // small.batch_size)) == 500 and small.seed == 2
    assert named_config("datacomp-medium").samples_seen == 128_000_000 and set(NAMED_CONFIGS) >= {"tiny-cpu"}
    with pytest.raises(ValueError, match="named config: got 'large'; expected one of"):
        named_config("large")


def test_open_clip_train_command_one_process_on_cpu_torchrun_per_gpu(tmp_path):
    from curation.train.open_clip_backend import build_command, check_samples_seen

    cfg = small_cfg(model="tiny-rn-32", strategy="clip_da", samples_seen=64, batch_size=16)
    argv, env = build_command(cfg, ["b.tar", "a.tar"], tmp_path, "run", CPU, gpus=0)
    assert argv[1:3] == ["-m", "curation.train.open_clip_entry"] and "LOCAL_RANK" not in env
    a = dict(zip(argv, argv[1:]))
    assert a["--train-data"] == "a.tar::b.tar" and a["--train-num-samples"] == "64" and "--dataset-resampled" in argv
    assert a["--device"] == "cpu" and a["--precision"] == "fp32" and a["--batch-size"] == "16"
    assert "scale=(0.4, 1.0)" in argv and "gray_scale_prob=0.2" in argv
    # 4 GPUs: torchrun with one process each, the global batch split, bf16 autocast
    gpu = ComputeSpec(device="cpu", precision="bf16", num_workers=2)
    argv, _ = build_command(small_cfg(model="tiny-vit-p8-32", strategy="flip", samples_seen=512, batch_size=64),
                            ["a.tar"], tmp_path, "run", gpu, gpus=4)  # fmt: skip
    a = dict(zip(argv, argv[1:]))
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert a["--batch-size"] == "16" and a["--device"] == "cuda" and a["--precision"] == "amp_bf16"
    assert a["--force-patch-dropout"] == "0.5"
    with pytest.raises(ValueError, match=r"samples_seen: got 100; expected a multiple of batch_size x workers x processes = 16 x 2 x 4 = 128"):
        check_samples_seen(100, 16, 2, 4)


@pytest.mark.parametrize("n", [40, 100])
def test_matched_samples_seen_across_subset_sizes_for_both_backends(tmp_path, n):
    """Both backends train exactly 64 samples on a 40- and a 100-sample subset, checked from
    open_clip_train's own log; both checkpoints load in open_clip."""
    import open_clip

    from curation.train.trainer import train_subset

    tars = _write_toy_shards(tmp_path / "shards", n)
    cpu0 = ComputeSpec(device="cpu", num_workers=0)
    seen = {}
    for backend in ("open_clip_train", "platform"):
        cfg = small_cfg(model="tiny-rn-32", samples_seen=64, batch_size=16, backend=backend)
        summary, path = train_subset(tars, cfg, tmp_path / f"{backend}.pt", cpu0)
        seen[backend] = (summary.samples_seen, summary.steps, summary.n_train)
        open_clip.create_model_and_transforms("tiny-rn-32", pretrained=str(path), weights_only=True)
        assert read_sidecar(path)["samples_seen"] == 64
    assert seen == {"open_clip_train": (64, 4, n), "platform": (64, 4, n)}
    log_text = (tmp_path / "open_clip_train.open_clip_train" / "run" / "out.log").read_text()
    assert "[64/64 (100%)]" in log_text


def test_open_clip_train_runs_in_one_process_equal_each_run_alone(tmp_path):
    """Two seeds and a second budget in ONE open_clip_train process (train_runs) give bitwise the
    weights, samples seen and logs each gives in its own process; a platform run in the same batch
    goes through the platform loop."""
    import torch

    from curation.train.trainer import TrainRun, train_runs, train_subset

    tars = _write_toy_shards(tmp_path / "shards", 40)
    cpu0 = ComputeSpec(device="cpu", num_workers=0)
    cfgs = [small_cfg(model="tiny-rn-32", samples_seen=s, batch_size=16, seed=seed, backend="open_clip_train")
            for seed, s in ((0, 64), (1, 64), (0, 32))]  # fmt: skip
    runs = [TrainRun(c, tmp_path / "batch" / f"r{i}.pt", {"i": i}) for i, c in enumerate(cfgs)]
    runs.append(TrainRun(small_cfg(model="tiny-rn-32", samples_seen=32, batch_size=16, backend="platform"), tmp_path / "batch" / "p.pt"))
    batch = train_runs(tars, runs, cpu0)
    assert [s.backend for s, _ in batch] == ["open_clip_train"] * 3 + ["platform"]
    assert [s.samples_seen for s, _ in batch] == [64, 64, 32, 32]
    assert len(list((tmp_path / "batch").glob("*.open_clip_train/runs.json"))) == 1  # one process for the three
    for i, c in enumerate(cfgs):
        alone, path = train_subset(tars, c, tmp_path / "alone" / f"r{i}.pt", cpu0)
        a, b = torch.load(path, weights_only=True), torch.load(batch[i][1], weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"run {i} differs when batched"
        assert alone.final_loss == batch[i][0].final_loss and read_sidecar(batch[i][1])["extra"] == {"i": i}
    w0, w1 = (torch.load(batch[i][1], weights_only=True) for i in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # the seed reached the second run


def test_open_clip_train_refuses_a_subset_smaller_than_one_batch(tmp_path):
    from curation.train.trainer import train_subset

    tars = _write_toy_shards(tmp_path / "shards", 10)
    with pytest.raises(ValueError, match="got a subset of 10 pairs for batch_size 16; expected at least one batch"):
        train_subset(tars, small_cfg(model="tiny-rn-32", samples_seen=64, batch_size=16, backend="open_clip_train"),
                     tmp_path / "x.pt", ComputeSpec(device="cpu", num_workers=0))  # fmt: skip


def test_auto_backend_trains_a_subset_smaller_than_one_batch_on_the_platform_loop(tmp_path):
    from curation.train.trainer import train_subset

    tars = _write_toy_shards(tmp_path / "shards", 10)
    summary, path = train_subset(tars, small_cfg(model="tiny-rn-32", samples_seen=32, batch_size=16, backend="auto"),
                                 tmp_path / "x.pt", ComputeSpec(device="cpu", num_workers=0))  # fmt: skip
    assert summary.backend == "platform" and summary.samples_seen == 32 and summary.batch_size == 10 and path.exists()
