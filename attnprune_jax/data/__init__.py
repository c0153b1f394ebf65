"""The fixed corpus and its token windows.

Two public-domain Jane Austen novels ship as package data (extracted from Debian's
r-cran-janeaustenr by `tools/extract_austen.py`, one normalized paragraph per line; `read_text`
separates paragraphs by a blank line):
calibration windows come from *Emma*, evaluation windows from *Pride and Prejudice*, so the two
never share text (like the paper's C4 train/validation split).

A window is the tokenizer's start token (`Tokenizer.start_token`: `<|endoftext|>` for SmolLM2,
BOS `<|begin_of_text|>` for Llama 3) followed by ctx − 1 consecutive text tokens; windows are
taken in order from the start of the text and never overlap. Everything is deterministic.
"""

import functools
import gzip
from importlib import resources

import numpy as np

from attnprune_jax import validation
from attnprune_jax.errors import InputError

CALIBRATION_TEXT = "emma"
EVALUATION_TEXT = "prideprejudice"


def read_text(name: str) -> str:
  """The normalized text of a shipped novel ('emma' or 'prideprejudice'), paragraphs separated
  by a blank line as in the printed source."""
  if name not in (CALIBRATION_TEXT, EVALUATION_TEXT):
    raise InputError(f"name must be {CALIBRATION_TEXT!r} or {EVALUATION_TEXT!r}, got {name!r}")
  data = resources.files(__name__).joinpath(f"{name}.txt.gz").read_bytes()
  return "\n\n".join(gzip.decompress(data).decode("utf-8").splitlines())


@functools.lru_cache(maxsize=4)
def text_tokens(tokenizer, name: str) -> np.ndarray:
  """All tokens of a shipped novel, (tokens,) int32 (cached per tokenizer)."""
  if tokenizer is None:
    raise InputError("tokenizer is None: the model has none (a folder without tokenizer.json?); "
                     "windows of text need one")
  return np.asarray(tokenizer.encode(read_text(name)), np.int32)


def token_windows(tokenizer, name: str, *, count: int, ctx: int) -> np.ndarray:
  """`count` disjoint windows of `ctx` tokens from the start of a novel, (count, ctx) int32."""
  count = validation.check_positive_int("count", count)
  if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
    raise InputError(f"ctx must be an integer >= 2, got {ctx!r}")
  tokens = text_tokens(tokenizer, name)
  per_window = ctx - 1
  if count * per_window > tokens.size:
    raise InputError(f"count={count} windows of ctx={ctx} need {count * per_window} text tokens; "
                     f"{name} has {tokens.size}")
  text = tokens[:count * per_window].reshape(count, per_window)
  start = np.full((count, 1), tokenizer.token_id(tokenizer.start_token), np.int32)
  return np.concatenate([start, text], axis=1)


def calibration_windows(tokenizer, *, count: int, ctx: int) -> np.ndarray:
  """(count, ctx) calibration windows from Emma."""
  return token_windows(tokenizer, CALIBRATION_TEXT, count=count, ctx=ctx)


def evaluation_windows(tokenizer, *, count: int, ctx: int) -> np.ndarray:
  """(count, ctx) evaluation windows from Pride and Prejudice."""
  return token_windows(tokenizer, EVALUATION_TEXT, count=count, ctx=ctx)
