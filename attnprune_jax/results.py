"""Result files: plain JSON with a schema version and provenance, written atomically."""

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import jax

SCHEMA_VERSION = 1
_PACKAGES = ("attnprune_jax", "jax", "jaxlib", "optax", "flax", "numpy")


def _git_commit() -> str | None:
  """HEAD of the checkout holding this package, with '-dirty' if it has local changes."""
  root = Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty.strip() else "")


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def provenance(*, seed: int | None, settings: dict, wall_time_s: float) -> dict:
  """What produced a result: code version, library versions, machine, seed, settings, time."""
  return {
      "git_commit": _git_commit(),
      "versions": {name: _version(name) for name in _PACKAGES} | {
          "python": platform.python_version()},
      "platform": platform.platform(),
      "jax_backend": jax.default_backend(),
      "devices": [str(device) for device in jax.devices()],
      "command": " ".join(sys.argv),
      "seed": seed,
      "settings": settings,
      "wall_time_s": wall_time_s,
      "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def result_document(kind: str, results: dict, provenance_record: dict) -> dict:
  """The JSON document of one command's results."""
  return {"schema_version": SCHEMA_VERSION, "kind": kind, "provenance": provenance_record,
          **results}


def write_json_atomic(path: str | os.PathLike, document: dict) -> None:
  """Writes `document` to `path` so that a reader sees the old file or the new one, never half."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                   delete=False) as handle:
    try:
      json.dump(document, handle, indent=2)
      handle.write("\n")
      handle.flush()
      os.fsync(handle.fileno())
      os.chmod(handle.name, 0o644)
    except BaseException:
      handle.close()
      os.unlink(handle.name)
      raise
  os.replace(handle.name, path)
