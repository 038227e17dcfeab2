"""Pictures of COCO instance masks for a person to review (``omnilabel visualize``).

Drawing conventions:

- Each instance of an image gets a colour of :data:`PALETTE_RGB` by its index among the image's drawn
  annotations (cycling after 12): its mask is alpha-blended in that colour, its 1-px boundary (mask
  pixels with a 4-neighbour outside the mask or the image) is drawn in the full colour. With ground truth,
  a pseudomask takes the colour of the GT instance its ``omnilabel.weak_id`` names, so the two sides of a
  compare image pair up by colour.
- The prompts that made a pseudomask (``ann["omnilabel"]["prompt"]``: ``point`` ``[x, y]``, ``bbox``
  ``[x, y, w, h]``, COCO pixel-edge coordinates) are drawn in the instance's colour: the point as a
  filled circle with a white ring (radius ``max(3, 1% of the longer image side)``), the box as a dashed
  outline. A weak annotation's own ``point`` or ``bbox`` (no segmentation) is drawn the same way; a
  malformed prompt is not drawn.
- Labels ``"class 0.93"`` (the score only when the annotation has one) sit just above the top-left
  corner of the instance's box (inside it when there is no room), white on a dark box outlined in the
  instance's colour, shifted to stay in the image. A tag (no geometry) is labelled in the image's
  top-left corner.

Labels and rings aside, pixels away from every mask, prompt and geometry are the input's, unchanged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from omnilabel.data.coco import (
    annotations_by_image,
    category_names,
    check_image_files,
    load_coco,
    resolve_image_path,
    validate_coco,
)
from omnilabel.data.images import read_image_rgb
from omnilabel.data.maps import max_uncertainty, uncertainty_map_paths
from omnilabel.errors import InputError
from omnilabel.eval.miou import image_miou
from omnilabel.events import OnEvent, emit
from omnilabel.io import read_json
from omnilabel.ops.masks import segmentation_to_rle
from omnilabel.viz_html import (
    ContactSheet,
    ImageReport,
    label_font,
    render_index_html,
    side_by_side,
    write_bytes_atomic,
    write_png_atomic,
)

#: Well separated hues (Trubetskoy's list of 20 distinct colours, first 12), cycled by instance index.
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128), (170, 110, 40), (128, 0, 0))
#: Weight of the heat map colour where the uncertainty is > 0.
HEAT_ALPHA = 0.6
_LABEL_BG_RGB = (24, 24, 24)
_TEXT_RGB = (255, 255, 255)
_DASH_PX, _DASH_GAP_PX = 4, 3


def instance_color(index: int) -> tuple[int, int, int]:
    """RGB colour of the ``index``-th instance of an image (cycles through :data:`PALETTE_RGB`)."""
    return PALETTE_RGB[index % len(PALETTE_RGB)]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _coords(value: Any, n: int) -> list[float] | None:
    """``value`` as ``n`` finite floats, or None."""
    if not isinstance(value, list | tuple) or len(value) != n or not all(_is_number(v) for v in value):
        return None
    return [float(v) for v in value]


def _prompts(ann: dict[str, Any]) -> tuple[list[float] | None, list[float] | None]:
    """``(point [x, y], bbox [x, y, w, h])`` to draw for one annotation (either may be None)."""
    info = ann.get("omnilabel")
    prompt = info.get("prompt") if isinstance(info, dict) else None
    if isinstance(prompt, dict):
        return _coords(prompt.get("point"), 2), _coords(prompt.get("bbox"), 4)
    if ann.get("segmentation") is None:
        return _coords(ann.get("point"), 2), _coords(ann.get("bbox"), 4)
    return None, None


def _box_pixels(bbox_xywh: list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Inclusive pixel rectangle ``(x0, y0, x1, y1)`` of a pixel-edge box, clipped to the image."""
    x, y, w, h = bbox_xywh
    x0 = min(max(int(math.floor(x)), 0), width - 1)
    y0 = min(max(int(math.floor(y)), 0), height - 1)
    x1 = min(max(int(math.ceil(x + w)) - 1, x0), width - 1)
    y1 = min(max(int(math.ceil(y + h)) - 1, y0), height - 1)
    return x0, y0, x1, y1


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], color: tuple[int, int, int],
                      width_px: int) -> None:
    x0, y0, x1, y1 = box
    step = _DASH_PX + _DASH_GAP_PX
    for x in range(x0, x1 + 1, step):
        end = min(x + _DASH_PX - 1, x1)
        draw.line([(x, y0), (end, y0)], fill=color, width=width_px)
        draw.line([(x, y1), (end, y1)], fill=color, width=width_px)
    for y in range(y0, y1 + 1, step):
        end = min(y + _DASH_PX - 1, y1)
        draw.line([(x0, y), (x0, end)], fill=color, width=width_px)
        draw.line([(x1, y), (x1, end)], fill=color, width=width_px)


def _draw_label(draw: ImageDraw.ImageDraw, text: str, anchor_xy: tuple[int, int], color: tuple[int, int, int],
                font: Any, *, inside: bool = False) -> None:
    """Text on a dark box just above ``anchor_xy`` (below it when ``inside`` or there is no room), kept
    inside the image."""
    width, height = draw.im.size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = anchor_xy
    if not inside and y - box_h >= 0:
        y -= box_h
    x = max(0, min(x, width - box_w))
    y = max(0, min(y, height - box_h))
    draw.rectangle([x, y, x + box_w - 1, y + box_h - 1], fill=_LABEL_BG_RGB, outline=color)
    draw.text((x + pad - left, y + pad - top), text, fill=_TEXT_RGB, font=font)


def _label_text(ann: dict[str, Any], category_names: dict[int, str]) -> str:
    name = category_names.get(ann.get("category_id"), f"class {ann.get('category_id')}")
    return f"{name} {ann['score']:.2f}" if _is_number(ann.get("score")) else name


def _boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of ``mask`` with a 4-neighbour outside it (or outside the image)."""
    m = np.pad(mask, 1)
    interior = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of any COCO segmentation (polygons, RLE, compressed RLE)."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)


def draw_overlay(image_rgb: np.ndarray, anns: Sequence[dict[str, Any]], *, category_names: dict[int, str],
                 alpha: float = 0.45, color_indices: Sequence[int] | None = None) -> np.ndarray:
    """Draw the annotations of one image on it (see the module docstring).

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        anns: COCO annotations of this image; their order gives the colours.
        category_names: ``{category_id: name}`` for the labels.
        alpha: weight of the instance colour in the mask fill, in [0, 1].
        color_indices: one palette index per annotation [default: its position in ``anns``].

    Returns:
        (H, W, 3) uint8 RGB, a new array.
    """
    height, width = image_rgb.shape[:2]
    colors = [instance_color(c) for c in (color_indices if color_indices is not None else range(len(anns)))]
    if len(colors) != len(anns):
        raise ValueError(f"color_indices: expected {len(anns)} entries, got {len(colors)}")
    out = image_rgb.astype(np.float32)
    boundaries: list[tuple[tuple[np.ndarray, ...], tuple[int, int, int]]] = []  # pixel indices, colour
    anchors: list[tuple[int, int, bool] | None] = []  # per annotation: label corner (x, y, inside) or None
    for i, ann in enumerate(anns):
        color, anchor = colors[i], None
        if ann.get("segmentation") is not None:
            mask = decode_segmentation(ann["segmentation"], height, width)
            if mask.any():
                out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
                boundaries.append((np.nonzero(_boundary(mask)), color))
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                anchor = (int(cols[0]), int(rows[0]), False)
        anchors.append(anchor)
    canvas = np.rint(out).astype(np.uint8)
    for pixels, color in boundaries:
        canvas[pixels] = color
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    line_px = max(1, round(max(height, width) / 400))
    radius_px = max(3, round(0.01 * max(height, width)))
    points: list[tuple[int, int, tuple[int, int, int]]] = []
    for i, ann in enumerate(anns):
        point, bbox = _prompts(ann)
        if bbox is not None:
            box = _box_pixels(bbox, height, width)
            _dashed_rectangle(draw, box, colors[i], line_px)
            anchors[i] = anchors[i] or (box[0], box[1], False)
        if point is not None:
            cx = min(max(int(math.floor(point[0])), 0), width - 1)
            cy = min(max(int(math.floor(point[1])), 0), height - 1)
            points.append((cx, cy, colors[i]))
            anchors[i] = anchors[i] or (cx, cy + radius_px + 1, True)
    font = label_font(height, width)
    tag_y = 0
    for i, ann in enumerate(anns):
        text = _label_text(ann, category_names)
        if anchors[i] is None:  # a tag: stacked in the top-left corner
            _draw_label(draw, text, (0, tag_y), colors[i], font, inside=True)
            tag_y += draw.textbbox((0, 0), text, font=font)[3] + 5
        else:
            x, y, inside = anchors[i]
            _draw_label(draw, text, (x, y), colors[i], font, inside=inside)
    # Points last: a label must not hide the click that made the mask.
    ring_px = max(1, radius_px // 3)
    for cx, cy, color in points:
        draw.ellipse([cx - radius_px, cy - radius_px, cx + radius_px, cy + radius_px], fill=color,
                     outline=_TEXT_RGB, width=ring_px)
    return np.asarray(img, dtype=np.uint8).copy()


def overlay_heatmap(image_rgb: np.ndarray, uncertainty: np.ndarray, *, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """Blend an inferno heat map of ``uncertainty`` over the image where it is > 0.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        uncertainty: (H, W) float in [0, 1] (see ``omnilabel.data.maps``).
        alpha: weight of the heat colour, in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB; pixels where ``uncertainty == 0`` are the input's.

    Raises:
        ValueError: the map's shape is not the image's (H, W).
    """
    u = np.asarray(uncertainty, dtype=np.float32)
    if u.shape != image_rgb.shape[:2]:
        raise ValueError(f"uncertainty: expected shape {image_rgb.shape[:2]}, got {u.shape}")
    heat_bgr = cv2.applyColorMap(np.rint(np.clip(u, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    hot = u > 0
    out = image_rgb.copy()
    blended = (1.0 - alpha) * image_rgb[hot].astype(np.float32) + alpha * heat_bgr[..., ::-1][hot]
    out[hot] = np.rint(blended).astype(np.uint8)
    return out


# -- the visualize command -------------------------------------------------------------------------


@dataclass(frozen=True)
class VizConfig:
    """Settings of :func:`visualize` (defaults are the command line's).

    Raises:
        InputError: a value is out of range (the message names the flag).
    """

    min_score: float = 0.0  # annotations scoring lower are neither drawn nor scored; unscored ones always are
    max_images: int | None = None  # the first N images by id; None: all
    alpha: float = 0.45  # weight of the instance colour in a mask's fill
    thumb_size_px: int = 256  # contact sheet thumbnails fit this square
    uncertainty: bool = False  # also write uncertainty/ heat maps
    html: bool = False  # also write index.html

    def __post_init__(self) -> None:
        problems = []
        if not math.isfinite(self.min_score):
            problems.append(f"--min-score: expected a finite number, got {self.min_score}")
        if self.max_images is not None and self.max_images < 1:
            problems.append(f"--max-images: expected ≥ 1, got {self.max_images}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--alpha: expected a value in [0, 1], got {self.alpha}")
        if not 16 <= self.thumb_size_px <= 4096:
            problems.append(f"--thumb-size: expected 16 to 4096 pixels, got {self.thumb_size_px}")
        if problems:
            raise InputError("visualize: bad settings", problems)


#: The contact sheet shows at most this many images (the first ones by id).
CONTACT_SHEET_MAX_IMAGES = 100
_MAX_LISTED = 50


def _error(head: str, problems: list[str]) -> InputError:
    more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
    return InputError(head, problems[:_MAX_LISTED] + more)


def _load_predictions(path: Path, gt: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """The COCO dict to draw and whether the file was a results list (images and categories from ``gt``)."""
    raw = read_json(path)
    if isinstance(raw, list):
        if gt is None:
            raise InputError(f"{path}: a COCO results list names no images or categories; pass --gt GT.json "
                             "to take them from the ground truth")
        anns = [{**r, "id": i + 1} if isinstance(r, dict) else r for i, r in enumerate(raw)]
        data = {"images": gt["images"], "categories": gt["categories"], "annotations": anns}
        what = "COCO results list (annotation id=N is its N-th entry, from 1)"
    elif isinstance(raw, dict):
        data, what = raw, "COCO file"
    else:
        raise InputError(f"{path}: expected a COCO file or a COCO results list, got {type(raw).__name__}")
    problems = validate_coco(data, source=str(path), allow_outside_images=True) or [
        f"{path}: annotation id={a['id']}: score: expected a finite number, got {a['score']!r}"
        for a in data["annotations"] if "score" in a and not _is_number(a["score"])]
    if problems:
        raise _error(f"{path}: {len(problems)} problem(s) in {what}", problems)
    return data, isinstance(raw, list)


def _gt_problems(images: list[dict[str, Any]], gt: dict[str, Any], gt_path: Path) -> list[str]:
    gt_images = {img["id"]: img for img in gt["images"]}
    problems = []
    for img in images:
        ref = gt_images.get(img["id"])
        if ref is None:
            problems.append(f"{gt_path}: image id={img['id']}: missing (the predictions' {img['file_name']!r})")
        elif (ref["height"], ref["width"]) != (img["height"], img["width"]):
            problems.append(f"{gt_path}: image id={img['id']}: height, width: {ref['width']}x{ref['height']} in "
                            f"the ground truth, {img['width']}x{img['height']} in the predictions")
    return problems


def _colors_like_gt(anns: Sequence[dict[str, Any]], gt_anns: Sequence[dict[str, Any]]) -> list[int]:
    """Palette indices that give a pseudomask the colour of the GT instance its ``omnilabel.weak_id`` names
    (GT annotations are coloured by their position); the others take the indices after the GT's."""
    gt_index = {a.get("id"): i for i, a in enumerate(gt_anns)}
    spare = iter(range(len(gt_anns), len(gt_anns) + len(anns)))
    out = []
    for ann in anns:
        info = ann.get("omnilabel")
        weak_id = info.get("weak_id") if isinstance(info, dict) else None
        out.append(gt_index[weak_id] if weak_id in gt_index else next(spare))
    return out


def _output_name(img: dict[str, Any]) -> str:
    """``<id>_<stem>.png`` with the stem reduced to portable file-name characters."""
    stem = re.sub(r"[^\w.-]+", "_", PurePath(img["file_name"].replace("\\", "/")).stem).strip("._") or "image"
    return f"{img['id']}_{stem}.png"


def visualize(coco_path: str | Path, *, output_dir: str | Path, images_dir: str | Path | None = None,
              gt_path: str | Path | None = None, config: VizConfig | None = None,
              on_event: OnEvent | None = None) -> dict[str, Any]:
    """Draw a COCO file's masks, prompts and labels on its images, for a person to review.

    Writes into ``output_dir``: ``images/<id>_<stem>.png`` (each image with its annotations, at the input
    size); with ``gt_path``, ``compare/<id>_<stem>.png`` (GT | prediction under a header with the image's
    mIoU, see :func:`omnilabel.eval.miou.image_miou`); with ``config.uncertainty``,
    ``uncertainty/<id>_<stem>.png`` (the overlay under a heat map of the pixel-wise max of its annotations'
    uncertainty maps, for images with a map); ``contact_sheet.png`` (the first ``CONTACT_SHEET_MAX_IMAGES``
    images); with ``config.html``, ``index.html``. Everything is checked (files, ids, images, map paths)
    before anything is written; each file is written atomically; images are processed one at a time.

    Args:
        coco_path: a complete COCO file (pseudomasks, ground truth, weak labels), or a COCO results list
            (``omnilabel predict`` output), which needs ``gt_path`` for its images and categories.
        output_dir: folder to write into (created; files of an earlier run are overwritten).
        images_dir: folder of the images [default: the folder of the file that lists them].
        gt_path: ground-truth COCO file; every drawn image id must be in it with the same size (its other
            images are ignored).
        config: the settings (:class:`VizConfig`).
        on_event: gets a ``progress`` event (images done, total) after each image.

    Returns:
        ``{"output_dir", "images", "compare", "uncertainty"`` (counts of images written)``,
        "contact_sheet", "contact_sheet_images", "contact_sheet_capped", "html"`` (path or None)``,
        "mean_miou"`` (mean of per-image mIoU over images with GT masks, or None)``, "scored_images"}``.

    Raises:
        InputError: a file is unreadable or invalid, a results list comes without GT, an image is missing
            or undecodable (its id and file named), an id is missing from the GT, ``config.uncertainty``
            is set but no annotation names a map, or a map is missing or unreadable (its annotation named).
    """
    config = config or VizConfig()
    coco_path, output_dir = Path(coco_path), Path(output_dir)
    gt = load_coco(gt_path, allow_outside_images=True) if gt_path is not None else None
    data, is_results = _load_predictions(coco_path, gt)
    images = sorted(data["images"], key=lambda img: img["id"])[: config.max_images]
    if not images:
        raise InputError(f"{coco_path}: no images to draw")
    if gt is not None and (problems := _gt_problems(images, gt, Path(gt_path))):
        raise _error(f"{gt_path}: does not hold the images of {coco_path}", problems)
    listed_by = Path(gt_path) if is_results else coco_path
    images_dir = Path(images_dir) if images_dir is not None else listed_by.parent
    by_image = annotations_by_image(data)
    kept = {img["id"]: [a for a in by_image[img["id"]]
                        if not (_is_number(a.get("score")) and a["score"] < config.min_score)] for img in images}
    if problems := check_image_files({"images": images}, images_dir, allow_outside_images=True):
        raise _error(f"{listed_by}: {len(problems)} image problem(s) (images in {images_dir}); nothing written",
                     problems)
    map_paths: dict[int, Path] = {}
    if config.uncertainty:
        map_paths = uncertainty_map_paths((a for anns in kept.values() for a in anns), base_dir=coco_path.parent)
        if not map_paths:
            raise InputError(f"{coco_path}: --uncertainty: no drawn annotation names an uncertainty map "
                             "(omnilabel.uncertainty, written by `omnilabel uncertainty`)")

    names, gt_names = category_names(data), category_names(gt) if gt is not None else {}
    gt_by_image = annotations_by_image(gt) if gt is not None else {}
    pred_title = "prediction" if is_results else "pseudo"
    subdirs = ["images"] + (["compare"] if gt is not None else []) + (["uncertainty"] if config.uncertainty else [])
    for sub in subdirs:
        (output_dir / sub).mkdir(parents=True, exist_ok=True)
    sheet = ContactSheet(min(len(images), CONTACT_SHEET_MAX_IMAGES), thumb_size_px=config.thumb_size_px)
    reports: list[ImageReport] = []
    for done, img in enumerate(images, start=1):
        name, anns = _output_name(img), kept[img["id"]]
        rgb = read_image_rgb(resolve_image_path(images_dir, img["file_name"], allow_outside_images=True))
        gt_anns = gt_by_image.get(img["id"], [])
        overlay = draw_overlay(rgb, anns, category_names=names, alpha=config.alpha,
                               color_indices=_colors_like_gt(anns, gt_anns))
        write_png_atomic(overlay, output_dir / "images" / name)
        shown, miou, compare_png, uncertainty_png = overlay, None, None, None
        if gt is not None:
            miou = image_miou(anns, gt_anns, image=img)
            gt_overlay = draw_overlay(rgb, gt_anns, category_names=gt_names, alpha=config.alpha)
            score = "n/a" if miou is None else f"{miou:.2f}"
            shown = side_by_side(gt_overlay, overlay, titles=("GT", f"{pred_title}  mIoU {score}"))
            compare_png = f"compare/{name}"
            write_png_atomic(shown, output_dir / compare_png)
        if config.uncertainty and (peak := max_uncertainty(anns, map_paths, size_hw=rgb.shape[:2])) is not None:
            uncertainty_png = f"uncertainty/{name}"
            write_png_atomic(overlay_heatmap(overlay, peak), output_dir / uncertainty_png)
        if sheet.count < CONTACT_SHEET_MAX_IMAGES:
            caption = f"#{img['id']}  {len(anns)} inst" + ("" if gt is None else f"  mIoU {score}")
            sheet.add(shown, caption)
        reports.append(ImageReport(
            image_id=img["id"], file_name=img["file_name"], num_instances=len(anns),
            class_counts=dict(Counter(names.get(a["category_id"], str(a["category_id"])) for a in anns)),
            overlay_png=f"images/{name}", miou=miou, compare_png=compare_png, uncertainty_png=uncertainty_png))
        emit(on_event, "progress", done=done, total=len(images), unit="images")

    write_png_atomic(sheet.image, output_dir / "contact_sheet.png")
    scored = [r.miou for r in reports if r.miou is not None]
    mean_miou = float(np.mean(scored)) if scored else None
    html_path = None
    if config.html:
        html_path = output_dir / "index.html"
        page = render_index_html(reports, title=coco_path.name, has_gt=gt is not None, mean_miou=mean_miou,
                                 contact_sheet_png="contact_sheet.png")
        write_bytes_atomic(page.encode("utf-8"), html_path)
    return {"output_dir": str(output_dir), "images": len(reports),
            "compare": sum(r.compare_png is not None for r in reports),
            "uncertainty": sum(r.uncertainty_png is not None for r in reports),
            "contact_sheet": str(output_dir / "contact_sheet.png"), "contact_sheet_images": sheet.count,
            "contact_sheet_capped": len(reports) > sheet.count,
            "html": str(html_path) if html_path is not None else None,
            "mean_miou": mean_miou, "scored_images": len(scored)}
