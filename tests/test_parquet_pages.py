"""Fixed-width values viewed in place in a mapped Parquet file (curation.storage.parquet_pages):
equal to Arrow's decode for every page layout the layout's writers produce, None for every
chunk not in that form (the caller then decodes through Arrow)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.storage.parquet_pages import column_views, fixed_width_views

N, D = 700, 6


def _vectors(dtype: str, n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(dtype)


def _binary(x: np.ndarray) -> pa.Array:
    return pa.array([r.tobytes() for r in x], pa.binary())


def _write(path, x: np.ndarray, nullable: bool = True, **kw) -> pq.FileMetaData:
    schema = pa.schema([pa.field("id", pa.int32()), pa.field("emb", pa.binary(), nullable=nullable)])
    t = pa.table({"id": pa.array(np.arange(len(x), dtype=np.int32)), "emb": _binary(x)}, schema=schema)
    opts = dict(compression="NONE", use_dictionary=["id"], column_encoding={"emb": "PLAIN"}, write_statistics=["id"],
                row_group_size=256)
    opts.update(kw)
    pq.write_table(t, path, **opts)
    return pq.ParquetFile(path).metadata


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", ["v1", "v2", "small pages", "required", "page statistics", "page index"])
def test_views_equal_the_stored_vectors_for_every_page_layout(tmp_path, dtype, case):
    """Row groups in any order and subset, one or several pages per chunk (a view each), v1 and
    v2 data pages, nullable and required columns, page headers carrying statistics (a struct
    the header parser skips): the views hold exactly the written vectors, read-only."""
    x = _vectors(dtype)
    kw = {"v1": {}, "v2": {"data_page_version": "2.0"}, "small pages": {"data_page_size": 1000, "write_batch_size": 50},
          "required": {}, "page statistics": {"write_statistics": True},
          "page index": {"write_statistics": True, "write_page_index": True}}[case]
    path = str(tmp_path / "f.parquet")
    md = _write(path, x, nullable=case != "required", **kw)
    assert md.num_row_groups == 3
    for groups in ([0, 1, 2], [2, 0], [1]):
        views = fixed_width_views(path, md, "emb", groups, dtype)
        assert views is not None
        if case == "small pages":
            assert len(views) > len(groups)
        got = np.concatenate(views)
        want = np.concatenate([x[g * 256 : (g + 1) * 256] for g in groups])
        assert got.dtype == np.dtype(dtype) and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert not any(v.flags.writeable for v in views)


def test_views_of_the_layouts_delta_writer_files(tmp_path):
    """The files of deltalake's writer (the layout's object-store path and its updates), with
    the layout's writer properties: viewed in place, equal to the written vectors."""
    import glob

    from deltalake import write_deltalake

    from curation.storage.lake import plain_writer_properties

    x = _vectors("float32", 3000, seed=1)
    t = pa.table({"id": pa.array(np.arange(len(x), dtype=np.int32)), "emb": _binary(x)})
    write_deltalake(str(tmp_path / "t"), t, writer_properties=plain_writer_properties(["emb"], max_row_group_size=1024))
    (path,) = glob.glob(str(tmp_path / "t" / "*.parquet"))
    md = pq.ParquetFile(path).metadata
    views = fixed_width_views(path, md, "emb", list(range(md.num_row_groups)), "float32")
    assert views is not None
    np.testing.assert_array_equal(np.concatenate(views), x)


@pytest.mark.parametrize("case", ["compressed", "dictionary", "null", "ragged", "other column", "no such column",
                                  "wrong width"])
def test_chunks_not_in_the_plain_fixed_width_form_are_left_to_arrow(tmp_path, case):
    """None (never wrong values) for a compressed or dictionary-encoded chunk, a null value, values
    of different widths, a non-binary column, a missing one, and a dtype the width does not divide."""
    x = _vectors("float32")
    path = str(tmp_path / "f.parquet")
    column, dtype = "emb", "float32"
    if case == "compressed":
        md = _write(path, x, compression="SNAPPY")
    elif case == "dictionary":
        md = _write(path, x, use_dictionary=True, column_encoding=None)
    elif case in ("null", "ragged"):
        values = [r.tobytes() for r in x]
        values[300] = None if case == "null" else values[300][:-4]
        t = pa.table({"id": pa.array(np.arange(N, dtype=np.int32)), "emb": pa.array(values, pa.binary())})
        pq.write_table(t, path, compression="NONE", use_dictionary=["id"], column_encoding={"emb": "PLAIN"},
                       row_group_size=256)
        md = pq.ParquetFile(path).metadata
    else:
        md = _write(path, x)
        column = {"other column": "id", "no such column": "vectors", "wrong width": "emb"}[case]
        if case == "wrong width":  # 24-byte values as 16-byte items
            dtype = "complex128"
    assert fixed_width_views(path, md, column, [0, 1, 2], dtype) is None
    if case in ("null", "ragged"):  # the row groups without the odd value are still viewed
        for g in (0, 2):
            np.testing.assert_array_equal(np.concatenate(fixed_width_views(path, md, "emb", [g], "float32")),
                                          x[g * 256 : (g + 1) * 256])


def test_a_truncated_file_is_left_to_arrow(tmp_path):
    """A page header or page running past the end of a (cut) file: None, not an error or a view
    of bytes that are not there."""
    x = _vectors("float32")
    path = str(tmp_path / "f.parquet")
    md = _write(path, x)
    chunk = md.row_group(2).column(1)
    with open(path, "r+b") as f:
        f.truncate(chunk.data_page_offset + 10)
    assert fixed_width_views(path, md, "emb", [2], "float32") is None
    assert np.array_equal(np.concatenate(fixed_width_views(path, md, "emb", [0], "float32")), x[:256])


def _layout_like(path, n: int = N, required: bool = False, null_at: int | None = None, **kw):
    """A file shaped like a layout file: 16-byte uids, a cluster id and a cos (PLAIN numbers,
    no dictionary, statistics on the cluster id) and vectors, in 256-row row groups."""
    rng = np.random.default_rng(2)
    cid = np.sort(rng.integers(0, 50, n)).astype(np.int32)
    cos = rng.random(n).astype(np.float32)
    uid = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    x = _vectors("float32", n)
    schema = pa.schema([pa.field("cluster_id", pa.int32(), nullable=not required),
                        pa.field("uid", pa.binary(), nullable=not required),
                        pa.field("cos_to_centroid", pa.float32(), nullable=not required),
                        pa.field("emb", pa.binary(), nullable=not required)])
    cos_col = pa.array(cos, mask=None if null_at is None else np.arange(n) == null_at)
    t = pa.table([pa.array(cid), _binary(uid), cos_col, _binary(x)], schema=schema)
    opts = dict(compression="NONE", use_dictionary=False, write_statistics=["cluster_id"], row_group_size=256,
                column_encoding={c: "PLAIN" for c in schema.names})
    opts.update(kw)
    pq.write_table(t, path, **opts)
    return pq.ParquetFile(path).metadata, {"cluster_id": cid, "uid": uid, "cos_to_centroid": cos, "emb": x}


KINDS = {"cluster_id": "int32", "uid": "uint8", "cos_to_centroid": "float32", "emb": "float32"}


@pytest.mark.parametrize("case", ["v1", "v2", "required", "small pages"])
def test_number_columns_and_uids_are_viewed_with_the_vectors_in_one_map(tmp_path, case):
    """column_views: PLAIN INT32 and FLOAT columns as 1-D views, 16-byte uids as uint8 rows and
    the vectors, of any row groups in any order, equal to what was written; a column the file
    lacks has no entry."""
    kw = {"v1": {}, "v2": {"data_page_version": "2.0"}, "required": {},
          "small pages": {"data_page_size": 500, "write_batch_size": 40}}[case]
    path = str(tmp_path / "f.parquet")
    md, cols = _layout_like(path, required=case == "required", **kw)
    assert md.num_row_groups == 3 and md.row_group(0).column(0).statistics.has_min_max
    for groups in ([0, 1, 2], [2, 0], [1]):
        got = column_views(path, md, {**KINDS, "absent": "int32"}, groups)
        assert sorted(got) == sorted(KINDS)
        for c, views in got.items():
            if case == "small pages":
                assert len(views) > len(groups)
            want = np.concatenate([cols[c][g * 256 : (g + 1) * 256] for g in groups])
            v = np.concatenate(views)
            assert v.dtype == np.dtype(KINDS[c]) and v.shape == want.shape
            np.testing.assert_array_equal(v, want)
            assert not any(x.flags.writeable for x in views)


@pytest.mark.parametrize("case", ["dictionary", "null", "integer kind as float", "float as integer", "wider dtype",
                                  "compressed"])
def test_number_columns_not_plain_and_packed_are_left_to_arrow(tmp_path, case):
    """A dictionary-encoded or compressed number column, one with a null (its PLAIN page holds one
    value fewer than rows), or a dtype of another kind or width: no entry for it (never other
    numbers), while the file's other columns are still viewed."""
    path = str(tmp_path / "f.parquet")
    kinds = dict(KINDS)
    kw = {}
    if case == "dictionary":
        kw = dict(use_dictionary=["cos_to_centroid"], column_encoding={c: "PLAIN" for c in ("cluster_id", "uid", "emb")})
    elif case == "compressed":
        kw = dict(compression={"cos_to_centroid": "SNAPPY", "cluster_id": "NONE", "uid": "NONE", "emb": "NONE"})
    elif case == "integer kind as float":
        kinds["cluster_id"] = "float32"
    elif case == "float as integer":
        kinds["cos_to_centroid"] = "int32"
    elif case == "wider dtype":
        kinds["cluster_id"] = "int64"
    md, cols = _layout_like(path, null_at=300 if case == "null" else None, **kw)
    odd = "cluster_id" if case in ("integer kind as float", "wider dtype") else "cos_to_centroid"
    got = column_views(path, md, kinds, [0, 1, 2])
    assert odd not in got and sorted(got) == sorted(c for c in KINDS if c != odd)
    for c, views in got.items():
        np.testing.assert_array_equal(np.concatenate(views), cols[c])
    if case == "null":  # the row groups without the null are still viewed
        for g in (0, 2):
            part = column_views(path, md, kinds, [g])
            np.testing.assert_array_equal(np.concatenate(part[odd]), cols[odd][g * 256 : (g + 1) * 256])
