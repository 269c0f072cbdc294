"""Fixed-width values of a Parquet column, viewed in place in the memory-mapped file.

The pool's by-cluster layout stores each vector as one ``binary`` value of ``d * itemsize``
bytes, written uncompressed and PLAIN (see :func:`curation.select.layout.write_layout_rows`).
In such a data page the values lie one after another, each behind its 4-byte length: a
strided ``(n, d)`` array over the page is the column, with no decoding at all. Arrow's
Parquet reader instead copies every value into a new buffer: for an update that multiplies
every cluster of a 1M pool by its few new members, that copy (2 GB read and written) cost
as much as the products themselves, which then read the copy again.

The layout's uids (16-byte ``binary`` values) can be viewed the same way, and its cluster ids
and cos (INT32 and FLOAT, written PLAIN without a dictionary) as the packed values they are:
a read of a bucket in several files (updates not yet compacted) then decodes no column
through Arrow, whose Parquet reader per file and column costs ~0.4 ms before any value is
read (see ``curation.select.layout.MAPPED_SMALL_MIN_FILES``).

:func:`fixed_width_views` returns those views for chosen row groups of one file (and
:func:`column_views` for several columns, mapping the file once), or None
when the column chunk is not in that form (compressed, dictionary-encoded, another
encoding, nulls, values of different widths, a repeated column): the caller then reads the
column through Arrow as before. The views are read-only and keep the file's mapping alive;
Delta data files are never changed in place, so a view stays valid while it is held.

Only the page headers are parsed here: a Parquet page header is a Thrift struct in the
compact protocol (https://github.com/apache/parquet-format, ``PageHeader``), of which the
page type, its size and the data page header's value count and encodings are read; every
other field is skipped by its wire type.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

# parquet-format enums
_DATA_PAGE, _DATA_PAGE_V2 = 0, 3
_PLAIN = 0
# Thrift compact protocol wire types
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12


class _Unreadable(ValueError):
    """The chunk is not in the form the views need (the caller reads it through Arrow)."""


def _varint(b, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(b):
            raise _Unreadable("page header runs past the end of the file")
        byte = b[i]
        i += 1
        out |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return out, i


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(b, i: int, wire: int) -> int:
    if wire in (_TRUE, _FALSE):
        return i
    if wire == _BYTE:
        return i + 1
    if wire in (_I16, _I32, _I64):
        return _varint(b, i)[1]
    if wire == _DOUBLE:
        return i + 8
    if wire == _BINARY:
        n, i = _varint(b, i)
        return i + n
    if wire in (_LIST, _SET):
        head = b[i]
        i += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, i = _varint(b, i)
        for _ in range(n):
            i = _skip(b, i, elem)
        return i
    if wire == _MAP:
        n, i = _varint(b, i)
        if n:
            kinds = b[i]
            i += 1
            for _ in range(n):
                i = _skip(b, _skip(b, i, kinds >> 4), kinds & 0x0F)
        return i
    if wire == _STRUCT:
        return _struct(b, i, {})[1]
    raise _Unreadable(f"page header: unknown Thrift wire type {wire}")


def _struct(b, i: int, nested: dict) -> tuple[dict, int]:
    """Read a compact-protocol struct at ``b[i]``: ``({field id: int or bool}, end)``; the
    structs whose field ids are keys of ``nested`` are read (with ``nested[id]`` as theirs),
    every other struct, string or container is skipped. A one-byte varint (every field of a
    page header but its sizes, usually) is read inline: this runs once per page of every
    column a bucket read views (~5k headers for a 1M layout's 32 buckets)."""
    out: dict = {}
    fid = 0
    try:
        while True:
            head = b[i]
            i += 1
            if head == 0:  # STOP
                return out, i
            wire, delta = head & 0x0F, head >> 4
            if delta:
                fid += delta
            else:
                v, i = _varint(b, i)
                fid = _zigzag(v)
            if wire == _I32 or wire == _I64 or wire == _I16:
                v = b[i]
                if v < 0x80:
                    i += 1
                else:
                    v, i = _varint(b, i)
                out[fid] = (v >> 1) ^ -(v & 1)
            elif wire == _TRUE or wire == _FALSE:
                out[fid] = wire == _TRUE
            elif wire == _STRUCT and fid in nested:
                out[fid], i = _struct(b, i, nested[fid])
            else:
                i = _skip(b, i, wire)
    except IndexError:
        raise _Unreadable("page header runs past the end of the file") from None


#: bytes of a page header read at once (a header without statistics is ~20-40 bytes; a longer
#: one is read in place)
_HEADER_PEEK = 256


def _page_header(b, i: int) -> tuple[dict, int]:
    """``(PageHeader fields, offset of the page's data)``: 1 type, 3 compressed_page_size,
    5 DataPageHeader (1 num_values, 2 encoding), 8 DataPageHeaderV2 (1 num_values,
    2 num_nulls, 3 num_rows, 4 encoding, 5 definition_levels_byte_length,
    6 repetition_levels_byte_length). Parsed from a copy of its first bytes (indexing a
    ``bytes`` is cheaper than indexing the map), or in place when it is longer."""
    head = b[i : i + _HEADER_PEEK]
    try:
        out, j = _struct(head, 0, {5: {}, 8: {}})
    except _Unreadable:
        if len(head) < _HEADER_PEEK:
            raise
        return _struct(b, i, {5: {}, 8: {}})
    return out, i + j


def _values_of_page(b, i: int, max_def: int) -> tuple[int, int, int]:
    """``(values start, values end, rows)`` of the PLAIN data page whose header starts at
    ``b[i]``, and the offset of the next page as ``values end``."""
    head, data = _page_header(b, i)
    size = head.get(3)
    if size is None or size < 0 or data + size > len(b):
        raise _Unreadable("page header without a valid size")
    end = data + size
    kind = head.get(1)
    if kind == _DATA_PAGE:
        page = head.get(5)
        if not page or page.get(2) != _PLAIN:
            raise _Unreadable("a data page not PLAIN-encoded")
        start = data
        if max_def > 0:  # RLE definition levels, behind their 4-byte length (no repetition levels)
            if start + 4 > end:
                raise _Unreadable("data page shorter than its level header")
            start += 4 + int.from_bytes(b[start : start + 4], "little")
        return start, end, int(page.get(1, -1))
    if kind == _DATA_PAGE_V2:
        page = head.get(8)
        if not page or page.get(4) != _PLAIN or page.get(2, 0) != 0 or page.get(6, 0) != 0:
            raise _Unreadable("a v2 data page not PLAIN-encoded, or with nulls or repetition levels")
        return data + int(page.get(5, 0)), end, int(page.get(3, -1))
    raise _Unreadable(f"page type {kind} (a dictionary or index page)")


#: the fixed-width Parquet physical types a PLAIN page holds packed, value after value: their
#: width, and the numpy kinds that may view them
_FIXED_TYPES = {"INT32": (4, "iu"), "INT64": (8, "iu"), "FLOAT": (4, "f"), "DOUBLE": (8, "f")}


def fixed_width_views(path: str, metadata, column: str, row_groups: list[int], dtype: str) -> list[np.ndarray] | None:
    """Views ``(rows, d)`` of ``dtype`` (little-endian) over the values of the ``binary``
    column ``column`` in the row groups ``row_groups`` (in that order) of the Parquet file at
    ``path``, one view per data page, in row order; None when the column chunks are not
    uncompressed, PLAIN, non-null values of one width (the caller reads them otherwise). A
    column of a fixed-width number type gives 1-D views (see :func:`column_views`).

    ``metadata``: the file's ``pyarrow.parquet.FileMetaData`` (a dataset fragment's, already
    read: the footer is not read again). Each view's rows are checked: their count against the
    row group's, every value's length against the width. Views may be unaligned (a page starts
    anywhere in the file): numpy reads them as they are, and BLAS gets an aligned copy of a
    product's operand from numpy when it needs one.
    """
    return column_views(path, metadata, {column: dtype}, row_groups).get(column)


def column_views(path: str, metadata, columns: dict[str, str], row_groups: list[int]) -> dict[str, list[np.ndarray]]:
    """:func:`fixed_width_views` of several columns of one file, mapped once: ``{column:
    views}`` for each column of ``columns`` (``{name: dtype}``) whose chunks are in that form,
    and no entry for the others (the caller decodes those through Arrow).

    Besides ``binary`` columns of fixed-width values (views ``(rows, d)``, e.g. vectors, or a
    16-byte uid as ``uint8``), a column of a fixed-width physical type (INT32, INT64, FLOAT,
    DOUBLE) written PLAIN gives 1-D views ``(rows,)`` when ``dtype`` has its width and kind
    (integer, float); its pages are checked to hold one value per row (a null would leave a
    page short)."""
    out: dict[str, list[np.ndarray]] = {}
    schema = metadata.schema
    names = [schema.column(i).path for i in range(len(schema))]
    wanted = [(c, names.index(c), np.dtype(dt)) for c, dt in columns.items() if c in names]
    if not wanted:
        return out
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return out
            b = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError:
        return out
    buf = np.frombuffer(b, dtype=np.uint8)
    for column, ci, dt in wanted:
        try:
            views = _chunk_views(b, buf, size, metadata, ci, row_groups, dt)
        except _Unreadable:
            views = None
        if views is not None:
            out[column] = views
    return out


def _chunk_views(b, buf: np.ndarray, size: int, metadata, ci: int, row_groups: list[int], dt: np.dtype) -> list[np.ndarray] | None:
    """The views of column ``ci`` in ``row_groups`` over the mapped file ``b`` (see
    :func:`column_views`), or None."""
    desc = metadata.schema.column(ci)
    item = dt.itemsize
    if desc.max_repetition_level != 0:
        return None
    fixed = _FIXED_TYPES.get(desc.physical_type)
    if fixed is None and desc.physical_type != "BYTE_ARRAY":
        return None
    if fixed is not None and (fixed[0] != item or dt.kind not in fixed[1]):
        return None  # a view of another width or kind would be other numbers
    packed = fixed is not None
    little = dt.newbyteorder("<")
    views: list[np.ndarray] = []
    for g in row_groups:
        rg = metadata.row_group(g)
        chunk = rg.column(ci)
        if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page:
            return None
        i, end, rows = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size, 0
        if end > size:
            return None
        while i < end:
            start, i, n = _values_of_page(b, i, desc.max_definition_level)
            if n < 0 or i > end:
                return None
            if n == 0:
                continue
            if packed:
                if i - start != n * item:
                    return None  # nulls (no bytes in PLAIN), or a page that is not this column's
                views.append(np.ndarray((n,), little, buffer=buf, offset=start))
                rows += n
                continue
            span, rem = divmod(i - start, n)
            width = span - 4
            if rem or width <= 0 or width % item:
                return None  # values of different widths, or nulls (no bytes in PLAIN)
            lengths = np.ndarray((n,), np.dtype("<i4"), buffer=buf, offset=start, strides=(span,))
            if not bool(np.all(lengths == width)):
                return None
            views.append(np.ndarray((n, width // item), little, buffer=buf, offset=start + 4, strides=(span, item)))
            rows += n
        if rows != rg.num_rows:
            return None
    if len({v.shape[1:] for v in views}) > 1:
        return None
    for v in views:
        v.flags.writeable = False
    return views
