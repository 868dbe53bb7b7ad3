"""Long prompts (issue 15): chunked prefill in the dynamic model and the predictor, its bad arguments."""

import numpy as np
import paddle
import pytest

from conftest import hf_state, left_padded, paddle_model, paddle_state, reference_model, small_config
from paddle_glm4.demo import random_weights
from paddle_glm4.generation import ModelSession
from paddle_glm4.inference import Predictor, export_model
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4Tokenizer

CHUNK = 8
LENGTHS = (1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK * 11 // 2)  # 5.5 chunks last
STEPS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("long_context")


@pytest.fixture(scope="module")
def built(root):
    """(dynamic model, predictor over its float32 export in root / "export")."""
    checkpoint = str(root / "checkpoint")
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(checkpoint))
    config = small_config(
        vocab_size=tokenizer.vocab_size,
        rope_ratio=500.0,
        seq_length=128,
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = paddle_model(config, dict(random_weights(config, seed=5)))
    model.save_pretrained(checkpoint)
    export_model(checkpoint, str(root / "export"), max_seq_len=64, progress=False)
    return model, Predictor(str(root / "export"))


def prompts(lengths=LENGTHS):
    # ids below 256 are plain bytes of the small vocabulary: no special token, no stop id
    return [np.random.RandomState(7 + n).randint(3, 256, n).astype("int64") for n in lengths]


def session_logits(session, ids, mask):
    """Logits [b, 1 + STEPS, vocab]: after the prompt, then after each greedy token."""
    out = [
        session.prefill(
            paddle.to_tensor(ids), None if mask is None else paddle.to_tensor(mask), None, ids.shape[1] + STEPS
        ).numpy()
    ]
    for _ in range(STEPS):
        out.append(session.step(paddle.to_tensor(out[-1].argmax(-1))).numpy())
    return np.stack(out, axis=1)


def sessions(built, chunk):
    model, predictor = built
    return {"dynamic": ModelSession(model, prefill_chunk=chunk), "predictor": predictor.session(chunk)}


@pytest.mark.parametrize("engine", ["dynamic", "predictor"])
def test_a_prompt_prefilled_in_chunks_gives_the_one_shot_logits_alone_and_left_padded(built, engine):
    for p in prompts():
        chunked = session_logits(sessions(built, CHUNK)[engine], p[None], None)
        one_shot = session_logits(sessions(built, 1000)[engine], p[None], None)
        assert np.abs(chunked - one_shot).max() <= 1e-4, len(p)
    batch, mask = left_padded(prompts(), 0)
    chunked = session_logits(sessions(built, CHUNK)[engine], batch, mask)
    one_shot = session_logits(sessions(built, 1000)[engine], batch, mask)
    assert np.abs(chunked - one_shot).max() <= 1e-4
    # and each padded row is its prompt alone
    for row, p in enumerate(prompts()):
        alone = session_logits(sessions(built, CHUNK)[engine], p[None], None)
        assert np.abs(chunked[row] - alone[0]).max() <= 1e-4, len(p)


def test_the_exported_program_attends_through_the_kernel_where_it_is_built(built, root):
    # the operator walks keys in blocks, so the program's memory is bounded by the chunk, not chunk x context
    from paddle_glm4 import kernels

    _, predictor = built
    program = (root / "export" / "glm4.json").read_text(encoding="utf-8")
    assert ("glm4_attention" in program) == kernels.available() == predictor.manifest.kernels
    assert ("scaled_dot_product_attention" in program or "softmax" in program) != kernels.available()


def test_the_chunk_is_what_each_prefill_forward_takes(built, monkeypatch):
    model, _ = built
    widths = []
    forward = model.logits
    monkeypatch.setattr(
        model, "logits", lambda ids, *args, **kw: widths.append(ids.shape[1]) or forward(ids, *args, **kw)
    )
    p = prompts((CHUNK * 11 // 2,))[0]
    model.generate(p, max_new_tokens=2, prefill_chunk=CHUNK, eos_token_id=[])
    assert widths == [CHUNK] * 5 + [CHUNK // 2, 1]
    one_shot = model.generate(p, max_new_tokens=8, eos_token_id=[], prefill_chunk=1000)[0].numpy().tolist()
    assert model.generate(p, max_new_tokens=8, eos_token_id=[], prefill_chunk=3)[0].numpy().tolist() == one_shot


@pytest.mark.parametrize("chunk", [0, -4, 2.5, "512", True])
def test_a_bad_prefill_chunk_is_refused(built, chunk):
    model, predictor = built
    for engine in (model, predictor):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
            engine.generate(prompts((3,))[0], max_new_tokens=2, prefill_chunk=chunk)


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi"], ["chat"]])
def test_a_bad_prefill_chunk_flag_is_one_line_and_exit_2_before_loading(tmp_path, capsys, argv):
    from paddle_glm4 import __main__ as glm4_cli
    from paddle_glm4.server import __main__ as server_cli

    for main, args in ((glm4_cli.main, argv), (server_cli.main, [])):
        code = main([*args, "--model", str(tmp_path / "missing"), "--prefill-chunk", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--prefill-chunk must be a positive integer" in err[0], err


def attention_case(rng, b, s, length, h=4, g=2, d=16, padded=True):
    """q [b, s, h, d] at slots length - s.. over k, v [b, length, g, d] and a Mask (some slots padding)."""
    from paddle_glm4 import ops

    q, k, v = (
        paddle.to_tensor(rng.randn(*shape).astype("float32"))
        for shape in ((b, s, h, d), (b, length, g, d), (b, length, g, d))
    )
    valid = paddle.to_tensor(rng.rand(b, length) > 0.3) if padded else None
    return q, k, v, ops.attention_mask(valid, length - s, s)


def attention_reference(q, k, v, mask):
    """Plain softmax attention in numpy, the Mask's rule spelled out: [b, s, h, d]."""
    q, k, v = (t.astype("float32").numpy() for t in (q, k, v))
    b, s, h, d = q.shape
    g, length = k.shape[2], k.shape[1]
    valid = np.ones((b, length), bool) if mask.key_valid is None else mask.key_valid.numpy()
    out = np.zeros_like(q)
    for row in range(b):
        for i in range(s):
            slot = int(mask.start) + i
            seen = (np.arange(length) <= slot) & (valid[row] | (np.arange(length) == slot))
            for head in range(h):
                scores = k[row, :, head // (h // g)] @ q[row, i, head] / np.sqrt(d)
                p = np.exp(np.where(seen, scores - scores[seen].max(), -np.inf))
                out[row, i, head] = (p / p.sum()) @ v[row, :, head // (h // g)]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_attention_without_the_kernel_in_query_blocks_equals_one_call(monkeypatch, causal):
    # the path of training (a gradient is wanted) and of machines without a C++ compiler
    import paddle.nn.functional as F

    from paddle_glm4 import ops

    rng = np.random.RandomState(0)
    b, s, length, h = 2, 37, 37 if causal else 50, 4
    q, k, v, mask = attention_case(rng, b, s, length, h=h, padded=not causal)
    q.stop_gradient = False  # a gradient is wanted: no kernel
    whole = ops.attention(q, k, v, mask).numpy()
    assert np.abs(whole - attention_reference(q, k, v, mask)).max() <= 1e-5
    shapes = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, *a, **kw: shapes.append(q.shape[1]) or sdpa(q, *a, **kw)
    )
    monkeypatch.setattr(ops, "SCORE_BUDGET", b * h * length * 5)  # blocks of 5 queries
    blocked = ops.attention(q, k, v, mask).numpy()
    assert shapes == [5] * 7 + [2]
    assert np.abs(blocked - whole).max() <= 1e-5


def test_rotary_angles_near_the_128k_context_match_the_reference():
    import torch
    from transformers import GlmConfig
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding, apply_rotary_pos_emb

    from paddle_glm4 import ops

    # glm-4-9b-chat's rotary: head_dim 128, half of it rotated, base 10000 * rope_ratio 500, 131072 positions
    config = small_config(
        head_dim=128, num_attention_heads=2, num_key_value_heads=2, hidden_size=256, rope_ratio=500.0, seq_length=131072
    )
    positions = np.concatenate([[0, 1, 8191, 8192, 32767, 32768, 65535], np.arange(131072 - 57, 131072)])
    x = np.random.RandomState(0).randn(1, len(positions), 2, 128).astype("float32")  # [b, s, h, d]
    rope = GlmRotaryEmbedding(GlmConfig(**config.to_hf_glm_dict()))
    cos, sin = rope(torch.from_numpy(x), torch.from_numpy(positions[None]))
    reference, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin, unsqueeze_dim=2)
    inv_freq = ops.inverse_frequencies(config.rotary_dim, config.rope_theta)
    tables = ops.rotary_tables(paddle.to_tensor(positions[None]), inv_freq, "float32", 131072)
    ours = ops.apply_rotary(paddle.to_tensor(x), tables).numpy()
    assert np.abs(ours - reference.numpy()).max() <= 1e-5
    # the angles themselves, not only their effect: the cosines of the pairs
    np.testing.assert_allclose(
        tables[0].numpy()[0, :, 0, ::2], cos.numpy()[0, :, : config.rotary_dim // 2], atol=1e-6, rtol=0
    )


def test_a_long_prefill_reports_its_progress_to_the_streamer(built):
    from paddle_glm4.streamer import Streamer

    class Recorder(Streamer):
        def __init__(self):
            super().__init__()
            self.progress = []

        def on_prefill(self, done, total):
            self.progress.append((done, total, self.tokens))

    model, predictor = built
    p = prompts((CHUNK * 11 // 2,))[0]
    for engine in (model, predictor):
        recorder = Recorder()
        engine.generate(p, max_new_tokens=2, prefill_chunk=CHUNK, eos_token_id=[], streamer=recorder)
        # before the first chunk and after each, all before the first token
        assert recorder.progress == [(done, 44, 0) for done in (0, 8, 16, 24, 32, 40, 44)]


def test_the_server_logs_time_to_first_token(built, caplog):
    import asyncio
    import logging

    from paddle_glm4.server.worker import Worker

    model, _ = built

    async def serve_one():
        worker = Worker(model, 1)
        job = worker.submit([int(t) for t in prompts((20,))[0]], max_new_tokens=3, eos_token_id=[], prefill_chunk=CHUNK)
        tokens = [token async for token in job.receive()]
        worker.close()
        return tokens

    with caplog.at_level(logging.INFO, logger="paddle_glm4.server"):
        assert len(asyncio.run(serve_one())) == 3
    assert any("prompt of 20 tokens: time to first token" in r.getMessage() for r in caplog.records)


def forced_logits(model, sequence, prompt_len, kv_cache_dtype):
    """Logits [len(sequence) - prompt_len + 1, vocab] after the prompt and after each later token of `sequence`."""
    session = ModelSession(model, kv_cache_dtype=kv_cache_dtype)
    out = [session.prefill(paddle.to_tensor(sequence[None, :prompt_len]), None, None, len(sequence) + 1)]
    out += [session.step(paddle.to_tensor(sequence[k : k + 1])) for k in range(prompt_len, len(sequence))]
    assert session.sequences.cache.keys[0].dtype == getattr(paddle, kv_cache_dtype)
    return np.concatenate([o.numpy() for o in out])


@pytest.mark.parametrize("seed", [1, 2])
def test_a_bfloat16_cache_gives_the_greedy_tokens_of_float32_for_32_steps_but_at_near_ties(seed):
    # the reference-style models of test_generation (logits far from zero); a bf16 cache rounds keys and values
    # to 8 bits of mantissa, so it may only swap two tokens whose float32 logits are within its error
    config = small_config(rope_ratio=500.0, seq_length=128)
    model = paddle_model(config, paddle_state(config, hf_state(reference_model(config, seed=seed))))
    identical = 0
    for n in (5, 11, 30):
        p = np.random.RandomState(n).randint(3, config.vocab_size, n).astype("int64")
        exact = model.generate(p, max_new_tokens=32, eos_token_id=[], kv_cache_dtype="float32")[0].numpy()[0]
        compact = model.generate(p, max_new_tokens=32, eos_token_id=[], kv_cache_dtype="bfloat16")[0].numpy()[0]
        sequence = np.concatenate([p, exact])
        ref, ours = (forced_logits(model, sequence, n, dtype)[:32] for dtype in ("float32", "bfloat16"))
        error = np.abs(ours - ref).max()
        assert error <= 2e-2 * np.abs(ref).max()
        if (compact == exact).all():
            identical += 1
            continue
        step = int(np.argmax(compact != exact))
        assert ref[step, exact[step]] - ref[step, compact[step]] <= 2 * error
    assert identical >= 2


def test_an_export_with_a_bfloat16_cache_computes_what_the_dynamic_model_does_with_one(built, root):
    from paddle_glm4.inference import ExportError

    model, _ = built
    export_model(
        str(root / "checkpoint"), str(root / "export-bf16"), max_seq_len=64, progress=False, kv_cache_dtype="bfloat16"
    )
    predictor = Predictor(str(root / "export-bf16"))
    assert predictor.manifest.kv_cache_dtype == "bfloat16"
    batch, mask = left_padded(prompts(), 0)
    session = predictor.session(CHUNK)
    ours = session_logits(session, batch, mask)
    assert session.cache.keys[0].dtype == paddle.bfloat16
    dynamic = session_logits(ModelSession(model, prefill_chunk=CHUNK, kv_cache_dtype="bfloat16"), batch, mask)
    # the two engines' float32 keys differ in their last bits, which rounding to bf16 can turn into one bf16 step
    # of a key: within the bf16 cache's own error (see the greedy test below), far from the logits' size
    assert np.abs(ours - dynamic).max() <= 1e-2 * np.abs(dynamic).max()
    float32 = session_logits(built[1].session(CHUNK), batch, mask)
    assert np.abs(ours - float32).max() <= 2e-2 * np.abs(float32).max()
    with pytest.raises(ExportError, match="kv_cache_dtype must be float32 or bfloat16, got 'int8'"):
        export_model(str(root / "checkpoint"), str(root / "export-int8"), kv_cache_dtype="int8", progress=False)


def test_the_cache_dtype_defaults_to_bfloat16_for_long_contexts_on_cpu_only():
    from paddle_glm4 import memory

    assert memory.cache_dtype(None, memory.LONG_CONTEXT, "float32", on_gpu=False) == "float32"
    assert memory.cache_dtype(None, memory.LONG_CONTEXT + 1, "float32", on_gpu=False) == "bfloat16"
    assert memory.cache_dtype(None, 131072, "float16", on_gpu=True) == "float16"
    assert memory.cache_dtype("float32", 131072, "float32", on_gpu=False) == "float32"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        memory.cache_dtype("int8", 10, "float32", on_gpu=False)


def test_a_cache_that_cannot_fit_is_refused_before_any_work(built, monkeypatch):
    from paddle_glm4 import memory

    model, _ = built
    # 2 layers x 2 x 2 groups x 16 dims: 128 values a slot, 512 bytes in float32; 60 slots = 30720 bytes
    monkeypatch.setattr(memory, "available_bytes", lambda: 20000)
    forward = model.logits
    monkeypatch.setattr(model, "logits", lambda *args, **kwargs: pytest.fail("a forward ran"))
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs 0\.00 GB in float32.*kv_cache_dtype='bfloat16'"):
        model.generate(prompts((50,))[0], max_new_tokens=10, kv_cache_dtype="float32")
    with pytest.raises(memory.InsufficientMemoryError, match="lower max_new_tokens"):
        model.generate(prompts((50,))[0], max_new_tokens=30, kv_cache_dtype="bfloat16")
    monkeypatch.setattr(model, "logits", forward)
    model.generate(prompts((50,))[0], max_new_tokens=10, kv_cache_dtype="bfloat16", eos_token_id=[])  # 15360 bytes
    # the predictor's cache (the export's float32) is checked the same way, before it runs the program
    _, predictor = built
    monkeypatch.setattr(predictor, "run", lambda *args: pytest.fail("the program ran"))
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs 0\.00 GB in float32"):
        predictor.generate(prompts((50,))[0], max_new_tokens=10)


def test_load_engine_sets_the_cache_dtype_of_the_dynamic_model_and_refuses_it_for_an_export(built, tmp_path):
    from paddle_glm4.cli_errors import UsageError
    from paddle_glm4.engine import load_engine

    model, _ = built
    checkpoint = str(tmp_path / "checkpoint")
    model.save_pretrained(checkpoint)
    write_small_vocabulary(checkpoint)
    loaded, _ = load_engine(checkpoint, kv_cache_dtype="bfloat16", prefill_chunk=4)
    assert (loaded.kv_cache_dtype, loaded.prefill_chunk) == ("bfloat16", 4)
    with pytest.raises(UsageError, match=r"--kv-cache-dtype applies to the dynamic engine.*glm4 export --kv-cache"):
        load_engine(checkpoint, engine="inference", kv_cache_dtype="bfloat16")


@pytest.mark.slow
def test_a_16k_token_prompt_matches_the_reference(monkeypatch):
    # transformers' GlmForCausalLM with sdpa attention (memory-bounded on CPU) against the chunked prefill, through
    # the attention kernel and through the query-blocked portable path, on a small random model with the 128K
    # model's rotary base
    import torch

    from paddle_glm4 import ops

    length, new = 16384, 16
    config = small_config(rope_ratio=500.0, seq_length=32768)
    ref = reference_model(config, seed=4)
    ref.config._attn_implementation = "sdpa"
    model = paddle_model(config, paddle_state(config, hf_state(ref)))
    monkeypatch.setattr(ops, "SCORE_BUDGET", 1 << 22)  # several query blocks per chunk, even here
    p = np.random.RandomState(0).randint(3, config.vocab_size, length).astype("int64")
    with torch.no_grad():
        expected_logits = ref(torch.from_numpy(p[None]), logits_to_keep=1).logits[0, -1].numpy()
        expected = ref.generate(
            torch.from_numpy(p[None]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, length:].numpy()
    # generate attends through the kernel where it is built; a forward that may want gradients, through
    # Paddle's ops on blocks of queries
    ids, _ = model.generate(p, max_new_tokens=new, eos_token_id=[], prefill_chunk=2048, kv_cache_dtype="float32")
    assert ids.numpy()[0].tolist() == expected.tolist()
    for gradients in (False, True):
        with paddle.set_grad_enabled(gradients):
            session = ModelSession(model, prefill_chunk=2048, kv_cache_dtype="float32")
            logits = session.prefill(paddle.to_tensor(p[None]), None, None, length + 1).numpy()[0]
        assert np.abs(logits - expected_logits).max() <= 1e-4, gradients
