"""Mask2Former's loss with one weight per target instance (pseudomasks can count less than ground truth).

What is weighted, exactly. For each image, the Hungarian matching between queries and targets is the
unweighted one of Mask2Former (a down-weighted target is still matched, so its query is not pushed towards
"no object"). Then, with ``w_t`` the weight of target ``t`` and ``q(t)`` its matched query:

* mask terms: ``loss_mask = Σ_t w_t · BCE(q(t), t) / N`` and ``loss_dice = Σ_t w_t · Dice(q(t), t) / N``,
  where ``N`` is the number of targets (averaged over DDP workers, as in Mask2Former), not the sum of
  weights — so a weight of 0.5 halves that target's contribution and leaves the others unchanged;
* class term: the cross-entropy of query ``q`` is multiplied by ``w_t`` when ``q`` is matched to ``t`` and
  by 1 when it is unmatched ("no object"); the normaliser stays Mask2Former's ``Σ_q c(label_q)`` (class
  weights: 1 for objects, ``no_object_weight`` = 0.1 for "no object"), not a weighted one;
* the same weights apply to every auxiliary (intermediate decoder layer) loss.

With every weight equal to 1 the result equals ``transformers``' ``Mask2FormerLoss`` (same random points,
same matching). A weight of 0 makes a target invisible to the loss while still occupying its query.

Per-point certainty (``train-student --uncertainty``). Each target may also carry a certainty map ``c`` in
[0, 1] (``1 - u``, its uncertainty map, carried through the augmentation with its mask; 1 everywhere for
ground truth). After the (unweighted) matching, ``c`` is read at the very points the target mask is read at,
bilinearly like the mask, except that a point within half a pixel of the map's edge reads the edge pixels
(``grid_sample``'s border padding, not zeros: a constant ``c`` reads as that constant at every point). With
``p_i`` the predicted probability, ``t_i`` the target and ``c_i`` the certainty at point ``i`` of ``P``:

* ``BCE_c = (1 / P) · Σ_i c_i · ce_i`` with ``ce_i = -t_i log p_i - (1 - t_i) log(1 - p_i)``;
* ``Dice_c = 1 - (2 Σ_i c_i p_i t_i + 1) / (Σ_i c_i p_i + Σ_i c_i t_i + 1)``.

These replace ``BCE`` and ``Dice`` above (the target weight ``w_t`` still multiplies them; the normaliser
stays ``N``). ``c = 1`` everywhere gives Mask2Former's terms; ``c = 0`` everywhere gives 0 for both, so the
target adds nothing to the mask terms (its class term is unchanged). Without certainty maps nothing of this
is computed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss, sample_point


def point_mask_losses(point_logits: Tensor, point_labels: Tensor, point_certainty: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Sigmoid cross-entropy and Dice of masks at their sampled points, optionally weighted per point.

    Args:
        point_logits: (N, P) float predicted logits. point_labels: (N, P) float targets in [0, 1].
        point_certainty: (N, P) float weights in [0, 1] (see the module docstring for the weighted forms), or
            None: Mask2Former's unweighted terms.

    Returns:
        ``(bce, dice)``, each (N,) float per mask.
    """
    bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    probs = point_logits.sigmoid()
    if point_certainty is None:
        dice = 1 - (2 * (probs * point_labels).sum(-1) + 1) / (probs.sum(-1) + point_labels.sum(-1) + 1)
        return bce.mean(1), dice
    weighted_probs = point_certainty * probs
    dice = 1 - ((2 * (weighted_probs * point_labels).sum(-1) + 1)
                / (weighted_probs.sum(-1) + (point_certainty * point_labels).sum(-1) + 1))
    return (point_certainty * bce).mean(1), dice


class WeightedMask2FormerLoss(Mask2FormerLoss):
    """``Mask2FormerLoss`` whose mask and class terms are weighted per target (see the module docstring).

    Built from a ``Mask2FormerConfig`` and the model's ``weight_dict`` (class 2, mask 5, dice 5).
    """

    def forward(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
                class_labels: list[Tensor], auxiliary_predictions: list[dict[str, Tensor]] | None = None,
                target_weights: list[Tensor] | None = None, target_certainty: list[Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Unscaled loss terms (``weight_dict`` is applied by :func:`total_loss`).

        Args:
            masks_queries_logits: (B, Q, h, w) float mask logits.
            class_queries_logits: (B, Q, K + 1) float class logits (last: no object).
            mask_labels: B tensors (N_b, H, W) float in {0, 1}; any H, W (sampled at normalised points).
            class_labels: B tensors (N_b,) int64 in [0, K).
            auxiliary_predictions: per intermediate layer, ``masks_queries_logits`` and
                ``class_queries_logits`` as above.
            target_weights: B tensors (N_b,) float >= 0; None means all 1.
            target_certainty: B tensors (N_b, H, W) float in [0, 1], aligned with ``mask_labels``: per-point
                weights of the mask terms (see the module docstring); None: unweighted.

        Returns:
            ``loss_mask``, ``loss_dice``, ``loss_cross_entropy`` and, per auxiliary layer ``i``, the same keys
            suffixed ``_i``; scalar tensors.
        """
        if target_weights is None:
            target_weights = [torch.ones(len(c), device=c.device) for c in class_labels]
        indices = self._match(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        num_masks = self.get_num_masks(class_labels, device=masks_queries_logits.device)
        matched_weights = torch.cat([w[j].to(masks_queries_logits.device, torch.float32)
                                     for w, (_, j) in zip(target_weights, indices, strict=True)])
        losses = {**self._weighted_masks(masks_queries_logits, mask_labels, indices, num_masks, matched_weights,
                                         certainty=target_certainty),
                  **self._weighted_labels(class_queries_logits, class_labels, indices, matched_weights)}
        for i, aux in enumerate(auxiliary_predictions or []):
            aux_losses = self.forward(aux["masks_queries_logits"], aux["class_queries_logits"], mask_labels,
                                      class_labels, target_weights=target_weights, target_certainty=target_certainty)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def _match(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
               class_labels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Hungarian matching image by image; an image without targets matches nothing."""
        indices = []
        for b in range(masks_queries_logits.shape[0]):
            if len(class_labels[b]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            indices += self.matcher(masks_queries_logits[b:b + 1], class_queries_logits[b:b + 1],
                                    mask_labels[b:b + 1], class_labels[b:b + 1])
        return indices

    def get_num_masks(self, class_labels: list[Tensor], device: torch.device) -> Tensor:
        """Targets per worker: the batch's count, averaged over DDP workers (Mask2Former), at least 1."""
        num_masks = torch.as_tensor(float(sum(len(c) for c in class_labels)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        return torch.clamp(num_masks, min=1)

    def _weighted_masks(self, masks_queries_logits: Tensor, mask_labels: list[Tensor],
                        indices: list[tuple[Tensor, Tensor]], num_masks: Tensor, weights: Tensor, *,
                        certainty: list[Tensor] | None = None) -> dict[str, Tensor]:
        src_idx = self._get_predictions_permutation_indices(indices)
        if weights.numel() == 0:
            zero = masks_queries_logits.sum() * 0.0  # keeps the graph: every parameter gets a (zero) gradient
            return {"loss_mask": zero, "loss_dice": zero}
        pred_masks = masks_queries_logits[src_idx][:, None]
        target_masks = torch.cat([m[j] for m, (_, j) in zip(mask_labels, indices, strict=True)])[:, None]
        target_masks = target_masks.to(pred_masks.dtype)
        with torch.no_grad():
            points = self.sample_points_using_uncertainty(pred_masks, self.calculate_uncertainty, self.num_points,
                                                          self.oversample_ratio, self.importance_sample_ratio)
            point_labels = sample_point(target_masks, points, align_corners=False).squeeze(1)
            point_certainty = None
            if certainty is not None:
                target_certainty = torch.cat([c[j] for c, (_, j) in zip(certainty, indices, strict=True)])[:, None]
                # Border padding: zeros would pull c towards 0 at points near the edge (their outer taps).
                point_certainty = sample_point(target_certainty.to(pred_masks.dtype), points, align_corners=False,
                                               padding_mode="border").squeeze(1)
        point_logits = sample_point(pred_masks, points, align_corners=False).squeeze(1)
        bce, dice = point_mask_losses(point_logits, point_labels, point_certainty)
        return {"loss_mask": (weights * bce).sum() / num_masks, "loss_dice": (weights * dice).sum() / num_masks}

    def _weighted_labels(self, class_queries_logits: Tensor, class_labels: list[Tensor],
                         indices: list[tuple[Tensor, Tensor]], weights: Tensor) -> dict[str, Tensor]:
        batch_size, num_queries, _ = class_queries_logits.shape
        idx = self._get_predictions_permutation_indices(indices)
        target = torch.full((batch_size, num_queries), self.num_labels, dtype=torch.int64,
                            device=class_queries_logits.device)
        target[idx] = torch.cat([c[j] for c, (_, j) in zip(class_labels, indices, strict=True)]).to(target.device)
        sample_weight = torch.ones((batch_size, num_queries), device=class_queries_logits.device)
        sample_weight[idx] = weights
        class_weight = self.empty_weight.to(class_queries_logits.device)[target]
        ce = F.cross_entropy(class_queries_logits.transpose(1, 2), target, reduction="none")
        return {"loss_cross_entropy": (ce * class_weight * sample_weight).sum() / class_weight.sum()}


def total_loss(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Σ of the terms, each scaled by ``weight_dict`` as ``Mask2FormerForUniversalSegmentation`` does."""
    total: Any = 0.0
    for key, value in losses.items():
        scale = next((w for name, w in weight_dict.items() if name in key), 1.0)
        total = total + value * scale
    return total
