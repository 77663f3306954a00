"""One self-contained HTML page: inline CSS, figures as PNG data URLs, no script, nothing fetched."""

from __future__ import annotations

import base64
from html import escape

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 0 0 10px; }
.sub { color: #5f6368; margin-bottom: 18px; }
section { background: #fff; border: 1px solid #e3e5e8; border-radius: 8px; padding: 16px 20px; margin: 14px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 8px; }
th, td { border-bottom: 1px solid #eceef1; padding: 4px 10px; text-align: right; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; } td.text, th.text { text-align: left; }
tr.mark td { background: #eef6ee; font-weight: 600; }
figure { margin: 6px 0 10px; } figure img { max-width: 100%; height: auto; border: 1px solid #eceef1; }
figcaption { color: #5f6368; font-size: 12px; }
.warn { background: #fff7e0; border-left: 4px solid #e3a21a; padding: 6px 10px; margin: 4px 0; }
.ok { background: #eef6ee; border-left: 4px solid #3c9a3c; padding: 6px 10px; margin: 4px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px; }
.card { border: 1px solid #e3e5e8; border-radius: 6px; padding: 8px 10px; font-size: 12.5px; background: #fcfcfd; }
.card img { width: 96px; height: 96px; image-rendering: pixelated; object-fit: contain; display: block; margin-bottom: 6px; background: #000; }
.card .input { max-height: 9em; overflow: auto; white-space: pre-wrap; margin-bottom: 6px; font-family: Georgia, serif; }
.bad { color: #b3261e; } .good { color: #2e7d32; }
pre { background: #f3f4f6; padding: 10px; overflow: auto; font-size: 12px; max-height: 480px; }
"""


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body><main>\n"
            f'<h1>{escape(title)}</h1><div class="sub">{escape(subtitle)}</div>\n'
            + "\n".join(sections) + "\n</main></body></html>\n")  # fmt: skip


def section(title: str, *parts: str, anchor: str = "") -> str:
    identifier = f' id="{escape(anchor)}"' if anchor else ""
    return f"<section{identifier}><h2>{escape(title)}</h2>\n" + "\n".join(p for p in parts if p) + "\n</section>"


def figure(png: bytes, caption: str, name: str) -> str:
    """`name`: the figure's alt text and its data-figure attribute (what a test looks it up by)."""
    source = "data:image/png;base64," + base64.b64encode(png).decode()
    return (f'<figure data-figure="{escape(name)}"><img alt="{escape(name)}" src="{source}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")  # fmt: skip


def table(headers: list[str], rows: list[list], text_columns: int = 1, marked: set[int] = frozenset()) -> str:
    """Rows of cells (numbers formatted, everything escaped); the first `text_columns` columns left
    aligned; rows whose index is in `marked` highlighted."""

    text, mark = ' class="text"', ' class="mark"'
    head = "".join(f"<th{text if i < text_columns else ''}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join(f"<tr{mark if n in marked else ''}>"
                   + "".join(f"<td{text if i < text_columns else ''}>{escape(format_value(v))}</td>" for i, v in enumerate(row))
                   + "</tr>" for n, row in enumerate(rows))  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def format_value(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"  # parameter counts
    return str(value)


def notes(lines: list[str], kind: str = "warn") -> str:
    return "".join(f'<div class="{kind}">{escape(line)}</div>' for line in lines)


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def preformatted(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"
