"""The `attnprune` command: registry, --help, --quiet, JSON results with provenance, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnprune_jax import cli

SMALL_DEMO = ["demo", "--n", "16", "--d", "8", "--rank", "4", "--steps", "5", "--sparsities",
              "0.5", "0.75"]


def test_demo_writes_json_with_provenance(tmp_path, capsys):
  out = tmp_path / "sub" / "demo.json"
  assert cli.main(SMALL_DEMO + ["--json", str(out), "--quiet"]) == 0
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == ""
  document = json.loads(out.read_text())
  assert document["schema_version"] == 1 and document["kind"] == "demo"
  provenance = document["provenance"]
  for field in ("git_commit", "versions", "seed", "settings", "wall_time_s", "platform"):
    assert field in provenance
  assert provenance["versions"]["jax"] and provenance["settings"]["steps"] == 5
  assert document["loss_after"] < document["loss_before"]
  assert document["lr_halvings"] == 0  # η = 1/L̂ is safe on the default kind of problem
  rows = document["pruned"]
  assert {row["method"] for row in rows} >= {"magnitude", "wanda-merged"}
  assert all(row["achieved_sparsity"] == row["sparsity"] for row in rows)
  assert all(row["attention_error"] >= 0 for row in rows)
  assert list(tmp_path.joinpath("sub").iterdir()) == [out]


def test_demo_prints_table_and_json_to_stdout(capsys):
  assert cli.main(SMALL_DEMO + ["--json", "-"]) == 0
  captured = capsys.readouterr()
  assert "magnitude" in captured.err and "L(M)" in captured.err
  assert json.loads(captured.out)["kind"] == "demo"


def test_bad_option_value_is_a_clear_error(capsys):
  assert cli.main(SMALL_DEMO[:-2] + ["1.5"]) == 2
  assert "--sparsities must be in [0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"]] + [[c.name, "--help"] for c in cli.COMMANDS])
def test_help_everywhere(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 0
  assert "usage: attnprune" in capsys.readouterr().out


def test_console_script_is_installed():
  script = Path(sys.executable).parent / "attnprune"
  done = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
  assert done.stdout.startswith("attnprune ")
