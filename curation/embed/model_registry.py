"""Model-config registry: the platform's small open_clip architectures.

Configs are data: one JSON per architecture in ``curation/embed/model_configs/``, registered with
open_clip (``open_clip.add_model_config``) so ``open_clip.create_model(name)`` and
``open_clip.list_models()`` see them beside open_clip's own configs.
"""

from __future__ import annotations

import functools
from pathlib import Path


def model_config_dir() -> str:
    """The directory of the shipped JSON configs (``curation/embed/model_configs``)."""
    return str(Path(__file__).resolve().parent / "model_configs")


@functools.cache
def register_model_configs() -> list[str]:
    """Register the shipped configs with open_clip (idempotent). Returns their names."""
    import open_clip

    names = sorted(p.stem for p in Path(model_config_dir()).glob("*.json"))
    if names:
        open_clip.add_model_config(model_config_dir())
    return names


# --------------------------------------------------------------------------------------------
# the ONE checkpoint loader (checks, evaluation, encoders and the trainer all call this)
# --------------------------------------------------------------------------------------------


def sidecar_path(checkpoint_path: str | Path) -> Path:
    """The JSON sidecar beside a checkpoint: ``<dir>/<stem>.json`` for ``<dir>/<stem>.pt``."""
    return Path(checkpoint_path).with_suffix(".json")


def read_state_dict(path: str | Path) -> dict:
    """Weights of a checkpoint file as a plain open_clip state dict (CPU tensors).

    Accepts the platform's format (the state dict saved with ``torch.save``), a
    ``.safetensors`` file, and ``open_clip_train``'s checkpoint dict (``{"epoch", "name",
    "state_dict", "optimizer", ...}``, keys possibly prefixed ``module.`` by DDP). Loads with
    ``weights_only=True`` (no pickled code runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tensor state dict (names what was found).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {p}: got {type(state).__name__} with keys {list(state)[:5] if isinstance(state, dict) else []}; "
            "expected an open_clip state dict or an open_clip_train checkpoint {'state_dict': ...}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(
    pretrained: str | Path | None,
    model_name: str | None = None,
    device: str | object = "cpu",
    precision: str = "fp32",
):
    """Load an open_clip model and its eval transform and tokenizer: the one loader of the platform.

    Args:
        pretrained: a checkpoint file (:func:`read_state_dict` formats), an open_clip
            pretrained tag (needs a network or a populated cache), or ``None`` for random
            init (logged).
        model_name: the open_clip config name; ``None`` reads it from the checkpoint's JSON
            sidecar (:func:`sidecar_path`). A name open_clip does not know is built from the
            sidecar's ``model_config``.
        device: where the model goes (``"cpu"``, ``"cuda"``, a ``torch.device``).
        precision: ``fp32`` keeps float32 weights; ``bf16``/``fp16`` stay float32 too (the
            callers use autocast), the value is validated only.

    Returns:
        ``(model in eval mode, preprocess (PIL -> (3, S, S) float32), tokenizer, meta)`` where
        ``meta`` is the sidecar dict (``{}`` without one).

    Raises:
        ValueError: unknown model name (lists the valid ones) or mismatched keys (strict load).
    """
    import json
    import logging

    import torch

    register_model_configs()
    import open_clip

    log = logging.getLogger(__name__)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision: got {precision!r}; expected one of ['fp32', 'bf16', 'fp16']")
    meta: dict = {}
    is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
    if is_file:
        pretrained = Path(pretrained).expanduser().resolve()
        sc = sidecar_path(pretrained)
        if sc.exists():
            meta = json.loads(sc.read_text())
    name = model_name or meta.get("model_name")
    if not name:
        raise ValueError(f"model_name: got None and no sidecar beside {pretrained}; expected an open_clip config name")
    known = open_clip.list_models()
    if name in known:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu")
    elif meta.get("model_config"):
        from open_clip.model import CLIP

        model = CLIP(**meta["model_config"])
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    else:
        raise ValueError(f"model_name: got {name!r}; expected one of {known}")
    if is_file:
        model.load_state_dict(read_state_dict(pretrained), strict=True)
    elif pretrained is not None:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(pretrained), device="cpu")
    else:
        log.warning("open_clip %s: no pretrained weights given; using random initialization", name)
    tokenizer = open_clip.get_tokenizer(name) if name in known else open_clip.get_tokenizer("ViT-B-32")
    return model.to(torch.device(device) if isinstance(device, str) else device).eval(), preprocess, tokenizer, meta
