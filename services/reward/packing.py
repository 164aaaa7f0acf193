"""Packing plan: lay scoring items end to end in rows of a fixed token budget (no torch).

Padded batches pay for every pad token; packed rows pay only for a row's unused tail. Items
of lengths 64-1024 go into rows of `row_tokens` by first-fit decreasing (longest first,
each into the first row with room), which keeps the tail small. A row's padded length is
the smallest of a few fixed `buckets` that holds it, so a compiled backbone sees a handful
of shapes and never recompiles under load. The forward pass itself is packed_forward.py.

    >>> plan = plan_packed_rows([5, 7, 3, 2, 6, 1], row_tokens=10, buckets=(10,))
    >>> [[s.index for s in row.items] for row in plan.rows]
    [[1, 2], [4, 3, 5], [0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PackingOptions:
    """How rows are built and run; the reward settings fill it (`--packing`, `--compile`, ...).

    Here rather than in packed_forward.py so settings can build it without importing torch."""

    row_tokens: int | None = None  # None: packed_forward.default_row_tokens(...)
    buckets: tuple[int, ...] | None = None  # None: default_buckets(row_tokens, bucket_count)
    bucket_count: int = 4  # how many row lengths when `buckets` is None; each is one compile
    attention: str = "auto"  # auto | flex | sdpa | eager
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    compile_backend: str = "inductor"


@dataclass(frozen=True)
class Slot:
    """One item inside a row: tokens [start, start + length) of the row are item `index`."""

    index: int  # position of the item in the caller's list
    start: int
    length: int

    @property
    def last(self) -> int:
        """Offset of the item's last token in the row (where a decoder RM pools)."""
        return self.start + self.length - 1


@dataclass(frozen=True)
class PackedRow:
    """Items laid end to end; `length` is the bucket the row is padded to (>= used)."""

    items: tuple[Slot, ...]
    length: int

    @property
    def used(self) -> int:
        return sum(s.length for s in self.items)


@dataclass(frozen=True)
class PackPlan:
    """Rows in the order they are built (the first row holds the longest item)."""

    rows: tuple[PackedRow, ...]
    row_tokens: int
    buckets: tuple[int, ...]

    @property
    def real_tokens(self) -> int:
        return sum(r.used for r in self.rows)

    @property
    def padded_tokens(self) -> int:
        """Tokens the forward passes actually compute: sum of the rows' bucket lengths."""
        return sum(r.length for r in self.rows)

    @property
    def fill(self) -> float:
        """real / padded tokens: 1.0 means no compute is spent on padding."""
        return self.real_tokens / self.padded_tokens if self.rows else 1.0


def default_buckets(row_tokens: int, count: int = 4, multiple: int = 128) -> tuple[int, ...]:
    """`count` row lengths: row_tokens, row_tokens/2, /4, ... rounded up to `multiple`.

    128 is FlexAttention's block size, so every bucket is whole blocks; the last (short)
    row of a plan then pays at most half its length in padding. Ascending, no duplicates.
    """
    if row_tokens < 1 or count < 1 or multiple < 1:
        raise ValueError(f"row_tokens ({row_tokens}), count ({count}) and multiple ({multiple}) must be >= 1")
    sizes = {row_tokens}
    for k in range(1, count):
        size = -(-row_tokens // (2**k))  # ceil
        size = min(row_tokens, -(-size // multiple) * multiple)
        sizes.add(size)
    return tuple(sorted(sizes))


def check_buckets(row_tokens: int, buckets: Sequence[int]) -> tuple[int, ...]:
    """Buckets sorted ascending; the largest must be row_tokens (a full row needs a shape)."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"buckets must be positive row lengths, got {list(buckets)}")
    if out[-1] != row_tokens:
        raise ValueError(f"the largest bucket ({out[-1]}) must equal row_tokens ({row_tokens}): "
                         "a full row must have a shape to run in")
    return out


def bucket_for(used: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= used (buckets ascending)."""
    for b in buckets:
        if b >= used:
            return b
    raise ValueError(f"{used} tokens do not fit the largest bucket {buckets[-1]}")


def plan_packed_rows(
    lengths: Sequence[int], row_tokens: int, buckets: Sequence[int] | None = None
) -> PackPlan:
    """First-fit decreasing: items by length, longest first (ties: lower index first), each
    into the first open row with room, else a new row. Every item lands in exactly one row,
    no row holds more than row_tokens real tokens. O(items x rows), fine for a queue window.
    """
    buckets = check_buckets(row_tokens, buckets if buckets is not None else default_buckets(row_tokens))
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"item {i} has {n} tokens; every scored item has at least one token")
        if n > row_tokens:
            raise ValueError(f"item {i} has {n} tokens, more than a packed row holds ({row_tokens}); "
                             "raise the row budget to at least the engine's max_tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[Slot]] = []
    used: list[int] = []
    for i in order:
        n = lengths[i]
        for r, u in enumerate(used):
            if u + n <= row_tokens:
                rows[r].append(Slot(i, u, n))
                used[r] = u + n
                break
        else:
            rows.append([Slot(i, 0, n)])
            used.append(n)
    packed = tuple(PackedRow(tuple(slots), bucket_for(u, buckets)) for slots, u in zip(rows, used))
    return PackPlan(packed, row_tokens, buckets)
