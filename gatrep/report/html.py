"""HTML building blocks of the report: escaping, number formats, cell shading, notes, and the page around it all."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_TEXT = 300  # characters of an error message or URI shown before it is cut


def esc(value: Any) -> str:
    """`value` as HTML-escaped text (quotes included, so it is safe in attributes); None becomes an em dash."""
    if value is None:
        return "\u2014"
    return html.escape(str(value), quote=True)


def cut(text: Any, limit: int = MAX_TEXT) -> str:
    """`text` as a string of at most `limit` characters (an ellipsis marks the cut); None becomes ''."""
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def num(value: Any, digits: int = 3) -> str:
    """A number for display: integers with thousands separators, floats with `digits` decimals, else an em dash."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return "\u2014" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return f"{float(value):.{digits}f}"
    return "\u2014"


def shade(value: float, rgb: tuple[int, int, int] = (37, 99, 235)) -> str:
    """An inline style shading a table cell by `value` in [0, 1] (clipped; NaN unshaded), with readable text."""
    if not math.isfinite(value):
        return ""
    alpha = min(max(value, 0.0), 1.0)
    colour = "#fff" if alpha > 0.7 else "#111"
    return f' style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f});color:{colour}"'


def heat(value: float) -> str:
    """An inline style colouring a score in [0, 1] from red (0) through yellow to green (1); NaN unshaded.
    Unlike `shade`, scores close to each other near 1 (F1 0.82 vs 0.97) still look different."""
    if not math.isfinite(value):
        return ""
    return f' style="background:hsl({min(max(value, 0.0), 1.0) * 120:.0f},70%,78%)"'


def not_run(stage_uri: str, job: str) -> str:
    """The note a section shows when its stage was never published."""
    return (f'<p class="notrun">Not run: <code>{esc(stage_uri)}</code> has no published stage '
            f"(run <code>python -m jobs.{esc(job)}</code>).</p>")


def failed(stage_uri: str, err: BaseException) -> str:
    """The note a section shows when its stage exists but could not be read."""
    return (f'<p class="failed">Could not read <code>{esc(stage_uri)}</code>: '
            f"{esc(cut(f'{type(err).__name__}: {err}'))}</p>")


def section(anchor: str, title: str, body: str) -> str:
    """One top-level section of the page."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def placeholder(label: str, px: int, title: str = "") -> str:
    """A labelled box the size of a thumbnail, standing in for an image that cannot be shown (never a broken img)."""
    return (f'<div class="ph" style="width:{px}px;height:{px}px" title="{esc(title or label)}">'
            f"<span>{esc(label)}</span></div>")


# ----------------------------------------------------------------------------------------------
# The page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;background:#f4f5f7}
header{background:#1f2937;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd5e1}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 24px;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#1d4ed8;text-decoration:none}
main{padding:8px 24px 40px;max-width:1500px}section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;
padding:6px 18px 16px;margin:14px 0}h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}
h3{font-size:15px;margin:10px 0 6px}h3 small{font-weight:normal;color:#555}h4{font-size:12px;margin:0 0 4px;color:#555;
font-weight:600}.cats{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:10px}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:6px 10px;margin:6px 0;background:#fcfcfd}
.card.wrong{border-left:4px solid #dc2626}.card.right{border-left:4px solid #16a34a}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:11px;color:#444;max-width:112px;overflow-wrap:anywhere}
figure img,.ph{display:block;margin:0 auto 2px;border:2px solid transparent;border-radius:3px;background:#eee}
figure.rep img{border-color:#1f2937}figure.hit img{border-color:#16a34a}figure.miss img{border-color:#dc2626}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;font-size:10px;color:#666;
background:repeating-linear-gradient(45deg,#eee,#eee 6px,#e3e3e3 6px,#e3e3e3 12px);border:1px dashed #aaa}
.ph span{padding:2px}.scores{min-width:230px}.bar{display:flex;align-items:center;gap:6px;font-size:12px}
.bar .name{width:90px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.bar .track{flex:1;height:8px;
background:#eee;border-radius:4px;min-width:80px}.bar .track span{display:block;height:8px;background:#93c5fd;
border-radius:4px}.bar.best .name{font-weight:700}.bar.best .track span{background:#2563eb}
.bar.truth .name{text-decoration:underline #16a34a 2px}.bar .v{width:52px;text-align:right}
table{border-collapse:collapse;margin:6px 0;font-size:12px}th,td{border:1px solid #e3e3e3;padding:3px 6px}
th{background:#f6f7f9;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.matrix td{min-width:30px}th.l{white-space:nowrap}.notrun,.failed,.empty{color:#666;font-style:italic}
.failed{color:#b91c1c}.legend{list-style:none;padding:0;margin:0;font-size:12px}.legend li{margin:2px 0}
.sw{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
svg.chart text{font-size:11px;fill:#444}.bad{display:flex;gap:10px;align-items:center;margin:6px 0}
.merge p{margin:2px 0;text-align:center;font-size:12px}.more{font-size:12px;color:#555}details{margin:8px 0}
summary{cursor:pointer;color:#1d4ed8}.cats figure:not(.rep){max-width:84px}.cats .strip{gap:4px}
.cats figure:not(.rep) img{width:80px;height:80px}.cats figure:not(.rep) .ph{width:80px!important;height:80px!important}
ul.notes{font-size:13px}footer{color:#777;font-size:12px;padding:0 24px 24px}
"""

# Counts failed resources and script errors (capture phase also sees <img> load errors) into data attributes,
# so a headless browser's --dump-dom can check the page; the page works the same without it.
HEAD_SCRIPT = ("window.addEventListener('error',function(){var d=document.documentElement;"
               "d.setAttribute('data-errors',String((+d.getAttribute('data-errors')||0)+1));},true);")
TAIL_SCRIPT = ("window.addEventListener('load',function(){var im=document.images,b=0;for(var i=0;i<im.length;i++)"
               "{if(!im[i].complete||im[i].naturalWidth===0)b++;}document.body.setAttribute('data-images',"
               "String(im.length));document.body.setAttribute('data-broken-images',String(b));});")
# Nothing outside the page may load: images are data URIs, style and script are inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def page(title: str, subtitle: str, body: str, nav: Sequence[tuple[str, str]] = ()) -> str:
    """The whole HTML document around `body`, with a link bar of (anchor, label) pairs; `title`, `subtitle` and
    the labels are plain text (escaped here)."""
    links = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
            f"<script>{HEAD_SCRIPT}</script><style>{CSS}</style></head>\n<body><header><h1>{esc(title)}</h1>"
            f"<p>{esc(subtitle)}</p></header><nav>{links}</nav><main>\n{body}\n</main>"
            f"<script>{TAIL_SCRIPT}</script></body></html>\n")
