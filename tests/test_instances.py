from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from omnilabel.instances import NO_WEAK_ID, Instances


def _square_masks(n: int, h: int = 20, w: int = 30) -> np.ndarray:
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        masks[i, 2 + i : 8 + i, 3 + 2 * i : 10 + 2 * i] = True
    return masks


def test_boxes_derived_from_masks_and_defaults_filled():
    masks = _square_masks(3)
    inst = Instances((20, 30), masks=masks)
    assert len(inst) == 3
    np.testing.assert_array_equal(inst.boxes_xyxy[0], [3, 2, 10, 8])
    assert inst.scores.tolist() == [1.0, 1.0, 1.0]
    assert inst.weak_ids.tolist() == [NO_WEAK_ID] * 3
    assert np.isnan(inst.points_xy).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"boxes_xyxy": np.zeros((2, 4)), "scores": np.ones(3)}, "scores"),
        ({"boxes_xyxy": np.zeros((2, 3))}, "boxes_xyxy"),
        ({"masks": np.zeros((2, 5, 5), dtype=bool)}, "masks"),
        ({"boxes_xyxy": np.zeros((2, 4)), "data": {"weak": ["points"]}}, "weak"),
    ],
)
def test_construction_rejects_mismatched_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Instances((20, 30), **kwargs)


def test_indexing_returns_new_object_with_every_column():
    masks = _square_masks(3)
    inst = Instances((20, 30), masks=masks, scores=[0.1, 0.2, 0.3], category_ids=[1, 2, 3],
                     weak_ids=[7, 8, 9], data={"weak": ["points", "boxes", "tags"]})
    sub = inst[np.array([False, True, True])]
    assert len(sub) == 2 and len(inst) == 3
    assert sub.category_ids.tolist() == [2, 3]
    assert sub.data["weak"] == ["boxes", "tags"]
    np.testing.assert_array_equal(sub.masks_bool(), masks[1:])
    assert inst[0].weak_ids.tolist() == [7]


def test_rle_roundtrip_and_coco_fields():
    masks = _square_masks(2)
    inst = Instances((20, 30), masks=masks, scores=[0.5, 0.9], category_ids=[4, 5])
    anns = inst.to_coco(image_id=11, first_id=100, extra=[{"omnilabel": {"weak": "points"}}, {}])
    assert [a["id"] for a in anns] == [100, 101]
    assert anns[0]["bbox"] == [3.0, 2.0, 7.0, 6.0]
    assert anns[0]["area"] == 42.0
    assert isinstance(anns[0]["segmentation"]["counts"], str)
    assert anns[0]["omnilabel"] == {"weak": "points"} and anns[0]["iscrowd"] == 0
    decoded = mask_utils.decode([{"size": a["segmentation"]["size"],
                                  "counts": a["segmentation"]["counts"].encode()} for a in anns])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)
    back = Instances.from_coco(anns, (20, 30))
    np.testing.assert_array_equal(back.masks_bool(), masks)
    assert back.weak_ids.tolist() == [100, 101]
    assert back.category_ids.tolist() == [4, 5]


def test_from_coco_weak_annotations_keep_points_and_boxes():
    anns = [
        {"id": 1, "image_id": 1, "category_id": 2, "point": [4.5, 6.5]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]},
        {"id": 3, "image_id": 1, "category_id": 3},
    ]
    inst = Instances.from_coco(anns, (20, 30))
    assert inst.masks is None
    np.testing.assert_array_equal(inst.points_xy[0], [4.5, 6.5])
    np.testing.assert_array_equal(inst.boxes_xyxy[1], [1, 2, 4, 6])
    assert np.isnan(inst.boxes_xyxy[2]).all() and np.isnan(inst.points_xy[2]).all()


def test_cat_mixes_bool_and_rle_masks():
    a = Instances((20, 30), masks=_square_masks(2), data={"weak": ["points", "points"]})
    b = Instances((20, 30), masks=a.masks_rle()[:1], data={"weak": ["boxes"]})
    both = Instances.cat([a, b, Instances((20, 30), masks=[], data={"weak": []})])
    assert len(both) == 3
    assert both.data["weak"] == ["points", "points", "boxes"]
    np.testing.assert_array_equal(both.masks_bool()[2], _square_masks(1)[0])
