"""The length-grouped batch order: a permutation, deterministic in (seed, epoch), with less padding."""
import random

import pytest

from cfsam.data.formatting import length_grouped_order


def _padding(lengths, order, batch_size):
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


_RNG = random.Random(0)
LENGTHS = [_RNG.randint(20, 256) for _ in range(1003)]  # not a multiple of the batch


def test_is_a_permutation_and_deterministic():
    a = length_grouped_order(LENGTHS, 8, seed=1234, epoch=0)
    assert sorted(a) == list(range(len(LENGTHS)))
    assert a == length_grouped_order(LENGTHS, 8, seed=1234, epoch=0)
    assert a != length_grouped_order(LENGTHS, 8, seed=1234, epoch=1)
    assert a != length_grouped_order(LENGTHS, 8, seed=1, epoch=0)


def test_batches_share_lengths_and_the_steps_have_no_length_trend():
    import torch

    order = length_grouped_order(LENGTHS, 8, seed=3, epoch=0, mega=50)
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(3)).tolist()
    assert _padding(LENGTHS, order, 8) < 0.1 < _padding(LENGTHS, shuffled, 8)
    # within the first mega-batch the batches are not sorted by length
    first = [max(LENGTHS[i] for i in order[s:s + 8]) for s in range(0, 400, 8)]
    assert first != sorted(first) and first != sorted(first, reverse=True)


def test_mega_1_keeps_the_random_batches_as_sets():
    import torch

    order = length_grouped_order(LENGTHS, 8, seed=5, epoch=2, mega=1)
    perm = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(7)).tolist()
    assert [set(order[s:s + 8]) for s in range(0, 1000, 8)] == [set(perm[s:s + 8]) for s in range(0, 1000, 8)]


@pytest.mark.parametrize("bs, mega", [(0, 50), (8, 0)])
def test_bad_sizes_are_named(bs, mega):
    with pytest.raises(ValueError, match="positive"):
        length_grouped_order(LENGTHS, bs, seed=0, epoch=0, mega=mega)
