"""The data-parallel helpers the PPO update and the SFT/RM loop share, on hand-worked numbers:
a rank's weighted pieces of a batch, and sums over ranks in a process of its own (world 1)."""

from __future__ import annotations

import pytest
import torch

from trainer.train_device import all_gather_rows, average_gradients, sum_over_ranks, weighted_pieces


def test_weighted_pieces_hand_worked():
    units = [1, 2, 3, 2]  # 8 in all
    assert weighted_pieces(units, 0, 2, max_rows=1) == [(slice(0, 1), 0.25), (slice(1, 2), 0.5)]
    assert weighted_pieces(units, 1, 2, max_rows=1) == [(slice(2, 3), 0.75), (slice(3, 4), 0.5)]
    assert weighted_pieces(units, 0, 1) == [(slice(0, 4), 1.0)]  # alone, unsplit: the plain loss
    assert weighted_pieces(units, 0, 1, max_rows=3) == [(slice(0, 3), 0.75), (slice(3, 4), 0.25)]
    assert weighted_pieces([4], 1, 2) == []  # fewer rows than ranks: nothing to do on rank 1
    assert weighted_pieces([0, 0], 0, 1) == [(slice(0, 2), 0.0)]  # no units at all: weight 0, not a division by 0


def test_weighted_piece_means_add_up_to_the_batch_mean():
    # Per-row token losses of unequal lengths; each piece's loss is its own token mean.
    rows = [torch.tensor([1.0]), torch.tensor([2.0, 4.0]), torch.tensor([3.0, 5.0, 7.0]), torch.tensor([6.0, 8.0])]
    batch_mean = torch.cat(rows).mean()
    units = [len(r) for r in rows]
    for world in (1, 2):
        total = 0.0
        for rank in range(world):
            for piece, w in weighted_pieces(units, rank, world, max_rows=1):
                total += w * torch.cat(rows[piece]).mean().item()
        assert total / world == pytest.approx(batch_mean.item())  # the ranks' mean of the weighted sums


def test_world_one_needs_no_process_group():
    mine = torch.arange(6.0).reshape(3, 2, 1)  # (K=3, b=2, 1)
    assert all_gather_rows(mine, 2, 1) is mine
    assert sum_over_ranks({"a": 1.5}, torch.device("cpu"), 1) == {"a": 1.5}
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([2.0, 3.0])
    average_gradients([p], 1)  # nothing to average with
    assert p.grad.tolist() == [2.0, 3.0]
