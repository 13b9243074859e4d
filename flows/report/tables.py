"""Terminal tables that stay readable in a narrow terminal and in a log file.

Rich fits a table to the console by shrinking columns, down to one character plus an
ellipsis; a build log (no terminal: rich assumes 80 columns) got the same. So: with no
terminal the table is printed as plain aligned text at its natural width (a log line may be
long, it is never cut); in a terminal it is a rich table whose columns keep at least their
header's width (or 12 characters) and fold long values onto more lines; when even that does
not fit, each row is printed as a block of `column: value` lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

MIN_FOLD = 12  # a folded column keeps at least this many characters (or its header's width)


@dataclass(frozen=True)
class Col:
    name: str
    right: bool = False  # numbers: right-aligned


def _plain(cell: str) -> str:
    return Text.from_markup(cell).plain


def render_plain(title: str, cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> str:
    """The table as aligned plain text, every cell whole."""
    cells = [[_plain(c) for c in r] for r in rows]
    widths = [max([len(c.name)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if c.right else v.ljust(w)
                         for v, w, c in zip(values, widths, cols, strict=True)).rstrip()

    out = [title, line([c.name for c in cols]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def render_records(title: str, cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> str:
    """One block of `column: value` lines per row: for terminals too narrow for any table."""
    key_w = max(len(c.name) for c in cols)
    out = [title]
    for r in rows:
        out.append("")
        out += [f"{c.name.rjust(key_w)}: {_plain(v)}" for c, v in zip(cols, r, strict=True)]
    return "\n".join(out)


def print_table(con: Console, title: str, cols: Sequence[Col], rows: Sequence[Sequence[str]],
                bold_last: bool = False) -> None:
    """Print a table readably whatever the console: see the module's docstring."""
    if not con.is_terminal:
        con.print(render_plain(title, cols, rows), markup=False, highlight=False, soft_wrap=True)
        return
    natural = [max([len(c.name)] + [len(_plain(r[i])) for r in rows]) for i, c in enumerate(cols)]
    floor = [min(n, max(len(c.name), MIN_FOLD)) for n, c in zip(natural, cols, strict=True)]
    overhead = 3 * len(cols) + 1  # rich's borders and padding
    if sum(floor) + overhead > con.width:
        con.print(render_records(title, cols, rows), markup=False, highlight=False, overflow="fold")
        return
    t = Table(title=escape(title))
    for c, f in zip(cols, floor, strict=True):
        t.add_column(c.name, justify="right" if c.right else "left", min_width=f, overflow="fold")
    for i, r in enumerate(rows):
        t.add_row(*r, style="bold" if bold_last and i == len(rows) - 1 else None)
    con.print(t)
