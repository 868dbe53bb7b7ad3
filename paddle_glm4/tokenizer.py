"""GLM4Tokenizer: GLM-4's tiktoken BPE vocabulary, its special tokens, its chat format and streaming decode.

A tokenizer directory holds two files, the same ones the published model ships:
- `tokenizer.model`: one base token per line, `<base64 bytes> <rank>`, ranks 0..n-1;
- `tokenizer_config.json`: the special tokens (`added_tokens_decoder`, ids n, n+1, ...), `eos_token`,
  `pad_token` and the Jinja `chat_template`.
Special ids are always taken from the files (151329.. for GLM-4-9B, lower for a small vocabulary built by
`paddle_glm4.small_vocab`).

Unlike the published tokenizer, text never becomes special ids unless the caller says so: `encode("<|user|>")`
gives the ids of those characters, and in `apply_chat_template` only the template's own structure yields special
ids (see chat_template.py). `allowed_special=` opts in.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import copy
import errno
import json
import operator
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import tiktoken

from .chat_template import STRUCTURAL_TEMPLATE, render_chat
from .checkpoint import write_text_atomic
from .validation import AnyOf, Map, Object, Optional, SchemaError, Str, read_bounded, read_json, validate

TOKENIZER_FILE = "tokenizer.model"
MAX_TOKENIZER_BYTES = 64 << 20  # GLM-4's tokenizer.model is 2.6 MB
CONFIG_FILE = "tokenizer_config.json"

# GLM-4's pre-tokenizer: BPE never merges across the pieces this pattern cuts text into.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# In id order, right after the base vocabulary.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
# Every encoded prompt starts with these two.
PREFIX_TOKENS = ("[gMASK]", "<sop>")
# Besides eos, generation stops where the model hands the turn back to the user or to a tool.
STOP_TOKENS = ("<|user|>", "<|observation|>")

Padding = bool | Literal["longest", "max_length", "do_not_pad"]


class TokenizerError(SchemaError):
    """A tokenizer file, token id or argument this tokenizer cannot work with."""


TOKEN_TEXT = AnyOf(Str(), Object({"content": Str()}, required=("content",)))  # transformers writes either
# The fields of tokenizer_config.json that are read (transformers writes many more).
CONFIG_SCHEMA = Object(
    {
        "added_tokens_decoder": Map(
            Object({"content": Str(max_len=256)}, required=("content",)),
            key=Str(pattern=r"[0-9]{1,9}", what="a token id (decimal digits)"),
            max_len=1 << 16,
        ),
        "eos_token": TOKEN_TEXT,
        "pad_token": TOKEN_TEXT,
        "chat_template": Optional(Str(max_len=1 << 20)),
        "truncation_side": Str(("left", "right")),
    }
)


def glm4_tokenizer_config(base_vocab_size: int, chat_template: str | None = None) -> dict[str, Any]:
    """A tokenizer_config.json for GLM-4's special tokens placed right after a base vocabulary of this size."""
    config: dict[str, Any] = {
        "added_tokens_decoder": {
            str(base_vocab_size + i): {"content": token, "special": True} for i, token in enumerate(GLM4_SPECIAL_TOKENS)
        },
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "tokenizer_class": "ChatGLM4Tokenizer",  # THUDM's name for it, which tools (PaddleNLP) recognise
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def read_tokenizer_model(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (`<base64 token> <rank>` per line) into {token bytes: rank}, checking it fully."""
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for number, line in enumerate(read_bounded(str(path), MAX_TOKENIZER_BYTES, TokenizerError).splitlines(), 1):
        where = f"{path}, line {number}"
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
        if not token or rank < 0:
            raise TokenizerError(f"{where}: empty token or negative rank in {line[:80]!r}")
        if rank in line_of_rank:
            raise TokenizerError(f"{where}: rank {rank} is already used on line {line_of_rank[rank]}")
        if token in ranks:
            raise TokenizerError(f"{where}: token {token!r} already has rank {ranks[token]}")
        ranks[token] = rank
        line_of_rank[rank] = number
    _check_ranks(ranks, str(path))
    return ranks


def write_tokenizer_files(directory: str | os.PathLike, tokens: Sequence[bytes], config: Mapping[str, Any]) -> Path:
    """Write `tokenizer.model` (token i gets rank i) and `tokenizer_config.json`, each atomically; return the
    directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))
    write_text_atomic(str(directory / TOKENIZER_FILE), "".join(lines))
    write_text_atomic(str(directory / CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory


def _check_ranks(ranks: Mapping[bytes, int], source: str):
    if set(ranks.values()) != set(range(len(ranks))):
        missing = min(set(range(len(ranks))) - set(ranks.values()))
        raise TokenizerError(
            f"{source}: ranks must run from 0 to {len(ranks) - 1} without gaps, but rank {missing} is missing"
        )
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise TokenizerError(
            f"{source}: {len(missing_bytes)} single bytes have no token (first: "
            f"0x{missing_bytes[0]:02x}), so some text could not be encoded"
        )


def _special_tokens(config: Mapping[str, Any], base_vocab_size: int, source: str) -> dict[str, int]:
    """{text: id} from `added_tokens_decoder`, whose ids must continue the base vocabulary without gaps."""
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, Mapping) or not decoder:
        raise TokenizerError(f"{source}: 'added_tokens_decoder' with the special tokens is missing")
    specials: dict[str, int] = {}
    for key, entry in decoder.items():
        token_id, text = int(key), entry["content"]  # CONFIG_SCHEMA made sure of their types
        if not text or text in specials:
            raise TokenizerError(f"{source}: special token {text!r} (id {key}) is empty, not text or repeated")
        specials[text] = token_id
    expected = range(base_vocab_size, base_vocab_size + len(specials))
    if sorted(specials.values()) != list(expected):
        wrong = sorted(set(specials.values()) ^ set(expected))[0]
        raise TokenizerError(
            f"{source}: special token ids must be {expected.start}..{expected.stop - 1}, right after "
            f"the {base_vocab_size} base tokens; id {wrong} breaks that"
        )
    return specials


def _token_text(config: Mapping[str, Any], key: str) -> str:
    # transformers writes these either as a string or as a serialized AddedToken.
    value = config.get(key, "<|endoftext|>")
    return value["content"] if isinstance(value, Mapping) else value


Tokenizer = TypeVar("Tokenizer", bound="GLM4Tokenizer")


class GLM4Tokenizer:
    """GLM-4's tokenizer on tiktoken: encode, decode, batch calls with left padding, chat template, streaming."""

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        config: Mapping[str, Any] | None = None,
        *,
        source: str = "tokenizer",
    ):
        """`mergeable_ranks`: {token bytes: rank}, ranks 0..n-1; `config`: the tokenizer_config.json content
        (GLM-4's special tokens after the base vocabulary when None); `source` names them in error messages."""
        _check_ranks(mergeable_ranks, source)
        self.base_vocab_size = len(mergeable_ranks)
        if config is None:
            config = glm4_tokenizer_config(len(mergeable_ranks))
        self.config = copy.deepcopy(dict(validate(config, CONFIG_SCHEMA, source, TokenizerError)))
        self.special_tokens = _special_tokens(self.config, self.base_vocab_size, source)
        self.vocab_size = self.base_vocab_size + len(self.special_tokens)

        self.eos_token, self.pad_token = _token_text(self.config, "eos_token"), _token_text(self.config, "pad_token")
        needed = {self.eos_token, self.pad_token, *PREFIX_TOKENS, *STOP_TOKENS}
        missing = sorted(needed - set(self.special_tokens))
        if missing:
            raise TokenizerError(f"{source}: special tokens {', '.join(missing)} are missing")
        self.eos_token_id = self.special_tokens[self.eos_token]
        self.pad_token_id = self.special_tokens[self.pad_token]
        self.stop_token_ids = [self.eos_token_id] + [self.special_tokens[t] for t in STOP_TOKENS]
        self._prefix = [self.special_tokens[t] for t in PREFIX_TOKENS]

        self.chat_template: str | None = self.config.get("chat_template")
        self._template_name = (
            f"the chat template of {source}" if self.chat_template else "GLM-4's structural chat template"
        )
        # The published tokenizer keeps transformers' default: cut the end off sequences that are too long.
        self.truncation_side: str = self.config.get("truncation_side", "right")

        self._encoding = tiktoken.Encoding(
            "glm4", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(mergeable_ranks), special_tokens=self.special_tokens
        )

    # ---- files ----

    @classmethod
    def from_pretrained(cls: type[Tokenizer], directory: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.model` and `tokenizer_config.json` from a directory (without a config file, GLM-4's
        special tokens follow the base vocabulary and the chat format is the structural fallback)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(errno.ENOENT, "tokenizer directory not found", str(directory))
        ranks = read_tokenizer_model(directory / TOKENIZER_FILE)
        config_path = directory / CONFIG_FILE
        config = read_json(str(config_path), error=TokenizerError) if os.path.lexists(config_path) else None
        return cls(ranks, config, source=str(config_path if config is not None else directory / TOKENIZER_FILE))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.model` and `tokenizer_config.json` (each atomically); loading them gives this tokenizer."""
        tokens = [self._encoding.decode_single_token_bytes(rank) for rank in range(self.base_vocab_size)]
        return write_tokenizer_files(directory, tokens, self.config)

    # ---- encoding ----

    def encode(
        self, text: str, add_special_tokens: bool = True, *, allowed_special: Literal["all"] | Collection[str] = ()
    ) -> list[int]:
        """Token ids of `text`, after `[gMASK]<sop>` when `add_special_tokens`.

        Special-token text in `text` is encoded as plain characters unless listed in `allowed_special`
        (or `allowed_special="all"`).
        """
        allowed = self._allowed(allowed_special)
        if allowed:
            ids = self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        else:
            ids = self._encoding.encode_ordinary(text)
        return self._prefix + ids if add_special_tokens else ids

    def encode_batch(
        self,
        texts: Iterable[str],
        add_special_tokens: bool = True,
        *,
        allowed_special: Literal["all"] | Collection[str] = (),
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """`encode` for many texts at once, on `num_threads` threads (default: one per core)."""
        texts = list(texts)
        threads = num_threads or os.cpu_count() or 1
        allowed = self._allowed(allowed_special)
        if allowed:
            batch = self._encoding.encode_batch(
                texts, num_threads=threads, allowed_special=allowed, disallowed_special=()
            )
        else:
            batch = self._encoding.encode_ordinary_batch(texts, num_threads=threads)
        return [self._prefix + ids for ids in batch] if add_special_tokens else batch

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: Padding = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: Literal["np", "pd"] | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """Encode one text or a batch into `input_ids`, `attention_mask` and `position_ids`.

        padding: False (none), True or "longest" (to the longest text), "max_length" (to `max_length`).
        Padding goes on the LEFT with the pad id, attention 0 and position 0, as in the published tokenizer.
        truncation: cut each text so that with the `[gMASK]<sop>` prefix it fits `max_length`, on
        `truncation_side` ("right", transformers' default, unless tokenizer_config.json says "left").
        return_tensors: None (lists), "np" or "pd" (int64, shape [batch, length]; a single text then gets a batch
        of one).
        """
        single = isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("the tokenizer takes a string or a non-empty list of strings")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise TokenizerError(f"padding must be False, True, 'longest' or 'max_length', not {padding!r}")
        if return_tensors not in (None, "np", "pd"):
            raise TokenizerError(f"return_tensors must be None, 'np' or 'pd', not {return_tensors!r}")
        if (truncation or padding == "max_length") and (max_length is None or max_length < 1):
            raise TokenizerError("truncation and padding='max_length' need a positive max_length")
        limit = max_length or 0  # (positive where it is used: checked above)

        if len(texts) == 1:  # a thread pool costs more than it saves on one text
            encoded = [self.encode(texts[0], add_special_tokens=False)]
        else:
            encoded = self.encode_batch(texts, add_special_tokens=False)
        prefix = self._prefix if add_special_tokens else []
        if truncation:  # as in transformers, the text is cut and the prefix kept
            room = max(limit - len(prefix), 0)
            left = self.truncation_side == "left"
            encoded = [ids[max(len(ids) - room, 0) :] if left else ids[:room] for ids in encoded]
        batch = [prefix + ids for ids in encoded]
        if padding == "max_length":
            width = limit
        elif padding in (True, "longest"):
            width = max(map(len, batch))
        else:
            width = 0

        columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for ids in batch:
            pad = max(width - len(ids), 0)
            columns["input_ids"].append([self.pad_token_id] * pad + ids)
            columns["attention_mask"].append([0] * pad + [1] * len(ids))
            columns["position_ids"].append([0] * pad + list(range(len(ids))))
        if return_tensors is None:
            return {key: rows[0] for key, rows in columns.items()} if single else columns
        lengths = {len(row) for row in columns["input_ids"]}
        if len(lengths) > 1:
            raise TokenizerError(f"cannot make a tensor of sequences with lengths {sorted(lengths)}; pass padding=True")
        arrays = {key: np.array(rows, dtype=np.int64).reshape(len(rows), -1) for key, rows in columns.items()}
        if return_tensors == "pd":
            import paddle

            return {key: paddle.to_tensor(array) for key, array in arrays.items()}
        return arrays

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """Render a conversation with the model's chat template (or GLM-4's bare structure when the config has
        none): token ids when `tokenize`, else the text. Messages are dicts with a `role` (system, user,
        assistant, observation), `content`, and optionally `metadata` and `tools`. Only the template's own
        structure becomes special ids; special-token text inside messages stays text."""
        rendered = render_chat(
            self.chat_template or STRUCTURAL_TEMPLATE,
            messages,
            tuple(self.special_tokens),
            add_generation_prompt=add_generation_prompt,
            name=self._template_name,
        )
        if not tokenize:
            return rendered.text
        ids: list[int] = []
        for piece, special in rendered.pieces:
            if special:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    # ---- decoding ----

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """The text of `ids`. `errors` says what becomes of what has no text, as in Python's codecs: ids past the
        vocabulary (a model's padding rows, see `is_padding_id`) and bytes that are not UTF-8. "replace" (the
        default) writes U+FFFD for each, "ignore" drops them, "strict" raises (TokenizerError for an id,
        UnicodeDecodeError for bytes). Negative ids and non-integers always raise."""
        if errors not in ERRORS:
            raise TokenizerError(f"errors must be one of {', '.join(map(repr, ERRORS))}, not {errors!r}")
        ids = self._check_ids(ids, errors)
        if skip_special_tokens:
            ids = [i for i in ids if not self.base_vocab_size <= i < self.vocab_size]
        pieces, start = [], 0
        for end in [k for k, i in enumerate(ids) if i >= self.vocab_size] + [len(ids)]:  # split at ids with no token
            pieces.append(self._encoding.decode_bytes(ids[start:end]).decode("utf-8", errors=errors))
            start = end + 1
        return ("\ufffd" if errors == "replace" else "").join(pieces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, errors: str = "replace") -> list[str]:
        """`decode` of each row: a list of id lists, a [batch, length] array or tensor (e.g. generate()'s ids)."""
        if hasattr(sequences, "tolist"):  # numpy arrays and paddle tensors
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens, errors) for ids in sequences]

    def detokenizer(self, skip_special_tokens: bool = False, errors: str = "replace") -> IncrementalDetokenizer:
        """A streaming decoder for ids that arrive one at a time (see IncrementalDetokenizer)."""
        return IncrementalDetokenizer(self, skip_special_tokens, errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its text in UTF-8)."""
        token_id = operator.index(token_id)
        self._check_id(token_id)
        return self._encoding.decode_single_token_bytes(token_id)

    def is_padding_id(self, token_id: int) -> bool:
        """Whether a model's output id lies past this vocabulary: GLM-4's embedding has padding rows after the
        last token (151552 rows for 151343 tokens), which stand for no text. Only untrained weights pick them."""
        return token_id >= self.vocab_size

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.base_vocab_size

    def special_token_id(self, token: str) -> int:
        """The id of a special token given by its text, e.g. "<|user|>"."""
        if token not in self.special_tokens:
            raise TokenizerError(f"{token!r} is not a special token of this tokenizer")
        return self.special_tokens[token]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"GLM4Tokenizer(vocab_size={self.vocab_size}, base={self.base_vocab_size}, "
            f"chat_template={'model' if self.chat_template else 'structural'})"
        )

    def _allowed(self, allowed_special: Literal["all"] | Collection[str]) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = sorted(allowed - set(self.special_tokens))
        if unknown:
            raise TokenizerError(f"allowed_special names tokens that are not special tokens: {', '.join(unknown)}")
        return allowed

    def _check_ids(self, ids: Iterable[int], errors: str = "strict") -> list[int]:
        """`ids` as a list of ints; a negative id is always an error, an id past the vocabulary only when
        `errors` is "strict"."""
        if hasattr(ids, "tolist"):  # numpy arrays and paddle tensors
            ids = ids.tolist()
        ids = [operator.index(i) for i in ids]
        if ids and (min(ids) < 0 or (errors == "strict" and max(ids) >= self.vocab_size)):
            self._check_id(next(i for i in ids if not 0 <= i < self.vocab_size))
        return ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is out of range: this vocabulary has ids 0..{self.vocab_size - 1}"
            )


ERRORS = ("strict", "replace", "ignore")


class IncrementalDetokenizer:
    """Turns ids into text one id at a time, never emitting part of a UTF-8 character.

    `push(id)` returns the text completed by that id (often '', e.g. after the first byte of a character split
    over two tokens); `flush()` returns what is left at the end. Joined, the outputs are
    `tokenizer.decode(ids, skip_special_tokens, errors)`: Python's incremental UTF-8 decoder replaces (or drops)
    invalid bytes exactly as a one-shot decode does, and holds back only an incomplete trailing character. An id
    past the vocabulary ends the character in progress and stands for one U+FFFD ("replace") or nothing
    ("ignore"); with "strict" it raises.
    """

    def __init__(self, tokenizer: GLM4Tokenizer, skip_special_tokens: bool = False, errors: str = "replace"):
        if errors not in ERRORS:
            raise TokenizerError(f"errors must be one of {', '.join(map(repr, ERRORS))}, not {errors!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._errors = errors
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def push(self, token_id: int) -> str:
        token_id = operator.index(token_id)
        if token_id >= self._tokenizer.vocab_size and self._errors != "strict":
            return self.flush() + ("\ufffd" if self._errors == "replace" else "")
        data = self._tokenizer.token_bytes(token_id)
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """The rest of the text (an unfinished character: U+FFFD, nothing, or UnicodeDecodeError, as `errors`
        says); the detokenizer can then start over."""
        try:
            return self._utf8.decode(b"", final=True)
        finally:
            self._utf8.reset()
