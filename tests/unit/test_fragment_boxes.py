"""A flat run of a row-major tensor as boxes of its shape: the arithmetic every checkpoint relies on."""

import math
import random

import pytest
import torch

from moe_dist.checkpoint.fragment import box_start, box_view, flat_boxes


def _check(shape, start, n):
    boxes = flat_boxes(shape, start, n)
    assert len(boxes) <= 2 * (len(shape) - 1) + 1, f"{shape} [{start}, {start + n}): {len(boxes)} boxes"
    full = torch.arange(math.prod(shape)).view(shape)
    run = torch.arange(start, start + n)
    covered = []
    for box in boxes:
        assert box.numel > 0, "a zero-size box reads as an overlap in DCP"
        block = full[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]
        assert torch.equal(box_view(run, box, start), block), f"{shape} [{start}, {start + n}): {box}"
        assert box_start(shape, box.offsets, box.sizes) == box.start
        covered += block.reshape(-1).tolist()
    assert sorted(covered) == list(range(start, start + n))


def test_every_run_of_small_shapes_is_covered_exactly_by_views():
    for shape in [(7,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]:
        numel = math.prod(shape)
        for start in range(numel):
            for end in range(start + 1, numel + 1):
                _check(shape, start, end - start)


def test_random_runs_of_random_shapes():
    rng = random.Random(0)
    for _ in range(2000):
        shape = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 4)))
        numel = math.prod(shape)
        start = rng.randrange(numel)
        _check(shape, start, rng.randint(1, numel - start))


def test_boxes_are_views_not_copies():
    run = torch.zeros(10)
    for box in flat_boxes((4, 5), 3, 10):
        box_view(run, box, 3).fill_(1.0)
    assert run.sum() == 10


def test_empty_run_gives_no_box_and_a_matrix_row_block_gives_one():
    assert flat_boxes((4, 5), 3, 0) == []
    (box,) = flat_boxes((4, 5), 5, 10)
    assert (box.offsets, box.sizes) == ((1, 0), (2, 5))


def test_box_start_refuses_a_box_that_is_not_one_run():
    with pytest.raises(ValueError, match="not a contiguous run"):
        box_start((4, 5), (0, 1), (2, 3))
