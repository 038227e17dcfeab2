"""Evaluation: COCO AP through pycocotools, and teacher quality (mask IoU, boundary IoU) per weak type.

``coco_eval`` scores predictions (a COCO results list or a complete COCO file) against ground truth with
pycocotools' ``COCOeval``; ``miou`` scores each pseudomask against the ground-truth mask of the weak
annotation it came from. Both take plain COCO dicts (already loaded JSON) and return numbers; printing is
the CLI's job.
"""
