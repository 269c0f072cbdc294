"""``python -m curation.train.open_clip_entry ARGS``: open_clip_train's ``main`` with the platform's
model configs registered first (so ``--model tiny-rn-32`` resolves), nothing else changed.

webdataset 1.0 (pinned by the platform) ends every shard with an empty ``{}`` marker that
open_clip_train 3.3.0's ``group_by_keys_nothrow`` does not expect (``KeyError: 'fname'``); the
entry asks webdataset's ``tar_file_expander`` for no end marker (``eof_value=None``), the
pre-1.0 behaviour open_clip_train was written for (samples are still split at key changes).

Images: open_clip_train decodes with webdataset's ``"pilrgb"`` (``convert("RGB")``), which
drops transparency and exposes whatever colour transparent pixels hold (black for most
emoji). The entry decodes with the platform's :func:`curation.embed.encoders.to_rgb` instead
(alpha composited on white), so both backends and the evaluation see the same pixels.

Run under ``torchrun --nproc_per_node N -m curation.train.open_clip_entry ...`` for N GPUs;
plain ``python -m`` runs one process (open_clip_train sees no distributed environment).
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


class _WebdatasetOnWhite:
    """The ``webdataset`` module as open_clip_train sees it, with ``"pilrgb"`` decoding on white."""

    def __init__(self, wds):
        self._wds = wds

    def __getattr__(self, name):
        return getattr(self._wds, name)

    def decode(self, *handlers, **kw):
        return self._wds.decode(*(decode_on_white if h == "pilrgb" else h for h in handlers), **kw)


def main(argv: list[str] | None = None) -> None:
    from curation.embed.model_registry import register_model_configs

    register_model_configs()
    import functools

    import open_clip_train.data as oct_data
    from open_clip_train.main import main as open_clip_train_main

    if "eof_value" in oct_data.tar_file_expander.__code__.co_varnames:
        oct_data.tar_file_expander = functools.partial(oct_data.tar_file_expander, eof_value=None)
    oct_data.wds = _WebdatasetOnWhite(oct_data.wds)

    open_clip_train_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
