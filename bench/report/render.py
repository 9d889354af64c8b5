"""Writing a report out: markdown (pipe tables, PNGs by relative path), one HTML file, and a CSV per table.

The HTML embeds its PNGs as data: URIs by default, so that the one file can be mailed or attached to a CI run;
``linked`` refers to them by relative path as the markdown does: a file a third the size that needs its folder.
The reports committed under report/ are linked: embedded, each plot was in the tree twice (once base64-inflated),
and the whole tree travels to the GPU machine under a 64 MiB cap."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd


@dataclass
class Table:
    slug: str  # file stem of its CSV
    title: str
    frame: pd.DataFrame
    warnings: list[str] = field(default_factory=list)  # shown right above the table (e.g. clocks differ)


@dataclass
class Plot:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    items: list[Table | Plot] = field(default_factory=list)


def write_csvs(sections: list[Section], out_dir: Path) -> None:
    for section in sections:
        for item in section.items:
            if isinstance(item, Table):
                item.frame.to_csv(out_dir / f"{item.slug}.csv", index=False)


def _md_cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")  # a pipe would end the cell on a code-hosting site


def to_markdown(title: str, intro: list[str], sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    lines += [p for text in intro for p in (text, "")]
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines += [p for text in section.notes for p in (text, "")]
        for item in section.items:
            if isinstance(item, Table):
                frame = item.frame.map(_md_cell)
                lines += [f"### {item.title}", ""]
                lines += [p for text in item.warnings for p in (f"> **{text}**", "")]
                lines += [frame.to_markdown(index=False), "",
                          f"CSV: [{item.slug}.csv]({item.slug}.csv)", ""]
            else:
                rel = item.path.relative_to(out_dir).as_posix()
                alt = item.caption.replace("[", "(").replace("]", ")")  # brackets would end the alt text
                lines += [f"![{alt}]({rel})", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0 1.5em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
p.note { color: #444; max-width: 70em; }
p.warn { color: #8a1c00; background: #fff3e0; border-left: 4px solid #e65100; padding: 0.3em 0.6em; max-width: 70em; }
"""


HtmlImages = Literal["embedded", "linked"]


def _img_tag(plot: Plot, out_dir: Path, images: HtmlImages) -> str:
    if images == "linked":
        src = html.escape(plot.path.relative_to(out_dir).as_posix())
    else:
        src = "data:image/png;base64," + base64.b64encode(plot.path.read_bytes()).decode()
    alt = html.escape(plot.caption)
    return f'<figure><img alt="{alt}" src="{src}"><figcaption>{alt}</figcaption></figure>'


def to_html(title: str, intro: list[str], sections: list[Section], out_dir: Path,
            images: HtmlImages = "embedded") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(text)}</p>" for text in intro]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p class='note'>{html.escape(text)}</p>" for text in section.notes]
        for item in section.items:
            if isinstance(item, Table):
                parts.append(f"<h3>{html.escape(item.title)}</h3>")
                parts += [f"<p class='warn'>{html.escape(text)}</p>" for text in item.warnings]
                parts.append(item.frame.to_html(index=False, border=0))
            else:
                parts.append(_img_tag(item, out_dir, images))
    parts.append("</body></html>")
    return "\n".join(parts)
