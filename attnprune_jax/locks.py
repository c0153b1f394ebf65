"""One run per output: a lock held on a folder or file for as long as a run writes it.

A second run on an output in use is refused with an `InputError` that names the process holding
it, before any work. The lock is the kernel's (`flock` on a hidden file beside the output), so it
ends with its process however that ends: the lock file a killed run leaves behind is recognised
as stale and taken over, with the temporary files of its unfinished writes
(`results.write_atomic`). A finished run removes its lock file.
"""

import contextlib
import fcntl
import glob
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from attnprune_jax.errors import InputError


def lock_path(output: str | os.PathLike, *, folder: bool) -> Path:
  """The lock file of an output: OUT/.lock for a folder, .NAME.lock beside a file."""
  output = Path(output)
  return output / ".lock" if folder else output.parent / f".{output.name}.lock"


def _holder(path: Path) -> str:
  try:
    text = path.read_text(encoding="ascii", errors="replace").strip()
  except OSError:
    text = ""
  return text or "a process that has not written its name yet"


def _remove_unfinished_writes(output: Path, *, folder: bool) -> None:
  """Removes the temporary files (`results.write_atomic`) and staged model folders that a dead
  run left in a folder now locked (at any depth), or beside a file now locked (its own and its
  Markdown twin's), except those of a file another run holds locked."""
  if folder:
    leftovers = output.rglob(".*.tmp")
  else:
    names = [output.name, output.with_suffix(".md").name]
    leftovers = [p for name in names for p in output.parent.glob(f".{glob.escape(name)}.*.tmp")]
  for leftover in leftovers:
    written = leftover.name[1:].rsplit(".", 2)[0]  # .NAME.RANDOM.tmp -> NAME
    if (leftover.parent / f".{written}.lock").exists():
      continue  # another run's file, beside or inside this output
    with contextlib.suppress(OSError):
      if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover)
      else:
        leftover.unlink()


@contextlib.contextmanager
def exclusive(output: str | os.PathLike, option: str, *, folder: bool) -> Iterator[None]:
  """Holds the lock of `output` (a folder if `folder`, else a file) while the block runs; an
  InputError naming `option` and the holder if another run holds it."""
  given, output = output, Path(output) if folder else Path(os.path.realpath(output))  # not a link's
  path = lock_path(output, folder=folder)
  while True:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
      raise InputError(f"{option} {given} cannot be written ({err.strerror}: "
                       f"{err.filename})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise InputError(f"{option} {given} is in use by another run ({_holder(path)}); wait "
                       f"for it to end or choose another {option}") from None
    except OSError as err:  # a file system without locks (some network ones)
      os.close(fd)
      raise InputError(f"{option} {given} cannot be locked for this run ({err.strerror}); "
                       "choose an output on a local file system") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:  # else the holder removed the file as we opened it: lock the new one
      break
    os.close(fd)
  try:
    _remove_unfinished_writes(output, folder=folder)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      path.unlink()
    os.close(fd)
