"""The curation gallery: one HTML page of thumbnails — the most and the least unique rows, the
first rows selected to label, and the labels cleanlab suspects — under ``<out_dir>/gallery/``.

Each thumbnail is the row's image (read as the flows read images: a path, a URL, a bucket or a
``block://`` reference) shrunk to `THUMBNAIL_SIZE` and written whole; an image that cannot be read
shows its reference instead. The page is written last.
"""

from __future__ import annotations

import hashlib
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

from .._steps.sources import read_bytes
from .._storage.access import join
from .._storage.publish import write_output

__all__ = ["GALLERY_ROWS", "GalleryItem", "write_gallery"]

#: Rows per section, by default.
GALLERY_ROWS = 24
THUMBNAIL_SIZE = (192, 192)


@dataclass(frozen=True)
class GalleryItem:
    """One tile: the image and its caption."""

    image_ref: str
    caption: str


def _thumbnail(ref: str) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(read_bytes(ref, "image"))) as image:
            image.thumbnail(THUMBNAIL_SIZE)
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=80)
            return out.getvalue()
    except Exception:  # a missing, remote-only or broken image shows its reference
        return None


def write_gallery(folder: str, sections: Sequence[tuple[str, Sequence[GalleryItem]]], title: str) -> str:
    """Write the thumbnails and ``index.html`` under ``folder``; the page's location."""
    written: dict[str, str | None] = {}
    for _, items in sections:
        for item in items:
            if item.image_ref in written:
                continue
            thumb = _thumbnail(item.image_ref)
            name = f"thumbs/{hashlib.sha256(item.image_ref.encode()).hexdigest()[:16]}.jpg"
            if thumb is not None:
                write_output(join(folder, name), thumb)
            written[item.image_ref] = name if thumb is not None else None
    esc = html.escape
    parts = []
    for heading, items in sections:
        tiles = "".join(
            "<figure>"
            + (
                f'<img src="{esc(src)}" alt="">'
                if (src := written[i.image_ref])
                else '<div class="missing">no preview</div>'
            )
            + f"<figcaption>{esc(i.caption)}<br><code>{esc(i.image_ref)}</code></figcaption></figure>"
            for i in items
        )
        parts.append(f'<h2>{esc(heading)} ({len(items)})</h2><div class="grid">{tiles or "<p>none</p>"}</div>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .grid{{display:flex;flex-wrap:wrap;gap:10px}}
figure{{margin:0;width:{THUMBNAIL_SIZE[0]}px;font-size:12px}} img{{max-width:100%;border:1px solid #999}}
code{{word-break:break-all}}
.missing{{height:120px;background:#eee;display:flex;align-items:center;justify-content:center}}</style>
</head><body><h1>{esc(title)}</h1>{"".join(parts)}</body></html>
"""
    location = join(folder, "index.html")
    write_output(location, page.encode())
    return location
