from __future__ import annotations

import numpy as np

from omnilabel.ops.masks import mask_iou, masks_to_rle, rle_area, rle_to_bbox_xywh, rle_to_masks


def test_rle_polygon_and_iou():
    m = np.zeros((3, 10, 12), dtype=bool)
    m[0, 1:4, 2:6] = True
    m[1, 5:9, 0:3] = True
    rles = masks_to_rle(m)
    assert all(isinstance(r["counts"], str) for r in rles)
    np.testing.assert_array_equal(rle_to_masks(rles, 10, 12), m)
    assert rle_area(rles[0]) == 12 and rle_to_bbox_xywh(rles[0]) == [2.0, 1.0, 4.0, 3.0]
    poly = [[2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0]]
    assert rle_to_masks([poly], 10, 12)[0].sum() > 0
    np.testing.assert_allclose(mask_iou(m, m[[1, 0, 2]]), [0.0, 0.0, 1.0])
