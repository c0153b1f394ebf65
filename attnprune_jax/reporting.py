"""The one reporter through which commands talk to people; `--quiet` silences it.

Human-readable text and progress bars go to stderr so that stdout can carry JSON for scripts.
"""

import dataclasses
import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Reporter:
  """Messages, tables and progress bars, all silenced when `quiet`."""
  quiet: bool = False
  stream: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)

  def info(self, message: str) -> None:
    if not self.quiet:
      print(message, file=self.stream, flush=True)

  def progress(self, iterable: Iterable, *, total: int | None = None, desc: str = ""):
    """Wraps `iterable` in a progress bar with rate and ETA (no bar when quiet)."""
    return tqdm(iterable, total=total, desc=desc, disable=self.quiet, file=self.stream,
                dynamic_ncols=True, leave=False)

  def table(self, header: list[str], rows: list[list]) -> None:
    """Prints rows as an aligned plain-text table; floats in 4 significant digits."""
    if self.quiet:
      return
    cells = [header] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
                        for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    self.info("\n".join(lines))
