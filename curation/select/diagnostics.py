"""DBP diagnostics: how far are DBP's budgets from SSP's on this pool? Is DBP SSP in disguise?

DBP (density-based pruning) spreads ``N_keep`` over clusters by ``softmax(complexity / tau)``
with a lower bound ``floor(balance * N_keep / k)``; SSP keeps the same fraction of every
cluster. When the complexity softmax is nearly flat (weights close to ``1 / k``), or the lower
bound decides most budgets, DBP's budgets are SSP's in disguise. This module measures it on a
real pool (:func:`dbp_vs_ssp`), sweeps ``tau`` (:func:`tau_sweep`) and plots each cluster's
keep fraction against its complexity for both (:func:`plot_keep_vs_complexity`).

Scalars (all computed over clusters with at least one candidate):

* ``tv``: total variation distance between the two budget shares ``x / N_keep``:
  ``0.5 * sum |dbp_j - ssp_j| / N_keep``, the fraction of the kept samples DBP places in other
  clusters than SSP would (0: identical budgets, 1: disjoint).
* ``kl``: ``KL(dbp || ssp)`` of the budget shares in nats (clusters where SSP gives 0 and DBP
  gives > 0 are smoothed with 0.5 sample).
* ``weight_min`` / ``weight_max`` / ``weight_uniform`` (``1 / k``) and ``weight_cv``
  (std / mean of the weights: 0 = flat softmax).
* ``at_lower_bound``: fraction of clusters whose DBP budget equals the lower bound;
  ``at_capacity``: fraction kept whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from curation.select.budgets import dbp_budgets, ssp_budgets
from curation.select.clustering import DEFAULT_NEIGHBORS, cluster_complexity

log = logging.getLogger(__name__)

DEFAULT_TAUS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def dbp_vs_ssp(sizes: np.ndarray, weights: np.ndarray, n_keep: int, balance: float = 0.5) -> dict[str, float]:
    """Budget divergence of DBP from SSP for one pool.

    Args:
        sizes: (k,) int candidates per cluster.
        weights: (k,) float DBP cluster weights (softmax of complexity / tau).
        n_keep: samples to keep in total.
        balance: DBP's lower-bound factor.

    Returns:
        ``{"tv", "kl", "weight_min", "weight_max", "weight_uniform", "weight_cv",
        "at_lower_bound", "at_capacity", "k", "n_keep"}`` (floats).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    d = dbp_budgets(sizes, w, n_keep, balance=balance)
    s = ssp_budgets(sizes, n_keep)
    nz = sizes > 0
    k = int(nz.sum())
    out = {"k": float(k), "n_keep": float(n_keep)}
    if n_keep == 0 or k == 0:
        return {**out, "tv": 0.0, "kl": 0.0, "weight_min": 0.0, "weight_max": 0.0, "weight_uniform": 0.0,
                "weight_cv": 0.0, "at_lower_bound": 0.0, "at_capacity": 0.0}  # fmt: skip
    p = d[nz] / n_keep
    q = np.maximum(s[nz], 0.5) / max(float(np.maximum(s[nz], 0.5).sum()), 1e-12)
    pos = p > 0
    wn = w[nz] / w[nz].sum() if w[nz].sum() > 0 else np.full(k, 1.0 / k)
    lb = min(int(np.floor(balance * n_keep / sizes.size)), 10**18)
    lbj = np.minimum(lb, sizes[nz])
    return {
        **out,
        "tv": float(0.5 * np.abs(d[nz] - s[nz]).sum() / n_keep),
        "kl": float(np.sum(p[pos] * np.log(p[pos] / q[pos]))),
        "weight_min": float(wn.min()),
        "weight_max": float(wn.max()),
        "weight_uniform": 1.0 / k,
        "weight_cv": float(wn.std() / wn.mean()),
        "at_lower_bound": float(np.mean((d[nz] == lbj) & (lbj < sizes[nz]))),
        "at_capacity": float(np.mean(d[nz] == sizes[nz])),
    }


def tau_sweep(
    cluster_ids: np.ndarray,
    cos_to_centroid: np.ndarray,
    centroids: np.ndarray,
    n_keep: int,
    taus: Sequence[float] = DEFAULT_TAUS,
    balance: float = 0.5,
    n_neighbors: int = DEFAULT_NEIGHBORS,
) -> pl.DataFrame:
    """DBP-vs-SSP divergence for every ``tau``.

    Args:
        cluster_ids: (n,) int cluster of each candidate.
        cos_to_centroid: (n,) float cosine of each candidate to its centroid.
        centroids: (k, d) float32 unit-norm centroids.
        n_keep: samples to keep.
        taus: temperatures to try (each > 0).

    Returns:
        One row per tau: ``tau`` then the keys of :func:`dbp_vs_ssp`.
    """
    bad = [t for t in taus if not t > 0]
    if bad:
        raise ValueError(f"taus: got {bad}; expected temperatures > 0")
    k = centroids.shape[0]
    sizes = np.bincount(np.asarray(cluster_ids, dtype=np.int64), minlength=k)
    rows = []
    for tau in taus:
        comp = cluster_complexity(cluster_ids, cos_to_centroid, centroids, n_neighbors=n_neighbors, tau=float(tau))
        rows.append({"tau": float(tau), **dbp_vs_ssp(sizes, comp.weight, n_keep, balance)})
    return pl.DataFrame(rows)


def plot_keep_vs_complexity(
    complexity: np.ndarray, sizes: np.ndarray, dbp: np.ndarray, ssp: np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """PNG: each cluster's keep fraction (budget / size) against its complexity, DBP and SSP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.asarray(sizes)
    nz = sizes > 0
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.scatter(np.asarray(complexity)[nz], np.asarray(ssp)[nz] / sizes[nz], s=10, color="#ff7f0e", alpha=0.6, label="ssp")
    ax.scatter(np.asarray(complexity)[nz], np.asarray(dbp)[nz] / sizes[nz], s=10, color="#2ca02c", alpha=0.6, label="dbp")
    ax.set_xlabel("cluster complexity (d_intra * d_inter)")
    ax.set_ylabel("kept fraction of the cluster")
    ax.set_title(title or "DBP vs SSP: kept fraction of each cluster against its complexity", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def diagnostics_markdown(current: dict[str, float], sweep: pl.DataFrame, tau: float) -> str:
    """A short paragraph and the tau-sweep table."""
    head = (
        f"At tau={tau:g}: DBP places {current['tv']:.1%} of the kept samples in other clusters than SSP "
        f"(total variation; KL {current['kl']:.4f} nats); weights span {current['weight_min']:.4f}-"
        f"{current['weight_max']:.4f} (uniform {current['weight_uniform']:.4f}, cv {current['weight_cv']:.2f}); "
        f"{current['at_lower_bound']:.0%} of clusters sit at the lower bound, {current['at_capacity']:.0%} are kept whole."
    )
    if current["tv"] < 0.05:
        head += " DBP is close to SSP in disguise on this pool; a lower tau spreads the budgets more."
    cols = ["tau", "tv", "kl", "weight_min", "weight_max", "weight_cv", "at_lower_bound", "at_capacity"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in sweep.iter_rows(named=True):
        lines.append("| " + " | ".join(f"{r[c]:g}" if c == "tau" else f"{r[c]:.4f}" for c in cols) + " |")
    return head + "\n\n" + "\n".join(lines)


__all__ = ["DEFAULT_TAUS", "dbp_vs_ssp", "diagnose_dbp", "diagnostics_markdown", "plot_keep_vs_complexity", "tau_sweep"]


def diagnose_dbp(recipe, pool, taus: Sequence[float] = DEFAULT_TAUS) -> dict:
    """Diagnostics of one ``dbp`` recipe on a pool (its SemDeDup chain applied first).

    Args:
        recipe: a :class:`curation.select.recipes.Recipe` with ``method == "dbp"``.
        pool: a :class:`curation.select.recipes.Pool` (``max_sim`` when the recipe is chained).

    Returns:
        ``{"current": dbp_vs_ssp at the recipe's tau, "sweep": tau_sweep frame,
        "complexity": (k,), "sizes": (k,), "dbp": (k,), "ssp": (k,) budgets}``.
    """
    from curation.select.budgets import n_keep_for
    from curation.select.recipes import candidates

    if recipe.method != "dbp":
        raise ValueError(f"recipe {recipe.name!r}: got method {recipe.method!r}; expected 'dbp'")
    cand = candidates(recipe, pool)
    cid = np.asarray(pool.cluster_ids, dtype=np.int64)[cand]
    cos = np.asarray(pool.cos_to_centroid)[cand]
    sizes = np.bincount(cid, minlength=pool.k).astype(np.int64)
    n_keep = n_keep_for(recipe.keep_fraction, cand.size)
    comp = cluster_complexity(cid, cos, pool.centroids, n_neighbors=recipe.n_neighbors, tau=recipe.tau)
    taus = sorted(set(taus) | {recipe.tau})
    return {
        "current": dbp_vs_ssp(sizes, comp.weight, n_keep, recipe.balance),
        "sweep": tau_sweep(cid, cos, pool.centroids, n_keep, taus, recipe.balance, recipe.n_neighbors),
        "complexity": np.asarray(comp.complexity),
        "sizes": sizes,
        "dbp": dbp_budgets(sizes, comp.weight, n_keep, balance=recipe.balance),
        "ssp": ssp_budgets(sizes, n_keep),
    }
