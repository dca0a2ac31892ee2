"""A tiny document model rendered twice: markdown (images as files beside it) and self-contained HTML.

The report is built once as a list of sections made of blocks; `to_markdown` and `to_html` walk the
same list, so the two files always say the same thing. The HTML carries its CSS inline and its images as
base64 `data:` URIs, so it opens anywhere without the run folder. Standard library only.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Union

from lmsmith.report.tables import Table


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    filename: str  # beside report.md
    caption: str
    png: bytes


@dataclass
class Preformatted:
    text: str


Block = Union[Paragraph, Bullets, Image, Preformatted, Table]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    @property
    def images(self) -> list[Image]:
        return [block for s in self.sections for block in s.blocks if isinstance(block, Image)]

    def to_markdown(self) -> str:
        parts = [f"# {self.title}"]
        if self.subtitle:
            parts.append(self.subtitle)
        for section in self.sections:
            parts.append(f"## {section.title}")
            parts.extend(_block_markdown(block) for block in section.blocks)
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        if self.subtitle:
            body.append(f'<p class="subtitle">{html.escape(self.subtitle)}</p>')
        for section in self.sections:
            body.append(f"<section><h2>{html.escape(section.title)}</h2>")
            body.extend(_block_html(block) for block in section.blocks)
            body.append("</section>")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>"
            "<body><main>" + "\n".join(body) + "</main></body></html>\n"
        )


def _block_markdown(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Image):
        return f"![{block.caption}]({block.filename})"
    if isinstance(block, Preformatted):
        return "```\n" + block.text + "\n```"
    return block.to_markdown()


def _block_html(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
        )
    if isinstance(block, Preformatted):
        return f"<pre>{html.escape(block.text)}</pre>"
    return block.to_html()


_CSS = """
body { font-family: -apple-system, "Segoe UI", "Noto Sans", "PingFang SC", sans-serif; color: #1f2328;
       background: #f6f8fa; margin: 0; }
main { max-width: 980px; margin: 0 auto; padding: 24px 32px; background: #fff; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: 8px; }
h2 { margin-top: 32px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.subtitle { color: #57606a; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; vertical-align: top; }
table.numeric td:not(:first-child) { text-align: right; }
th { background: #f0f3f6; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 12px 0; }
img { max-width: 100%; }
figcaption { color: #57606a; font-size: 13px; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; }
""".strip()
