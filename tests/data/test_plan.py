"""The weak plan of a job, as a table: every ``--weak`` mode × every kind of image, with and without a
detector. Hand-written dicts, no model."""

from __future__ import annotations

import pytest

from omnilabel.data.weak import WeakMode, WeakType, plan_weak

F, B, P, T = WeakType.FULL, WeakType.BOX, WeakType.POINT, WeakType.TAG
SEG = [[1, 1, 8, 1, 8, 8, 1, 8]]

#: One image of each kind: its annotations (a polygon, a box, a point, a tag).
IMAGES = {
    "full": [{"segmentation": SEG}],
    "boxes": [{"bbox": [1, 1, 5, 5]}],
    "points": [{"point": [3.5, 3.5]}],
    "tags": [{}],
    "unlabelled": [],
    "full+tags": [{"segmentation": SEG}, {}],
    "points+tags": [{"point": [3.5, 3.5]}, {}],
    "boxes+points": [{"bbox": [1, 1, 5, 5]}, {"point": [3.5, 3.5]}],
}

#: mode → image → (kinds, detect); "misfit" where the annotations do not fit the mode.
EXPECTED = {
    WeakMode.AUTO: {"full": ((F,), None), "boxes": ((B,), None), "points": ((P,), None), "tags": ((T,), T),
                    "unlabelled": ((), WeakType.NONE), "full+tags": ((F, T), T), "points+tags": ((P, T), T),
                    "boxes+points": ((B, P), None)},
    WeakMode.NONE: {"full": ((F,), None), "boxes": ((T,), WeakType.NONE), "points": ((T,), WeakType.NONE),
                    "tags": ((T,), WeakType.NONE), "unlabelled": ((), WeakType.NONE), "full+tags": ((F, T), None),
                    "points+tags": ((T, T), WeakType.NONE), "boxes+points": ((T, T), WeakType.NONE)},
    WeakMode.TAGS: {"full": ((F,), None), "boxes": ((T,), T), "points": ((T,), T), "tags": ((T,), T),
                    "unlabelled": ((), None), "full+tags": ((F, T), None), "points+tags": ((T, T), T),
                    "boxes+points": ((T, T), T)},
    WeakMode.POINTS: {"full": ((F,), None), "boxes": "misfit", "points": ((P,), None), "tags": "misfit",
                      "unlabelled": ((), None), "full+tags": "misfit", "points+tags": "misfit",
                      "boxes+points": "misfit"},
    WeakMode.BOXES: {"full": ((F,), None), "boxes": ((B,), None), "points": "misfit", "tags": "misfit",
                     "unlabelled": ((), None), "full+tags": "misfit", "points+tags": "misfit",
                     "boxes+points": "misfit"},
}


def _file(names: list[str]) -> dict:
    images, annotations = [], []
    for i, name in enumerate(names, start=1):
        images.append({"id": i, "file_name": f"{i}.png", "height": 10, "width": 10})
        for ann in IMAGES[name]:
            annotations.append({"id": 100 * i + len(annotations), "image_id": i, "category_id": 1, **ann})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


CASES = [(mode, name) for mode in WeakMode for name in IMAGES]


@pytest.mark.parametrize(("mode", "name"), CASES, ids=[f"{m.value}-{n}" for m, n in CASES])
def test_one_image_under_each_mode(mode, name):
    plan = plan_weak(_file([name]), mode, has_detector=True, source="w.json")
    expected = EXPECTED[mode][name]
    if expected == "misfit":
        assert plan.problems and all(p.startswith("w.json: annotation id=") for p in plan.problems)
        assert f"--weak {mode.value}" in plan.problems[0]
        return
    kinds, detect = expected
    assert not plan.problems
    (image,) = plan.images
    assert (image.kinds, image.detect, image.left_out) == (kinds, detect, None)
    assert image.needs_detector == (detect is not None)
    # without a detector the same image is left out exactly when it needs one (alone in its file, `auto`
    # and the detector modes then have nothing left to do and are refused)
    bare = plan_weak(_file([name]), mode, has_detector=False, source="w.json")
    assert (bare.images[0].left_out is not None) == (detect is not None)
    refused = mode in (WeakMode.TAGS, WeakMode.NONE) or (mode is WeakMode.AUTO and detect is not None)
    assert bool(bare.problems) == refused
    if refused:
        assert "need a detector" in bare.problems[0]


def test_auto_without_a_detector_leaves_out_only_the_images_that_need_one():
    plan = plan_weak(_file(list(IMAGES)), WeakMode.AUTO, has_detector=False)
    assert not plan.problems
    out = {p.image_id for p in plan.left_out}
    assert out == {i for i, name in enumerate(IMAGES, start=1) if EXPECTED[WeakMode.AUTO][name][1] is not None}
    assert all(p.left_out for p in plan.left_out)
    assert not plan.uses_detector()  # nothing kept needs one; points would use one only if there were one


def test_the_job_loads_a_detector_only_where_an_image_uses_it():
    points = plan_weak(_file(["points", "full"]), WeakMode.AUTO, has_detector=True)
    assert points.uses_detector() and not points.uses_detector(refine_points=False)
    assert not plan_weak(_file(["boxes", "full"]), WeakMode.AUTO, has_detector=True).uses_detector()
    assert not plan_weak(_file(["full"]), WeakMode.TAGS, has_detector=True).uses_detector()


def test_a_plan_travels_as_plain_data():
    from omnilabel.data.weak import ImagePlan

    for plan in plan_weak(_file(list(IMAGES)), WeakMode.AUTO, has_detector=False).images:
        assert ImagePlan.from_dict(plan.to_dict()) == plan


def test_raise_problems_names_the_file_and_caps_the_list():
    from omnilabel.errors import InputError

    plan = plan_weak(_file(["tags"] * 30), WeakMode.POINTS, has_detector=True, source="w.json")
    with pytest.raises(InputError) as err:
        plan.raise_problems("w.json")
    text = str(err.value)
    assert "30 problem(s) with --weak points" in text and "... and 10 more" in text and "point" in text
