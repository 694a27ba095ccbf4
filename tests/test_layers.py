"""Default layer ids follow DESIGN.md's formulas; every validation rule names the id and the range."""

from __future__ import annotations

import warnings

import pytest

from draftfeed.client.errors import InvalidArgument
from draftfeed.client.layers import (
    default_dflash_layer_ids,
    default_dspark_layer_ids,
    default_eagle3_layer_ids,
    validate_dflash_layer_ids,
    validate_dspark_layer_ids,
    validate_eagle3_layer_ids,
)


@pytest.mark.parametrize("n", [8, 16, 28, 30, 36, 64])
def test_defaults_follow_the_formulas(n):
    assert default_eagle3_layer_ids(n) == [1, n // 2 - 1, n - 4]
    assert default_dflash_layer_ids(n, 1) == [n // 2]
    for k in (2, 3, 5):
        assert default_dflash_layer_ids(n, k) == [round(1 + i * (n - 4) / (k - 1)) for i in range(k)]
        assert default_dspark_layer_ids(n, k) == sorted({round(1 + i * (n - 2) / (k - 1)) for i in range(k)})
    assert default_dspark_layer_ids(n, 1) == [n - 1]
    assert default_dspark_layer_ids(n, 10 * n) == default_dspark_layer_ids(n, n - 1)  # K clamped to N-1
    for ids in (default_eagle3_layer_ids(n), default_dflash_layer_ids(n)):
        assert all(0 <= i < n for i in ids)


def test_known_defaults():
    assert default_dflash_layer_ids(28) == [1, 7, 13, 19, 25]
    assert default_dflash_layer_ids(36) == [1, 9, 17, 25, 33]
    assert default_eagle3_layer_ids(16) == [1, 7, 12]


def test_eagle3_rules():
    assert validate_eagle3_layer_ids([0, 3, 7], 8) == [0, 3, 7]
    with pytest.raises(
        InvalidArgument, match=r"exactly 3 aux_layer_ids, got 2: \[1, 2\]; valid ids are 0..7"
    ):
        validate_eagle3_layer_ids([1, 2], 8)
    with pytest.raises(InvalidArgument, match=r"aux layer id 8 is out of range: valid ids are 0..7"):
        validate_eagle3_layer_ids([1, 2, 8], 8)
    with pytest.raises(InvalidArgument, match=r"aux layer id -1 is out of range"):
        validate_eagle3_layer_ids([-1, 2, 3], 8)
    with pytest.raises(
        InvalidArgument, match=r"distinct, got \[1, 1, 3\] \(id 1 repeats\); pick 3 different ids in 0..7"
    ):
        validate_eagle3_layer_ids([1, 1, 3], 8)
    with pytest.raises(InvalidArgument, match="not an integer"):
        validate_eagle3_layer_ids([1, 2.5, 3], 8)
    with pytest.raises(InvalidArgument, match="N=4"):
        default_eagle3_layer_ids(4)


def test_dflash_rules():
    assert validate_dflash_layer_ids([5], 8) == [5]
    with pytest.raises(InvalidArgument, match=r"must not be empty; pass ids in 0..7"):
        validate_dflash_layer_ids([], 8)
    with pytest.raises(InvalidArgument, match=r"target layer id 9 is out of range: valid ids are 0..7"):
        validate_dflash_layer_ids([1, 9], 8)


def test_dspark_rules():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_dspark_layer_ids([0, 3, 6], 8) == [0, 3, 6]
    with pytest.warns(UserWarning, match=r"\[-1, 7\].*SGLang"):
        validate_dspark_layer_ids([-1, 3, 7], 8)
    with pytest.raises(
        InvalidArgument,
        match=r"strictly increasing, got \[3, 3\] \(id 3 after 3\); valid ids are -1 and 0..7",
    ):
        validate_dspark_layer_ids([3, 3], 8)
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        validate_dspark_layer_ids([4, 2], 8)
    with pytest.raises(InvalidArgument, match=r"id -2 is out of range: valid ids are -1 .* and 0..7"):
        validate_dspark_layer_ids([-2, 3], 8)
    with pytest.raises(InvalidArgument, match=r"id 8 is out of range"):
        validate_dspark_layer_ids([3, 8], 8)
    with pytest.raises(
        InvalidArgument, match=r"must not be empty; pass strictly increasing ids from -1 and 0..7"
    ):
        validate_dspark_layer_ids([], 8)
