"""A checkpoint of this project as GGUF files for llama.cpp: the same weights, in llama.cpp's `chatglm` arch
(the one it runs GLM-4-9B and glm-4-9b-chat with), then quantized by llama.cpp's own `llama-quantize`.

The weights: matrices in BF16 (exactly the checkpoint's bf16 values; a float32 checkpoint is rounded to bf16),
1-D tensors (norms, the QKV bias) in F32, tensor names from the `gguf` package's own map of THUDM's published
names (which converters/mapping.py gives for each of ours). Written tensor by tensor, so memory holds one
tensor at a time, whatever the depth.

The tokenizer (llama.cpp refuses a model without one): the byte-level BPE of `tokenizer.model` in the given
directory (GLM-4's real one when present) as GPT-2-style strings, with merges rebuilt from the tiktoken ranks,
GLM-4's 14 special tokens as CONTROL and the padding ids up to the vocabulary size as UNUSED. Without a
`tokenizer.model` that fits the vocabulary, the project's small built-in vocabulary (paddle_glm4.small_vocab)
takes its place: the benchmark feeds token ids, not text, so only the loading matters. `Vocabulary.source` says
which was used.

    python -m benchmarks.gguf_peer CHECKPOINT OUT.gguf [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

ARCH = "chatglm"
QUANT_TYPES = ("Q8_0", "Q4_0")


@dataclass
class Vocabulary:
    tokens: list[str]  # GPT-2 byte-level strings, one per id, vocab_size of them
    types: list[int]  # gguf.TokenType per id
    merges: list[str]  # "left right", in rank order
    specials: dict[str, int]
    source: str  # where it came from, for the report


# ---- tokenizer ------------------------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what llama.cpp's `gpt2` tokenizer model expects):
    printable Latin-1 bytes stand for themselves, the others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The two tokens BPE joins to make `token`: byte-level BPE over its bytes using only the merges ranked
    before it, which leaves exactly two pieces for a token BPE can build; None for a token it cannot (GLM-4
    has a few hundred: tiktoken emits them only when a whole pre-tokenized piece is that token)."""
    rank = ranks[token]
    pieces = [token[i : i + 1] for i in range(len(token))]
    while len(pieces) > 2:
        best, at = rank, -1
        for i in range(len(pieces) - 1):
            r = ranks.get(pieces[i] + pieces[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        pieces[at : at + 2] = [pieces[at] + pieces[at + 1]]
    return (pieces[0], pieces[1]) if len(pieces) == 2 else None


def vocabulary(vocab_size: int, tokenizer_dir: str | None) -> Vocabulary:
    """The GGUF vocabulary for a model with `vocab_size` ids (see the module docstring)."""
    import gguf

    from paddle_glm4 import small_vocab
    from paddle_glm4.tokenizer import GLM4_SPECIAL_TOKENS, TOKENIZER_FILE, read_tokenizer_model

    room = vocab_size - len(GLM4_SPECIAL_TOKENS)  # base tokens the vocabulary has room for
    path = os.path.join(tokenizer_dir, TOKENIZER_FILE) if tokenizer_dir else None
    ranks = read_tokenizer_model(path) if path and os.path.isfile(path) else None
    if ranks is not None and len(ranks) <= room:
        source = f"GLM-4's tokenizer ({path})"
    else:
        why = "too large for the vocabulary" if ranks is not None else "none given or found"
        ranks = small_vocab.train_bpe(small_vocab.SAMPLE_TEXT, max(0, room - 256))
        source = f"the project's small built-in BPE vocabulary ({len(ranks)} tokens; tokenizer.model: {why})"
    if len(ranks) > room:
        raise ValueError(f"vocabulary size {vocab_size} is too small for 256 byte tokens and the special tokens")
    by_rank = sorted(ranks, key=ranks.__getitem__)
    to_text = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    tokens = [text(token) for token in by_rank]
    pairs = [_merge_of(ranks, token) for token in by_rank if len(token) > 1]
    merges = [f"{text(left)} {text(right)}" for left, right in filter(None, pairs)]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    specials = {token: len(tokens) + i for i, token in enumerate(GLM4_SPECIAL_TOKENS)}
    tokens += list(specials)
    types += [gguf.TokenType.CONTROL] * len(specials)
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]")
        types.append(gguf.TokenType.UNUSED)
    return Vocabulary(tokens, [int(t) for t in types], merges, specials, source)


# ---- the file -------------------------------------------------------------------------------------------
def write_gguf(checkpoint: str, path: str, tokenizer_dir: str | None = None, progress: bool = True) -> Vocabulary:
    """Write `checkpoint` (a directory of this project: config.json + safetensors) as a BF16 GGUF file at
    `path` (atomically); return the vocabulary used."""
    import gguf
    from tqdm import tqdm

    from converters import mapping
    from paddle_glm4 import GLM4Config
    from paddle_glm4.checkpoint import inspect
    from paddle_glm4.safetensors_file import SafetensorsReader, cast, to_float32

    config = GLM4Config.from_pretrained(checkpoint)
    specs = mapping.module_order(mapping.tensor_specs(config))
    locations = inspect(checkpoint, {spec.paddle: spec.shape for spec in specs})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, config.num_hidden_layers)
    vocab = vocabulary(config.vocab_size, tokenizer_dir)

    temporary = f"{path}.tmp"
    writer = gguf.GGUFWriter(temporary, ARCH)
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.specials["<|endoftext|>"])
    writer.add_pad_token_id(vocab.specials["<|endoftext|>"])
    writer.add_unk_token_id(vocab.specials["<|endoftext|>"])
    writer.add_eot_token_id(vocab.specials["<|user|>"])
    writer.add_add_bos_token(False)

    planned = []
    for spec in specs:
        name = names.get_name(spec.published.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"the gguf package has no {ARCH} name for {spec.published}")
        torch_shape = spec.shape[::-1] if spec.linear else spec.shape
        matrix = len(torch_shape) == 2
        dtype, raw = (np.uint16, gguf.GGMLQuantizationType.BF16) if matrix else (np.float32, None)
        writer.add_tensor_info(
            name, torch_shape, np.dtype(dtype), int(np.prod(torch_shape)) * np.dtype(dtype).itemsize, raw_dtype=raw
        )
        planned.append((spec, matrix))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(locations[spec.paddle].nbytes for spec, _ in planned)
        with tqdm(total=total, unit="B", unit_scale=True, desc="GGUF", disable=not progress, file=sys.stderr) as bar:
            for spec, matrix in planned:
                location = locations[spec.paddle]
                with SafetensorsReader(location.path) as reader:
                    # torch layout [out, in] (ggml's row order), bf16 bits for matrices, fp32 for the rest
                    (array,) = mapping.from_paddle(spec, reader.view(spec.paddle), "published")
                array = cast(array, location.dtype, "bfloat16") if matrix else to_float32(array, location.dtype)
                writer.write_tensor_data(np.ascontiguousarray(array))
                del array
                bar.update(location.nbytes)
    except BaseException:
        writer.close()
        os.unlink(temporary)
        raise
    writer.close()
    os.replace(temporary, path)
    return vocab


def quantize(llama_quantize: str, source: str, path: str, kind: str, threads: int | None = None):
    """`llama-quantize source path kind` (Q8_0 or Q4_0; llama.cpp chooses the few tensors it keeps wider)."""
    if kind not in QUANT_TYPES:
        raise ValueError(f"quantization type {kind!r}: expected one of {', '.join(QUANT_TYPES)}")
    temporary = f"{path}.tmp"
    threads = threads or len(os.sched_getaffinity(0))
    done = subprocess.run([llama_quantize, source, temporary, kind, str(threads)], capture_output=True, text=True)
    if done.returncode:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise RuntimeError(f"llama-quantize {kind} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(temporary, path)


def tensor_bytes(path: str) -> dict[str, int]:
    """{tensor name: bytes stored} of a GGUF file (what a decode step reads, less the embedding table)."""
    import gguf

    return {tensor.name: int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory of this project (config.json + safetensors)")
    parser.add_argument("output", help="the GGUF file to write (BF16 matrices, F32 vectors)")
    parser.add_argument(
        "--tokenizer",
        help="directory with GLM-4's tokenizer.model (default: the checkpoint's; "
        "the small built-in vocabulary when none fits)",
    )
    args = parser.parse_args(argv)
    try:
        vocab = write_gguf(args.checkpoint, args.output, args.tokenizer or args.checkpoint)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}; tokenizer: {vocab.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
