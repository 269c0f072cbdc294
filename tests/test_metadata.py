import polars as pl

from assets.metadata import md_table


def test_md_table_escapes_cuts_formats_and_counts_the_rest():
    df = pl.DataFrame({"a": [1.23456789, 2.0, 3.0], "b": ["x|y", "line\nbreak", "z" * 80]})
    out = md_table(df, max_rows=2, max_chars=10)
    lines = out.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2] == "| 1.235 | x\\|y |"
    assert lines[3] == "| 2 | line break |"
    assert out.endswith("_1 more rows_")
    full = md_table(df, max_rows=None, max_chars=10, float_fmt=".4f")
    assert "| 3.0000 | zzzzzzzzz… |" in full and "more rows" not in full
    assert md_table(df.head(0)) == "_no rows_"
