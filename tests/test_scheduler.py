"""The continuous-batching engine: what each request gets does not depend on who else is in the batch."""

import numpy as np
import pytest

from conftest import hf_state, paddle_model, paddle_state, reference_model, small_config
from paddle_glm4.scheduler import Request, Scheduler
from paddle_glm4.streamer import Streamer


@pytest.fixture(scope="module")
def model():
    config = small_config(rope_ratio=500.0, seq_length=128)
    return paddle_model(config, paddle_state(config, hf_state(reference_model(config, seed=1))))


def requests(model, count=16):
    """Requests of different prompt lengths, max_tokens and settings: greedy, seeded sampling, penalties."""
    made = []
    for n in range(count):
        rng = np.random.RandomState(n)
        prompt = rng.randint(3, model.config.vocab_size, 2 + (7 * n) % 23).tolist()
        kinds = [{}, {"temperature": 0.9, "top_p": 0.9}, {"temperature": 1.2, "top_k": 20}, {"repetition_penalty": 1.3}]
        settings = model.generation_config.merged(**kinds[n % 4])
        made.append(Request(prompt, max_tokens=3 + (5 * n) % 17, settings=settings, seed=100 + n))
    return made


def bytes_per_token(config):  # keys and values of every layer, float32 (written out: memory.py's is under test)
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4


def alone(model, request):
    twin = Request(request.prompt, request.max_tokens, request.settings, request.seed)
    return Scheduler(model, max_num_seqs=1).run([twin])[0].output


def test_sixteen_requests_together_get_what_each_gets_alone(model):
    batch = requests(model)
    # a small chunk and few rows: prompts are prefilled in pieces and join while others decode
    Scheduler(model, max_num_seqs=5, prefill_chunk=4).run(batch)
    for request in batch:
        assert request.error is None
        assert request.output == alone(model, request), request
        assert 1 <= len(request.output) <= request.max_tokens


def test_greedy_equals_generate(model):
    for request in requests(model, 8)[::4]:  # the greedy ones
        ids, _ = model.generate([request.prompt], max_new_tokens=request.max_tokens)
        Scheduler(model, max_num_seqs=2).run([request])
        expected = [int(t) for t in ids.numpy()[0]]
        stop = next((i for i, t in enumerate(expected) if t in request.settings.eos_token_id), len(expected) - 1)
        assert request.output == expected[: stop + 1]


def test_rows_are_reused_and_the_cache_is_bounded_and_released(model):
    batch = requests(model, 12)
    per_token = bytes_per_token(model.config)
    engine = Scheduler(model, max_num_seqs=3, kv_cache_memory=3 * 64 * per_token)
    for request in batch:
        engine.submit(request)
    peak = 0
    while engine.busy:
        engine.step()
        assert len(engine.running) + len(engine.prefilling) <= 3
        peak = max(peak, engine.kv_bytes)
    assert 0 < peak <= 3 * 64 * per_token
    assert engine.kv_bytes == 0
    assert all(r.output == alone(model, r) for r in batch)


def test_a_request_larger_than_the_pool_is_refused(model):
    engine = Scheduler(model, kv_cache_memory=16 * bytes_per_token(model.config))
    with pytest.raises(ValueError, match="KV cache pool of 16"):
        engine.submit(Request([5] * 10, 10, model.generation_config))


def test_a_step_prefills_several_short_prompts_and_a_long_one_a_chunk_at_a_time(model):
    """Each step prefills up to prefill_chunk prompt tokens: a burst of short prompts all join at once (their
    first tokens come before the next decode step), a long prompt takes a chunk per step; both as alone."""
    short = [Request([7 + n] * (3 + n), 6, model.generation_config.merged(eos_token_id=[])) for n in range(4)]
    engine = Scheduler(model, max_num_seqs=8, prefill_chunk=20)  # 3 + 4 + 5 + 6 = 18 tokens: all in one step
    for request in short:
        engine.submit(request)
    engine.step()
    assert len(engine.running) == 4 and not engine.prefilling
    assert all(len(r.output) == 2 for r in short)  # the first token from the prefill, the second from the decode
    long = Request(list(range(3, 53)), 4, model.generation_config.merged(eos_token_id=[]))
    engine.submit(long)
    engine.step()
    assert long.prefilled == 20 and not long.output  # one chunk, and the others decoded on
    assert all(len(r.output) == 3 for r in short)
    engine.step()
    assert long.prefilled == 40
    while engine.busy:
        engine.step()
    for request in [*short, long]:
        assert request.output == alone(model, request)


def test_the_default_pool_is_max_num_seqs_full_contexts_within_half_the_available_memory(model, monkeypatch):
    from paddle_glm4 import memory

    full = 3 * model.context_length * bytes_per_token(model.config)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * full)
    assert Scheduler(model, max_num_seqs=3).kv_cache_tokens == 3 * model.context_length
    monkeypatch.setattr(memory, "available_bytes", lambda: full)
    assert Scheduler(model, max_num_seqs=3).kv_cache_tokens == full // 2 // bytes_per_token(model.config)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # not Linux: the full contexts
    assert Scheduler(model, max_num_seqs=3).kv_cache_tokens == 3 * model.context_length


def test_bad_settings_are_refused_with_their_name(model):
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1, got 0"):
        Scheduler(model, max_num_seqs=0)
    with pytest.raises(ValueError, match=r"prefill_chunk must be a positive integer.*got 0"):
        Scheduler(model, prefill_chunk=0)
    request = Request([5, 6], 2, model.generation_config)
    request.prefill_chunk = 2.5
    with pytest.raises(ValueError, match=r"prefill_chunk must be a positive integer.*got 2.5"):
        Scheduler(model).submit(request)


def test_a_batch_cache_the_machine_has_no_room_for_fails_its_request_alone(model, monkeypatch):
    """Within the pool, but the machine's free memory shrank since: the request that would grow the cache
    fails with the memory check's error (not the process killed); the engine serves the next ones."""
    from paddle_glm4 import memory

    engine = Scheduler(model, max_num_seqs=2, kv_cache_memory=2 * 64 * bytes_per_token(model.config))
    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)
    starved = requests(model, 2)
    engine.run(starved)
    assert all(isinstance(r.error, memory.InsufficientMemoryError) and not r.output[1:] for r in starved)
    assert "KV cache" in str(starved[0].error) and engine.kv_bytes == 0
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    fed = requests(model, 2)
    engine.run(fed)
    assert all(r.error is None and r.output == alone(model, r) for r in fed)


def test_a_cancelled_request_leaves_and_a_failing_one_fails_alone(model):
    class CancelAfterTwo(Streamer):
        def on_tokens(self, token_ids):
            if self.tokens == 2:
                self.cancel()

    class Broken(Streamer):
        failed = None

        def on_tokens(self, token_ids):
            raise RuntimeError("client broke")

        def fail(self, error):
            self.failed = error

    batch = requests(model, 6)
    for r in batch:
        r.max_tokens = 20
        r.settings.eos_token_id = []
    batch[1].streamer, batch[2].streamer = CancelAfterTwo(), Broken()
    Scheduler(model, max_num_seqs=6).run(batch)
    assert len(batch[1].output) == 2
    assert isinstance(batch[2].error, RuntimeError) and batch[2].streamer.failed is batch[2].error
    for request in batch[:1] + batch[3:]:
        assert request.error is None and request.output == alone(model, request)


def test_the_offline_batch_call_gives_each_prompt_what_it_gets_alone(model, tmp_path):
    from paddle_glm4.llm import LLM, Options
    from paddle_glm4.small_vocab import write_small_vocabulary
    from paddle_glm4.tokenizer import GLM4Tokenizer

    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path))
    llm = LLM(model, tokenizer, max_num_seqs=4)
    prompts = ["hello there", [5, 9, 33, 41, 7, 8, 100], "a longer prompt than the others, by a few words", "x"]
    options = [
        Options(max_tokens=12),
        Options(max_tokens=5, temperature=0.8, seed=3),
        Options(max_tokens=9, top_k=5, seed=4),
        Options(max_tokens=7, repetition_penalty=1.5),
    ]
    together = llm.generate(prompts, options)
    for prompt, option, output in zip(prompts, options, together, strict=True):
        assert output == LLM(model, tokenizer, max_num_seqs=1).generate([prompt], option)[0]
        assert 1 <= len(output.token_ids) <= option.max_tokens
    # a stop string cuts the text before it and stops the generation
    text = together[0].text
    assert len(text) >= 2, "the greedy answer is too short to test stop strings with"
    stopped = llm.generate([prompts[0]], Options(max_tokens=12, stop=(text[1:3],)))[0]
    assert stopped.text == text[: text.find(text[1:3])] and stopped.finish_reason == "stop"
    assert len(stopped.token_ids) <= len(together[0].token_ids)
    with pytest.raises(ValueError, match="2 prompts but 1 options"):
        llm.generate(["a", "b"], [Options()])


def test_a_bfloat16_cache_is_batch_invariant_too(model):
    model.kv_cache_dtype = "bfloat16"
    try:
        batch = requests(model, 6)
        engine = Scheduler(model, max_num_seqs=3, prefill_chunk=5)
        assert engine.cache_dtype == "bfloat16"
        engine.run(batch)
        assert all(r.error is None and r.output == alone(model, r) for r in batch)
    finally:
        model.kv_cache_dtype = None
