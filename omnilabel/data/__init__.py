"""Datasets on disk: COCO files (read, validate, write), weak annotation types and splits, image decoding,
synthetic test scenes."""
