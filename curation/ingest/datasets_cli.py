"""Library commands of ``curation`` that need no Dagster: ``curation datasets ...``.

``assets/cli.py`` wraps :func:`add_library_commands` with the orchestration commands
(demo, materialize, backfill, ui); ``python -m curation.ingest.datasets_cli`` runs the library commands alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from curation.storage.data_home import data_home


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; expected a positive integer")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a number in (0, 1)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"got {value}; expected a number in (0, 1)")
    return value


def cmd_datasets_list(args: argparse.Namespace) -> int:
    """Print the built-in datasets and the shards already in the landing zone."""
    from curation.ingest.emoji_dataset import list_datasets
    from curation.ingest.shards import find_shards

    for name, desc in list_datasets().items():
        print(f"{name}\t{desc}")
    landing = Path(args.out) / "landing" if args.out else data_home() / "landing"
    shards = find_shards(landing)
    per_dataset: dict[str, int] = {}
    for key in shards:
        per_dataset[key.rpartition("-")[0]] = per_dataset.get(key.rpartition("-")[0], 0) + 1
    print(f"\nlanding zone {landing}: {len(shards)} shards")
    for ds, n in sorted(per_dataset.items()):
        print(f"  {ds}\t{n} shards")
    return 0


def cmd_datasets_build(args: argparse.Namespace) -> int:
    """Build a built-in dataset into the data home (landing shards + held-out eval split)."""
    from curation.ingest.emoji_dataset import build_default_dataset, list_datasets

    if args.name != "default":
        print(f"unknown dataset {args.name!r}; expected one of {sorted(list_datasets())}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else data_home()
    stats = build_default_dataset(
        out,
        limit=args.limit,
        samples_per_shard=args.samples_per_shard,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        workers=args.workers,
    )
    print(
        f"built {stats.pool_samples} pool samples in {stats.pool_shards} shards "
        f"({stats.pool_concepts} concepts) under {stats.landing}"
    )
    print(
        f"held out {stats.eval_samples} samples ({stats.eval_concepts} concepts) under {stats.eval_dir} "
        f"in {stats.seconds:.1f} s"
    )
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    return 0


def cmd_datasets_split(args: argparse.Namespace) -> int:
    """Hold out whole concepts (or a uniform slice) of a landing dataset as an eval set."""
    from curation.ingest.split import split_dataset

    home = Path(args.out) if args.out else data_home()
    try:
        stats = split_dataset(home, args.dataset, args.name or f"{args.dataset}-heldout", by=args.by,
                              column=args.column, fraction=args.fraction, seed=args.seed)
    except ValueError as e:
        print(f"curation: error: {e}", file=sys.stderr)
        return 2
    what = f"{stats.eval_concepts} whole concepts ({stats.column})" if stats.by == "concept" else "a uniform slice"
    print(f"held out {stats.eval_samples} samples, {what}, into {stats.eval_dir}")
    print(f"the pool keeps {stats.pool_samples} samples in landing/{stats.dataset}/; the original shards are in {stats.original_dir}")
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    return 0


def add_library_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``datasets build|list|split`` to a ``curation`` sub-parser set."""
    p = subparsers.add_parser("datasets", help="build, list or split datasets in the landing zone")
    sub = p.add_subparsers(dest="datasets_command", required=True)

    b = sub.add_parser(
        "build",
        help="build a built-in dataset (default: the embedded emoji dataset) into a data home",
        description="Write landing/<dataset>/NNNNN.tar|parquet (the pool) and eval/<split>/ "
        "(held-out whole concepts, manifest.parquet, tasks.json) under --out.",
    )
    b.add_argument("name", choices=["default"], help="dataset to build")
    b.add_argument("--out", help="data home to write into (default: $CURATION_HOME or ./data)")
    b.add_argument("--limit", type=_positive_int, default=None, help="use at most N concepts (default: all)")
    b.add_argument("--samples-per-shard", type=_positive_int, default=500, help="samples per tar shard (default: 500)")
    b.add_argument(
        "--eval-fraction", type=_fraction, default=0.12, help="fraction of concepts held out for eval (default: 0.12)"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of selection, hold-out, captions, order (default: 0)")
    b.add_argument("--workers", type=_positive_int, default=None, help="SVG rendering processes (default: min(2, CPUs))")
    b.add_argument("--json", action="store_true", help="also print the build statistics as JSON")
    b.set_defaults(func=cmd_datasets_build)

    ls = sub.add_parser("list", help="list built-in datasets and the shards in the landing zone")
    ls.add_argument("--out", help="data home to look in (default: $CURATION_HOME or ./data)")
    ls.set_defaults(func=cmd_datasets_list)

    sp = sub.add_parser(
        "split",
        help="hold out whole concepts (or a uniform slice) of a landing dataset as an eval set",
        description="Write eval/<name>/ (shards, manifest.parquet, tasks.json) from landing/<dataset>/ and remove "
        "those samples from the pool: the original shards move to original/<dataset>/, landing/<dataset>/ keeps "
        "the rest member for member. --by concept holds out every sample of some values of a KEY.json field "
        "(zero-shot on unseen concepts + retrieval); --by uniform a seeded slice (retrieval). Run it before ingesting.",
    )
    sp.add_argument("dataset", help="dataset folder under landing/")
    sp.add_argument("--by", choices=["concept", "uniform"], default="concept", help="what to hold out (default: concept)")
    sp.add_argument("--column", default="concept", help="KEY.json field naming the concept (default: concept)")
    sp.add_argument("--fraction", type=_fraction, default=0.1, help="target fraction of samples held out (default: 0.1)")
    sp.add_argument("--name", help="eval split name (default: <dataset>-heldout)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the choice (default: 0)")
    sp.add_argument("--out", help="data home (default: $CURATION_HOME or ./data)")
    sp.add_argument("--json", action="store_true", help="also print the statistics as JSON")
    sp.set_defaults(func=cmd_datasets_split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation", description="Library commands of the curation platform.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_library_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
