"""The Dagster metadata builders: markdown with embedded images, rounding, progress events."""

import math

import dagster as dg
import pytest

from assets import previews
from curation.engine.progress import report


def test_md_text_and_image_cannot_break_the_markdown():
    s = previews.md_text("a|b [x](javascript:alert(1)) <img src=x>\n_y_*z*", limit=200)
    assert "|" not in s.replace("\\|", "") and "[" not in s and "<" not in s and "\n" not in s
    img = previews.md_image("data:image/jpeg;base64,AAAA", alt="a ](evil) [b")
    assert img.startswith("![a") and img.endswith("(data:image/jpeg;base64,AAAA)") and img.count("](") == 1
    assert previews.md_image(None) == "_(does not decode)_"


def test_sample_table_has_images_over_captions():
    rows = [{"thumb": "data:image/jpeg;base64,AA", "caption": "cat", "cos": 0.5}, {"thumb": None, "caption": "dog", "cos": 0.25}]
    md = previews.md_sample_table(rows, note=lambda s: f"cos {s['cos']:.2f}", label="central")
    lines = md.splitlines()
    assert len(lines) == 3 and lines[0].count("![") == 1 and "does not decode" in lines[0]
    assert "cat — **cos 0.50**" in lines[2]


def test_rounded_keeps_types_and_rounds_floats():
    out = previews.rounded({"a": 0.29545454545454547, "b": 1234.56789, "c": 3, "d": True, "e": "x", "f": math.nan,
                            "g": dg.MetadataValue.md("m")})
    assert out["a"] == 0.2955 and out["b"] == 1234.568 and out["c"] == 3 and out["d"] is True and math.isnan(out["f"])
    assert isinstance(out["g"], dg.MetadataValue)


def test_png_metadata_is_markdown_with_a_data_uri():
    from curation.evaluate.figures import loss_curve_png

    out = previews.loss_plot({"seed 0": [{"samples_seen": 10, "loss": 3.0}, {"samples_seen": 20, "loss": 2.0}]})
    md = out["loss_plot"].value
    assert md.startswith("![training loss](data:image/png;base64,") and len(md) > 1000
    assert loss_curve_png({"s": [{"samples_seen": 1, "loss": 1.0}]})[:8] == b"\x89PNG\r\n\x1a\n"
    assert previews.loss_plot({}) == {}


def test_a_failing_preview_never_fails_the_asset(caplog):
    class Broken:
        def lake(self):
            raise RuntimeError("lake down")

    assert previews.waterfall(Broken()) == {}
    assert "preview waterfall failed" in caplog.text


def test_progress_becomes_run_log_lines_and_observations():
    @dg.asset
    def slow(context: dg.AssetExecutionContext):
        cb = previews.dagster_progress(context, "embed", min_interval_s=0.0)
        for step in (1, 2):
            report(cb, "embed", step, 2, 10 * step, float(step))

    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize([slow], instance=instance)
    obs = [e for e in res.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert len(obs) == 2
    md = obs[-1].event_specific_data.asset_observation.metadata
    assert md["step"].value == 2 and md["percent"].value == pytest.approx(100.0) and md["eta_s"].value == 0.0
    lines = [e.user_message for e in instance.all_logs(res.run_id) if "embed step" in (e.user_message or "")]
    assert lines == ["embed step 1/2 (50%), 10 samples, 10 samples/s, ETA 1 s", "embed step 2/2 (100%), 20 samples, 10 samples/s, ETA 0 s"]
