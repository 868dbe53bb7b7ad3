"""The real server app over a scripted model, for the tests that need a known answer (tool calls) or a slow one
(admission, disconnects). Run as `python tests/scripted_server.py --tokenizer DIR --port 0`.

The scripted model has the engine interface (generate, config, generation_config) and answers by looking at the
last user or observation turn of the prompt, in GLM-4's format:
- after an observation: "\\n<name> said: <observation>", <name> from the tool-call turn before it;
- a user turn with "slow": "tick" forever, 20 ms a token (until max_new_tokens or a cancel);
- "malformed": a tool-call line followed by text that is not JSON;
- "weather": a call of get_weather if the prompt shows that tool, else "\\nI have no tools.";
- "explode": generate raises;
- anything else: "\\nHello there."
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from types import SimpleNamespace

import numpy as np

from paddle_glm4.generation import GenerationConfig
from paddle_glm4.server import bind, serve
from paddle_glm4.server.app import create_app
from paddle_glm4.tokenizer import GLM4Tokenizer

WEATHER_CALL = 'get_weather\n{"city": "Beijing"}'


class ScriptedModel:
    def __init__(self, tokenizer: GLM4Tokenizer, seq_length: int = 1024):
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(seq_length=seq_length, vocab_size=tokenizer.vocab_size)
        self.context_length = seq_length
        self.generation_config = GenerationConfig(
            eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id
        )

    def answer(self, prompt: str) -> tuple[str, str, float]:
        """(text, the special token that ends it, seconds per token)."""
        role, content = re.findall(r"<\|(user|observation)\|>\n(.*?)(?=<\|)", prompt, re.S)[-1]
        if role == "observation":
            name = re.findall(r"<\|assistant\|>(\w+)\n", prompt)[-1]
            return f"\n{name} said: {content}", "<|user|>", 0.0
        if "explode" in content:
            raise RuntimeError("the scripted model fails on purpose")
        if "slow" in content:
            return "tick " * 10_000, "<|user|>", 0.02
        if "malformed" in content:
            return "get_weather\nthis is not JSON", "<|observation|>", 0.0
        if "weather" in content:
            if "## get_weather" in prompt:
                return WEATHER_CALL, "<|observation|>", 0.0
            return "\nI have no tools.", "<|user|>", 0.0
        return "\nHello there.", "<|user|>", 0.0

    def generate(self, input_ids, max_new_tokens=128, eos_token_id=None, streamer=None, **_sampling):
        text, end, delay = self.answer(self.tokenizer.decode(input_ids[0]))
        script = [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.special_token_id(end)]
        out = []
        for token in script[:max_new_tokens]:
            time.sleep(delay)
            out.append(token)
            streamer.put(np.array([token]))
            if token in eos_token_id or streamer.cancelled:
                break
        streamer.end()
        return np.array([out]), np.zeros([1, 1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    tokenizer = GLM4Tokenizer.from_pretrained(args.tokenizer)
    app = create_app(ScriptedModel(tokenizer), tokenizer, "scripted", max_concurrency=1)
    return serve(app, bind("127.0.0.1", args.port), "scripted")


if __name__ == "__main__":
    sys.exit(main())
