"""The data explorer: one self-contained HTML page of what the curation did to the samples.

Written beside the report (``artifacts/reports/explorer.html``) by ``curation_report`` and
by ``curation explore``. Everything is inline (thumbnails and plots as ``data:`` URIs, no
scripts or styles fetched), so the file can be mailed or attached to a ticket. Sections:

* where the samples went: the waterfall of each stage's removals per recipe;
* concept clusters: thumbnail grids (most central, least central, random) with the cluster
  statistics and each recipe's kept count / keep fraction;
* SemDeDup: the removed fraction against eps, and the duplicate groups removed at one eps;
* per recipe: kept vs removed samples side by side, with the reason for each removal;
* quarantine: every reason with examples;
* sample lookup: click any thumbnail (or paste a uid) to see :func:`curation.evaluate.explain.explain`.

Every caption and string from the data is HTML-escaped; the embedded JSON has ``<``, ``>``
and ``&`` escaped so no caption can close the script element.
"""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

from curation.evaluate import views
from curation.evaluate.explain import explain, explain_cache
from curation.evaluate.figures import png_data_uri, removed_fraction_png, waterfall_png
from curation.storage.lake import Lake

log = logging.getLogger(__name__)

EXPLORER_FILE = "explorer.html"

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
figure.s{margin:0;width:108px;font-size:11px;cursor:pointer}
figure.s img,.ph{width:96px;height:96px;object-fit:contain;border:1px solid #ccc;background:#fff;display:block}
.ph{display:flex;align-items:center;justify-content:center;color:#a00;font-size:10px;text-align:center}
figcaption{overflow-wrap:anywhere}figcaption .cap{display:block;max-height:4.2em;overflow:hidden}
figcaption .note{display:block;font-weight:bold}
.cluster,.group,.recipe{border:1px solid #e3e3e3;border-radius:6px;padding:8px;margin:8px 0}
.row{display:flex;gap:10px;align-items:flex-start}.lbl{width:90px;font-size:12px;color:#555;flex:none}
.kept figure img{border:2px solid #2a2}.removed figure img{border:2px solid #c33}
.stats{font-size:12px;color:#333;margin-bottom:4px}
#explain{position:sticky;top:0;background:#fffbe6;border:1px solid #e6d27a;padding:8px;font-size:13px;white-space:pre-wrap;z-index:2}
nav a{margin-right:1em}
"""

_JS = """
const EX = JSON.parse(document.getElementById('explanations').textContent);
function fmt(v){return v===null||v===undefined?'-':(typeof v==='number'?(+v.toFixed(4)).toString():String(v));}
function show(uid){
  const e = EX[uid]; const box = document.getElementById('explain');
  if(!e){box.textContent = 'uid ' + uid + ' is not among the samples shown on this page: run `curation explain ' + uid + '`'; return;}
  const s = e.source || {}; const c = e.cluster || {};
  let t = 'sample ' + e.uid + '\\nsource   ' + fmt(s.dataset) + ' shard ' + fmt(s.shard) + ' key ' + fmt(s.key) +
          '\\ncaption  ' + fmt(s.caption) + '\\ncluster  ' + fmt(c.cluster_id) + ' (size ' + fmt(c.size) + ', complexity ' +
          fmt(c.complexity) + '), cos to centroid ' + fmt(c.cos_to_centroid) + '\\nSemDeDup M ' + fmt(e.M) + '   CLIP score ' + fmt(e.clip_score);
  for(const q of e.quarantine){ t += '\\nquarantine [' + q.stage + '] ' + q.reason + ': ' + q.detail; }
  for(const r of e.recipes){ t += '\\n' + (r.kept ? 'KEPT    ' : 'removed ') + r.recipe + ': ' + r.why; }
  box.textContent = t;
}
document.addEventListener('click', ev => { const f = ev.target.closest('[data-uid]'); if(f) show(f.dataset.uid); });
document.getElementById('lookup').addEventListener('change', ev => show(ev.target.value.trim().toLowerCase()));
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _sample(s: dict, note: str = "") -> str:
    cap = s.get("caption") or ""
    img = (
        f'<img src="{s["thumb"]}" alt="{_e(cap[:80])}" loading="lazy">'
        if s.get("thumb")
        else '<div class="ph">image does not decode</div>'
    )
    extra = f'<span class="note">{_e(note)}</span>' if note else ""
    return f'<figure class="s" data-uid="{_e(s.get("uid", ""))}" title="{_e(cap)}">{img}<figcaption><span class="cap">{_e(cap)}</span>{extra}</figcaption></figure>'


def _table(header: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_num(c) if isinstance(c, float) else c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_explorer(data: dict, explanations: dict[str, dict], title: str = "Data explorer", report_href: str | None = None) -> str:
    """The HTML page of :func:`gather` ``data`` (pure function of its inputs)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{_e(title)}</h1>")
    links = ["#waterfall", "#clusters", "#semdedup", "#recipes", "#quarantine"]
    parts.append("<nav>" + "".join(f'<a href="{h}">{h[1:]}</a>' for h in links) + (f'<a href="{_e(report_href)}">report</a>' if report_href else "") + "</nav>")
    parts.append('<p>Click a thumbnail, or paste a uid: <input id="lookup" size="36" placeholder="32-hex uid"></p><div id="explain">Click a thumbnail to see where the sample came from and what each recipe did with it.</div>')

    wf = data["waterfall"]
    parts.append('<h2 id="waterfall">Where the samples went</h2>')
    if wf:
        parts.append(f'<img class="plot" alt="waterfall" src="{png_data_uri(waterfall_png(wf))}">')
        parts.append(_table(["recipe", "seen", "quarantine", "SemDeDup", "pruning", "kept", "eps"],
                            [[r["recipe"], r["seen"], r["quarantine"], r["dedup"], r["pruning"], r["kept"], r["eps"]] for r in wf]))
    else:
        parts.append("<p>No recipe has run yet.</p>")

    parts.append('<h2 id="clusters">Concept clusters</h2><p>Most and least complex clusters: the most central members, the least central, and a random draw. Kept = samples each recipe keeps from the cluster (the DBP budget for dbp).</p>')
    for c in data["clusters"]:
        rec = "; ".join(f"{_e(r)}: {v['kept']} ({v['keep_fraction']:.0%})" for r, v in c["recipes"].items())
        parts.append(
            f'<div class="cluster" data-cluster="{c["cluster_id"]}"><div class="stats"><b>cluster {c["cluster_id"]}</b> '
            f"size {c['size']} &middot; d_intra {c['d_intra']:.3f} &middot; d_inter {c['d_inter']:.3f} &middot; "
            f"complexity {c['complexity']:.3f} &middot; weight {c['weight']:.3f}<br>kept per recipe: {rec or '-'}</div>"
        )
        for row, label in (("central", "most central"), ("peripheral", "least central"), ("random", "random")):
            parts.append(f'<div class="row"><div class="lbl">{label}</div><div class="grid">'
                         + "".join(_sample(s, f"cos {s['cos']:.3f}") for s in c[row]) + "</div></div>")
        parts.append("</div>")

    d = data["dedup"]
    parts.append(f'<h2 id="semdedup">SemDeDup</h2><p>{d["removed"]} of {d["n"]} samples are duplicates at eps={d["eps"]:g} (M &gt; {1 - d["eps"]:.3f}). Each group keeps its least prototypical member (green) and removes the near-copies (red, with the cosine to the kept one).</p>')
    if d["curve"]:
        parts.append(f'<img class="plot" alt="removed fraction vs eps" src="{png_data_uri(removed_fraction_png(d["curve"], d["eps"]))}">')
    for g in d["groups"]:
        parts.append(
            f'<div class="group"><div class="stats">cluster {g["cluster_id"]}: {g["n_removed"]} removed</div><div class="row">'
            f'<div class="kept">{_sample(g["kept"], "kept")}</div><div class="grid removed">'
            + "".join(_sample(s, f"cos {s['cos']:.3f}") for s in g["removed"]) + "</div></div></div>"
        )

    parts.append('<h2 id="recipes">Kept and removed, per recipe</h2>')
    for r in data["kept_removed"]:
        parts.append(
            f'<div class="recipe" data-recipe="{_e(r["recipe"])}"><div class="stats"><b>{_e(r["recipe"])}</b> ({_e(r["method"])}): '
            f"kept {r['n_kept']} of {r['n_pool']}</div><div class=\"row\"><div class=\"lbl\">kept</div><div class=\"grid kept\">"
            + "".join(_sample(s) for s in r["kept"])
            + '</div></div><div class="row"><div class="lbl">removed</div><div class="grid removed">'
            + ("".join(_sample(s, s["reason"]) for s in r["removed"]) or "<i>nothing removed</i>")
            + "</div></div></div>"
        )

    parts.append('<h2 id="quarantine">Quarantine</h2>')
    if not data["quarantine"]:
        parts.append("<p>No sample was quarantined.</p>")
    for q in data["quarantine"]:
        parts.append(f'<div class="group"><div class="stats"><b>{_e(q["reason"])}</b> ({_e(q["stage"])}): {q["count"]} samples</div><div class="grid">')
        for ex in q["examples"]:
            parts.append(_sample({"uid": "", "caption": f"{ex['shard']}/{ex['key']}: {ex['detail']}", "thumb": ex["thumb"]}))
        parts.append("</div></div>")

    blob = json.dumps(explanations, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    parts.append(f'<script type="application/json" id="explanations">{blob}</script><script>{_JS}</script></body></html>')
    return "\n".join(parts)


def gather(db: Lake, landing: str | os.PathLike, eps: float = views.DEFAULT_EPS, n_clusters: int = 8, per: int = 4,
           size: int = 96, seed: int = 0) -> dict:
    """Every view's data (bounded: ``n_clusters`` clusters, 6 groups, ``per`` samples per row)."""
    return {
        "waterfall": views.waterfall(db),
        "clusters": views.cluster_gallery(db, landing, n_clusters=n_clusters, per=per, size=size, seed=seed),
        "dedup": views.dedup_groups(db, landing, eps=eps, n_groups=6, per_group=per + 2, size=size),
        "kept_removed": views.kept_removed(db, landing, n=per + 2, size=size, seed=seed),
        "quarantine": views.quarantine_examples(db, landing, per_reason=per, size=size),
    }


def shown_uids(data: dict) -> list[str]:
    """The uids of every sample a page of ``data`` shows."""
    out: list[str] = []
    for c in data["clusters"]:
        out += [s["uid"] for row in ("central", "peripheral", "random") for s in c[row]]
    for g in data["dedup"]["groups"]:
        out += [g["kept"]["uid"]] + [s["uid"] for s in g["removed"]]
    for r in data["kept_removed"]:
        out += [s["uid"] for s in r["kept"] + r["removed"]]
    return list(dict.fromkeys(u for u in out if u))


def write_explorer(db: Lake, landing: str | os.PathLike, out_dir: str | os.PathLike, eps: float = views.DEFAULT_EPS,
                   seed: int = 0, title: str = "Data explorer") -> dict:
    """Write ``out_dir/explorer.html``.

    Returns:
        ``{"path": Path, "images": int (thumbnails embedded), "bytes": int, "data": dict}``.
    """
    data = gather(db, landing, eps=eps, seed=seed)
    uids = shown_uids(data)
    cache = explain_cache(db, uids)  # only the shown samples' rows
    explanations = {u: explain(db, u, cache) for u in uids}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "curation_report.html"
    text = render_explorer(data, explanations, title=title, report_href=report.name if report.exists() else None)
    path = out / EXPLORER_FILE
    path.write_text(text, encoding="utf-8")
    n_img = text.count('src="data:image/jpeg')
    log.info("wrote the data explorer (%d thumbnails, %d bytes) to %s", n_img, len(text), path)
    return {"path": path, "images": n_img, "bytes": len(text.encode()), "data": data}
