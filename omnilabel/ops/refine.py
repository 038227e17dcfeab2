"""Prompt refinement for the point + class setting: Algorithm 1 of the omni-supervised SAM + GDino paper.

Stage 1 of the points setting prompts P-SAM with each ground-truth point ``P_gt[j]`` and takes the box of
its mask, ``B_sam[j]``. Grounding DINO, prompted with the image's classes, proposes boxes ``B_dino`` with
confidences ``C_dino`` and classes ``Y_dino``. :func:`refine_prompts` matches detections to instances with
the Hungarian algorithm and returns, for every instance, the box that prompts BP-SAM in stage 2:
``B_merged[j]``, either the matched detection or, failing a valid match, ``B_sam[j]``.

Pure numpy + scipy: no model, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from omnilabel.errors import InputError
from omnilabel.ops.boxes import box_iou, points_in_boxes

__all__ = ["RefineResult", "finite_cost", "refine_prompts"]


@dataclass(frozen=True)
class RefineResult:
    """What :func:`refine_prompts` decided for each of the N′ instances.

    Attributes:
        boxes_merged_xyxy: (N′, 4) float64, ``B_merged``: the box prompt for BP-SAM.
        from_dino: (N′,) bool, True where ``B_merged[j]`` is a GDino detection, False where it is ``B_sam[j]``.
        assignment: (N′,) int64, index of the detection the Hungarian step gave instance j, or -1 when it
            got none. A detection can be assigned yet rejected (class mismatch, point outside, below τ_c):
            ``from_dino`` says whether it was used.
        cost: (N, N′) float64, the cost matrix ``C`` of Algorithm 1; rows of detections below τ_c are ``inf``.
    """

    boxes_merged_xyxy: np.ndarray
    from_dino: np.ndarray
    assignment: np.ndarray
    cost: np.ndarray

    @property
    def num_from_dino(self) -> int:
        """How many instances take a GDino box."""
        return int(self.from_dino.sum())


def finite_cost(cost: np.ndarray) -> np.ndarray:
    """``C`` with every ``inf`` replaced by one finite value larger than any achievable finite total.

    ``scipy.optimize.linear_sum_assignment`` rejects infinite entries; with this replacement it still
    maximises the number of finite pairs first, then minimises their cost: the replacement ``M`` exceeds the
    spread of all finite totals, so trading one ``inf`` pair for a finite one always lowers the total.

    Args:
        cost: (N, N′) float, finite or ``+inf``.

    Returns:
        (N, N′) float64, all finite.
    """
    c = np.asarray(cost, dtype=np.float64)
    finite = np.isfinite(c)
    if finite.all():
        return c.copy()
    if finite.any():
        span = float(np.abs(c[finite]).max())
    else:
        span = 0.0
    pairs = min(c.shape)
    big = (2.0 * span + 1.0) * (pairs + 1)
    return np.where(finite, c, big)


def _as_array(name: str, value: np.ndarray, dtype: type, shape_tail: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.size == 0:
        arr = arr.reshape((0, *shape_tail))
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
        expected = "(n, " + ", ".join(str(s) for s in shape_tail) + ")" if shape_tail else "(n,)"
        raise InputError(f"refine_prompts: {name} must have shape {expected}, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError(f"refine_prompts: {name} contains NaN or infinite values")
    return arr


def refine_prompts(
    *,
    boxes_dino_xyxy: np.ndarray,
    scores_dino: np.ndarray,
    labels_dino: np.ndarray,
    points_gt_xy: np.ndarray,
    boxes_sam_xyxy: np.ndarray,
    labels_gt: np.ndarray,
    alpha: float = 5.0,
    beta: float = 2.0,
    tau_c: float = 0.1,
) -> RefineResult:
    """Merge GDino detections with P-SAM boxes (Algorithm 1, "Prompt Refinement").

    The cost of giving detection i to instance j is::

        C[i, :] = ∞                                     if C_dino[i] < τ_c
        C[i, j] = α·[Y_dino[i] ≠ Y_gt[j] or P_gt[j] ∉ B_dino[i]] − IoU(B_dino[i], B_sam[j]) − β·C_dino[i]

    ``σ* = argmin_σ Σ_j C[σ(j), j]`` over matchings that give each instance at most one detection and each
    detection at most one instance (Hungarian). Then ``B_merged[j] = B_dino[σ*(j)]`` when the classes agree
    and ``P_gt[j]`` lies in ``B_dino[σ*(j)]``, else ``B_sam[j]``.

    Decisions where the paper is silent [D]:

    - ``Y_dino`` is one integer class per detection (the paper writes N×K scores; take their argmax first).
    - "Point in box" includes the border, and ``C_dino[i] < τ_c`` is strict: a score equal to τ_c is kept.
    - ``∞`` entries are replaced by one large finite value (:func:`finite_cost`) for the solver, so the
      matching keeps as many finite pairs as possible, then the cheapest; an instance assigned to an ``∞``
      row, or left without a detection (N < N′), takes ``B_sam[j]``.
    - A detection under τ_c is never used, even when it is the only one; N = 0 gives ``B_merged = B_sam``.
    - A matched detection whose class differs or whose box misses the point is rejected (``B_sam[j]``),
      exactly as the paper's final loop; the α penalty only steers the matching away from such pairs.

    Args:
        boxes_dino_xyxy: (N, 4) float, ``B_dino`` in pixels.
        scores_dino: (N,) float in [0, 1], ``C_dino``.
        labels_dino: (N,) int, ``Y_dino``: category id of each detection.
        points_gt_xy: (N′, 2) float, ``P_gt``: one positive click per instance, pixels.
        boxes_sam_xyxy: (N′, 4) float, ``B_sam``: boxes of the P-SAM masks.
        labels_gt: (N′,) int, ``Y_gt``: category id of each instance.
        alpha: α, the penalty of a class mismatch or a point outside the box (Algorithm 1: 5).
        beta: β, the weight of the detection confidence (Algorithm 1: 2).
        tau_c: τ_c, detections below this confidence are never matched (Algorithm 1: 0.1).

    Returns:
        A :class:`RefineResult` with ``B_merged``, where each box came from, the assignment and ``C``.

    Raises:
        InputError: arrays of the wrong shape, lengths that disagree, or NaN/infinite boxes, points or scores.
    """
    b_dino = _as_array("boxes_dino_xyxy", boxes_dino_xyxy, np.float64, (4,))
    c_dino = _as_array("scores_dino", scores_dino, np.float64, ())
    y_dino = _as_array("labels_dino", labels_dino, np.int64, ())
    p_gt = _as_array("points_gt_xy", points_gt_xy, np.float64, (2,))
    b_sam = _as_array("boxes_sam_xyxy", boxes_sam_xyxy, np.float64, (4,))
    y_gt = _as_array("labels_gt", labels_gt, np.int64, ())
    n, n_inst = len(b_dino), len(p_gt)
    if len(c_dino) != n or len(y_dino) != n:
        raise InputError(
            f"refine_prompts: {n} GDino boxes but {len(c_dino)} scores and {len(y_dino)} labels"
        )
    if len(b_sam) != n_inst or len(y_gt) != n_inst:
        raise InputError(
            f"refine_prompts: {n_inst} points but {len(b_sam)} SAM boxes and {len(y_gt)} labels"
        )

    # Lines 1-10: the cost matrix.
    mismatch = (y_dino[:, None] != y_gt[None, :]) | ~points_in_boxes(p_gt, b_dino)  # (N, N')
    cost = alpha * mismatch - box_iou(b_dino, b_sam) - beta * c_dino[:, None]
    cost[c_dino < tau_c, :] = np.inf

    merged = b_sam.copy()
    from_dino = np.zeros(n_inst, dtype=bool)
    assignment = np.full(n_inst, -1, dtype=np.int64)
    if n == 0 or n_inst == 0:
        return RefineResult(merged, from_dino, assignment, cost)

    # Line 11: the Hungarian matching σ*.
    rows, cols = linear_sum_assignment(finite_cost(cost))
    assignment[cols] = rows

    # Lines 12-16: keep a detection only when the match is valid.
    for i, j in zip(rows, cols, strict=True):
        if np.isfinite(cost[i, j]) and not mismatch[i, j]:
            merged[j] = b_dino[i]
            from_dino[j] = True
    return RefineResult(merged, from_dino, assignment, cost)
