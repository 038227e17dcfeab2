from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from omnilabel.errors import InputError
from omnilabel.ops.superpixels import felzenszwalb_superpixels, superpixel_centroids

RED, BLUE, GREEN, WHITE = (220, 30, 30), (20, 40, 200), (30, 180, 40), (250, 250, 250)


def _image(h, w, fill):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:] = fill
    return img


def test_two_flat_halves_give_two_superpixels_with_their_centres():
    img = _image(20, 30, RED)
    img[:, 15:] = BLUE
    labels = felzenszwalb_superpixels(img)
    assert labels.shape == (20, 30) and labels.dtype == np.int32
    assert sorted(np.unique(labels)) == [0, 1]
    left, right = labels[0, 0], labels[0, -1]
    assert left != right
    assert (labels[:, :15] == left).all() and (labels[:, 15:] == right).all()
    xy = superpixel_centroids(labels)
    # cols 0..14 and 15..29, rows 0..19; pixel centres at +0.5
    np.testing.assert_allclose(xy[left], [7.5, 10.0])
    np.testing.assert_allclose(xy[right], [22.5, 10.0])


def test_four_quadrants():
    img = _image(40, 40, RED)
    img[:20, 20:], img[20:, :20], img[20:, 20:] = BLUE, GREEN, WHITE
    labels = felzenszwalb_superpixels(img)
    assert labels.max() == 3
    xy = superpixel_centroids(labels)
    for (r, c), expected in zip([(0, 0), (0, 39), (39, 0), (39, 39)],
                                [[10, 10], [30, 10], [10, 30], [30, 30]], strict=True):
        np.testing.assert_allclose(xy[labels[r, c]], expected)


def test_flat_image_is_one_superpixel_centred():
    labels = felzenszwalb_superpixels(_image(9, 13, GREEN))
    assert (labels == 0).all()
    np.testing.assert_allclose(superpixel_centroids(labels), [[6.5, 4.5]])


@pytest.mark.parametrize(("scale", "min_size"), [(50, 20), (100, 50), (500, 10)])
def test_noise_image_labels_consecutive_and_min_size(scale, min_size):
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    labels = felzenszwalb_superpixels(img, scale=scale, sigma=0.5, min_size=min_size)
    counts = np.bincount(labels.ravel())
    assert labels.min() == 0 and (counts > 0).all()
    assert counts.min() >= min_size
    assert len(counts) > 1


def test_larger_scale_gives_fewer_superpixels():
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img = ndimage.uniform_filter(img, size=(5, 5, 1))
    k = [felzenszwalb_superpixels(img, scale=s, min_size=5).max() + 1 for s in (10, 100, 1000)]
    assert k[0] > k[1] > k[2]


def test_centroids_equal_centre_of_mass_and_lie_on_their_superpixel():
    img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    labels = felzenszwalb_superpixels(img, scale=100, min_size=30)
    k = labels.max() + 1
    xy = superpixel_centroids(labels)
    assert xy.shape == (k, 2) and xy.dtype == np.float64
    np.testing.assert_array_equal(labels[xy[:, 1].astype(int), xy[:, 0].astype(int)], np.arange(k))
    com = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, range(k)))[:, ::-1] + 0.5
    inside = labels[com[:, 1].astype(int), com[:, 0].astype(int)] == np.arange(k)
    assert inside.any()
    np.testing.assert_allclose(xy[inside], com[inside])


def test_ring_centroid_snaps_to_nearest_ring_pixel():
    # Label 1 is a ring around label 0; its centroid (the image centre) lies on label 0.
    labels = np.ones((11, 11), dtype=np.int32)
    labels[3:8, 3:8] = 0
    xy = superpixel_centroids(labels)
    np.testing.assert_allclose(xy[0], [5.5, 5.5])
    # ring centroid (5.5, 5.5); nearest ring pixel centres are 3 away: (5.5, 2.5) first in raster order
    np.testing.assert_allclose(xy[1], [5.5, 2.5])
    assert labels[int(xy[1, 1]), int(xy[1, 0])] == 1


def test_c_shape_snaps_inside():
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[2:8, 2:10] = 1  # label 0 is a C open to the right; its centroid lies in the gap
    labels[0, 9] = 2
    xy = superpixel_centroids(labels)
    for k in range(3):
        assert labels[int(xy[k, 1]), int(xy[k, 0])] == k
    np.testing.assert_allclose(xy[2], [9.5, 0.5])


@pytest.mark.parametrize(
    "labels",
    [np.zeros((3, 3), float), np.zeros((2, 2, 2), int), np.array([[0, 2]]), np.array([[-1, 0]])],
)
def test_centroids_reject_bad_labels(labels):
    with pytest.raises(InputError):
        superpixel_centroids(labels)


def test_centroids_of_empty_labels():
    assert superpixel_centroids(np.zeros((0, 5), int)).shape == (0, 2)


@pytest.mark.parametrize(
    ("image", "kwargs"),
    [
        (np.zeros((4, 4), np.uint8), {}),
        (np.zeros((4, 4, 3), np.float32), {}),
        (np.zeros((4, 4, 3), np.uint8), {"scale": 0}),
        (np.zeros((4, 4, 3), np.uint8), {"min_size": 0}),
    ],
)
def test_superpixels_reject_bad_input(image, kwargs):
    with pytest.raises(InputError):
        felzenszwalb_superpixels(image, **kwargs)
