"""Small PNG figures for the views (matplotlib Agg), returned as bytes or ``data:`` URIs.

Used by the Dagster metadata (``assets/previews.py``: markdown ``![..](data:image/png...)``,
Dagster's documented way to show an image) and the HTML explorer.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence


def _fig(w: float = 5.6, h: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h), dpi=90)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def removed_fraction_png(curve: Sequence[tuple[float, float]], eps: float | None = None) -> bytes:
    """SemDeDup: fraction of the pool removed against eps (log x), the chosen eps marked."""
    plt, fig, ax = _fig()
    xs = [e for e, _ in curve]
    ys = [f for _, f in curve]
    ax.plot(xs, ys, marker="o", ms=3)
    if eps is not None:
        ax.axvline(eps, color="tab:red", ls="--", lw=1, label=f"eps={eps:g}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("eps (duplicate if M > 1 - eps)")
    ax.set_ylabel("fraction removed")
    ax.set_title("SemDeDup: removed fraction vs eps")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def waterfall_png(rows: Sequence[Mapping]) -> bytes:
    """Stacked horizontal bars per recipe: kept, removed by pruning, by dedup, quarantined."""
    plt, fig, ax = _fig(6.4, 1.8 + 0.4 * max(1, len(rows)))
    names = [r["recipe"] for r in rows]
    left = [0] * len(rows)
    for key, color in (("kept", "tab:green"), ("pruning", "tab:orange"), ("dedup", "tab:red"), ("quarantine", "tab:gray")):
        vals = [int(r[key]) for r in rows]
        ax.barh(names, vals, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("samples")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    ax.set_title("where the samples went, per recipe")
    return _png(plt, fig)


def loss_curve_png(histories: Mapping[str, Sequence[Mapping]], x: str = "samples_seen", y: str = "loss") -> bytes:
    """Training loss against samples seen, one line per run (e.g. per seed)."""
    plt, fig, ax = _fig()
    for label, hist in histories.items():
        ax.plot([h[x] for h in hist], [h[y] for h in hist], label=label, lw=1.2)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y)
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if len(histories) > 1:
        ax.legend(fontsize=8)
    return _png(plt, fig)
