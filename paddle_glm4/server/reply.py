"""One answer as the client sees it, built from the generated tokens as they arrive.

The same object serves streamed and whole responses (a whole response is the streamed pieces joined), so the
two always agree. It applies, in order:
- stop strings: the text ends before the first one, as with OpenAI, and `stopped` tells the caller to cancel
  the generation; while generating, the last characters that could begin a stop string are held back;
- leading whitespace: dropped when asked (GLM-4 begins each chat answer with "\\n");
- tool calls: when tools were offered, an answer whose first line is not empty may be a call (see tool_calls.py),
  so it is held back whole and parsed at the end; an answer with an empty first line streams as it comes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .schemas import ToolCall
from .tool_calls import parse_reply

if TYPE_CHECKING:
    from ..tokenizer import GLM4Tokenizer

PLAIN, UNDECIDED, HELD = "plain", "undecided", "held"


class Reply:
    def __init__(
        self,
        tokenizer: GLM4Tokenizer,
        eos_ids: Iterable[int],
        *,
        stop: Iterable[str] = (),
        tool_names: Iterable[str] = (),
        strip_leading: bool = False,
    ):
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
        self._segment_token = tokenizer.special_token_id("<|assistant|>")
        self._tokenizer = tokenizer
        self._eos = set(eos_ids)
        self._stops = [s for s in stop if s]
        self._hold = max(map(len, self._stops), default=1) - 1
        self._tool_names = set(tool_names)
        self._strip = strip_leading
        self._mode = UNDECIDED if self._tool_names else PLAIN
        self._breaks: list[int] = []  # where in `text` the model wrote <|assistant|>
        self._sent = 0  # text[:_sent] has been released (or dropped as leading whitespace)
        self._started = False  # whether any content has been released
        self.text = ""  # the answer so far, without special tokens, cut at a stop string
        self.tokens = 0  # tokens taken, for the usage counts
        self.stopped = False  # a stop string ended the answer
        self.tool_calls: list[ToolCall] = []
        self.finish_reason: str | None = None
        self._last_token: int | None = None

    def add(self, token_id: int) -> str:
        """Take the next generated token; return the content that can be sent now (often "")."""
        if self.stopped:  # the generation may run a step past a stop string before it sees the cancel
            return ""
        self.tokens += 1
        self._last_token = token_id
        if token_id == self._segment_token:
            self._breaks.append(len(self.text))
        self._append("" if self._tokenizer.is_padding_id(token_id) else self._detokenizer.push(token_id))
        return self._release(len(self.text) if self.stopped else len(self.text) - self._hold)

    def finish(self) -> str:
        """The generation is over: return the rest of the content, and set `tool_calls` and `finish_reason`."""
        if not self.stopped:
            self._append(self._detokenizer.flush())
        content = self._release(len(self.text))
        if self._mode != PLAIN:
            parsed = parse_reply(self._segments(), self._tool_names)
            if parsed:
                content, self.tool_calls = parsed
            else:  # not a well-formed call: the client gets the text as it is
                content = self.text.lstrip() if self._strip else self.text
        if self.tool_calls:
            self.finish_reason = "tool_calls"
        elif self.stopped or self._last_token in self._eos:
            self.finish_reason = "stop"
        else:
            self.finish_reason = "length"
        return content

    def _append(self, piece: str) -> None:
        start = max(len(self.text) - self._hold, 0)  # a stop string ending in `piece` starts here at the earliest
        self.text += piece
        hits = [i for i in (self.text.find(stop, start) for stop in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, end: int) -> str:
        if self._mode == UNDECIDED:
            newline = self.text.find("\n", 0, end)
            if newline < 0:
                return ""
            self._mode = HELD if self.text[:newline].strip() else PLAIN
        if self._mode == HELD or end <= self._sent:
            return ""
        piece = self.text[self._sent : end]
        self._sent = end
        if self._strip and not self._started:
            piece = piece.lstrip()
        self._started = self._started or bool(piece)
        return piece

    def _segments(self) -> list[str]:
        bounds = [0, *(b for b in self._breaks if b <= len(self.text)), len(self.text)]
        return [self.text[a:b] for a, b in itertools.pairwise(bounds)]
