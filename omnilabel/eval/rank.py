"""``omnilabel rank``: order images by the uncertainty of their pseudomasks, worst first, for relabeling.

A pseudomask file scored with uncertainty carries, per pseudomask annotation, ``omnilabel.uncertainty_mean``
(the mask's mean uncertainty, a float in ``[0, 1]``; higher = less certain, see ``omnilabel.data.maps``) and
``omnilabel.uncertainty`` (its map file). An image's score is the mean (``RankBy.MEAN``) or the max
(``RankBy.MAX``) of its pseudomasks' ``uncertainty_mean``; images rank by score, highest first, ties by
image id. Annotations with ``omnilabel.source == "gt"`` never count, whatever they carry; an
``uncertainty_mean`` of ``null`` counts as absent (the convention of ``omnilabel.data.coco``). Images without
a scored pseudomask are not ranked, only counted.

``rank_images`` and ``subset_coco`` take parsed COCO dicts; ``rank_file`` reads and writes the files.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from omnilabel.data.coco import load_coco
from omnilabel.errors import InputError
from omnilabel.io import write_json_atomic

#: Where an annotation keeps its score: ``ann[OMNILABEL_KEY][UNCERTAINTY_MEAN_KEY]``.
OMNILABEL_KEY = "omnilabel"
UNCERTAINTY_MEAN_KEY = "uncertainty_mean"
#: The map file an annotation names (rewritten when a subset is written elsewhere).
UNCERTAINTY_PATH_KEY = "uncertainty"

_MAX_LISTED = 50
_SCORE_HINT = "run `omnilabel uncertainty PSEUDO.json --refiner R.pt` or `pseudomask --refiner` first"


class RankBy(str, Enum):
    """How an image's pseudomask scores combine into its score."""

    MEAN = "mean"  # mean of its pseudomasks' uncertainty_mean: the image as a whole is doubtful
    MAX = "max"  # the worst pseudomask: one bad mask is enough to send the image back


@dataclass(frozen=True)
class RankedImage:
    """One ranked image.

    Attributes:
        rank: 1 for the most uncertain image.
        image_id: COCO image id.
        file_name: the image's ``file_name``.
        n_pseudo: how many scored pseudomasks the score is over (>= 1).
        score: in [0, 1]; the mean or the max of their ``uncertainty_mean``.
        worst_annotation_id: the pseudomask with the highest ``uncertainty_mean`` (lowest id on ties).
    """

    rank: int
    image_id: int
    file_name: str
    n_pseudo: int
    score: float
    worst_annotation_id: int


@dataclass(frozen=True)
class Ranking:
    """Every ranked image, worst first.

    Attributes:
        by: how the score was computed.
        images: ranked images, ``images[k].rank == k + 1``.
        unranked_images: images without a scored pseudomask (not in ``images``).
        unscored_pseudo: annotations with ``source == "pseudo"`` but no ``uncertainty_mean`` (not counted).
    """

    by: RankBy
    images: tuple[RankedImage, ...]
    unranked_images: int
    unscored_pseudo: int

    def to_dict(self) -> dict[str, Any]:
        """The ranking as JSON-ready data: ``by``, the counts, and ``ranking`` (one dict per image)."""
        return {"by": self.by.value, "ranked_images": len(self.images), "unranked_images": self.unranked_images,
                "unscored_pseudo": self.unscored_pseudo, "ranking": [asdict(r) for r in self.images]}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def pseudomask_scores(data: dict[str, Any], *, source: str = "<coco>") -> tuple[dict[int, list[tuple[int, float]]],
                                                                                 int]:
    """The ``uncertainty_mean`` of every scored pseudomask, by image.

    Args:
        data: a validated COCO dict (``omnilabel.data.coco.validate_coco``).
        source: the file's name, for error messages.

    Returns:
        ``({image_id: [(annotation id, uncertainty_mean), ...]}, unscored)``: images in file order, only those
        with a scored pseudomask; annotations in file order; ``unscored`` counts ``source == "pseudo"``
        annotations without a score.

    Raises:
        InputError: naming the file: no annotation (but GT) has ``omnilabel.uncertainty_mean``, or one is not
            a number in [0, 1] (each listed with its annotation id and field).
    """
    scores: dict[int, list[tuple[int, float]]] = {}
    problems: list[str] = []
    unscored = 0
    for ann in data["annotations"]:
        info = ann.get(OMNILABEL_KEY)
        if not isinstance(info, dict) or info.get("source") == "gt":
            continue
        value = info.get(UNCERTAINTY_MEAN_KEY)
        if value is None:
            if info.get("source") == "pseudo":
                unscored += 1
            continue
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            problems.append(f"{source}: annotation id={ann['id']}: {OMNILABEL_KEY}.{UNCERTAINTY_MEAN_KEY}: "
                            f"expected a number in [0, 1], got {value!r}")
            continue
        scores.setdefault(ann["image_id"], []).append((ann["id"], float(value)))
    if problems:
        more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        raise InputError(f"{source}: {len(problems)} bad uncertainty score(s)", problems[:_MAX_LISTED] + more)
    if not scores:
        raise InputError(f"{source}: no pseudomask has {OMNILABEL_KEY}.{UNCERTAINTY_MEAN_KEY} (its uncertainty "
                         f"score); {_SCORE_HINT}")
    order = {img["id"]: i for i, img in enumerate(data["images"])}
    return dict(sorted(scores.items(), key=lambda kv: order[kv[0]])), unscored


def rank_images(data: dict[str, Any], *, by: RankBy = RankBy.MEAN, source: str = "<coco>") -> Ranking:
    """Rank the images of a scored pseudomask file, most uncertain first.

    Args:
        data: a validated COCO dict whose pseudomasks carry ``omnilabel.uncertainty_mean``.
        by: the image score: mean or max of its pseudomasks' ``uncertainty_mean``.
        source: the file's name, for error messages.

    Returns:
        The ranking: score descending, image id ascending on ties.

    Raises:
        InputError: see :func:`pseudomask_scores`.
    """
    by = RankBy(by)
    scores, unscored = pseudomask_scores(data, source=source)
    names = {img["id"]: img["file_name"] for img in data["images"]}
    rows = []
    for image_id, anns in scores.items():
        values = [v for _, v in anns]
        # fsum: the mean does not depend on the annotations' order in the file
        score = max(values) if by is RankBy.MAX else math.fsum(values) / len(values)
        worst_id = min(anns, key=lambda a: (-a[1], a[0]))[0]
        rows.append((score, image_id, len(anns), worst_id))
    rows.sort(key=lambda r: (-r[0], r[1]))
    ranked = tuple(RankedImage(rank=k + 1, image_id=image_id, file_name=names[image_id], n_pseudo=n, score=score,
                               worst_annotation_id=worst_id)
                   for k, (score, image_id, n, worst_id) in enumerate(rows))
    return Ranking(by=by, images=ranked, unranked_images=len(data["images"]) - len(ranked),
                   unscored_pseudo=unscored)


def rebase_path(ref: str, *, src_dir: str | Path, dst_dir: str | Path) -> str:
    """A path relative to ``src_dir`` made relative to ``dst_dir`` (naming the same file); absolute stays.

    Both sides are resolved (symbolic links followed), so the ``..`` steps of the result climb real folders.
    The result uses ``/``; where no relative path exists (another drive) it is absolute.
    """
    if os.path.isabs(ref):
        return ref
    target = (Path(src_dir) / ref).resolve()
    try:
        return Path(os.path.relpath(target, Path(dst_dir).resolve())).as_posix()
    except ValueError:
        return str(target)


def subset_coco(data: dict[str, Any], image_ids: Iterable[int], *, src_dir: str | Path,
                dst_dir: str | Path) -> dict[str, Any]:
    """The COCO file of some images: every annotation of theirs, every category, other top-level keys kept.

    Args:
        data: a validated COCO dict, read from ``src_dir``; not modified.
        image_ids: the images to keep, in the order they are written.
        src_dir: the folder ``data``'s relative ``omnilabel.uncertainty`` paths start from.
        dst_dir: the folder the subset is written to; those paths are rewritten relative to it.

    Returns:
        A new dict: ``images`` in ``image_ids``' order, ``annotations`` in file order with their ids,
        ``categories`` and any other key (``info``, ``licenses``, ...) as in ``data``.

    Raises:
        InputError: an id is not an image of ``data``.
    """
    by_id = {img["id"]: img for img in data["images"]}
    keep = list(dict.fromkeys(image_ids))
    missing = [i for i in keep if i not in by_id]
    if missing:
        raise InputError(f"no image with id {', '.join(map(str, missing))}")
    kept = set(keep)
    anns = []
    for ann in data["annotations"]:
        if ann["image_id"] not in kept:
            continue
        ann = copy.deepcopy(ann)
        info = ann.get(OMNILABEL_KEY)
        ref = info.get(UNCERTAINTY_PATH_KEY) if isinstance(info, dict) else None
        if isinstance(ref, str) and ref:
            info[UNCERTAINTY_PATH_KEY] = rebase_path(ref, src_dir=src_dir, dst_dir=dst_dir)
        anns.append(ann)
    subset = {"images": [copy.deepcopy(by_id[i]) for i in keep], "annotations": anns}
    return {k: subset[k] if k in subset else copy.deepcopy(v) for k, v in data.items()}


def rank_file(path: str | Path, *, by: RankBy = RankBy.MEAN, top: int | None = None, output: str | Path | None = None,
              json_out: str | Path | None = None) -> dict[str, Any]:
    """Rank the images of a scored pseudomask file; optionally write the worst ``top`` as a COCO file.

    Args:
        path: a complete COCO file whose pseudomasks carry ``omnilabel.uncertainty_mean``.
        by: the image score (see :class:`RankBy`).
        top: how many of the worst images ``output`` holds (>= 1).
        output: write those images with all their annotations here (atomically); needs ``top``.
        json_out: write ``Ranking.to_dict()`` plus ``input`` here (atomically).

    Returns:
        ``{"ranking": Ranking, "images": images in the file, "output": str | None, "output_images",
        "output_annotations", "json": str | None}``.

    Raises:
        InputError: ``top < 1``; ``output`` without ``top`` or naming the input; the file is unreadable or
            not valid COCO; see :func:`pseudomask_scores`. Nothing is written then.
    """
    path = Path(path)
    if top is not None and top < 1:
        raise InputError(f"--top must be an integer >= 1, got {top}")
    if output is not None and top is None:
        raise InputError("-o needs --top N: how many of the most uncertain images to write")
    if output is not None and Path(output).resolve() == path.resolve():
        raise InputError(f"{output}: -o names the input file; write the subset to another file")
    # Image files are not opened here, so file names outside an image folder are no concern.
    data = load_coco(path, allow_outside_images=True)
    ranking = rank_images(data, by=by, source=str(path))
    summary: dict[str, Any] = {"ranking": ranking, "images": len(data["images"]), "output": None,
                               "output_images": 0, "output_annotations": 0, "json": None}
    if output is not None and top is not None:  # output without top was refused above
        output = Path(output)
        subset = subset_coco(data, [r.image_id for r in ranking.images[:top]], src_dir=path.parent,
                             dst_dir=output.parent)
        write_json_atomic(subset, output)
        summary.update(output=str(output), output_images=len(subset["images"]),
                       output_annotations=len(subset["annotations"]))
    if json_out is not None:
        write_json_atomic({"input": str(path), **ranking.to_dict()}, json_out)
        summary["json"] = str(json_out)
    return summary
