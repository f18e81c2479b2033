"""report.html: the report as one self-contained file."""

from __future__ import annotations

from pathlib import Path


def to_html(markdown_text: str, folder: Path) -> str:
    """The same report as one self-contained HTML file (plots embedded), to open or mail."""
    import base64
    import re

    import markdown

    converter = markdown.Markdown(extensions=["tables", "fenced_code"])
    # HTML in the text (a class named after a folder can hold any) shows as text, never runs
    converter.preprocessors.deregister("html_block")
    for pattern in ("html", "autolink", "automail"):  # <a@b.c> and <http://...> in a name are no links either
        converter.inlinePatterns.deregister(pattern)
    body = converter.convert(markdown_text)

    def embed(match: re.Match) -> str:
        src = folder / match.group(2)
        if not src.is_file():
            return match.group(0)
        return f'{match.group(1)}"data:image/png;base64,{base64.b64encode(src.read_bytes()).decode()}"'

    # only the report's own images, by plain file name: text that reads src="..." (a class name) stays text
    body = re.sub(r'(<img [^>]*src=)"([^"/\\:]+\.png)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}code,pre{background:#f6f6f6}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>transferkit report</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
