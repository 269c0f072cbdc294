"""Small helpers that render asset metadata (shared by every asset module)."""

import re

import polars as pl

# markdown punctuation (CommonMark + GFM: emphasis, links, images, code, headings, tables,
# strikethrough, autolinks via "http:" / "www.") -> backslash-escaped
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def md_escape(text: object) -> str:
    """``text`` as literal, inert markdown table-cell content.

    HTML's special characters become entities (no raw HTML: no ``<script>``, ``<img
    src=...>`` or ``<a>``), every markdown punctuation character is backslash-escaped (no
    links, images, emphasis, headings, code spans, table cells or autolinks from data), line
    breaks become spaces and other control characters are dropped. Captions are data written
    by strangers; this is the only way they enter Dagster's markdown metadata.
    """
    s = _CONTROL.sub("", str(text)).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def md_table(
    df: pl.DataFrame, max_rows: int | None = 10, max_chars: int = 60, float_fmt: str = ".4g"
) -> str:
    """A markdown table of the first ``max_rows`` rows of ``df`` (all rows with ``None``).

    Text cells are cut to ``max_chars`` characters (with an ellipsis) and then escaped
    (:func:`md_escape`: no HTML, links, images or markup from data); numbers are formatted
    (floats with ``float_fmt``); a footer says how many rows were left out.
    """
    if df.height == 0:
        return "_no rows_"
    head = df if max_rows is None else df.head(max_rows)
    cols = head.columns
    lines = ["| " + " | ".join(md_escape(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, bool) or v is None:
                cells.append(str(v))
                continue
            if isinstance(v, float):
                cells.append(format(v, float_fmt))
                continue
            if isinstance(v, int):
                cells.append(str(v))
                continue
            s = str(v).replace("\r\n", " ").replace("\n", " ")
            s = s if len(s) <= max_chars else s[: max_chars - 1] + "…"
            cells.append(md_escape(s))
        lines.append("| " + " | ".join(cells) + " |")
    if head.height < df.height:
        lines.append(f"\n_{df.height - head.height} more rows_")
    return "\n".join(lines)
