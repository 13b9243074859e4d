"""Packing: several chat samples in one row of up to max_len tokens, so a step pads little.

Rows are filled first-fit decreasing from a window of samples (VITA packs to about 6,000
tokens). Inside a row each sample keeps its own positions (restarting at 0), and the model gives
the LLM those position ids with no 2D mask, from which it builds a block-diagonal causal mask:
no token attends across a sample boundary, so a sample's loss is the same packed or alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose total is at most `capacity`; longest first,
    each into the first row it fits (ties by index, so the result is deterministic)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a row of {capacity}")
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def row_layout(lengths: list[list[int]]) -> dict[str, torch.Tensor]:
    """For rows of sample lengths: position ids restarting at each sample (the padding after the
    last one counts as a sample of its own), the real-token mask, and each sample's
    (row, start, end)."""
    width = max(sum(r) for r in lengths)
    pos = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    spans = []
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            pos[r, start:start + n] = torch.arange(n)
            spans.append((r, start, start + n))
            start += n
        mask[r, :start] = 1
        pos[r, start:] = torch.arange(width - start)
    return {"position_ids": pos, "attention_mask": mask,
            "spans": torch.tensor(spans, dtype=torch.long).view(-1, 3)}
