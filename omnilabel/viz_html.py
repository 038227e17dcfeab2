"""Layouts of the overlays of an ``omnilabel visualize`` run: the GT | prediction pair, the contact sheet,
the static ``index.html``; and the atomic writes of its files.

The pair puts two images of one size side by side, ``GAP_PX`` apart, under a header strip with their
titles. The contact sheet is a grid of thumbnails (each fitted in a square, aspect kept) with a caption under
each; it is filled one image at a time, so only the sheet is held in memory.

The page is self-contained: inline CSS, no script, no network; every image is a relative link into the
output folder, every piece of text is HTML-escaped. With ground truth, the dataset's mean of per-image
mIoU heads the page and the cards are sorted worst mIoU first (unscored images last), so a reviewer
meets the failures first; without it they follow image id order.
"""

from __future__ import annotations

import functools
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from omnilabel.io import atomic_path

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #f4f4f4; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em 0; }
.summary { margin: 0 0 1.2em 0; color: #444; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 360px; }
.card img { max-width: 100%; height: auto; display: block; image-rendering: pixelated; }
.name { font-weight: 600; word-break: break-all; margin: .4em 0 .2em 0; }
.meta { font-size: .9em; color: #555; }
.miou { font-weight: 600; }
.bad { color: #b00020; }
.links a { margin-right: .8em; font-size: .9em; }
"""

#: Width (pixels) of the gap between the GT and the prediction halves of a compare image.
GAP_PX = 8
#: A per-image mIoU below this is shown in red.
LOW_MIOU = 0.5
#: Background of the contact sheet and of the compare images' header.
SHEET_BG_RGB = (40, 40, 40)


@functools.lru_cache(maxsize=8)
def sheet_font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size_px`` (a fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:
        return ImageFont.load_default()


def label_font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font of labels and titles on an image of this size: 10 px, growing beyond 600 px."""
    return sheet_font(max(10, round(max(height, width) / 60)))


class ContactSheet:
    """A grid of thumbnails with captions, filled one image at a time (only the sheet is held).

    Args:
        num_cells: thumbnails it will hold, ≥ 1.
        thumb_size_px: each thumbnail fits a square of this side, aspect kept.
    """

    def __init__(self, num_cells: int, *, thumb_size_px: int = 256) -> None:
        self.columns = max(1, min(num_cells, math.ceil(math.sqrt(num_cells))))
        rows = math.ceil(num_cells / self.columns)
        self.font = sheet_font(max(10, thumb_size_px // 20))
        self.thumb = thumb_size_px
        self.pad = 6
        self.caption_px = self.font.getbbox("Ag")[3] + 6
        self.cell = (thumb_size_px + 2 * self.pad, thumb_size_px + self.caption_px + 2 * self.pad)
        self.image = Image.new("RGB", (self.columns * self.cell[0], rows * self.cell[1]), SHEET_BG_RGB)
        self.count = 0

    def add(self, image_rgb: np.ndarray, caption: str) -> None:
        """Place the next thumbnail ((H, W, 3) uint8 RGB) and its caption."""
        row, col = divmod(self.count, self.columns)
        x0, y0 = col * self.cell[0] + self.pad, row * self.cell[1] + self.pad
        thumb = Image.fromarray(image_rgb)
        thumb.thumbnail((self.thumb, self.thumb), Image.Resampling.LANCZOS)
        self.image.paste(thumb, (x0 + (self.thumb - thumb.width) // 2, y0 + (self.thumb - thumb.height) // 2))
        draw = ImageDraw.Draw(self.image)
        draw.text((x0, y0 + self.thumb + 3), caption, fill=(255, 255, 255), font=self.font)
        self.count += 1


@dataclass(frozen=True)
class ImageReport:
    """What the page shows of one image.

    Attributes:
        image_id: COCO image id.
        file_name: the image's COCO ``file_name``, as written in the file.
        num_instances: annotations drawn on it (after ``--min-score``).
        class_counts: ``{category name: count}`` of those annotations, in first-seen order.
        overlay_png: the overlay, relative to the output folder (POSIX separators).
        miou: per-image mIoU in [0, 1] against ground truth; None without GT or with no GT mask.
        compare_png: the GT | prediction image, relative to the output folder, if written.
        uncertainty_png: the uncertainty heat map image, relative to the output folder, if written.
    """

    image_id: int
    file_name: str
    num_instances: int
    class_counts: dict[str, int] = field(default_factory=dict)
    overlay_png: str = ""
    miou: float | None = None
    compare_png: str | None = None
    uncertainty_png: str | None = None


def sort_worst_first(reports: Sequence[ImageReport]) -> list[ImageReport]:
    """Reports by ascending mIoU (ties by image id); those without an mIoU last, by image id."""
    return sorted(reports, key=lambda r: (r.miou is None, r.miou if r.miou is not None else 0.0, r.image_id))


def _href(rel_path: str) -> str:
    """An attribute-safe relative URL of a file under the output folder."""
    return html.escape(quote(rel_path, safe="/"), quote=True)


def _card(report: ImageReport, *, has_gt: bool) -> str:
    esc = html.escape
    classes = ", ".join(f"{esc(name)} ×{count}" for name, count in report.class_counts.items()) or "—"
    lines = [
        '<div class="card">',
        f'<a href="{_href(report.overlay_png)}"><img src="{_href(report.overlay_png)}" loading="lazy" '
        f'alt="{esc(report.file_name)}"></a>',
        f'<div class="name">{esc(report.file_name)}</div>',
        f'<div class="meta">image id {report.image_id} · {report.num_instances} instances</div>',
        f'<div class="meta">classes: {classes}</div>',
    ]
    if has_gt:
        if report.miou is None:
            lines.append('<div class="meta miou">mIoU n/a (no GT mask)</div>')
        else:
            bad = " bad" if report.miou < LOW_MIOU else ""
            lines.append(f'<div class="meta miou{bad}">mIoU {report.miou:.3f}</div>')
    links = [f'<a href="{_href(report.overlay_png)}">overlay</a>']
    if report.compare_png:
        links.append(f'<a href="{_href(report.compare_png)}">GT | pseudo</a>')
    if report.uncertainty_png:
        links.append(f'<a href="{_href(report.uncertainty_png)}">uncertainty</a>')
    lines.append(f'<div class="links">{"".join(links)}</div>')
    lines.append("</div>")
    return "\n".join(lines)


def render_index_html(reports: Sequence[ImageReport], *, title: str, has_gt: bool,
                      mean_miou: float | None = None, contact_sheet_png: str | None = None) -> str:
    """The whole page as a string.

    Args:
        reports: one per image, in image id order.
        title: the page heading (e.g. the COCO file's name); escaped here.
        has_gt: ground truth was given: show mIoU and sort worst first.
        mean_miou: the dataset's mean of per-image mIoU in [0, 1] (None: none scored).
        contact_sheet_png: the contact sheet, relative to the output folder, linked from the header.

    Returns:
        A complete HTML5 document.
    """
    ordered = sort_worst_first(reports) if has_gt else list(reports)
    esc = html.escape
    summary = [f"{len(ordered)} images", f"{sum(r.num_instances for r in ordered)} instances"]
    if has_gt:
        scored = sum(r.miou is not None for r in ordered)
        mean = "n/a" if mean_miou is None else f"{mean_miou:.3f}"
        summary.append(f'<span class="miou">mean mIoU {mean}</span> over {scored} images with GT masks '
                       "(worst first)")
    if contact_sheet_png:
        summary.append(f'<a href="{_href(contact_sheet_png)}">contact sheet</a>')
    body = "\n".join(_card(r, has_gt=has_gt) for r in ordered)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<p class=\"summary\">{' · '.join(summary)}</p>\n"
        f"<div class=\"grid\">\n{body}\n</div>\n</body>\n</html>\n"
    )


def side_by_side(left_rgb: np.ndarray, right_rgb: np.ndarray, *, titles: tuple[str, str],
                 gap_px: int = GAP_PX) -> np.ndarray:
    """Two images of one size side by side under a header strip holding their titles.

    Args:
        left_rgb: (H, W, 3) uint8 RGB.
        right_rgb: (H, W, 3) uint8 RGB.
        titles: text above each half.
        gap_px: dark gap between the halves.

    Returns:
        (header + H, 2W + gap_px, 3) uint8 RGB.

    Raises:
        ValueError: the images differ in shape.
    """
    if left_rgb.shape != right_rgb.shape:
        raise ValueError(f"side_by_side: expected two images of one shape, got {left_rgb.shape} and "
                         f"{right_rgb.shape}")
    height, width = left_rgb.shape[:2]
    font = label_font(height, width)
    header_px = font.getbbox("Ag")[3] + 8
    canvas = Image.new("RGB", (2 * width + gap_px, header_px + height), SHEET_BG_RGB)
    canvas.paste(Image.fromarray(left_rgb), (0, header_px))
    canvas.paste(Image.fromarray(right_rgb), (width + gap_px, header_px))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), titles[0], fill=(255, 255, 255), font=font)
    draw.text((width + gap_px + 4, 4), titles[1], fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``: a killed run leaves
    the old file or the new one, never a part (not fsynced: a power loss is not guarded against)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_png_atomic(image: np.ndarray | Image.Image, path: Path) -> None:
    """Encode an (H, W, 3) uint8 RGB array (or a PIL image) as PNG and write it atomically."""
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    write_bytes_atomic(buf.getvalue(), path)
