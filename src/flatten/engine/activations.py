"""The calibration activations a compression walks up through the model as it changes, kept between steps.

A ``Flattener`` builds each step on the activations that reach it in the already-compressed model below it
(sequential calibration), and, fitting to the dense model, on the original model's activations at the same
depth. Walking the calibration set up from the embeddings for every step would cost a pass per step: the
``Activations`` keep a few block boundaries (``Cursor``s) and walk up from the highest one below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

Span = tuple[int, int]  # first and last original block held by a block, inclusive
MAX_CURSORS = 8  # block boundaries whose calibration activations a compression keeps at most


@dataclass
class Cursor:
    """Activations at the input of current block ``position`` on the calibration ``rows`` (one tensor per
    batch), the other arguments of every current block, and (fitting to the dense model) the original
    model's activations at the same boundary and after the span last fitted from there."""

    rows: slice
    position: int
    hidden: list[Tensor]
    calls: list
    original: list[Tensor] | None
    dense: tuple[int, int, list[Tensor]] | None = None  # the last dense_after: first, last, activations

    def copy(self) -> Cursor:
        return Cursor(self.rows, self.position, self.hidden, list(self.calls), self.original)


def _key(rows: slice) -> tuple[int, int]:
    return rows.start, rows.stop


class Activations:
    """Cursors on ``calibration`` (token ids) of ``layers``, the model's list of blocks as it changes.

    ``capture(batches)``: the inputs of block 0 and every block's other arguments (``LayerInputs``);
    ``run(block, hidden, calls, name)``: a block's output; ``watch``: the ``Stopwatch`` phases are timed in.
    ``dense_rows``: the calibration rows on which the original model's activations are wanted as well (none:
    the compression does not fit to the dense model); its blocks are kept until the compression ends."""

    def __init__(self, layers: nn.ModuleList, calibration: Tensor, batch_size: int, capture: Callable,
                 run: Callable, watch, dense_rows: list[slice] = ()):
        self.layers, self.calibration, self.batch_size = layers, calibration, batch_size
        self.capture, self.run, self.watch = capture, run, watch
        self.cursors: list[Cursor] = []
        self.originals = list(layers) if dense_rows else []
        self.original_calls = {_key(rows): capture(self._batches(rows)).calls for rows in dense_rows}

    def _batches(self, rows: slice) -> list[Tensor]:
        return list(self.calibration[rows].split(self.batch_size))

    def at(self, position: int, rows: slice, spans: list[Span]) -> Cursor:
        """A cursor holding the activations at the input of block ``position`` on the calibration ``rows``,
        walked up from the highest cursor below it (or from the embeddings); ``spans``: the original blocks
        each current block holds. The cursors made are kept (up to ``MAX_CURSORS``, the lowest always) while
        the blocks below them stay as they are: a search tries the same positions again after a step above."""
        usable = [c for c in self.cursors if c.rows == rows and c.position <= position]
        if usable:
            start = max(usable, key=lambda c: c.position)
        else:
            inputs = self.capture(self._batches(rows))
            dense = _key(rows) in self.original_calls
            start = Cursor(rows, 0, inputs.hidden, list(inputs.calls), inputs.hidden if dense else None)
            self.cursors.append(start)
        if start.position == position:
            return start
        cursor = start.copy()
        with self.watch("running compressed blocks"):
            while cursor.position < position:
                i = cursor.position
                cursor.hidden = self.run(self.layers[i], cursor.hidden, cursor.calls[i], f"block {i}")
                if cursor.original is not None:
                    cursor.original = self._run_originals(cursor.original, rows, spans[i][0], spans[i][1])
                cursor.position += 1
        lowest = min((c for c in self.cursors if c.rows == rows), key=lambda c: c.position)
        self.cursors = [lowest] + [c for c in self.cursors if c is not lowest][-(MAX_CURSORS - 2):] + [cursor]
        return cursor

    def dense_after(self, cursor: Cursor, first: int, last: int) -> list[Tensor]:
        """The original model's activations after its blocks ``first``..``last``, run from the cursor's (at the
        input of block ``first``). The cursor keeps the last run, continued when a span grows upwards (each
        step of a run of absorbs adds one block to the same span)."""
        start, targets = first, cursor.original
        if cursor.dense is not None and cursor.dense[0] == first and cursor.dense[1] <= last:
            start, targets = cursor.dense[1] + 1, cursor.dense[2]
        targets = self._run_originals(targets, cursor.rows, start, last)
        cursor.dense = (first, last, targets)
        return targets

    def _run_originals(self, hidden: list[Tensor], rows: slice, first: int, last: int) -> list[Tensor]:
        calls = self.original_calls[_key(rows)]
        for j in range(first, last + 1):
            hidden = self.run(self.originals[j], hidden, calls[j], f"original block {j}")
        return hidden

    def merged(self, position: int, count: int) -> None:
        """Account for current blocks ``position`` .. ``position + count - 1`` having become one: the cursors
        above ``position`` are gone, the others forget the removed blocks' arguments."""
        self.cursors = [c for c in self.cursors if c.position <= position]
        for cursor in self.cursors:
            del cursor.calls[position + 1 : position + count]
