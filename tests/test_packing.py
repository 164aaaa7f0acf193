"""The packing planner (services.reward.packing): pure, so hand-worked examples and properties."""

from __future__ import annotations

import random

import pytest

from services.reward.packing import bucket_for, check_buckets, default_buckets, plan_packed_rows


def test_hand_worked_ffd_example():
    # Sorted longest first: 7(i1) 6(i4) 5(i0) 3(i2) 2(i3) 1(i5), budget 10.
    # 7 -> row0; 6 does not fit row0 (3 left) -> row1; 5 fits neither -> row2;
    # 3 -> row0 (full); 2 -> row1 (8); 1 -> row1 (9).
    plan = plan_packed_rows([5, 7, 3, 2, 6, 1], row_tokens=10, buckets=(10,))
    assert [[(s.index, s.start, s.length) for s in r.items] for r in plan.rows] == [
        [(1, 0, 7), (2, 7, 3)],
        [(4, 0, 6), (3, 6, 2), (5, 8, 1)],
        [(0, 0, 5)],
    ]
    assert [r.used for r in plan.rows] == [10, 9, 5]
    assert plan.real_tokens == 24 and plan.padded_tokens == 30 and plan.fill == pytest.approx(0.8)
    assert plan.rows[0].items[0].last == 6 and plan.rows[0].items[1].last == 9


def test_rows_pad_to_the_smallest_bucket_that_holds_them():
    plan = plan_packed_rows([5, 7, 3, 2, 6, 1], row_tokens=10, buckets=(4, 6, 8, 10))
    assert [(r.used, r.length) for r in plan.rows] == [(10, 10), (9, 10), (5, 6)]
    assert bucket_for(1, (4, 8)) == 4 and bucket_for(4, (4, 8)) == 4 and bucket_for(5, (4, 8)) == 8
    with pytest.raises(ValueError, match="largest bucket 8"):
        bucket_for(9, (4, 8))


def test_default_buckets_halve_and_round_to_blocks():
    assert default_buckets(32768) == (4096, 8192, 16384, 32768)
    assert default_buckets(2048, count=3) == (512, 1024, 2048)
    assert default_buckets(300, count=4, multiple=128) == (128, 256, 300)  # ceil(300/8)=38 -> 128, capped, deduplicated
    assert default_buckets(100, count=1) == (100,)


def test_bad_inputs_say_what_to_change():
    with pytest.raises(ValueError, match="more than a packed row holds"):
        plan_packed_rows([3, 11], row_tokens=10, buckets=(10,))
    with pytest.raises(ValueError, match="at least one token"):
        plan_packed_rows([3, 0], row_tokens=10, buckets=(10,))
    with pytest.raises(ValueError, match="must equal row_tokens"):
        check_buckets(10, (4, 8))
    with pytest.raises(ValueError, match="positive"):
        check_buckets(10, (0, 10))
    assert plan_packed_rows([], row_tokens=10).rows == ()


@pytest.mark.parametrize("seed", range(20))
def test_plan_properties_on_random_lengths(seed):
    rng = random.Random(seed)
    row_tokens = rng.choice([64, 100, 1024])
    lengths = [rng.randint(1, row_tokens) if rng.random() < 0.2 else rng.randint(1, row_tokens // 4 + 1)
               for _ in range(rng.randint(1, 200))]
    buckets = default_buckets(row_tokens, count=3, multiple=16)
    plan = plan_packed_rows(lengths, row_tokens, buckets)

    # Every item exactly once, with its own length.
    placed = sorted((s.index, s.length) for r in plan.rows for s in r.items)
    assert placed == [(i, n) for i, n in enumerate(lengths)]
    for row in plan.rows:
        # Items laid end to end from 0, within the budget, padded to the smallest bucket that fits.
        starts = [s.start for s in row.items]
        assert starts == [sum(s.length for s in row.items[:k]) for k in range(len(row.items))]
        assert row.used <= row_tokens
        assert row.length == min(b for b in buckets if b >= row.used)
    assert plan.real_tokens == sum(lengths)

    # FFD: replay placements in decreasing-length order; each item went to the first row that had room.
    where = {s.index: (r, s) for r, row in enumerate(plan.rows) for s in row.items}
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    used: list[int] = []
    for i in order:
        r, slot = where[i]
        first_fit = next((k for k, u in enumerate(used) if u + lengths[i] <= row_tokens), len(used))
        assert r == first_fit, f"item {i} ({lengths[i]} tokens) went to row {r}, first fit was row {first_fit}"
        if r == len(used):
            used.append(0)
        assert slot.start == used[r]
        used[r] += lengths[i]


def test_ffd_fills_rows_well_on_the_benchmark_mix():
    # 512 items of 64-1024 tokens into 32k rows: FFD leaves little but the last row's tail.
    rng = random.Random(0)
    lengths = [rng.randint(64, 1024) for _ in range(512)]
    plan = plan_packed_rows(lengths, 32768)
    full = plan.rows[:-1]
    assert sum(r.used for r in full) / sum(r.length for r in full) > 0.99
    assert plan.fill > 0.9
