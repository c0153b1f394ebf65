"""Tokenizers built with Hugging Face `tokenizers` from a GGUF file's fields.

Byte-level BPE (`tokenizer.ggml.model` "gpt2", SmolLM2, Llama 3): a BPE model from
`tokenizer.ggml.tokens` and `.merges`; the pre-tokenizer that llama.cpp names by
`tokenizer.ggml.pre`, rebuilt for the values in `PRE_TOKENIZERS` only (any other would split text
differently without a word, so it is refused); ByteLevel decoder; control tokens as special
tokens. Text round-trips exactly.

Gemma's SentencePiece BPE (`Tokenizer.gemma`, model "llama"): spaces become "▁", BPE with byte
fallback, merges derived from the vocabulary (a Gemma GGUF stores none; `derived_merges`), control
tokens special and user-defined ones (runs of newlines, tabs, ...) matched whole, as transformers'
GGUF converter builds it (its ids are the reference the tests compare with).
`to_json_str` / `Tokenizer.from_json_str` save and restore it as Hugging Face `tokenizer.json`
(any `tokenizer.json`, e.g. Llama 3's, loads that way).

A tokenizer also knows the checkpoint's BOS and EOS tokens and whether the model's own
tokenizer puts BOS before a text (`adds_bos`); `start_token` is the token our token windows
start with.
"""

import copy
from collections.abc import Sequence

import gguf
from tokenizers import (AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers,
                        pre_tokenizers)

from attnprune_jax.errors import InputError, InputTypeError

BPE_MODEL = "gpt2"
SENTENCEPIECE_MODEL = "llama"  # tokenizer.ggml.model of SentencePiece vocabularies (Gemma)
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space
DOCUMENT_SEPARATOR = "<|endoftext|>"  # GPT-2-style vocabularies put it between documents


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  """llama.cpp's "smollm" (SmolLM2): each digit alone, then the GPT-2 regex, no prefix space."""
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])


PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


class Tokenizer:
  """`encode(str) -> list[int]` and `decode(list[int]) -> str`, no tokens added implicitly."""

  bos_token: str | None = None
  eos_token: str | None = None
  adds_bos: bool = False

  def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
               model: str, pre: str | None):
    """The GGUF fields tokenizer.ggml.{tokens, merges, token_type, model, pre} (BOS/EOS:
    `with_special_tokens`).

    `pre` None means the field is absent, which llama.cpp reads as its "default" pre-tokenizer;
    that one is not reproduced here, so an absent field is refused like any unsupported value.
    """
    if model != BPE_MODEL:
      raise InputError(f"tokenizer.ggml.model must be {BPE_MODEL!r} (byte-level BPE), "
                       f"got {model!r}")
    if pre is None:
      raise InputError("tokenizer.ggml.pre is absent, which llama.cpp reads as 'default'; "
                       f"supported values: {sorted(PRE_TOKENIZERS)}")
    if pre not in PRE_TOKENIZERS:
      raise InputError(f"tokenizer.ggml.pre {pre!r} is not supported; supported values: "
                       f"{sorted(PRE_TOKENIZERS)}")
    if len(tokens) != len(token_types):
      raise InputError(f"token_types must have one entry per token ({len(tokens)}), "
                       f"got {len(token_types)}")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    try:
      bpe = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as err:  # tokenizers raises a bare Exception
      raise InputError(f"tokenizer fields are inconsistent: {err}") from err
    bpe.pre_tokenizer = PRE_TOKENIZERS[pre]()
    bpe.decoder = decoders.ByteLevel()
    self.special_tokens = [token for token, kind in zip(tokens, token_types)
                           if kind == gguf.TokenType.CONTROL]
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False)
                            for token in self.special_tokens])
    self._tokenizer = bpe
    self.vocab_size = len(tokens)

  @classmethod
  def _wrapping(cls, hf_tokenizer: HFTokenizer, special_tokens: list[str]) -> "Tokenizer":
    """A Tokenizer around a built `tokenizers.Tokenizer` (no BOS/EOS known yet)."""
    tokenizer = cls.__new__(cls)
    tokenizer.special_tokens = special_tokens
    tokenizer._tokenizer = hf_tokenizer
    tokenizer.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
    return tokenizer

  @classmethod
  def gemma(cls, tokens: Sequence[str], token_types: Sequence[int], *,
            unk_token: str) -> "Tokenizer":
    """Gemma's SentencePiece BPE from a GGUF file's tokenizer.ggml.{tokens, token_type} (see the
    module docstring); `unk_token` the vocabulary's unknown token."""
    if len(tokens) != len(token_types):
      raise InputError(f"token_types must have one entry per token ({len(tokens)}), "
                       f"got {len(token_types)}")
    # A token of whitespace holding a space is stored with real spaces; the model looks it up
    # as "▁"s (transformers' rule, kept to the letter: its ids are the reference).
    spelled = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    if unk_token not in vocab:
      raise InputError(f"unk_token {unk_token!r} is not in the vocabulary")
    try:
      bpe = HFTokenizer(models.BPE(vocab=vocab, merges=derived_merges(spelled), fuse_unk=True,
                                   unk_token=unk_token, byte_fallback=True))
    except Exception as err:  # tokenizers raises a bare Exception
      raise InputError(f"tokenizer fields are inconsistent: {err}") from err
    bpe.normalizer = normalizers.Replace(" ", SPACE)
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    bpe.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    special = [t for t, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    known = bpe.get_vocab(with_added_tokens=True)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, token_types)
                    if kind == gguf.TokenType.USER_DEFINED and t in known])
    return cls._wrapping(bpe, special)

  @classmethod
  def from_json_str(cls, text: str) -> "Tokenizer":
    """The tokenizer of a `tokenizer.json` text (ours from `to_json_str`, or a checkpoint's):
    special tokens are the added tokens marked special, in id order; no BOS/EOS known yet
    (`with_special_tokens`)."""
    try:
      bpe = HFTokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception
      raise InputError(f"text is not a valid tokenizer.json: {err}") from err
    added = bpe.get_added_tokens_decoder()
    return cls._wrapping(bpe, [added[i].content for i in sorted(added) if added[i].special])

  def with_special_tokens(self, *, bos_token: str | None, eos_token: str | None,
                          adds_bos: bool) -> "Tokenizer":
    """A copy that knows the checkpoint's BOS/EOS tokens (each in the vocabulary, or None) and
    whether its model expects BOS before a text."""
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
      if token is not None and not self.has_token(token):
        raise InputError(f"{name} {token!r} is not in the vocabulary")
    if adds_bos and bos_token is None:
      raise InputError("adds_bos is true but there is no bos_token")
    tokenizer = copy.copy(self)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.adds_bos = bos_token, eos_token, adds_bos
    return tokenizer

  @property
  def start_token(self) -> str:
    """The token a window of text starts with: BOS where the model's tokenizer adds it (Llama 3),
    else the document separator <|endoftext|> (SmolLM2 and other GPT-2-style vocabularies), else
    BOS; InputError if there is none of them."""
    if self.adds_bos:
      return self.bos_token
    if self._tokenizer.token_to_id(DOCUMENT_SEPARATOR) is not None:
      return DOCUMENT_SEPARATOR
    if self.bos_token is not None:
      return self.bos_token
    raise InputError(f"the tokenizer has no BOS token and no {DOCUMENT_SEPARATOR}: a window of "
                     "text has no start token")

  def post_processor_adds(self, token: str) -> bool:
    """Whether the tokenizer.json's post-processor puts `token` before a text."""
    ids = self._tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == self.token_id(token)

  def has_token(self, token: str) -> bool:
    """Whether `token` is one token of the vocabulary."""
    return isinstance(token, str) and self._tokenizer.token_to_id(token) is not None

  def id_to_token(self, index: int) -> str:
    """The token string of an id."""
    if isinstance(index, bool) or not isinstance(index, int):
      raise InputError(f"a token id must be an integer, got {index!r}")
    token = self._tokenizer.id_to_token(index) if 0 <= index < self.vocab_size else None
    if token is None:
      raise InputError(f"token id {index} is not in the vocabulary of {self.vocab_size}")
    return token

  def to_json_str(self) -> str:
    """The Hugging Face `tokenizer.json` text of this tokenizer."""
    return self._tokenizer.to_str()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special-token strings in the text map to their ids."""
    if not isinstance(text, str):
      raise InputTypeError(f"text must be a str, got {type(text).__name__}")
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens included."""
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  def token_id(self, token: str) -> int:
    """The id of one token string (e.g. '<|endoftext|>')."""
    index = self._tokenizer.token_to_id(token)
    if index is None:
      raise InputError(f"token {token!r} is not in the vocabulary")
    return index


def derived_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
  """BPE merges implied by a vocabulary listed best-first (a SentencePiece BPE vocabulary's
  order is its merge order): every split of a token into two tokens of the vocabulary, ranked
  by the token's position, ties by the pieces' lengths (longest first), then by the pieces'
  ids. The rule of transformers' GGUF converter for Gemma, whose stored scores do not follow
  the merge order."""
  vocab = {token: index for index, token in enumerate(tokens)}
  merges = []
  for token, index in vocab.items():
    pairs = [(token[:i], token[i:]) for i in range(1, len(token))
             if token[:i] in vocab and token[i:] in vocab]
    pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges += [(index, left, right) for left, right in pairs]
  merges.sort(key=lambda m: (m[0], -len(m[1]), -len(m[2])))  # stable: ties keep the id order
  return [(left, right) for _, left, right in merges]
