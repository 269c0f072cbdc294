import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curation.storage.lake import Lake, list_column_to_matrix, matrix_to_list_column


def _rows(shard, n, stage=None):
    d = {"uid": [f"{shard}{i}" for i in range(n)], "shard": [shard] * n}
    if stage:
        d["stage"] = [stage] * n
    return pl.DataFrame(d)


def test_partition_write_replaces_exactly_that_partition(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    for _ in range(3):
        lake.write("samples", _rows("a", 2), partition="a")
        lake.write("samples", _rows("b", 3), partition="b")
    assert lake.read("samples").height == 5
    lake.write("samples", _rows("a", 1), partition="a")
    df = lake.read("samples")
    assert sorted(df["uid"].to_list()) == ["a0", "b0", "b1", "b2"]
    assert lake.partitions("samples") == ["a", "b"]
    assert lake.read("samples", partitions=["b"]).height == 3
    assert lake.read("samples", partitions=[]).height == 0


def test_where_replaces_only_one_stage(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write("quarantine", _rows("a", 2, "ingest"), partition="a", where={"stage": "ingest"})
    lake.write("quarantine", _rows("a", 3, "embed"), partition="a", where={"stage": "embed"})
    lake.write("quarantine", _rows("a", 1, "embed"), partition="a", where={"stage": "embed"})
    df = lake.read("quarantine")
    assert df.filter(pl.col("stage") == "ingest").height == 2
    assert df.filter(pl.col("stage") == "embed").height == 1


def test_partition_rows_must_match(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(ValueError, match="other shard values"):
        lake.write("samples", _rows("b", 2), partition="a")
    with pytest.raises(ValueError, match="not partitioned"):
        lake.write("clusters", pl.DataFrame({"cluster_id": [0]}), partition="x")
    with pytest.raises(ValueError, match="unknown table"):
        lake.uri("nope")


def test_unpartitioned_overwrite_replaces_schema(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write("clusters", pl.DataFrame({"cluster_id": [0, 1]}))
    lake.write("clusters", pl.DataFrame({"cluster_id": [5], "size": [3]}))
    df = lake.read("clusters")
    assert df.to_dicts() == [{"cluster_id": 5, "size": 3}]


def test_list_column_round_trip_is_exact_and_contiguous(tmp_path):
    rng = np.random.default_rng(0)
    mat = rng.standard_normal((7, 5)).astype(np.float32)
    col = matrix_to_list_column(mat)
    assert col.type == pa.list_(pa.float32())
    lake = Lake(str(tmp_path / "lake"))
    lake.write("embeddings", pa.table({"uid": list("abcdefg"), "shard": ["s"] * 7, "image_emb": col}), partition="s")
    back = list_column_to_matrix(lake.read("embeddings")["image_emb"])
    assert back.dtype == np.float32 and back.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(back, mat)
    chunked = pa.chunked_array([matrix_to_list_column(mat[:3]), matrix_to_list_column(mat[3:])])
    np.testing.assert_array_equal(list_column_to_matrix(chunked), mat)


def test_ragged_lists_are_rejected():
    ragged = pa.array([[1.0, 2.0], [3.0]], type=pa.list_(pa.float32()))
    with pytest.raises(ValueError, match="different lengths"):
        list_column_to_matrix(ragged)


def test_read_uids_streams_the_rows_of_some_uids(tmp_path):
    lake = Lake(str(tmp_path))
    rows = pl.DataFrame({"uid": [f"{i:032x}" for i in range(30)], "shard": [f"s{i % 3}" for i in range(30)],
                         "caption": [f"c{i}" for i in range(30)]})
    lake.write("samples", rows)
    want = [f"{i:032x}" for i in (29, 3, 3, 14)] + ["f" * 32]  # a repeat and an unknown uid
    got = lake.read_uids("samples", want, ["caption", "shard"]).sort("uid")
    assert got.columns == ["uid", "caption", "shard"]
    assert got["caption"].to_list() == ["c3", "c14", "c29"]
    assert lake.read_uids("samples", pl.Series([], dtype=pl.String), ["caption"]).height == 0


def test_read_where_streams_the_rows_a_predicate_selects(tmp_path):
    lake = Lake(str(tmp_path))
    rows = pl.DataFrame({"uid": [f"{i:032x}" for i in range(40)], "shard": [f"s{i % 4}" for i in range(40)],
                         "cluster_id": pl.Series([i % 7 for i in range(40)], dtype=pl.Int32),
                         "cos_to_centroid": pl.Series([i / 40 for i in range(40)], dtype=pl.Float32)})
    lake.write("assignments", rows)
    got = lake.read_where("assignments", ["uid", "cluster_id"], pl.col("cluster_id").is_in([2, 5])).sort("uid")
    want = rows.filter(pl.col("cluster_id").is_in([2, 5])).select("uid", "cluster_id").sort("uid")
    assert got.equals(want) and got.height == 11
    assert lake.read_where("assignments", ["uid"], pl.col("cluster_id") == 99).height == 0
    assert lake.scan("assignments").select(pl.len()).collect().item() == 40


def test_local_reads_go_through_arrows_own_filesystem(tmp_path):
    """A local lake is read by Arrow's memory-mapped local filesystem (not deltalake's Python
    handler); the rows are the same, partition values that need escaping on disk included,
    and only the table's live files are read (an overwritten partition's old file is not)."""
    import pyarrow.fs as pa_fs

    lake = Lake(str(tmp_path / "lake"))
    shards = ["a b", "é%=x", "q?#&", "x/y", "plain"]
    for s in shards:
        lake.write("samples", _rows(s, 2), partition=s)
    lake.write("samples", _rows("plain", 1), partition="plain")  # the old file stays on disk
    fs = lake.filesystem("samples")
    assert isinstance(fs, pa_fs.SubTreeFileSystem) and isinstance(fs.base_fs, pa_fs.LocalFileSystem)
    ours = lake.dataset("samples").to_table().to_pylist()
    theirs = lake.table("samples").to_pyarrow_dataset().to_table().to_pylist()
    key = lambda r: r["uid"]  # noqa: E731
    assert sorted(ours, key=key) == sorted(theirs, key=key)
    assert len(ours) == 9 and lake.count_rows("samples") == 9
    assert sorted(lake.read("samples")["uid"].to_list()) == sorted(r["uid"] for r in ours)
    assert lake.dataset("samples", file_pruning_predicate=[("shard", "=", "x/y")]).count_rows() == 2
    assert lake.partition_counts("samples") == {"a b": 2, "plain": 1, "q?#&": 2, "x/y": 2, "é%=x": 2}
    assert lake.count_rows("samples", "plain") == 1 and lake.count_rows("samples", "absent") == 0
    with pytest.raises(ValueError, match="not partitioned"):
        lake.count_rows("assignments", "x")
    assert Lake("s3://bucket/prefix").filesystem("samples") is None  # object stores: deltalake's own


def test_hashed_uid_tables_write_their_uid_column_plain_and_the_rest_default(tmp_path):
    """dedup_scores / subsets / assignments: uid PLAIN, no dictionary, no statistics, pages
    uncompressed (whole table and partition writes), their unique numbers (scores, cosines,
    ranks) without a dictionary but with statistics; other tables keep deltalake's defaults."""
    import glob

    import pyarrow.parquet as pq

    from curation.ingest.ids import make_uid

    db = Lake(str(tmp_path))
    uids = [make_uid("d", "s", str(i)) for i in range(50)]
    db.write("dedup_scores", pl.DataFrame({"uid": uids, "cluster_id": np.arange(50, dtype=np.int32) % 3,
                                           "max_sim_to_earlier": np.zeros(50, np.float32)}))
    db.write("subsets", pl.DataFrame({"recipe": ["r"] * 50, "uid": uids, "rank": np.arange(50)}), partition="r")
    db.write("samples", pl.DataFrame({"uid": uids, "shard": ["s"] * 50}), partition="s")

    def uid_chunk(table, column="uid"):
        f = glob.glob(str(tmp_path / table / "**" / "*.parquet"), recursive=True)[0]
        md = pq.ParquetFile(f).metadata
        return next(md.row_group(0).column(i) for i in range(md.num_columns) if md.row_group(0).column(i).path_in_schema == column)

    for table in ("dedup_scores", "subsets"):
        c = uid_chunk(table)
        assert not c.has_dictionary_page and not c.is_stats_set and c.compression == "UNCOMPRESSED", table
        assert db.read(table)["uid"].to_list() == uids
    for table, column in (("dedup_scores", "max_sim_to_earlier"), ("subsets", "rank")):
        c = uid_chunk(table, column)
        assert not c.has_dictionary_page and c.is_stats_set and c.compression == "UNCOMPRESSED", (table, column)
    assert uid_chunk("dedup_scores", "cluster_id").has_dictionary_page  # clusters repeat: a dictionary
    c = uid_chunk("samples")
    assert c.has_dictionary_page and c.is_stats_set  # the defaults
