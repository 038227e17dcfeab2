"""Which uncertainty maps ``train-student --uncertainty`` weighs pseudomasks with, checked before training.

With ``--uncertainty`` every pseudomask target (``omnilabel.source`` ``pseudo``, a mask, ``score`` >=
``min_score``: :func:`omnilabel.students.data.target_kind`) must name its uncertainty map in
``omnilabel.uncertainty`` (written by ``omnilabel uncertainty``, a path relative to the COCO file's folder;
``omnilabel.data.maps`` defines the format), and the file must exist. Ground truth needs none (certainty 1).
The maps are only located here; each is read with its sample (``omnilabel.students.data.read_certainty``),
where its size is checked against the image's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnilabel.data.maps import uncertainty_map_paths
from omnilabel.errors import InputError
from omnilabel.students.data import target_kind

_MAX_LISTED = 50


def pseudomask_uncertainty_paths(data: dict[str, Any], coco_path: str | Path, *, min_score: float = 0.0
                                 ) -> dict[int, Path]:
    """The uncertainty map file of every pseudomask target of a training COCO file.

    Args:
        data: the validated COCO dict read from ``coco_path``.
        coco_path: the COCO file (named in errors; relative map paths start from its folder).
        min_score: pseudomasks scoring lower are not targets, so need no map.

    Returns:
        ``{annotation id: map file}``, one per pseudomask target; each file exists (none is opened).

    Raises:
        InputError: naming the file: it has no pseudomask target; or, listing each annotation id, a
            pseudomask target lacks ``omnilabel.uncertainty`` (run ``omnilabel uncertainty`` first), or names
            a map that is not a path or does not exist.
    """
    coco_path = Path(coco_path)
    pseudo = [ann for ann in data["annotations"] if target_kind(ann, min_score=min_score) == "pseudo"]
    if not pseudo:
        raise InputError(f"{coco_path}: --uncertainty weighs pseudomasks by their uncertainty maps, but the file "
                         f"has no pseudomask to train on (omnilabel.source \"pseudo\" with a mask and score >= "
                         f"{min_score}); train without --uncertainty")
    missing = [ann["id"] for ann in pseudo if (ann.get("omnilabel") or {}).get("uncertainty") is None]
    if missing:
        listed = [f"annotation id={i}: omnilabel.uncertainty is missing" for i in missing[:_MAX_LISTED]]
        more = [f"... and {len(missing) - _MAX_LISTED} more"] if len(missing) > _MAX_LISTED else []
        raise InputError(f"{coco_path}: {len(missing)} pseudomask(s) without an uncertainty map "
                         "(omnilabel.uncertainty); run `omnilabel uncertainty` on this file first, then train "
                         "with --uncertainty on its output", listed + more)
    try:
        return uncertainty_map_paths(pseudo, base_dir=coco_path.parent)
    except InputError as e:
        raise InputError(f"{coco_path}: {e.args[0]}", e.problems) from None
