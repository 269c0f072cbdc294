"""Small helpers that render asset metadata (shared by every asset module)."""

import polars as pl


def md_table(
    df: pl.DataFrame, max_rows: int | None = 10, max_chars: int = 60, float_fmt: str = ".4g"
) -> str:
    """A markdown table of the first ``max_rows`` rows of ``df`` (all rows with ``None``).

    Cells are cut to ``max_chars`` characters (with an ellipsis), pipes and newlines escaped,
    floats formatted with ``float_fmt``; a footer says how many rows were left out.
    """
    if df.height == 0:
        return "_no rows_"
    head = df if max_rows is None else df.head(max_rows)
    cols = head.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        cells = []
        for v in row:
            s = format(v, float_fmt) if isinstance(v, float) else str(v)
            s = s.replace("|", "\\|").replace("\n", " ")
            cells.append(s if len(s) <= max_chars else s[: max_chars - 1] + "…")
        lines.append("| " + " | ".join(cells) + " |")
    if head.height < df.height:
        lines.append(f"\n_{df.height - head.height} more rows_")
    return "\n".join(lines)
