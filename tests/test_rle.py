import numpy as np
import pytest
from pycocotools import mask as coco

from earthgptx.errors import InputError
from earthgptx.rle import mask_to_rle, rle_to_mask


def test_rle_matches_pycocotools_both_ways():
    rng = np.random.default_rng(0)
    for trial in range(300):
        h, w = rng.integers(1, 50, 2)
        m = rng.random((h, w)) < rng.random()
        if trial % 7 == 0:
            m[:] = trial % 2 == 0  # all background / all foreground
        ours = mask_to_rle(m)
        theirs = coco.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == [h, w]
        assert np.array_equal(coco.decode(ours), m)
        assert np.array_equal(rle_to_mask(ours), m)


def test_rle_known_value():
    m = np.zeros((3, 2), bool)
    m[1, 0] = True  # column-major: 0 1 0 | 0 0 0 -> runs 1,1,4
    assert rle_to_mask({"size": [3, 2], "counts": [1, 1, 4]}).tolist() == m.tolist()
    assert mask_to_rle(m) == {"size": [3, 2], "counts": "114"}


def test_rle_bad_input():
    with pytest.raises(InputError):
        rle_to_mask({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(InputError):
        rle_to_mask({"counts": "12"})
