"""SAM inference: encode an image once, then decode all of its prompts in a few batched decoder calls.

``SamTeacher.encode`` runs the image encoder (preprocessing identical to ``SamPredictor.set_image``);
``SamTeacher.encode_many`` runs it on several images per forward pass (each resized and padded to the square
input alone, so images of any sizes batch together; the embeddings equal one-at-a-time encoding);
``SamTeacher.predict`` takes N prompts of mixed kinds — one positive point, one box, or both — groups them
by kind, and runs the mask decoder once per group (and per chunk of ``max_prompts_per_call``), never once
per prompt. Results equal ``segment_anything.SamPredictor``'s, prompt by prompt.
``SamTeacher.decode_points_multimask`` streams SAM's 3 outputs per single point (e.g. a point grid) as
low-res logits, chunk by chunk; ``SamTeacher.upsample`` turns only the logits a caller keeps into masks.

The types these take and return, and ``run_mask_decoder`` (the decoder's one computation), live in
``omnilabel.teachers.sam_decode`` and are re-exported here.

Extension hook: ``SamTeacher.encode_prompts(batch)`` turns one ``PromptBatch`` into SAM's
``(sparse, dense)`` prompt embeddings. A class-aware prompt module overrides it in a subclass; per-prompt
side information (category ids, text embeddings) reaches it through ``predict(..., prompt_data=...)``,
sliced to the batch as ``batch.data``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from omnilabel.errors import InputError
from omnilabel.models.precision import autocast
from omnilabel.teachers.sam_decode import (
    DecoderOutput,
    ImageEmbedding,
    MultimaskChunk,
    PromptBatch,
    SamOutput,
    TokenChunk,
    run_mask_decoder,
    take_rows,
)

__all__ = ["DecoderOutput", "ImageEmbedding", "MultimaskChunk", "PromptBatch", "SamOutput", "SamTeacher",
           "SamTeacherConfig", "TokenChunk", "run_mask_decoder"]

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

_T = TypeVar("_T")


@dataclass(frozen=True)
class SamTeacherConfig:
    """Settings of SAM inference.

    Attributes:
        multimask_single_point: a prompt made of a single point is ambiguous, so SAM predicts 3 masks
            (whole, part, sub-part) and, by SAM's own convention (``SamAutomaticMaskGenerator``, the SAM
            paper §3), the one with the highest predicted IoU is kept. False: SAM's single-output head.
        max_prompts_per_call: largest number of prompts in one decoder call (a memory cap; results do not
            depend on it). One call holds B x (1024² + H x W) float32 upsampled logits: at B = 64, ~0.5 GB
            for a 1-MP image and ~3.4 GB for a 12-MP one.
        mask_threshold: logit threshold of a mask pixel (``Sam.mask_threshold`` = 0.0).
    """

    multimask_single_point: bool = True
    max_prompts_per_call: int = 64
    mask_threshold: float = 0.0


def _present_rows(arr: np.ndarray | None, n: int, name: str) -> np.ndarray:
    """Rows that hold a prompt: all finite. All-NaN rows hold none; anything else is an error."""
    if arr is None:
        return np.zeros(n, dtype=bool)
    flat = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:])))
    finite = np.isfinite(flat).all(axis=1)
    partial = ~finite & ~np.isnan(flat).all(axis=1)
    if partial.any():
        raise InputError(
            f"{name}: rows must be all finite (a prompt) or all NaN (no prompt)",
            [f"{name}[{i}] = {arr[i].tolist()}" for i in np.flatnonzero(partial)[:10]],
        )
    return finite


class SamTeacher:
    """Encode once per image, decode batched prompts.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (e.g. from ``omnilabel.models.sam_loader.load_sam``).
        config: inference settings.
        device: torch device string; the model is moved there. On CUDA the encoder and decoder run under
            bf16 autocast where the GPU supports it (fp16 otherwise); the prompt encoder and mask upsampling
            stay float32, since positional encodings of coordinates lose pixels in half precision. On CPU
            everything is float32. On CUDA the image encoder's attention also runs through
            ``scaled_dot_product_attention`` (``omnilabel.models.sam_attention.use_sdpa``: same function,
            fused kernels); the model passed in is converted in place.

    Attributes:
        encoder_calls: image-encoder forward passes so far (one per ``encode_many`` chunk).
        images_encoded: images encoded so far (``encoder_calls`` when every pass holds one image).
        decoder_calls: mask-decoder calls so far.
    """

    def __init__(self, sam: Sam, *, config: SamTeacherConfig | None = None, device: str = "cpu") -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.config = config or SamTeacherConfig()
        if self.config.max_prompts_per_call < 1:
            raise InputError(f"max_prompts_per_call must be >= 1, got {self.config.max_prompts_per_call}")
        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        if self.device.type == "cuda":
            from omnilabel.models.sam_attention import use_sdpa

            use_sdpa(self.sam.image_encoder)
        self.image_size: int = sam.image_encoder.img_size
        self.transform = ResizeLongestSide(self.image_size)
        #: (1, C, 1, 1) added to every dense prompt embedding: the GT task prompt of a teacher trained with SUM
        #: (``omnilabel.teachers.finetune.TaskPrompt``), or None.
        self.dense_offset: torch.Tensor | None = None
        self.encoder_calls = 0
        self.images_encoded = 0
        self.decoder_calls = 0
        self.oom_splits = 0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device)

    def encode(self, image_rgb: np.ndarray) -> ImageEmbedding:
        """Run the image encoder once; ``encode_many([image_rgb])[0]``.

        Args:
            image_rgb: (H, W, 3) uint8 RGB image.

        Returns:
            The image's ``ImageEmbedding``.

        Raises:
            InputError: the image is not (H, W, 3) uint8.
        """
        return self.encode_many([image_rgb])[0]

    def encode_many(self, images_rgb: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Run the image encoder once on all of ``images_rgb`` (one forward pass of batch size N).

        Each image is resized by ``ResizeLongestSide``, normalised and padded to the square input on its own,
        exactly as ``encode`` does, so images of different sizes batch together and each embedding equals
        that of encoding the image alone (to float rounding of the batched kernels). On CUDA the call waits
        for the pass to finish, so that the time spent in it is the encoder's (the decoder needs the
        features next anyway).

        Args:
            images_rgb: N >= 0 (H_i, W_i, 3) uint8 RGB images. The caller sizes N to the memory available.

        Returns:
            N ``ImageEmbedding``s in input order; ``features`` of each is (1, C, g, g), a view of the batch.

        Raises:
            InputError: an image is not (H, W, 3) uint8 (naming its position); nothing is encoded then.
        """
        for i, image_rgb in enumerate(images_rgb):
            if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
                shape = getattr(image_rgb, "shape", None)
                where = f" (image {i} of {len(images_rgb)})" if len(images_rgb) > 1 else ""
                raise InputError(f"SAM expects an (H, W, 3) RGB image, got shape {shape}{where}")
            if image_rgb.dtype != np.uint8:
                where = f" (image {i} of {len(images_rgb)})" if len(images_rgb) > 1 else ""
                raise InputError(f"SAM expects a uint8 image, got {image_rgb.dtype}{where}")
        if not images_rgb:
            return []
        resized = [self.transform.apply_image(image_rgb) for image_rgb in images_rgb]
        with torch.inference_mode():
            # ``Sam.preprocess`` normalises and pads one image to the square input; batching after it keeps
            # each image's input identical to ``encode``'s.
            x = torch.cat([self.sam.preprocess(torch.as_tensor(r, device=self.device).permute(2, 0, 1)
                                               .contiguous()[None]) for r in resized])
            with self._autocast():
                features = self.sam.image_encoder(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.encoder_calls += 1
        self.images_encoded += len(resized)
        return [
            ImageEmbedding(
                features=features[i : i + 1],
                original_size=(int(image_rgb.shape[0]), int(image_rgb.shape[1])),
                input_size=(int(r.shape[0]), int(r.shape[1])),
            )
            for i, (image_rgb, r) in enumerate(zip(images_rgb, resized, strict=True))
        ]

    def encode_prompts(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed one batch of prompts; the hook a class-aware prompt module overrides.

        Args:
            batch: prompts of one kind, coordinates already in the resized input frame.

        Returns:
            sparse: (B, T, C) float32 token embeddings; dense: (B, C, g, g) float32 embeddings.
        """
        points = None if batch.points is None else (batch.points, batch.point_labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=batch.boxes, masks=batch.mask_logits)
        if self.dense_offset is not None:
            dense = dense + self.dense_offset
        return sparse, dense

    def predict(
        self,
        emb: ImageEmbedding,
        *,
        points_xy: np.ndarray | None = None,
        boxes_xyxy: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
        prompt_data: Mapping[str, Any] | None = None,
    ) -> SamOutput:
        """Predict one mask per prompt.

        Prompt i holds a positive point if ``points_xy[i]`` is finite and a box if ``boxes_xyxy[i]`` is
        (NaN rows hold none); with ``mask_logits`` every prompt also carries a mask prior. Prompts are
        grouped by kind (point / box / point + box, and mask-only when ``mask_logits`` is given), and each
        group runs through the decoder in chunks of ``max_prompts_per_call``. Only single-point prompts
        without a mask prior use the multimask head (see ``SamTeacherConfig.multimask_single_point``).

        Args:
            emb: output of ``encode`` for the image.
            points_xy: (N, 2) float pixel xy in the original image, NaN rows for none; or (N, k, 2), k positive
                clicks per prompt (a prompt of several clicks gets SAM's single output).
            boxes_xyxy: (N, 4) float pixel xyxy in the original image, NaN rows for none.
            mask_logits: (N, 4g, 4g) float low-res logits (e.g. a previous ``SamOutput.low_res_logits``).
            prompt_data: per-prompt columns (length N) handed, sliced, to ``encode_prompts`` as
                ``batch.data``; unused by this class.

        Returns:
            A ``SamOutput`` with N masks in input order.

        Raises:
            InputError: shapes disagree, a row is partly NaN, or a prompt is empty.
        """
        pts, bxs, mlg, n = self._check_prompts(points_xy, boxes_xyxy, mask_logits, emb)
        data = dict(prompt_data or {})
        for key, col in data.items():
            if len(col) != n:
                raise InputError(f"prompt_data[{key!r}] has length {len(col)}, expected {n} prompts")
        has_pt = _present_rows(pts, n, "points_xy")
        has_box = _present_rows(bxs, n, "boxes_xyxy")
        if mlg is None and (empty := np.flatnonzero(~has_pt & ~has_box)).size:
            raise InputError("every prompt needs a point, a box or a mask", [f"prompt {i}" for i in empty[:10]])

        H, W = emb.original_size
        grid = self.sam.prompt_encoder.mask_input_size
        masks = np.zeros((n, H, W), dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        low_res = np.zeros((n, *grid), dtype=np.float32)
        pending = list(self._batches(emb, pts, bxs, mlg, has_pt, has_box, data))
        while pending:
            batch = pending.pop(0)
            try:
                m, s, lr = self._decode(emb, batch)
            except torch.OutOfMemoryError as exc:
                # Halve the batch and retry (results do not depend on the batch size), down to one prompt.
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(batch.indices) <= 1:
                    raise MemoryError(f"out of memory decoding a single prompt: {exc}") from exc
                self.oom_splits += 1
                pending[:0] = batch.halves()
                continue
            masks[batch.indices], scores[batch.indices], low_res[batch.indices] = m, s, lr
        return SamOutput(masks=masks, iou_scores=scores, low_res_logits=low_res)

    def decode_points_multimask(
        self, emb: ImageEmbedding, points_xy: np.ndarray, *, chunk: int | None = None
    ) -> Iterator[MultimaskChunk]:
        """SAM's 3 candidate masks per single positive point, streamed chunk by chunk as low-res logits.

        Each chunk is one decoder call with ``multimask_output=True``; nothing is upsampled, so a 64 x 64 grid
        (E-SAM §2.4) costs 3 x 4096 x (4g)² floats in total but only one chunk's worth at a time. Row i equals
        ``SamPredictor.predict(point_coords=points_xy[i:i+1], point_labels=[1], multimask_output=True)``.
        On out-of-memory the chunk size is halved for this and all later chunks (results do not depend on it).

        Args:
            emb: output of ``encode`` for the image.
            points_xy: (N, 2) finite float pixel xy in the original image (e.g. ``omnilabel.ops.grid.point_grid``).
            chunk: points per decoder call, >= 1; default ``config.max_prompts_per_call``.

        Yields:
            ``MultimaskChunk``s covering 0..N-1 in input order (none when N = 0).

        Raises:
            InputError: ``points_xy`` is not (N, 2) finite, ``chunk`` < 1, or ``emb`` is from another SAM.
            MemoryError: out of memory on a single point.
        """
        def decode(batch: PromptBatch) -> MultimaskChunk:
            low_res, iou = self._run_decoder(emb, batch, multimask=True)
            return MultimaskChunk(indices=batch.indices, low_res_logits=low_res.cpu().numpy(),
                                  iou_scores=iou.cpu().numpy())

        yield from self._point_chunks(emb, points_xy, chunk, decode)

    def decode_points_tokens(
        self, emb: ImageEmbedding, points_xy: np.ndarray, *, chunk: int | None = None
    ) -> Iterator[TokenChunk]:
        """All 4 of SAM's outputs per single positive point with the decoder's output tokens, chunk by chunk.

        The same decoder computation as every other path (``run_mask_decoder``): output 0 of row i equals SAM's
        single-mask prediction for the point and outputs 1–3 its multimask ones (``decode_points_multimask``).
        UOIS-SAM's discriminator (``omnilabel.teachers.uois``) reads the tokens; SAM itself is unchanged.

        Args:
            emb: output of ``encode`` for the image.
            points_xy: (N, 2) finite float pixel xy in the original image.
            chunk: points per decoder call, >= 1; default ``config.max_prompts_per_call``.

        Yields:
            ``TokenChunk``s covering 0..N-1 in input order (none when N = 0).

        Raises:
            InputError: ``points_xy`` is not (N, 2) finite, ``chunk`` < 1, or ``emb`` is from another SAM.
            MemoryError: out of memory on a single point.
        """
        def decode(batch: PromptBatch) -> TokenChunk:
            out = self._run_all(emb, batch)
            return TokenChunk(indices=batch.indices, low_res_logits=out.logits.cpu().numpy(),
                              iou_scores=out.iou.cpu().numpy(), iou_token=out.iou_token.cpu().numpy(),
                              mask_tokens=out.mask_tokens.cpu().numpy())

        yield from self._point_chunks(emb, points_xy, chunk, decode)

    def _point_chunks(self, emb: ImageEmbedding, points_xy: np.ndarray, chunk: int | None,
                      decode: Callable[[PromptBatch], _T]) -> Iterator[_T]:
        """``decode`` of single positive points in prompt batches of ``chunk``; on out-of-memory the chunk size is
        halved for this and all later chunks."""
        pts, _, _, n = self._check_prompts(points_xy, None, None, emb)
        if pts is None or (n and not np.isfinite(pts).all()):
            raise InputError("points_xy must be an (N, 2) array of finite pixel xy")
        step = self.config.max_prompts_per_call if chunk is None else int(chunk)
        if step < 1:
            raise InputError(f"chunk must be >= 1, got {chunk}")
        xy_all = self.transform.apply_coords(pts, emb.original_size)
        start = 0
        while start < n:
            idx = np.arange(start, min(start + step, n))
            points = torch.as_tensor(xy_all[idx], dtype=torch.float, device=self.device)[:, None, :]
            labels = torch.ones((len(idx), 1), dtype=torch.int, device=self.device)
            batch = PromptBatch(indices=idx, points=points, point_labels=labels, boxes=None, mask_logits=None)
            try:
                out = decode(batch)
            except torch.OutOfMemoryError as exc:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if step <= 1:
                    raise MemoryError(f"out of memory decoding a single prompt: {exc}") from exc
                self.oom_splits += 1
                step //= 2
                continue
            yield out
            start += len(idx)

    def upsample(self, emb: ImageEmbedding, low_res_logits: np.ndarray | torch.Tensor) -> np.ndarray:
        """Low-res logits to masks at the original image size (``Sam.postprocess_masks``, then threshold).

        Args:
            emb: the ``ImageEmbedding`` the logits were decoded from.
            low_res_logits: (n, 4g, 4g) float logits, e.g. rows of ``MultimaskChunk.low_res_logits[:, k]``.

        Returns:
            (n, H, W) bool masks, logit > ``config.mask_threshold``; computed ``max_prompts_per_call`` at a time.

        Raises:
            InputError: ``low_res_logits`` is not (n, 4g, 4g).
        """
        grid = tuple(self.sam.prompt_encoder.mask_input_size)
        if low_res_logits.ndim != 3 or tuple(low_res_logits.shape[1:]) != grid:
            raise InputError(f"low_res_logits: expected shape (n, {grid[0]}, {grid[1]}), got "
                             f"{tuple(low_res_logits.shape)}")
        H, W = emb.original_size
        out = np.zeros((len(low_res_logits), H, W), dtype=bool)
        step = self.config.max_prompts_per_call
        with torch.inference_mode():
            for start in range(0, len(out), step):
                lr = torch.as_tensor(low_res_logits[start : start + step], device=self.device).float()[:, None]
                full = self.sam.postprocess_masks(lr, emb.input_size, emb.original_size)
                out[start : start + step] = (full[:, 0] > self.config.mask_threshold).cpu().numpy()
        return out

    def lowres_masks(self, emb: ImageEmbedding, low_res_logits: np.ndarray) -> np.ndarray:
        """Masks at the decoder's own resolution: logit > ``config.mask_threshold`` on the part of the 4g x 4g grid
        that covers the image (the square input's padding cropped off), ~1/16 of the pixels of a 1024 image.

        Args:
            emb: the ``ImageEmbedding`` the logits were decoded from.
            low_res_logits: (..., 4g, 4g) float logits.

        Returns:
            (..., h, w) bool with h = ceil(h' * 4g / image_size), w likewise (h', w' = ``emb.input_size``).

        Raises:
            InputError: the last two dimensions are not (4g, 4g).
        """
        grid = tuple(self.sam.prompt_encoder.mask_input_size)
        lr = np.asarray(low_res_logits)
        if lr.ndim < 2 or tuple(lr.shape[-2:]) != grid:
            raise InputError(f"low_res_logits: expected shape (..., {grid[0]}, {grid[1]}), got {lr.shape}")
        h = -(-emb.input_size[0] * grid[0] // self.image_size)
        w = -(-emb.input_size[1] * grid[1] // self.image_size)
        return lr[..., :h, :w] > self.config.mask_threshold

    def _check_prompts(
        self, points_xy: Any, boxes_xyxy: Any, mask_logits: Any, emb: ImageEmbedding
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, int]:
        pts = None if points_xy is None else np.asarray(points_xy, dtype=np.float64)
        bxs = None if boxes_xyxy is None else np.asarray(boxes_xyxy, dtype=np.float64)
        mlg = None if mask_logits is None else np.asarray(mask_logits, dtype=np.float32)
        problems = []
        if pts is not None and (pts.ndim not in (2, 3) or pts.shape[-1] != 2 or 0 in pts.shape[1:]):
            problems.append(f"points_xy: expected shape (N, 2) or (N, k, 2), got {pts.shape}")
        if bxs is not None and (bxs.ndim != 2 or bxs.shape[1] != 4):
            problems.append(f"boxes_xyxy: expected shape (N, 4), got {bxs.shape}")
        grid = tuple(self.sam.prompt_encoder.mask_input_size)
        if mlg is not None and (mlg.ndim != 3 or mlg.shape[1:] != grid):
            problems.append(f"mask_logits: expected shape (N, {grid[0]}, {grid[1]}), got {mlg.shape}")
        lengths = {len(a) for a in (pts, bxs, mlg) if a is not None and a.ndim >= 1}
        if len(lengths) > 1:
            problems.append(f"prompt arrays disagree on N: {sorted(lengths)}")
        if tuple(emb.features.shape[-2:]) != tuple(self.sam.prompt_encoder.image_embedding_size):
            problems.append(f"embedding grid {tuple(emb.features.shape[-2:])} does not match this SAM")
        if problems:
            raise InputError("bad SAM prompts", problems)
        return pts, bxs, mlg, (lengths.pop() if lengths else 0)

    def _batches(
        self,
        emb: ImageEmbedding,
        pts: np.ndarray | None,
        bxs: np.ndarray | None,
        mlg: np.ndarray | None,
        has_pt: np.ndarray,
        has_box: np.ndarray,
        data: dict[str, Any],
    ) -> Iterator[PromptBatch]:
        """Group prompts by kind and chunk each group; coordinates go to the resized input frame."""
        step = self.config.max_prompts_per_call
        for kind_pt, kind_box in ((True, False), (False, True), (True, True), (False, False)):
            group = np.flatnonzero((has_pt == kind_pt) & (has_box == kind_box))
            for start in range(0, len(group), step):
                idx = group[start : start + step]
                points = labels = boxes = masks = None
                if kind_pt:
                    xy = self.transform.apply_coords(pts[idx], emb.original_size)  # type: ignore[index]
                    points = torch.as_tensor(xy, dtype=torch.float, device=self.device).reshape(len(idx), -1, 2)
                    labels = torch.ones(points.shape[:2], dtype=torch.int, device=self.device)
                if kind_box:
                    xyxy = self.transform.apply_boxes(bxs[idx], emb.original_size)  # type: ignore[index]
                    boxes = torch.as_tensor(xyxy, dtype=torch.float, device=self.device)
                if mlg is not None:
                    masks = torch.as_tensor(mlg[idx], dtype=torch.float, device=self.device)[:, None]
                yield PromptBatch(
                    indices=idx,
                    points=points,
                    point_labels=labels,
                    boxes=boxes,
                    mask_logits=masks,
                    data={k: take_rows(v, idx) for k, v in data.items()},
                )

    def _decode(self, emb: ImageEmbedding, batch: PromptBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One mask-decoder call: (B, H, W) bool masks, (B,) scores, (B, 4g, 4g) low-res logits."""
        multimask = batch.multimask_candidate and self.config.multimask_single_point
        low_res, iou = self._run_decoder(emb, batch, multimask=multimask)
        with torch.inference_mode():
            if multimask:
                best = iou.argmax(dim=1)
                rows = torch.arange(len(best), device=best.device)
                low_res, iou = low_res[rows, best][:, None], iou[rows, best][:, None]
            low_res, iou = low_res[:, :1], iou[:, 0]
            full = self.sam.postprocess_masks(low_res, emb.input_size, emb.original_size)
            masks = full[:, 0] > self.config.mask_threshold
        return masks.cpu().numpy(), iou.cpu().numpy(), low_res[:, 0].cpu().numpy()

    def _run_decoder(
        self, emb: ImageEmbedding, batch: PromptBatch, *, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask-decoder call: (B, 1 or 3, 4g, 4g) float32 low-res logits and (B, 1 or 3) float32 scores."""
        out = self._run_all(emb, batch)
        keep = slice(1, None) if multimask else slice(0, 1)
        return out.logits[:, keep], out.iou[:, keep]

    def _run_all(self, emb: ImageEmbedding, batch: PromptBatch) -> DecoderOutput:
        """One mask-decoder call with all 4 outputs and the tokens, as float32."""
        with torch.inference_mode():
            sparse, dense = self.encode_prompts(batch)
            image_pe = self.sam.prompt_encoder.get_dense_pe()
            with self._autocast():
                out = run_mask_decoder(self.sam.mask_decoder, emb.features, image_pe, sparse, dense)
            self.decoder_calls += 1
            return DecoderOutput(logits=out.logits.float(), iou=out.iou.float(), iou_token=out.iou_token.float(),
                                 mask_tokens=out.mask_tokens.float())
