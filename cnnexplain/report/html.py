"""One self-contained HTML page: every image embedded as a data URI, every string from data
escaped, no scripts, no external resources."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#b9c0cc;font-size:13px}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:18px 0;padding:14px 20px}
h2{font-size:18px;margin:6px 0 12px} h3{font-size:15px;margin:16px 0 8px;color:#33415c}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}
th,td{border-bottom:1px solid #e3e6eb;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#eef1f5;text-align:center} td.t{text-align:left}
.sig{color:#0a7d32;font-weight:600} .ns{color:#8a94a6}
.v{font-size:13px;margin:3px 0} .v .ok{color:#0a7d32;font-weight:600} .v .bad{color:#b3261e;font-weight:600}
.v .na{color:#8a94a6;font-weight:600}
img{max-width:100%;border:1px solid #e3e6eb;border-radius:4px;margin:4px 0}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.muted{color:#6b7485;font-size:12px} nav a{color:#b9c0cc;margin-right:14px;font-size:13px}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def img(png: bytes | Path | None, alt: str) -> str:
    if png is None:
        return ""
    data = png.read_bytes() if isinstance(png, Path) else png
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def table(frame: pd.DataFrame | None, max_rows: int = 60, highlight_significant: bool = False) -> str:
    if frame is None or frame.empty:
        return ""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for _, r in frame.head(max_rows).iterrows():
        cells = []
        for c in frame.columns:
            v = r[c]
            cls = "t" if isinstance(v, str) else ""
            text = esc(fmt(v))
            if highlight_significant and c == "significant":
                sig = str(v).lower() in ("true", "1", "yes")
                text = '<span class="sig">&#10003; yes</span>' if sig else '<span class="ns">no</span>'
            cells.append(f'<td class="{cls}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (f'<p class="muted">{len(frame) - max_rows} more rows in the CSV</p>'
            if len(frame) > max_rows else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def section(anchor: str, title: str, body: str) -> str:
    if not body.strip():
        return ""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    kept = [(a, t, b) for a, t, b in sections if b.strip()]
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in kept)
    body = "".join(section(a, t, b) for a, t, b in kept)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p><nav>{nav}</nav></header>"
            f"<main>{body}</main></body></html>\n")


def verdicts(items, with_section: bool = False) -> str:
    """One line per check: what the user should see, and whether it was seen."""
    out = []
    for v in items:
        cls = {True: "ok", False: "bad", None: "na"}[v.seen]
        where = f"{esc(v.section)}, " if with_section else ""
        out.append(f'<p class="v"><span class="{cls}">{esc(v.mark)}</span> '
                   f"[{where}{esc(v.run)}] {esc(v.expect)} <span class=\"muted\">"
                   f"({esc(v.detail)})</span></p>")
    return "".join(out)
