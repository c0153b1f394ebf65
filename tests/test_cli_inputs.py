"""Hostile input to `attnprune`: every bad option or output path is one line and exit 2 before
any work, Ctrl-C is one line and exit 130, and result files are standard JSON, never debris."""

import json
import math
import tempfile
import types
from pathlib import Path

import pytest

from attnprune_jax import cli, evaluate, models
from attnprune_jax.models.llama import LlamaConfig
from attnprune_jax.results import json_text, write_json_atomic
from attnprune_jax import pipeline
from experiments import demo, synthetic_convergence

PRUNE = ["prune", "--method", "attn-progressive", "--sparsity", "0.5", "--out", "p"]


def _no_work(*args, **kwargs):
  raise AssertionError("the work started before the input was checked")


@pytest.fixture
def no_work(monkeypatch, tmp_path):
  """Any model load, demo, synthetic run or perplexity fails the test; cwd is an empty folder
  holding `a_dir/` and `a_file`."""
  for module, name in ((models, "load"), (demo, "run"), (synthetic_convergence, "run"),
                       (evaluate, "perplexity"), (pipeline, "prune_model")):
    monkeypatch.setattr(module, name, _no_work)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "a_dir").mkdir()
  (tmp_path / "a_file").write_text("x")
  return tmp_path


def _one_line_error(capsys, command: str) -> str:
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"attnprune {command}: error: "), captured.err
  return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["demo", "--json", ""], "--json must be a file path, got an empty string"),
    (["demo", "--json", "a_dir"], "--json must be a file path, got 'a_dir', which is a folder"),
    (["demo", "--json", "new/"], "which is a folder"),
    (["demo", "--json", "a_file/r.json"], "'a_file' is a file, not a folder"),
    (["eval", "--json", "a_dir"], "--json must be a file path"),
    (["synthetic", "--out", ""], "--out must be a folder path, got an empty string"),
    (["synthetic", "--out", "a_file"], "--out must be a folder, got 'a_file', which is a file"),
    (["synthetic", "--out", "a_file/sub"], "'a_file' is a file, not a folder"),
    (["synthetic", "--out", "s", "--figures", "a_file"], "--figures must be a folder"),
    (["synthetic", "--out", "s", "--figures", ""], "--figures must be a folder path"),
    (PRUNE[:-1] + [""], "--out must be a folder path"),
    (PRUNE[:-1] + ["a_file"], "--out must be a folder"),
    (PRUNE + ["--json", "a_dir"], "--json must be a file path"),
    (["reproduce", "--results", "a_dir"], "--results must be a file path"),
    (["reproduce", "--results", ""], "--results must be a file path"),
    (["reproduce", "--work", "a_file"], "--work must be a folder"),
    (["reproduce", "--figures", "a_file"], "--figures must be a folder"),
    (["reproduce", "--quick", "--work", "a_file/w"], "'a_file' is a file"),
])
def test_bad_output_path_is_one_line_before_any_work(no_work, capsys, argv, message):
  assert cli.main(argv) == 2
  assert message in _one_line_error(capsys, argv[0])
  assert sorted(p.name for p in no_work.iterdir()) == ["a_dir", "a_file"]
  assert not list((no_work / "a_dir").iterdir())


def test_unwritable_output_folder_is_one_line(no_work, capsys, monkeypatch):
  # Permission bits do not stop root, so the folder refuses the probe file by hand.
  locked = no_work / "locked"
  locked.mkdir()
  real = tempfile.TemporaryFile

  def refuse_in_locked(*args, dir=None, **kwargs):
    if dir is not None and Path(dir) == locked:
      raise PermissionError(13, "Permission denied")
    return real(*args, dir=dir, **kwargs)

  monkeypatch.setattr(tempfile, "TemporaryFile", refuse_in_locked)
  assert cli.main(["demo", "--json", str(locked / "sub" / "r.json")]) == 2
  assert f"folder '{locked}' is not writable (Permission denied)" in _one_line_error(capsys,
                                                                                     "demo")


def test_failed_write_leaves_no_temporary_file(tmp_path):
  (tmp_path / "a_dir").mkdir()
  with pytest.raises(OSError):
    write_json_atomic(tmp_path / "a_dir", {"a": 1})
  assert [p.name for p in tmp_path.iterdir()] == ["a_dir"]
  assert not list((tmp_path / "a_dir").iterdir())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_never_written(tmp_path, value):
  document = {"kind": "x", "rows": [{"perplexity": 3.0}, {"perplexity": value}]}
  with pytest.raises(ValueError, match=r"rows\[1\]\.perplexity is (nan|inf|-inf); NaN"):
    write_json_atomic(tmp_path / "r.json", document)
  assert not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match=r"rows\[1\]\.perplexity"):
    json_text(document)
  assert json.loads(json_text({"a": [1.5, None]})) == {"a": [1.5, None]}


@pytest.mark.parametrize("argv,message", [
    (["demo", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["demo", "--n", "0"], "--n must be a positive integer, got 0"),
    (["demo", "--d", "3", "--rank", "2"], "--d must be at least 4"),
    (["demo", "--d", "8", "--rank", "9"], "--rank must be at most d=8, got 9"),
    (["demo", "--steps", "100000000000"], "--steps must be at most 10000000"),
    (["demo", "--lam", "-1"], "--lam must be >= 0, got -1"),
    (["demo", "--lam", "nan"], "--lam must be finite, got nan"),
    (["demo", "--step-fraction", "0"], "--step-fraction must be > 0, got 0"),
    (["demo", "--sparsities", "0.5", "1"], "--sparsities must be in [0, 1), got 1.0"),
    (["demo", "--seed", str(2**64)], "--seed must be a 64-bit integer"),
    (["demo", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["demo", "--n", "100000"], "--n: batch x n x max(n, d) and d x d must be at most"),
    (["demo", "--d", "4", "--rank", "4"], "--sparsities 0.9 keeps none of the d=4 entries"),
    (["eval", "--ctx", "1"], "--ctx must be at least 2"),
    (["eval", "--tokens", "-1"], "--tokens must be a positive integer"),
    (["eval", "--ctx", "100000"], "--tokens must be at least --ctx=100000"),
    (PRUNE[:3] + ["--sparsity", "nan", "--out", "p"], "--sparsity must be in [0, 1), got nan"),
    (PRUNE + ["--devices", "0"], "--devices must be 'all' or a count from 1"),
    (PRUNE + ["--devices", "100000"], "--devices must be 'all' or a count from 1 to "),
    (PRUNE + ["--devices", "¹"], "--devices must be 'all' or a count from 1"),
    (PRUNE[:3] + ["--pattern", "2:0", "--out", "p"], "--pattern must look like 2:4"),
    (PRUNE[:3] + ["--pattern", "2:4:8", "--out", "p"], "--pattern must look like 2:4"),
    (PRUNE[:3] + ["--pattern", "0.5", "--out", "p"], "--pattern must look like 2:4"),
    (PRUNE[:3] + ["--sparsity", "0.5", "--pattern", "2:4", "--out", "p"], "exactly one of"),
    (PRUNE + ["--layers", "5-3"], "--layers must look like"),
    (PRUNE + ["--calib-seqs", "0"], "--calib-seqs must be a positive integer"),
    (PRUNE + ["--eval-tokens", "100"], "--eval-tokens must be at least calib_len=512"),
    (PRUNE + ["--calib-seqs", "3"], "--windows-per-step (2) must divide the calibration windows"),
    (PRUNE + ["--lr", "0"], "--lr must be > 0, got 0"),
    (PRUNE + ["--reweight-lam", "-1"], "--reweight-lam must be >= 0"),
    (PRUNE + ["--rounds", "0"], "--rounds must be a positive integer"),
    (["prune", "--method", "wanda", "--sparsity", "0.5", "--lr", "0.1", "--out", "p"],
     "--lr applies only to the methods attn, attn-progressive, attn-reweight, attn-block, "
     "attn-block-reweight, not to wanda"),
    (PRUNE + ["--attention-weight", "0.5"],
     "--attention-weight applies only to the methods attn-block, attn-block-reweight, not to "
     "attn-progressive"),
    (PRUNE[:1] + ["--method", "attn-block"] + PRUNE[3:] + ["--target", "teachr"],
     "argument --target: invalid choice"),
    (PRUNE[:1] + ["--method", "attn-block"] + PRUNE[3:] + ["--attention-weight", "-1"],
     "--attention-weight must be >= 0"),
    (PRUNE[:1] + ["--method", "attn-block"] + PRUNE[3:] + ["--targets", "all", "--rest",
                                                          "wanda"],
     "--rest: attn-block prunes every target of a block itself"),
    (PRUNE + ["--targets", "all"], "--rest: attn-progressive prunes only q_proj and k_proj"),
    (PRUNE + ["--rest", "sparsegpt"], "--rest: rest='sparsegpt' prunes the targets beyond q/k"),
    (PRUNE + ["--true-sequential"], "--true-sequential orders a block's groups"),
    (PRUNE[:3] + ["--pattern", "2:4", "--allocation", "owl", "--out", "p"],
     "--allocation 'owl' shares one unstructured sparsity"),
    (["reproduce", "--targets", "all", "--methods", "owl:nonesuch"], "--methods: owl:nonesuch"),
    (PRUNE + ["--method", "nonesuch"], "argument --method: invalid choice: 'nonesuch'"),
    (["reproduce", "--targets", "all", "--methods", "attn"], "--methods: attn with targets all"),
    (["reproduce", "--report-only", "--results", "missing.json"], "needs stored rows"),
    (["reproduce", "--report-only", "--results", "a_file"], "--results: a_file is not a "
     "results file of reproduce"),
])
def test_bad_number_is_one_line_before_any_work(no_work, capsys, argv, message):
  assert cli.main(argv) == 2
  assert message in _one_line_error(capsys, argv[0])


class _Tokenizer:
  """A tokenizer whose texts are 1000 tokens long."""

  def encode(self, text):
    return list(range(1000))


def test_limits_of_the_model_are_checked_right_after_loading(no_work, capsys, monkeypatch):
  config = LlamaConfig(vocab_size=1000, hidden_size=8, intermediate_size=12, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=4, rope_base=1e4, rms_eps=1e-5)
  fake = types.SimpleNamespace(config=config, tokenizer=_Tokenizer())
  monkeypatch.setattr(models, "load", lambda name: fake)
  cases = [
      (["eval", "--tokens", "4096", "--ctx", "2048"], "--tokens and --ctx ask for 2 windows of "
       "2048 tokens, 4094 tokens of prideprejudice, which has 1000"),
      (PRUNE + ["--calib-len", "300"], "calib_seqs, heldout_seqs and calib_len ask for 12"),
      (PRUNE + ["--calib-len", "64", "--eval-tokens", "2048"], "eval_tokens and calib_len ask"),
      (PRUNE + ["--layers", "0-2"], "--layers must lie in 0-1, got (0, 1, 2)"),
      (PRUNE + ["--layers", "0-99999"], "--layers must lie in 0-1"),
      (PRUNE + ["--sparsity", "0.99"], "--sparsity 0.99 keeps none of the 8 entries of a q_proj"),
      (PRUNE[:3] + ["--pattern", "1:3", "--out", "p"], "--pattern: q_proj: n_m=(1, 3) needs the "
       "last axis to be a multiple of 3, got 8"),
      (PRUNE[:3] + ["--pattern", "1:8", "--targets", "all", "--rest", "wanda", "--out", "p"],
       "--pattern: down_proj: n_m=(1, 8) needs the last axis to be a multiple of 8, got 12"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2
    assert message in _one_line_error(capsys, argv[0])


@pytest.mark.parametrize("argv,resume", [
    (["demo"], False), (["eval"], False), (["synthetic", "--out", "s"], True),
    (PRUNE, True), (["reproduce"], True)])
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys, argv, resume):
  def interrupted(args, reporter):
    raise KeyboardInterrupt

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(cli, "COMMANDS", tuple(
      command._replace(run=interrupted) if command.name == argv[0] else command
      for command in cli.COMMANDS))
  try:
    code = cli.main(argv)
  except KeyboardInterrupt:  # not raised on: it would stop the whole test session
    pytest.fail("KeyboardInterrupt escaped cli.main")
  assert code == 130
  hint = "; rerun the same command to resume" if resume else ""
  assert capsys.readouterr().err == f"attnprune {argv[0]}: interrupted{hint}\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
  def broken(args, reporter):
    raise ZeroDivisionError("a bug")

  monkeypatch.setattr(cli, "COMMANDS", tuple(command._replace(run=broken)
                                             for command in cli.COMMANDS))
  with pytest.raises(ZeroDivisionError, match="a bug"):
    cli.main(["demo"])
