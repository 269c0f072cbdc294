"""Curation recipes: a config file of named recipes, and one function that applies any of them.

Recipes live in ``curation/select/recipes.yaml`` (or the file named by the environment
variable ``CURATION_RECIPES``)::

    recipes:
      dbp@0.5: {method: dbp, keep_fraction: 0.5, after_semdedup_eps: 0.05, tau: 0.5}

Each entry becomes a frozen :class:`Recipe`; unknown keys, keys that do not apply to the
method and out-of-range values are rejected with "got X; expected Y" messages.
:func:`get_recipe` raises ``ValueError`` listing the valid names. :func:`recipe_hash` is a
short stable hash of the resolved config (recorded with every subset).

Every recipe has ONE signature, :func:`apply_recipe`: a :class:`Pool` (uids, embeddings,
cluster ids, cos_to_centroid, centroids, SemDeDup ``M`` scores, aligned embeddings when
needed) in, a uid-keyed :class:`Selection` (rank, score) out. Chaining after SemDeDup is
explicit: ``after_semdedup_eps`` first drops the duplicates at that eps and the recipe then
runs on the remaining pool (so ``N_pool`` is the pool after dedup, as in the DBP paper).

Methods and what ``rank``/``score`` mean in the selection (rank 0 = most preferred):

=========  ===============================================  ==============================
method     selection                                        score
=========  ===============================================  ==============================
full       every sample                                     0
random     seeded uniform sample of ``round(f * N)``        the uniform key
semdedup   samples that are not duplicates at ``eps``       ``M`` (max sim to earlier)
ssp        same fraction per cluster, in-cluster ``order``  cos_to_centroid
dbp        water-filling budgets, in-cluster ``order``      cos_to_centroid
clipscore  top fraction / above ``threshold`` by CLIP score CLIP score
clipcov    greedy CLIPCov per proxy class, same fraction    marginal gain when picked
=========  ===============================================  ==============================

For the per-cluster methods the rank interleaves clusters by in-cluster position, so any
prefix of the ranking stays spread over the concepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import os
from dataclasses import dataclass, field
from importlib import resources as ir
from typing import Any, Callable

import numpy as np
import polars as pl
import yaml

from curation.engine.sorting import lex_order
from curation.ingest.ids import uid_arrow, uid_series
from curation.select.budgets import (
    ORDERS,
    dbp_budgets,
    in_cluster_order,
    n_keep_for,
    ssp_budgets,
    take_per_cluster,
)
from curation.select.clipcov import DEFAULT_MAX_DENSE, LARGE_MODES, clip_scores, clipcov_select, top_by_score
from curation.select.clustering import DEFAULT_NEIGHBORS, DEFAULT_TAU, cluster_complexity
from curation.select.semdedup import is_duplicate, semdedup_scores

log = logging.getLogger(__name__)

#: a recipe name is a partition key and a directory name: no separators, no '..', no spaces
# ":" for the derived controls (control:...), "<" / ">" for threshold recipes (clipscore>0.2)
_RECIPE_NAME_RE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.@+=:<>-]{0,127}$")

METHODS = ("full", "random", "semdedup", "ssp", "dbp", "clipscore", "clipcov")
CLASS_SOURCES = ("clusters",)

# Keys each method accepts besides ``method`` (anything else is rejected).
_COMMON = {"after_semdedup_eps"}
# what every recipe may say about how its subset is trained (the models of its partition)
_TRAINING = {"train_strategy"}
#: the training strategies a recipe may name (curation.train.config.STRATEGIES; select does not
#: import train, tests/test_recipes.py checks the two agree)
TRAIN_STRATEGIES = ("clip", "clip_da", "flip", "slip")
_KEYS: dict[str, set[str]] = {
    "full": set(),
    "random": {"keep_fraction", "seed"} | _COMMON,
    "semdedup": {"eps"},
    "ssp": {"keep_fraction", "order", "seed"} | _COMMON,
    "dbp": {"keep_fraction", "order", "seed", "tau", "balance", "n_neighbors"} | _COMMON,
    "clipscore": {"keep_fraction", "threshold"} | _COMMON,
    "clipcov": {"keep_fraction", "classes", "max_dense", "large", "factorized"} | _COMMON,
}
_KEYS = {m: keys | _TRAINING for m, keys in _KEYS.items()}
_REQUIRED: dict[str, set[str]] = {
    "random": {"keep_fraction"},
    "semdedup": {"eps"},
    "ssp": {"keep_fraction"},
    "dbp": {"keep_fraction"},
    "clipcov": {"keep_fraction"},
}
ALIGNED_METHODS = ("clipscore", "clipcov")


@dataclass(frozen=True)
class Recipe:
    """One curation recipe (a partition of ``pruned_subsets``).

    Attributes:
        name: the partition key, e.g. ``dbp@0.5``.
        method: one of ``METHODS``.
        keep_fraction: fraction of the (post-dedup) pool to keep, in (0, 1].
        seed: seed of random choices (``random`` sampling, ``order: random``).
        eps: SemDeDup threshold (``semdedup``): duplicates have ``M > 1 - eps``.
        after_semdedup_eps: run on the pool after SemDeDup at this eps (chaining), or None.
        tau: DBP softmax temperature over cluster complexity.
        balance: DBP lower-bound factor ``lb = floor(balance * N_keep / k)``.
        n_neighbors: DBP ``l`` of ``d_inter`` (``min(n_neighbors, k - 1)`` centroids).
        order: in-cluster keep order: ``hard`` (least prototypical first), ``easy``, ``random``.
        threshold: CLIP-score threshold (``clipscore``, instead of ``keep_fraction``).
        classes: CLIPCov proxy classes (``clusters``: the concept clusters).
        max_dense: CLIPCov: largest class solved with a dense similarity tile.
        large: CLIPCov: ``factorized`` approximation or ``exact`` for larger classes.
        factorized: CLIPCov: use the factorized approximation for every class.
        train_strategy: the training strategy of this recipe's models (``clip``, ``clip_da``,
            ``flip``, ``slip``), overriding ``trained_checkpoints``' configured one; None: the
            configured one. Lets one pool compare strategies on the same subset (Scaling Down
            CLIP), e.g. ``full+slip: {method: full, train_strategy: slip}``.
    """

    name: str
    method: str
    keep_fraction: float | None = None
    seed: int = 0
    eps: float | None = None
    after_semdedup_eps: float | None = None
    tau: float = DEFAULT_TAU
    balance: float = 0.5
    n_neighbors: int = DEFAULT_NEIGHBORS
    order: str = "hard"
    threshold: float | None = None
    classes: str = "clusters"
    max_dense: int = DEFAULT_MAX_DENSE
    large: str = "factorized"
    factorized: bool = False
    train_strategy: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _RECIPE_NAME_RE.match(self.name):
            # the name becomes a directory (artifacts/subsets/<name>, checkpoints) and a partition key
            raise ValueError(
                f"recipe name: got {self.name!r}; expected letters, digits and '_', '.', '@', '+', '=', ':', '<', '>', '-' "
                "(starting with a letter, digit or '_'; no '/', '..' or spaces)"
            )
        m = self.method
        if m not in METHODS:
            raise ValueError(f"recipe {self.name!r}: method: got {m!r}; expected one of {METHODS}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"recipe {self.name!r}: keep_fraction: got {self.keep_fraction}; expected 0 < f <= 1")
        for key in ("eps", "after_semdedup_eps"):
            v = getattr(self, key)
            if v is not None and not 0.0 < v < 1.0:
                raise ValueError(f"recipe {self.name!r}: {key}: got {v}; expected 0 < eps < 1")
        if self.tau <= 0:
            raise ValueError(f"recipe {self.name!r}: tau: got {self.tau}; expected > 0")
        if not 0.0 <= self.balance <= 1.0:
            raise ValueError(f"recipe {self.name!r}: balance: got {self.balance}; expected 0 <= balance <= 1")
        if self.n_neighbors < 1:
            raise ValueError(f"recipe {self.name!r}: n_neighbors: got {self.n_neighbors}; expected >= 1")
        if self.order not in ORDERS:
            raise ValueError(f"recipe {self.name!r}: order: got {self.order!r}; expected one of {ORDERS}")
        if self.classes not in CLASS_SOURCES:
            raise ValueError(f"recipe {self.name!r}: classes: got {self.classes!r}; expected one of {CLASS_SOURCES}")
        if self.large not in LARGE_MODES:
            raise ValueError(f"recipe {self.name!r}: large: got {self.large!r}; expected one of {LARGE_MODES}")
        if self.max_dense < 1:
            raise ValueError(f"recipe {self.name!r}: max_dense: got {self.max_dense}; expected >= 1")
        if self.train_strategy is not None and self.train_strategy not in TRAIN_STRATEGIES:
            raise ValueError(
                f"recipe {self.name!r}: train_strategy: got {self.train_strategy!r}; expected one of {TRAIN_STRATEGIES}"
            )
        if m == "clipscore" and (self.keep_fraction is None) == (self.threshold is None):
            raise ValueError(
                f"recipe {self.name!r}: clipscore: got keep_fraction={self.keep_fraction}, "
                f"threshold={self.threshold}; expected exactly one of them"
            )

    @property
    def needs_aligned(self) -> bool:
        """True when the recipe needs aligned image/caption embeddings (a CLIP)."""
        return self.method in ALIGNED_METHODS

    @property
    def needs_dedup(self) -> bool:
        """True when the recipe reads SemDeDup ``M`` scores."""
        return self.method == "semdedup" or self.after_semdedup_eps is not None

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (every field, defaults filled in)."""
        return dataclasses.asdict(self)


def recipe_config_path() -> str:
    """The recipes file: ``$CURATION_RECIPES`` or the packaged ``curation/select/recipes.yaml``."""
    return os.environ.get("CURATION_RECIPES") or str(ir.files("curation.select") / "recipes.yaml")


def parse_recipe(name: str, spec: Any) -> Recipe:
    """Validate one config entry and build its :class:`Recipe`."""
    if not isinstance(spec, dict):
        raise ValueError(f"recipe {name!r}: got {type(spec).__name__}; expected a mapping of keys")
    if "method" not in spec:
        raise ValueError(f"recipe {name!r}: got no 'method'; expected one of {METHODS}")
    method = spec["method"]
    if method not in METHODS:
        raise ValueError(f"recipe {name!r}: method: got {method!r}; expected one of {METHODS}")
    allowed = _KEYS[method]
    unknown = sorted(set(spec) - allowed - {"method"})
    if unknown:
        raise ValueError(f"recipe {name!r}: unknown keys {unknown} for method {method!r}; expected a subset of {sorted(allowed)}")
    missing = sorted(_REQUIRED.get(method, set()) - set(spec))
    if missing:
        raise ValueError(f"recipe {name!r}: missing keys {missing}; method {method!r} requires {sorted(_REQUIRED[method])}")
    kwargs = dict(spec)
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for key, val in kwargs.items():
        if key in ("method", "order", "classes", "large", "train_strategy"):
            if not isinstance(val, str):
                raise ValueError(f"recipe {name!r}: {key}: got {val!r}; expected a string")
        elif key in ("seed", "n_neighbors", "max_dense"):
            if isinstance(val, bool) or not isinstance(val, int):
                raise ValueError(f"recipe {name!r}: {key}: got {val!r}; expected an integer")
        elif key == "factorized":
            if not isinstance(val, bool):
                raise ValueError(f"recipe {name!r}: {key}: got {val!r}; expected true or false")
        elif isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ValueError(f"recipe {name!r}: {key}: got {val!r}; expected a number ({types[key]})")
        else:
            kwargs[key] = float(val)
    return Recipe(name=name, **kwargs)


def load_recipes(path: str | None = None) -> dict[str, Recipe]:
    """All recipes of a config file (default :func:`recipe_config_path`), by name, in file order."""
    path = path or recipe_config_path()
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or set(data) != {"recipes"} or not isinstance(data["recipes"], dict):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: got top-level {got}; expected exactly one key 'recipes' mapping names to recipes")
    if not data["recipes"]:
        raise ValueError(f"{path}: got no recipes; expected at least one")
    return {str(name): parse_recipe(str(name), spec) for name, spec in data["recipes"].items()}


def recipe_names(path: str | None = None) -> list[str]:
    """Recipe names (the partition keys), in file order."""
    return list(load_recipes(path))


def get_recipe(name: str, path: str | None = None) -> Recipe:
    """The recipe called ``name``; ``ValueError`` listing the valid names otherwise."""
    recipes = load_recipes(path)
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; expected one of {list(recipes)}")
    return recipes[name]


def recipe_hash(recipe: Recipe) -> str:
    """12-hex-char sha256 of the resolved curation config: the name and ``train_strategy`` (how
    the subset is trained, not which samples it holds) are excluded, so the same selection has
    the same hash."""
    d = recipe.to_dict()
    d.pop("name")
    d.pop("train_strategy")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Pool:
    """The pool arrays every recipe reads (row ``i`` is one sample everywhere).

    Attributes:
        uids: (n,) sample uids: ``str``, or fixed-width bytes (``S32``, how
            :func:`curation.select.pool_tables.read_recipe_pool` holds them: 32 bytes per uid
            instead of 128; they order exactly like the strings).
        cluster_ids: (n,) int32 concept cluster of each sample.
        cos_to_centroid: (n,) float32 cosine to its centroid.
        centroids: (k, d) float32 unit-norm centroids.
        max_sim: (n,) float32 SemDeDup ``M`` scores, or None (then computed from
            ``embeddings`` when a recipe needs them).
        embeddings: (n, d) float32 unit-norm image embeddings of the pool, or None.
        image_aligned: (n, d') float32 aligned (CLIP) image embeddings, or None.
        text_aligned: (n, d') float32 aligned caption embeddings, or None.
        d_inter: (k,) float64 stored ``d_inter`` of every cluster (complexity_scores'
            output; it depends only on the centroids), or None (DBP computes it).
        aligned_layout: a :class:`curation.select.layout.LayoutRef` whose buckets carry the
            aligned image/caption vectors, used by clipscore/clipcov INSTEAD of the two
            (n, d') matrices (one bucket per task; same results).
    """

    uids: np.ndarray
    cluster_ids: np.ndarray
    cos_to_centroid: np.ndarray
    centroids: np.ndarray
    max_sim: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    image_aligned: np.ndarray | None = None
    text_aligned: np.ndarray | None = None
    d_inter: np.ndarray | None = None
    aligned_layout: Any = None

    def __post_init__(self):
        n = len(self.uids)
        for name in ("cluster_ids", "cos_to_centroid", "max_sim", "embeddings", "image_aligned", "text_aligned"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"Pool.{name}: got {len(v)} rows; expected {n} (one per uid)")

    @property
    def n(self) -> int:
        return len(self.uids)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


@dataclass(frozen=True)
class Selection:
    """A recipe's output: kept samples keyed by uid.

    Attributes:
        recipe: the recipe name.
        index: (m,) int64 pool row of each kept sample, ordered by rank.
        uids: (m,) uids ordered by rank, of the pool's uid dtype (``str`` or ``S32`` bytes;
            :meth:`to_frame` and :func:`curation.ingest.ids.uid_series` give strings).
        rank: (m,) int64 ``0..m-1`` (0 = most preferred).
        score: (m,) float64 the method's score (see the module docstring).
        stats: ``n_pool`` (pool size), ``n_candidates`` (after chained SemDeDup),
            ``n_keep`` (target), ``n_kept``, and for per-cluster methods ``budgets``
            ((k,) int64 kept per cluster/class) and ``sizes`` ((k,) candidates per cluster).
    """

    recipe: str
    index: np.ndarray
    uids: np.ndarray
    rank: np.ndarray
    score: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def to_arrow(self):
        """The ``subsets`` table rows as an Arrow table (recipe, uid, rank, score), for writing:
        S32 uids become the uid column without a copy, the recipe column without a Python list."""
        import pyarrow as pa

        m = len(self.uids)
        uid = uid_series(self.uids).to_arrow() if not (isinstance(self.uids, np.ndarray) and self.uids.dtype.kind == "S") \
            else uid_arrow(self.uids)
        return pa.table({
            "recipe": pa.repeat(pa.scalar(self.recipe, pa.string()), m) if m else pa.array([], pa.string()),
            "uid": uid,
            "rank": pa.array(np.asarray(self.rank, dtype=np.int64)),
            "score": pa.array(np.asarray(self.score, dtype=np.float64)),
        })

    def to_frame(self) -> pl.DataFrame:
        """The ``subsets`` table rows: recipe, uid, rank, score."""
        return pl.DataFrame(
            {
                "recipe": pl.Series([self.recipe] * len(self.uids), dtype=pl.String),
                "uid": uid_series(self.uids),
                "rank": pl.Series(self.rank, dtype=pl.Int64),
                "score": pl.Series(self.score, dtype=pl.Float64),
            }
        )


def _max_sim(pool: Pool) -> np.ndarray:
    if pool.max_sim is not None:
        return np.asarray(pool.max_sim, dtype=np.float32)
    if pool.embeddings is None:
        raise ValueError("pool: got neither max_sim nor embeddings; expected one of them for SemDeDup")
    return semdedup_scores(pool.embeddings, pool.cluster_ids, pool.cos_to_centroid, pool.uids)


def candidates(recipe: Recipe, pool: Pool) -> np.ndarray:
    """(n',) int64 pool rows the recipe selects from.

    All rows; for ``semdedup`` and for recipes chained with ``after_semdedup_eps``, the rows
    that are not duplicates at that eps.
    """
    eps = recipe.eps if recipe.method == "semdedup" else recipe.after_semdedup_eps
    if eps is None:
        return np.arange(pool.n, dtype=np.int64)
    return np.flatnonzero(~is_duplicate(_max_sim(pool), eps)).astype(np.int64)


def expected_keep(recipe: Recipe, n_candidates: int) -> int | None:
    """``N_keep`` the recipe must hit exactly given its candidate count, or None (threshold recipes).

    ``full`` and ``semdedup`` keep every candidate; fraction recipes keep
    ``round(keep_fraction * n_candidates)`` (halves up).
    """
    if recipe.method in ("full", "semdedup"):
        return n_candidates
    if recipe.keep_fraction is None:
        return None
    return n_keep_for(recipe.keep_fraction, n_candidates)


def _interleaved_rank(cluster: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Order (position in cluster, cluster id): a round-robin over clusters."""
    return lex_order((cluster, pos))


def _per_cluster(recipe: Recipe, pool: Pool, cand: np.ndarray, weights_fn) -> tuple[np.ndarray, np.ndarray, dict]:
    cid = np.asarray(pool.cluster_ids, dtype=np.int64)[cand]
    cos = np.asarray(pool.cos_to_centroid)[cand]
    sizes = np.bincount(cid, minlength=pool.k).astype(np.int64)
    n_keep = n_keep_for(recipe.keep_fraction, cand.size)
    budgets = weights_fn(cid, cos, sizes, n_keep)
    order = in_cluster_order(cid, cos, np.asarray(pool.uids)[cand], order=recipe.order, seed=recipe.seed)
    kept_local, pos = take_per_cluster(order, cid, budgets)
    ranked = _interleaved_rank(cid[kept_local], pos)
    kept = cand[kept_local[ranked]]
    return kept, np.asarray(pool.cos_to_centroid, dtype=np.float64)[kept], {"budgets": budgets, "sizes": sizes}


def _full(recipe, pool, cand):
    order = np.argsort(np.asarray(pool.uids)[cand], kind="stable")
    return cand[order], np.zeros(cand.size), {}


def _random(recipe, pool, cand):
    rng = np.random.default_rng(recipe.seed)
    key = rng.random(cand.size)
    n_keep = n_keep_for(recipe.keep_fraction, cand.size)
    top = np.argsort(key, kind="stable")[:n_keep]
    return cand[top], key[top], {}


def _semdedup(recipe, pool, cand):
    idx = cand  # the candidates are exactly the non-duplicates at eps
    mk = _max_sim(pool)[idx].astype(np.float64)
    df = pl.DataFrame({"m": mk, "u": uid_series(np.asarray(pool.uids)[idx])})
    order = df.with_row_index("i").sort(["m", "u"])["i"].to_numpy()
    return idx[order], mk[order], {}


def _ssp(recipe, pool, cand):
    return _per_cluster(recipe, pool, cand, lambda cid, cos, sizes, n_keep: ssp_budgets(sizes, n_keep))


def _dbp(recipe, pool, cand):
    def budgets(cid, cos, sizes, n_keep):
        # d_intra on the post-dedup candidates (the DBP paper prunes the deduplicated pool);
        # d_inter is the stored one from complexity_scores when the pool carries it
        comp = cluster_complexity(cid, cos, pool.centroids, n_neighbors=recipe.n_neighbors, tau=recipe.tau,
                                  d_inter=pool.d_inter)
        return dbp_budgets(sizes, comp.weight, n_keep, balance=recipe.balance)

    return _per_cluster(recipe, pool, cand, budgets)


def _aligned(pool: Pool) -> tuple[np.ndarray, np.ndarray]:
    if pool.image_aligned is None or pool.text_aligned is None:
        raise ValueError("pool: got no aligned image/text embeddings; expected both for clipscore/clipcov")
    return pool.image_aligned, pool.text_aligned


def _clipscore(recipe, pool, cand, executor=None):
    if pool.image_aligned is None and pool.aligned_layout is not None:
        scores = pool.aligned_layout.clip_scores(pool.uids, executor=executor)[cand].astype(np.float64)
    else:
        img, txt = _aligned(pool)
        scores = clip_scores(img, txt)[cand].astype(np.float64)  # row-wise: no (n, d) copies
    uids = np.asarray(pool.uids)[cand]
    if recipe.threshold is not None:
        top = top_by_score(scores, uids, threshold=recipe.threshold)
    else:
        top = top_by_score(scores, uids, n_keep=n_keep_for(recipe.keep_fraction, cand.size))
    return cand[top], scores[top], {}


def _clipcov(recipe, pool, cand, executor=None):
    cid = np.asarray(pool.cluster_ids, dtype=np.int64)[cand]
    n_keep = n_keep_for(recipe.keep_fraction, cand.size)
    if pool.image_aligned is None and pool.aligned_layout is not None:
        # one task per bucket reads its classes' vectors from the lake (same result)
        kept_local, pos, gain = pool.aligned_layout.clipcov(
            np.asarray(pool.uids)[cand], cid, n_keep, max_dense=recipe.max_dense, large=recipe.large,
            factorized=recipe.factorized, executor=executor)
    elif executor is not None and executor.kind != "in-process":
        from curation.select.clipcov import clipcov_select_distributed

        img, txt = _aligned(pool)
        # per-class greedy spread over the executor; identical results (tests/test_distributed.py)
        kept_local, pos, gain = clipcov_select_distributed(
            executor, img[cand], txt[cand], cid, np.asarray(pool.uids)[cand], n_keep,
            max_dense=recipe.max_dense, large=recipe.large, factorized=recipe.factorized,
        )
    else:
        img, txt = _aligned(pool)
        kept_local, pos, gain = clipcov_select(
            img, txt, cid, np.asarray(pool.uids)[cand], n_keep,
            max_dense=recipe.max_dense, large=recipe.large, factorized=recipe.factorized, rows=cand,
        )
    ranked = _interleaved_rank(cid[kept_local], pos)
    sizes = np.bincount(cid, minlength=pool.k).astype(np.int64)
    return cand[kept_local[ranked]], gain[ranked], {
        "budgets": np.bincount(cid[kept_local], minlength=pool.k).astype(np.int64),
        "sizes": sizes,
    }


_APPLY: dict[str, Callable[[Recipe, Pool, np.ndarray], tuple[np.ndarray, np.ndarray, dict]]] = {
    "full": _full,
    "random": _random,
    "semdedup": _semdedup,
    "ssp": _ssp,
    "dbp": _dbp,
    "clipscore": _clipscore,
    "clipcov": _clipcov,
}


def apply_recipe(recipe: Recipe, pool: Pool, executor=None) -> Selection:
    """Apply ``recipe`` to ``pool``: the one signature every recipe shares.

    Args:
        recipe: a :class:`Recipe` (see :func:`get_recipe`).
        pool: the :class:`Pool` arrays.
        executor: optional :class:`curation.engine.executor.Executor`; per-class CLIPCov work is
            spread over it when it is not the in-process loop (same result either way).

    Returns:
        The :class:`Selection` (kept uids ordered by rank, with scores and stats).
    """
    cand = candidates(recipe, pool)
    if recipe.method in ("clipcov", "clipscore") and executor is not None:
        kept, score, extra = _APPLY[recipe.method](recipe, pool, cand, executor=executor)
    else:
        kept, score, extra = _APPLY[recipe.method](recipe, pool, cand)
    kept = np.asarray(kept, dtype=np.int64)
    stats = {
        "n_pool": pool.n,
        "n_candidates": int(cand.size),
        "n_keep": expected_keep(recipe, int(cand.size)),
        "n_kept": int(kept.size),
        **extra,
    }
    log.info("recipe %s: kept %d of %d (%d candidates)", recipe.name, kept.size, pool.n, cand.size)
    return Selection(
        recipe=recipe.name,
        index=kept,
        uids=np.asarray(pool.uids)[kept],
        rank=np.arange(kept.size, dtype=np.int64),
        score=np.asarray(score, dtype=np.float64),
        stats=stats,
    )
