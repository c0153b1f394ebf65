"""What a run writes stays its own: one run per output (a lock), checkpoints checked piece by
piece on reading, JSON nesting limited, files with the umask's mode, Ctrl-C exit 130."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnprune_jax import cli, locks, models
from attnprune_jax.pipeline import prune_model
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import read_json, write_atomic
from attnprune_jax.run_folder import RunFolder
from attnprune_jax.settings import PruneSettings

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--sparsity", "0.5", "--layers", "0-1", "--calib-seqs", "2", "--calib-len", "16",
            "--heldout-seqs", "1", "--eval-tokens", "64", "--quiet"]


def _one_line(capsys) -> str:
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1, err
  return err


# One run per output -------------------------------------------------------------------------

@pytest.mark.parametrize("argv,option,path,folder", [
    (["prune", "--method", "wanda", "--out", "X"], "--out", "X", True),
    (["reproduce", "--results", "r.json", "--work", "w"], "--results", "r.json", False),
    (["reproduce", "--results", "r.json", "--work", "w"], "--work", "w", True),
    (["reproduce", "--targets", "all"], "--results", "results/whole_model.json", False),
    (["convergence", "--quick", "--out", "c"], "--out", "c", True)])
def test_a_second_run_on_an_output_in_use_is_refused_before_work(
    monkeypatch, tmp_path, capsys, argv, option, path, folder):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(cli, "COMMANDS", tuple(
      command._replace(run=lambda args, reporter: pytest.fail("the work started"))
      for command in cli.COMMANDS))
  with locks.exclusive(path, option, folder=folder):  # the first run
    assert cli.main(argv) == 2
  err = _one_line(capsys)
  assert f"error: {option} {path} is in use by another run (process {os.getpid()} on " in err
  assert not locks.lock_path(path, folder=folder).exists()  # the first run's end removes it


def test_a_stale_lock_and_unfinished_writes_are_taken_over(tiny_folder, tmp_path, capsys):
  out = tmp_path / "X"
  out.mkdir()
  (out / ".lock").write_text("process 999999 on elsewhere, started 2026-01-01 00:00:00\n")
  (out / ".layer-000.npz.abc.tmp").write_bytes(b"half")  # a killed run's unfinished write
  (out / ".model.abc.tmp").mkdir()
  (out / "sub").mkdir()
  (out / "sub/.results.json.abc.tmp").write_bytes(b"half")  # at any depth
  (out / ".other.json.abc.tmp").write_bytes(b"busy")  # another run's, whose file is locked:
  (out / ".other.json.lock").write_text("process 1 on here\n")  # kept
  assert cli.main(["prune", "--model", str(tiny_folder), "--method", "wanda", "--out", str(out),
                   *TINY_RUN]) == 0
  assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
      ".other.json.abc.tmp", ".other.json.lock", "checkpoint.json", "layer-000.npz",
      "layer-001.npz", "results.json", "sub"]


def test_the_lock_is_the_kernels_and_ends_with_its_process(tmp_path):
  """A process holding the lock is named in the refusal; once it is killed, the lock is free."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from attnprune_jax import locks\n"
       f"with locks.exclusive({str(tmp_path)!r}, '--out', folder=True):\n"
       "  print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(ValueError, match=f"in use by another run \\(process {holder.pid} on "):
      with locks.exclusive(tmp_path, "--out", folder=True):
        pass
  finally:
    holder.kill()
    holder.wait()
  with locks.exclusive(tmp_path, "--out", folder=True):  # stale: taken over
    assert f"process {os.getpid()} " in (tmp_path / ".lock").read_text()


def _dangling(name):
  os.symlink("nowhere", name)


def _folder_with(entry, *, link=False):
  def make():
    os.mkdir("X")
    if link:
      os.symlink("nowhere", f"X/{entry}")
    else:
      os.mkdir(f"X/{entry}")
  return make


@pytest.mark.parametrize("setup,extra,message", [
    (lambda: _dangling("X"), [], "--out: cannot create 'X': 'X' is a symbolic link to nothing"),
    (lambda: os.symlink("X", "X"), [], "'X' is a symbolic link to nothing (or to itself)"),
    (_folder_with("results.json"), [], "--out (results.json) must be a file path"),
    (_folder_with("checkpoint.json"), [], "--out (checkpoint.json) must be a file path"),
    (_folder_with("layer-003.npz"), [], "--out (layer-003.npz) must be a file path"),
    (_folder_with("model", link=True), ["--save-weights"],
     "--save-weights: the model folder X/model exists already"),
    (lambda: os.mkdir("J"), ["--json", "J"], "--json must be a file path"),
])
def test_every_path_a_run_writes_is_checked_before_work(monkeypatch, tmp_path, capsys, setup,
                                                         extra, message):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the work started"))
  setup()
  assert cli.main(["prune", "--method", "wanda", "--sparsity", "0.5", "--out", "X", *extra]) == 2
  assert message in _one_line(capsys)


# Checkpoints checked on reading --------------------------------------------------------------

def _spoil_records(folder: Path, change) -> None:
  state = json.loads((folder / "checkpoint.json").read_text())
  change(state)
  (folder / "checkpoint.json").write_text(json.dumps(state))


def _spoil_layer(folder: Path, change) -> None:
  with np.load(folder / "layer-001.npz") as stored:
    arrays = dict(stored)
  change(arrays)
  np.savez(folder / "layer-001.npz", **arrays)


SPOILED = {
    "layers are numbers": lambda f: _spoil_records(f, lambda s: s.update(layers=[0, 1, 2])),
    "a record lacks a field": lambda f: _spoil_records(
        f, lambda s: s["layers"][1].pop("attention_error")),
    "a record has another layer": lambda f: _spoil_records(
        f, lambda s: s["layers"][1].update(layer=5)),
    "a kept count is text": lambda f: _spoil_records(
        f, lambda s: s["layers"][1]["kept"].update(q_proj="12")),
    "an error is NaN": lambda f: _spoil_records(
        f, lambda s: s["layers"][1].update(attention_error=float("nan"))),
    "a layer's q_proj has another shape": lambda f: _spoil_layer(
        f, lambda a: a.update(q_proj=a["q_proj"][:-1])),
    "a layer's q_proj has another dtype": lambda f: _spoil_layer(
        f, lambda a: a.update(q_proj=a["q_proj"].astype(np.float64))),
    "a layer holds NaN": lambda f: _spoil_layer(
        f, lambda a: a["q_proj"].__setitem__((0, 0), np.nan)),
    "a layer file of another run": lambda f: _spoil_layer(
        f, lambda a: a.update(run_key=np.array("0" * 64))),
    "a layer file with another entry": lambda f: _spoil_layer(
        f, lambda a: a.update(extra=np.zeros(1))),
}


@pytest.mark.parametrize("spoil", list(SPOILED))
def test_a_malformed_checkpoint_is_ignored_and_recomputed(tiny, tmp_path, spoil):
  model, calibration, heldout = tiny
  settings = PruneSettings("wanda", 0.5, None, (0, 1, 2), targets="all")
  whole = prune_model(model, settings, calibration, heldout, folder=RunFolder(tmp_path))
  SPOILED[spoil](tmp_path)
  stream = io.StringIO()
  again = prune_model(model, settings, calibration, heldout, folder=RunFolder(tmp_path),
                      reporter=Reporter(stream=stream))
  assert "ignoring" in stream.getvalue() and "starting afresh" in stream.getvalue()
  untimed = lambda records: [{k: v for k, v in r.items() if k != "prune_time_s"}
                             for r in records]
  assert untimed(again.layers) == untimed(whole.layers)
  for name, value in whole.weights.items():
    np.testing.assert_array_equal(again.weights[name], value)


def test_layer_files_from_before_the_run_digest_are_resumed(tiny, tmp_path):
  """Layer files written before they carried their run's digest count by the checkpoint's key."""
  model, calibration, heldout = tiny
  settings = PruneSettings("wanda", 0.5, None, (0, 1, 2), targets="all")
  whole = prune_model(model, settings, calibration, heldout, folder=RunFolder(tmp_path))
  for index in range(3):
    with np.load(tmp_path / f"layer-{index:03d}.npz") as stored:
      arrays = {name: stored[name] for name in stored.files if name != "run_key"}
    np.savez(tmp_path / f"layer-{index:03d}.npz", **arrays)
  stream = io.StringIO()
  again = prune_model(model, settings, calibration, heldout, folder=RunFolder(tmp_path),
                      reporter=Reporter(stream=stream))
  assert "resuming after layer 2" in stream.getvalue() and "ignoring" not in stream.getvalue()
  assert again.layers == whole.layers  # the stored records, times included


# JSON nesting and file modes -----------------------------------------------------------------

def test_deeply_nested_json_is_one_line(tiny_folder, tmp_path, capsys):
  deep = "[" * 100_000 + "]" * 100_000
  with pytest.raises(ValueError, match="nested more than"):
    (tmp_path / "deep.json").write_text(deep)
    read_json(tmp_path / "deep.json")
  model = tmp_path / "model"
  model.mkdir()
  for item in tiny_folder.iterdir():
    (model / item.name).symlink_to(item)
  (model / "config.json").unlink()
  (model / "config.json").write_text(deep)
  assert cli.main(["eval", "--model", str(model), "--quiet"]) == 2
  assert "config.json is not valid JSON: nested more than" in _one_line(capsys)
  (tmp_path / "results.json").write_text('{"rows": ' + deep + "}")
  assert cli.main(["reproduce", "--model", str(tiny_folder), "--results",
                   str(tmp_path / "results.json"), "--report-only", "--quiet"]) == 2
  assert "is not a results file of reproduce (ValueError: nested more than" in _one_line(capsys)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tiny_folder, tmp_path, mask):
  old = os.umask(mask)
  try:
    write_atomic(tmp_path / "file", lambda handle: handle.write(b"x"))
    assert cli.main(["prune", "--model", str(tiny_folder), "--method", "wanda", "--out",
                     str(tmp_path / "X"), "--save-weights", *TINY_RUN]) == 0
  finally:
    os.umask(old)
  files = [tmp_path / "file", *(tmp_path / "X").iterdir(), *(tmp_path / "X/model").iterdir()]
  for path in files:
    assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path


# Ctrl-C ----------------------------------------------------------------------------------------

def _default_sigint() -> None:
  signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_a_real_solve_exits_130_and_loses_nothing(tmp_path):
  """SIGINT at several points of a real attention-aware prune (the hostile probe's case): exit
  130 with one line each time (never a crash in teardown), and the resumed run ends with the
  uninterrupted run's numbers."""
  command = [sys.executable, "-m", "attnprune_jax.cli", "prune", "--method", "attn-reweight",
             "--sparsity", "0.5", "--layers", "0-1", "--calib-seqs", "2", "--calib-len", "128",
             "--eval-tokens", "512", "--quiet"]
  environment = os.environ | {"PYTHONPATH": str(ROOT)}
  reference = subprocess.run(command + ["--out", str(tmp_path / "reference")], cwd=ROOT,
                             env=environment, capture_output=True, text=True, timeout=900)
  assert reference.returncode == 0, reference.stderr
  codes = []
  for delay in (3.0, 8.0, 14.0, 20.0):
    # Ctrl-C's default action in the child: a test run in a background job inherits SIGINT
    # ignored (POSIX shells without job control do this), and the prune rightly keeps it so
    run = subprocess.Popen(command + ["--out", str(tmp_path / "X")], cwd=ROOT, env=environment,
                           stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    started = time.perf_counter()
    err = run.communicate(timeout=120)[1]
    assert time.perf_counter() - started < 10, ("Ctrl-C waited for the computation", delay)
    assert run.returncode in (130, 0), (delay, run.returncode, err)
    codes.append(run.returncode)
    if run.returncode == 130:
      assert err.splitlines()[-1].endswith("interrupted; rerun the same command to resume"), err
      assert "Traceback" not in err, err
  assert codes.count(130) >= 3, codes  # the runs were interrupted, not finished
  done = subprocess.run([c for c in command if c != "--quiet"] + ["--out", str(tmp_path / "X")],
                        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr
  assert "ignoring" not in done.stderr, done.stderr  # what the interrupted runs finished is kept
  expected = read_json(tmp_path / "reference/results.json")
  resumed = read_json(tmp_path / "X/results.json")
  assert resumed["perplexity"] == expected["perplexity"]
  assert resumed["layers"][1]["kept"] == expected["layers"][1]["kept"]
