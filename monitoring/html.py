"""The report page as HTML, for MLflow's artifact viewer: the markdown page's own subset (headings, paragraphs, bold
lines, lists, pipe tables, inline code, images) turned into one self-contained file.

MLflow shows an HTML artifact from a ``blob:`` URL in a sandboxed frame, where a relative ``<img src="figure.png">``
resolves to nothing: each figure is embedded as a ``data:`` URI, and its file, which sits beside the page, is named
in the tag's ``data-file`` and caption.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}img{max-width:100%}figure{margin:0.5em 0 1.5em}figcaption{color:#666;font-size:0.9em}"
    "code{background:#f3f3f3;padding:0 3px}"
)


def _inline(text: str) -> str:
    return _BOLD.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", html.escape(text, quote=False)))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, *body = [line for line in lines if not re.fullmatch(r"\|[-:| ]+\|", line.strip())]
    rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in _cells(head)) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in body]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _figure(alt: str, src: str, folder: Path) -> str:
    data = base64.b64encode((folder / src).read_bytes()).decode()
    name = html.escape(src)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}">'
        f"<figcaption>{html.escape(alt)} ({name})</figcaption></figure>"
    )


def _block(block: list[str], folder: Path) -> str:
    first = block[0]
    if first.startswith("#"):
        level = len(first) - len(first.lstrip("#"))
        return f"<h{level}>{_inline(first[level:].strip())}</h{level}>"
    if (image := _IMAGE.match(first.strip())) is not None:
        return _figure(image["alt"], image["src"], folder)
    if first.startswith("|"):
        return _table(block)
    if first.startswith("- "):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in block) + "</ul>"
    return f"<p>{_inline(' '.join(block))}</p>"


def _blocks(markdown: str) -> list[list[str]]:
    """Consecutive lines of one kind: a heading or an image alone, a table's or a list's lines, a paragraph."""
    blocks: list[list[str]] = []
    for line in markdown.splitlines():
        if not line.strip():
            blocks.append([])
            continue
        alone = line.startswith("#") or _IMAGE.match(line.strip()) is not None
        kind = line[:1] if line[:1] in "|-" else ""
        if alone or not blocks or not blocks[-1] or (blocks[-1][-1][:1] in "|-") != (kind != ""):
            blocks.append([line])
        else:
            blocks[-1].append(line)
        if alone:
            blocks.append([])
    return [b for b in blocks if b]


def markdown_page_html(markdown: str, *, title: str, folder: Path) -> str:
    """The HTML page of ``markdown`` (the report's own markdown), its images read from ``folder`` and embedded."""
    body = "\n".join(_block(b, folder) for b in _blocks(markdown))
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
