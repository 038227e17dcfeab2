"""``Instances``: the one typed container every stage of omnilabel takes and returns.

All fields are per instance and have the same length N. Masks are held either as an (N, H, W) bool
array or as N compressed COCO RLE dicts; ``masks_bool()`` and ``masks_rle()`` convert on demand. Only
numpy arrays and plain Python objects are stored, so an ``Instances`` pickles cheaply across processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnilabel.ops.boxes import box_xywh_to_xyxy, box_xyxy_to_xywh, masks_to_boxes_xyxy
from omnilabel.ops.masks import masks_to_rle, rle_area, rle_to_bbox_xywh, rle_to_masks, segmentation_to_rle

#: ``weak_ids`` value for an instance that came from no input annotation (a detection).
NO_WEAK_ID = -1


def _column(values: Any, n: int, dtype: Any, width: int | None, name: str, fill: float) -> np.ndarray:
    """Validate or create one per-instance column; ``width`` None for a 1-D column."""
    shape = (n,) if width is None else (n, width)
    if values is None:
        return np.full(shape, fill, dtype=dtype)
    arr = np.asarray(values, dtype=dtype)
    if arr.size == 0 and n == 0:
        return arr.reshape(shape)
    if arr.shape != shape:
        raise ValueError(f"Instances.{name}: expected shape {shape}, got {arr.shape}")
    return arr


@dataclass
class Instances:
    """Instances of one image.

    Attributes:
        image_size: ``(H, W)`` in pixels.
        boxes_xyxy: (N, 4) float64, pixels.
        masks: (N, H, W) bool, or a list of N COCO RLE dicts, or None (boxes/points only).
        scores: (N,) float64 in [0, 1] (1.0 where no model scored the instance).
        category_ids: (N,) int64 COCO category ids (-1 when unknown).
        points_xy: (N, 2) float64 pixel coordinates of one click; NaN where an instance has none.
        weak_ids: (N,) int64 id of the input annotation an instance came from (``NO_WEAK_ID`` if none).
        data: extra per-instance columns (arrays or lists of length N), e.g. ``"weak"``, ``"source"``.
    """

    image_size: tuple[int, int]
    boxes_xyxy: np.ndarray | None = None
    masks: np.ndarray | list[dict[str, Any]] | None = None
    scores: np.ndarray | None = None
    category_ids: np.ndarray | None = None
    points_xy: np.ndarray | None = None
    weak_ids: np.ndarray | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h, w = (int(v) for v in self.image_size)
        self.image_size = (h, w)
        n = self._infer_len()
        if isinstance(self.masks, np.ndarray):
            m = np.asarray(self.masks, dtype=bool)
            if m.shape != (n, h, w):
                raise ValueError(f"Instances.masks: expected shape {(n, h, w)}, got {m.shape}")
            self.masks = m
        elif self.masks is not None:
            self.masks = list(self.masks)
            if len(self.masks) != n:
                raise ValueError(f"Instances.masks: expected {n} RLEs, got {len(self.masks)}")
        if self.boxes_xyxy is None and self.masks is not None:
            self.boxes_xyxy = masks_to_boxes_xyxy(self.masks_bool())
        self.boxes_xyxy = _column(self.boxes_xyxy, n, np.float64, 4, "boxes_xyxy", np.nan)
        self.scores = _column(self.scores, n, np.float64, None, "scores", 1.0)
        self.category_ids = _column(self.category_ids, n, np.int64, None, "category_ids", -1)
        self.points_xy = _column(self.points_xy, n, np.float64, 2, "points_xy", np.nan)
        self.weak_ids = _column(self.weak_ids, n, np.int64, None, "weak_ids", NO_WEAK_ID)
        for key, value in self.data.items():
            if len(value) != n:
                raise ValueError(f"Instances.data[{key!r}]: expected length {n}, got {len(value)}")

    def _infer_len(self) -> int:
        for v in (self.boxes_xyxy, self.masks, self.scores, self.category_ids, self.points_xy, self.weak_ids,
                  *self.data.values()):
            if v is not None:
                return len(v)
        return 0

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, keep: Any) -> Instances:
        """Select instances by a bool mask, an index array, a slice or an int; returns a new object."""
        if isinstance(keep, (int, np.integer)):
            keep = [int(keep)]
        idx = np.arange(len(self))[keep]
        masks: Any = None
        if isinstance(self.masks, np.ndarray):
            masks = self.masks[idx]
        elif self.masks is not None:
            masks = [self.masks[i] for i in idx]
        data = {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in self.data.items()}
        return Instances(self.image_size, boxes_xyxy=self.boxes_xyxy[idx], masks=masks, scores=self.scores[idx],
                         category_ids=self.category_ids[idx], points_xy=self.points_xy[idx],
                         weak_ids=self.weak_ids[idx], data=data)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Instances:
        """No instances, with a mask field ready to concatenate."""
        return cls(image_size, boxes_xyxy=np.zeros((0, 4)))

    @classmethod
    def cat(cls, parts: Sequence[Instances]) -> Instances:
        """Concatenate instances of the same image (same size, same ``data`` keys)."""
        if not parts:
            raise ValueError("Instances.cat needs at least one part")
        size = parts[0].image_size
        if any(p.image_size != size for p in parts):
            raise ValueError("Instances.cat: parts have different image sizes")
        parts = [p for p in parts if len(p)] or [parts[0]]
        masks: Any = None
        if all(p.masks is not None for p in parts):
            if all(isinstance(p.masks, np.ndarray) for p in parts):
                masks = np.concatenate([p.masks for p in parts])
            else:
                masks = [r for p in parts for r in p.masks_rle()]
        keys = set(parts[0].data)
        if any(set(p.data) != keys for p in parts):
            raise ValueError("Instances.cat: parts have different data columns")
        data = {}
        for k in keys:
            vals = [p.data[k] for p in parts]
            data[k] = (np.concatenate(vals) if all(isinstance(v, np.ndarray) for v in vals)
                       else [x for v in vals for x in v])
        return cls(size, boxes_xyxy=np.concatenate([p.boxes_xyxy for p in parts]), masks=masks,
                   scores=np.concatenate([p.scores for p in parts]),
                   category_ids=np.concatenate([p.category_ids for p in parts]),
                   points_xy=np.concatenate([p.points_xy for p in parts]),
                   weak_ids=np.concatenate([p.weak_ids for p in parts]), data=data)

    def masks_bool(self) -> np.ndarray:
        """Masks as (N, H, W) bool (decoded from RLE if needed)."""
        if self.masks is None:
            raise ValueError("these Instances carry no masks")
        if isinstance(self.masks, np.ndarray):
            return self.masks
        return rle_to_masks(self.masks, *self.image_size)

    def masks_rle(self) -> list[dict[str, Any]]:
        """Masks as N compressed COCO RLE dicts with ``counts`` as str (JSON-ready)."""
        if self.masks is None:
            raise ValueError("these Instances carry no masks")
        if isinstance(self.masks, np.ndarray):
            return masks_to_rle(self.masks)
        out = []
        for r in self.masks:
            rle = segmentation_to_rle(r, *self.image_size)
            counts = rle["counts"]
            out.append({"size": [int(s) for s in rle["size"]],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
        return out

    def to_coco(self, image_id: int, *, first_id: int = 1,
                extra: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """COCO annotations of these instances; ``bbox`` and ``area`` come from the mask.

        Args:
            image_id: the COCO image id.
            first_id: annotation id of the first instance; the rest count up.
            extra: optional N dicts merged into the annotations (e.g. the ``omnilabel`` object).

        Returns:
            N annotation dicts with ``segmentation`` (compressed RLE), ``bbox``, ``area``, ``score``,
            ``category_id``, ``iscrowd: 0``.
        """
        rles = self.masks_rle() if self.masks is not None else [None] * len(self)
        extras = list(extra) if extra is not None else [{}] * len(self)
        if len(extras) != len(self):
            raise ValueError(f"to_coco: expected {len(self)} extra dicts, got {len(extras)}")
        anns = []
        for i, (rle, more) in enumerate(zip(rles, extras, strict=True)):
            ann: dict[str, Any] = {"id": first_id + i, "image_id": int(image_id),
                                   "category_id": int(self.category_ids[i])}
            if rle is not None:
                ann["segmentation"] = rle
                ann["area"] = float(rle_area(rle))
                ann["bbox"] = rle_to_bbox_xywh(rle)
            else:
                bbox = box_xyxy_to_xywh(self.boxes_xyxy[i])
                ann["bbox"] = [float(v) for v in bbox]
                ann["area"] = float(bbox[2] * bbox[3])
            ann["score"] = float(self.scores[i])
            ann["iscrowd"] = 0
            ann.update(more)
            anns.append(ann)
        return anns

    @classmethod
    def from_coco(cls, annotations: Sequence[dict[str, Any]], image_size: tuple[int, int]) -> Instances:
        """Build from COCO annotations of one image (already validated).

        Masks are kept only when every annotation has a ``segmentation``; boxes come from ``bbox`` or the
        mask; ``point`` fills ``points_xy``; the annotation ``id`` becomes ``weak_ids``.
        """
        h, w = image_size
        n = len(annotations)
        boxes = np.full((n, 4), np.nan)
        points = np.full((n, 2), np.nan)
        has_mask = n > 0 and all(a.get("segmentation") is not None for a in annotations)
        rles = []
        for i, a in enumerate(annotations):
            if has_mask:
                rles.append(segmentation_to_rle(a["segmentation"], h, w))
                boxes[i] = box_xywh_to_xyxy(rle_to_bbox_xywh(rles[-1]))
            if a.get("bbox") is not None:
                boxes[i] = box_xywh_to_xyxy(a["bbox"])
            if a.get("point") is not None:
                points[i] = a["point"][:2]
        return cls((h, w), boxes_xyxy=boxes, masks=rles if has_mask else None,
                   scores=np.array([float(a.get("score", 1.0)) for a in annotations]),
                   category_ids=np.array([int(a.get("category_id", -1)) for a in annotations], dtype=np.int64),
                   points_xy=points, weak_ids=np.array([int(a.get("id", NO_WEAK_ID)) for a in annotations],
                                                       dtype=np.int64))
