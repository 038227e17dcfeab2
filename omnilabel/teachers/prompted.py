"""UOIS-SAM's prompter as a label source: ``pseudomask --prompter prompter.pt``.

For the images that would need a detector — image-level tags (``tags``) and unlabelled images (``none``) — the
prompter (``omnilabel.teachers.uois.UoisPrompter``) replaces Grounding DINO → box-SAM: its prompt generator
puts one point on each object it finds, the job's SAM decodes each point from the image's one embedding, and
HDNet picks each point's mask and drops the background (``UoisMasks``). Those masks are class-agnostic; they
are labelled one of two ways:

- **With a classifier** (``--clip``): each mask is classified exactly as an entity proposal is
  (``teachers.proposals.classify_entities``: a masked crop through CLIP's image tower, scored against every
  dataset class and the background names), its label the likeliest allowed class (the image's tags, or every
  class for ``none``), kept at probability >= the threshold.
- **Without**: every mask takes the one category id the job declares for them (the output's ``object``).

Score (a choice of ours; the paper ranks by the adapted score alone): HDNet's adapted score Ŝ' clipped to
[0, 1] — it estimates the mask's IoU, as SAM's predicted IoU does for the other pseudomasks — times CLIP's
probability of the label when classified, as a detection's confidence multiplies SAM's score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from omnilabel.errors import InputError
from omnilabel.instances import Instances
from omnilabel.ops.masks import masks_to_rle
from omnilabel.teachers.proposals import ProposalConfig, classify_entities

if TYPE_CHECKING:
    from omnilabel.teachers.pipeline import PipelineConfig
    from omnilabel.teachers.proposals import ClipImageClassifier
    from omnilabel.teachers.uois import UoisMasks

__all__ = ["agnostic_instances", "check_prompter", "classified_instances", "prompted_extras"]


def check_prompter(config: PipelineConfig, *, categories: Mapping[int, str], has_refiner: bool,
                   has_classifier: bool) -> None:
    """A prompter replaces proposals and detections alike, has no refiner, and has a classifier or a category of
    its own (a new id).

    Raises:
        InputError: naming what does not go together.
    """
    if config.proposals is not None:
        raise InputError("--prompter and --proposals both label the images with tags or no labels; pass one")
    if has_refiner:
        raise InputError("--refiner cannot score prompter masks (--prompter): each is the one of SAM's 4 outputs "
                         "that HDNet picks, which the refiner was not trained to refine; run without --refiner")
    if has_classifier:
        return
    if config.prompter_category is None:
        raise InputError("class-agnostic prompter masks need a category id (PipelineConfig.prompter_category)")
    if config.prompter_category in categories:
        raise InputError(f"the prompter's category id {config.prompter_category} is a dataset class "
                         f"({categories[config.prompter_category]!r}); it must be a new id")


def agnostic_instances(found: UoisMasks, *, category_id: int) -> Instances:
    """The prompter's masks of one image, all of one class-agnostic category.

    Args:
        found: ``UoisPrompter.segment``'s masks (N, H, W) bool, adapted scores (N,) and prompts (N, 2).
        category_id: the category every mask takes.

    Returns:
        N instances in ``found``'s order (best adapted score first): ``masks`` (N, H, W) bool, ``scores`` the
        adapted scores clipped to [0, 1], ``category_ids``, ``points_xy`` the prompts (pixels, float64), and
        ``data["prompter_score"]`` (N,) float64 the adapted scores as HDNet gave them.
    """
    adapted = np.asarray(found.scores, dtype=np.float64)
    n = len(adapted)
    return Instances(found.masks.shape[1:], masks=found.masks, scores=np.clip(adapted, 0.0, 1.0),
                     category_ids=np.full(n, int(category_id), dtype=np.int64),
                     points_xy=np.asarray(found.points_xy, dtype=np.float64).reshape(n, 2),
                     data={"prompter_score": adapted})


def classified_instances(classifier: ClipImageClassifier, image_rgb: np.ndarray, found: UoisMasks, *,
                         allowed_ids: Sequence[int], categories: Mapping[int, str],
                         config: ProposalConfig) -> tuple[Instances, dict[str, int]]:
    """The prompter's masks of one image that CLIP gives an allowed class (``classify_entities``' rule).

    Args:
        classifier: CLIP with its image tower.
        image_rgb: (H, W, 3) uint8, the image ``found`` was made from.
        found: ``UoisPrompter.segment``'s masks.
        allowed_ids: the classes a label may take (the image's tags, or every class).
        categories: category id → name of the whole dataset (all are scored).
        config: threshold and crop margin.

    Returns:
        ``(instances, counts)``: the kept masks in ``found``'s order, as RLE, with ``scores`` = clip(Ŝ', 0, 1) ·
        CLIP's probability of the label, ``category_ids``, ``points_xy`` (the prompts), ``data["prompter_score"]``
        (Ŝ') and ``data["clip_score"]`` (the probability); counts of masks dropped as ``empty`` and
        ``below_threshold``.
    """
    rles = masks_to_rle(found.masks)
    entities = [{"entity_id": k, "segmentation": rle} for k, rle in enumerate(rles)]
    inst, counts = classify_entities(classifier, image_rgb, entities, allowed_ids=allowed_ids,
                                     categories=categories, config=config)
    idx = np.asarray(inst.data.pop("entity_id"), dtype=np.int64)
    adapted = np.asarray(found.scores, dtype=np.float64)[idx]
    clip_p = np.asarray(inst.scores, dtype=np.float64)
    out = Instances(inst.image_size, masks=inst.masks, scores=np.clip(adapted, 0.0, 1.0) * clip_p,
                    category_ids=inst.category_ids,
                    points_xy=np.asarray(found.points_xy, dtype=np.float64).reshape(-1, 2)[idx],
                    data={"prompter_score": adapted, "clip_score": clip_p})
    return out, counts


def prompted_extras(inst: Instances, *, weak: str, decimals: int) -> list[dict[str, Any]]:
    """Each prompter mask's ``omnilabel`` record: ``weak``, ``prompt: {"point": [x, y]}`` (its generated prompt in
    pixels, full precision), ``prompter_score`` (Ŝ') and, when classified, ``clip_score``, scores rounded to
    ``decimals``."""
    extras = []
    for i, (x, y) in enumerate(inst.points_xy.tolist()):
        extra: dict[str, Any] = {"weak": weak, "prompt": {"point": [float(x), float(y)]},
                                 "prompter_score": round(float(inst.data["prompter_score"][i]), decimals)}
        if "clip_score" in inst.data:
            extra["clip_score"] = round(float(inst.data["clip_score"][i]), decimals)
        extras.append(extra)
    return extras
