"""The batches of a fine-tuning step: prompts drawn from GT masks (and, for SUM, from pseudomasks with their
certainty; for Stable-SAM, from the RTS mixture), refiner pairs, GT masks in SAM's input frame, cached
embeddings or images.

What a step sees is a function of the seed and the step only (``omnilabel.teachers.finetune_data``), so it
does not depend on the number of workers and a resumed run continues exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnilabel.ops.boxes import jitter_boxes_xyxy
from omnilabel.teachers.finetune_data import (
    EmbeddingCache,
    TrainInstance,
    batch_instances,
    decode_mask,
    mask_in_input_frame,
    mixed_batch_instances,
    sample_prompt,
    sample_unlabeled_prompt,
)

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from omnilabel.teachers.finetune_run import FinetuneSetup
    from omnilabel.teachers.uncertainty import PairSet

__all__ = ["Batcher"]


def _read_u(inst: TrainInstance, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) float32 uncertainty map of a pseudomask; it must have its mask's size.

    Raises:
        InputError: unreadable, or another size (naming the annotation).
    """
    from omnilabel.data.maps import read_annotation_map

    return read_annotation_map(inst.annotation_id, str(inst.uncertainty), (int(shape[0]), int(shape[1])))


class Batcher:
    """Builds the tensors of one step on one worker."""

    def __init__(self, setup: FinetuneSetup, sam: Sam, *, cache: EmbeddingCache | None, rank: int, world_size: int,
                 device: torch.device) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.setup, self.sam, self.cache = setup, sam, cache
        self.rank, self.world_size, self.device = rank, world_size, device
        self.image_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.image_size)
        self.class_rows = {c: i for i, c in enumerate(setup.class_ids)}
        self.text = None if setup.class_text is None else torch.as_tensor(setup.class_text, device=device)
        self._images: dict[int, torch.Tensor] = {}
        #: The refiner's training pairs (``prompts refine``), set by ``train_worker``.
        self.pairs: PairSet | None = None
        self._pair_logits: dict[Any, torch.Tensor] = {}

    def _image(self, index: int) -> torch.Tensor:
        """(3, h', w') uint8 resized image, kept in memory (``--train-encoder`` runs only)."""
        if index not in self._images:
            from omnilabel.data.images import read_image_rgb

            rgb = read_image_rgb(self.setup.images[index].path)
            self._images[index] = torch.as_tensor(self.transform.apply_image(rgb)).permute(2, 0, 1).contiguous()
        return self._images[index]

    def _prompt(self, mask: np.ndarray, *, step: int, position: int, original_size: tuple[int, int],
                certainty: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The prompt of global batch position ``position`` at step ``step``, in SAM's input frame.

        Args:
            mask: (H, W) bool GT mask at the original size ``original_size`` = (H, W).

        Returns:
            ``(point_xy (2,), box_xyxy (4,))`` float64, all-NaN where the prompt has none; the box jittered
            with ``box_jitter`` (``finetune_data``'s choices).
        """
        cfg = self.setup.config
        rng = np.random.default_rng([cfg.seed, step, position])
        if certainty is None:
            point, box = sample_prompt(mask, cfg.prompts, rng)
        else:  # a pseudomask: its point drawn ∝ certainty (SUM §3.2.2)
            point, box = sample_unlabeled_prompt(mask, certainty, cfg.prompts, rng)
        if np.isfinite(point).all():
            point = self.transform.apply_coords(point[None], original_size)[0]
        if np.isfinite(box).all():
            box = self.transform.apply_boxes(box[None], original_size)[0]
            if cfg.box_jitter:
                # the jitter's draws come after the prompt's, from its generator: a pure function of
                # (seed, step, position) again; bounds: the box of a full mask, in SAM's convention
                h, w = original_size
                bounds = self.transform.apply_coords(np.array([[w - 1.0, h - 1.0]]), original_size)[0]
                box = jitter_boxes_xyxy(box, rng, std_frac=cfg.box_jitter_frac, max_px=cfg.box_jitter_max_px,
                                        bounds_wh=bounds)
        return point, box

    def _refine_step(self, step: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """A step of refiner pairs: the SAM mask's logits + its box + its click, target the GT mask."""
        cfg, dev, pairs = self.setup.config, self.device, self.pairs
        assert pairs is not None and self.cache is not None
        positions, indices = batch_instances(step, batch_size=cfg.batch_size, n_instances=len(pairs), seed=cfg.seed,
                                             rank=self.rank, world_size=self.world_size)
        b = len(positions)
        feats, gts, pts, bxs, logits = [], [], np.zeros((b, 2)), np.zeros((b, 4)), []
        for j, idx in enumerate(indices):
            k = int(pairs.instance[idx])
            inst = self.setup.instances[k]
            f, input_size, original = self.cache.load(self.setup.images[inst.image_index].image_id)
            feats.append(f)
            pts[j] = self.transform.apply_coords(pairs.point[idx][None], tuple(original))[0]
            bxs[j] = self.transform.apply_boxes(pairs.box[idx][None], tuple(original))[0]
            logits.append(pairs.logits(k, self._pair_logits))
            gts.append(mask_in_input_frame(decode_mask(inst), input_size=tuple(input_size),
                                           image_size=self.image_size, device=dev))
        group = {"index": torch.arange(b, device=dev),
                 "points": torch.as_tensor(pts, dtype=torch.float32, device=dev)[:, None],
                 "labels": torch.ones((b, 1), dtype=torch.int, device=dev),
                 "boxes": torch.as_tensor(bxs, dtype=torch.float32, device=dev),
                 "masks": torch.stack(logits).to(dev, torch.float32)[:, None], "text": None, "multimask": False}
        inputs = {"features": torch.stack(feats).to(dev, torch.float32), "images": None, "image_index": None,
                  "groups": [group], "positions": positions}
        return inputs, torch.stack(gts), b

    def _stable_step(self, step: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """A step of Stable-SAM's RTS mixture (``stable_prompts``): one group per prompt shape — boxes (GT and
        noisy), each point count (a lone point answered with SAM's 3 masks), coarse masks — each prompt drawn
        from the generator of ``(seed, step, position)``."""
        from omnilabel.teachers.stable_prompts import coarse_mask, mask_prompt_logits, sample_rts_prompt

        cfg, dev = self.setup.config, self.device
        assert self.cache is not None
        positions, indices = batch_instances(step, batch_size=cfg.batch_size, n_instances=len(self.setup.instances),
                                             seed=cfg.seed, rank=self.rank, world_size=self.world_size)
        low_res = tuple(int(v) for v in self.sam.prompt_encoder.mask_input_size)
        feats, gts = [], []
        shapes: dict[tuple[str, int], list[int]] = {}
        prompts: list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]] = []
        for j, (pos, idx) in enumerate(zip(positions, indices, strict=True)):
            inst = self.setup.instances[int(idx)]
            mask = decode_mask(inst)
            f, input_size, original = self.cache.load(self.setup.images[inst.image_index].image_id)
            feats.append(f)
            gt = mask_in_input_frame(mask, input_size=tuple(input_size), image_size=self.image_size, device=dev)
            gts.append(gt)
            rng = np.random.default_rng([cfg.seed, step, int(pos)])
            prompt = sample_rts_prompt(mask, rng)
            points = box = logits = None
            if prompt.points_xy is not None:
                points = self.transform.apply_coords(prompt.points_xy, tuple(original))
            if prompt.box_xyxy is not None:
                box = self.transform.apply_boxes(prompt.box_xyxy[None], tuple(original))[0]
            if prompt.kind == "mask":
                gt_low = torch.nn.functional.adaptive_avg_pool2d(gt.cpu()[None], low_res)[0, 0]
                logits = mask_prompt_logits(coarse_mask(gt_low, rng))
            key = ("points", len(points)) if points is not None else ("box", 0) if box is not None else ("mask", 0)
            shapes.setdefault(key, []).append(j)
            prompts.append((points, box, logits))
        groups = []
        for (kind, k), rows in sorted(shapes.items()):
            index = torch.as_tensor(rows, device=dev)
            group: dict[str, Any] = {"index": index, "points": None, "labels": None, "boxes": None, "masks": None,
                                     "text": None, "multimask": kind == "points" and k == 1, "task": None}
            if kind == "points":
                group["points"] = torch.as_tensor(np.stack([prompts[r][0] for r in rows]), dtype=torch.float32,
                                                  device=dev)
                group["labels"] = torch.ones((len(rows), k), dtype=torch.int, device=dev)
            elif kind == "box":
                group["boxes"] = torch.as_tensor(np.stack([prompts[r][1] for r in rows]), dtype=torch.float32,
                                                 device=dev)
            else:
                group["masks"] = torch.as_tensor(np.stack([prompts[r][2] for r in rows]), dtype=torch.float32,
                                                 device=dev)[:, None]
            groups.append(group)
        inputs = {"features": torch.stack(feats).to(dev, torch.float32), "images": None, "image_index": None,
                  "groups": groups, "positions": positions}
        return inputs, torch.stack(gts), len(positions)

    def __call__(self, step: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """``(model inputs + "positions" (b,) global batch positions, gt (b, 1, S, S), b)`` of step ``step``."""
        if self.pairs is not None:
            return self._refine_step(step)
        if self.setup.config.stable:
            return self._stable_step(step)
        cfg, dev = self.setup.config, self.device
        if cfg.unlabeled:
            positions, unlabeled, indices = mixed_batch_instances(
                step, batch_size=cfg.batch_size, n_labeled=len(self.setup.instances),
                n_unlabeled=len(self.setup.unlabeled), seed=cfg.seed, rank=self.rank, world_size=self.world_size)
        else:
            positions, indices = batch_instances(step, batch_size=cfg.batch_size,
                                                 n_instances=len(self.setup.instances), seed=cfg.seed, rank=self.rank,
                                                 world_size=self.world_size)
            unlabeled = np.zeros(len(positions), dtype=bool)
        b = len(positions)
        pts, bxs = np.full((b, 2), np.nan), np.full((b, 4), np.nan)
        gts, feats, image_of, certainty = [], [], [], []
        for j, (pos, idx) in enumerate(zip(positions, indices, strict=True)):
            inst = (self.setup.unlabeled if unlabeled[j] else self.setup.instances)[int(idx)]
            im = self.setup.images[inst.image_index]
            mask = decode_mask(inst)
            c = None if inst.uncertainty is None else 1.0 - _read_u(inst, mask.shape)
            if self.cache is not None:
                f, input_size, original = self.cache.load(im.image_id)
                feats.append(f)
            else:
                original = (im.height, im.width)
                input_size = self.transform.get_preprocess_shape(im.height, im.width, self.image_size)
                image_of.append(inst.image_index)
            pts[j], bxs[j] = self._prompt(mask, step=step, position=int(pos), original_size=tuple(original),
                                          certainty=c)
            gts.append(mask_in_input_frame(mask, input_size=tuple(input_size), image_size=self.image_size, device=dev))
            if cfg.unlabeled:  # c in the input frame: u resized like the mask, padding u = 0 (c = 1)
                u = np.zeros(mask.shape, np.float32) if c is None else 1.0 - c
                certainty.append(1.0 - mask_in_input_frame(u, input_size=tuple(input_size),
                                                           image_size=self.image_size, device=dev))
        inputs: dict[str, Any] = {"features": None, "images": None, "image_index": None}
        if self.cache is not None:
            inputs["features"] = torch.stack(feats).to(dev, torch.float32)
        else:
            unique = sorted(set(image_of))
            inputs["images"] = torch.cat([self.sam.preprocess(self._image(u).to(dev, torch.float32)[None])
                                          for u in unique])
            inputs["image_index"] = torch.as_tensor([unique.index(u) for u in image_of], device=dev)
        has_pt, has_box = np.isfinite(pts).all(1), np.isfinite(bxs).all(1)
        groups = []
        for kind_pt, kind_box in ((True, False), (False, True), (True, True)):
            rows = np.flatnonzero((has_pt == kind_pt) & (has_box == kind_box))
            if not len(rows):
                continue
            text = None
            if self.text is not None:
                cats = [self.setup.instances[int(indices[r])].category_id for r in rows]
                text = self.text[torch.as_tensor([self.class_rows[c] for c in cats], device=dev)]
            groups.append({
                "index": torch.as_tensor(rows, device=dev),
                "points": torch.as_tensor(pts[rows], dtype=torch.float32, device=dev)[:, None] if kind_pt else None,
                "labels": torch.ones((len(rows), 1), dtype=torch.int, device=dev) if kind_pt else None,
                "boxes": torch.as_tensor(bxs[rows], dtype=torch.float32, device=dev) if kind_box else None,
                "text": text, "multimask": kind_pt and not kind_box,
                "task": torch.as_tensor(~unlabeled[rows], dtype=torch.int64, device=dev) if cfg.unlabeled else None})
        inputs["groups"] = groups
        inputs["positions"] = positions
        inputs["unlabeled"] = unlabeled
        inputs["certainty"] = torch.stack(certainty) if cfg.unlabeled else None
        return inputs, torch.stack(gts), b
