"""Paddle Inference deployment: the exported program and its Predictor against the dynamic-graph model.

One small GLM-4 (random weights, the small vocabulary's special ids) is saved as a checkpoint and exported
twice: float32 weights, and bf16 weights (computed in float32 on CPU).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from conftest import left_padded, paddle_model, small_config
from paddle_glm4.demo import random_weights
from paddle_glm4.generation import ModelSession
from paddle_glm4.inference import ExportError, Predictor, export_model
from paddle_glm4.inference.manifest import MANIFEST_NAME
from paddle_glm4.kv_cache import KVCache
from paddle_glm4.sequences import Sequences
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEQ_LEN = 96
NEW = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(config, dynamic model, checkpoint dir, float32 export dir, bf16 export dir)."""
    root = tmp_path_factory.mktemp("inference")
    checkpoint = str(root / "checkpoint")
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(checkpoint))
    config = small_config(
        vocab_size=tokenizer.vocab_size,
        rope_ratio=500.0,
        seq_length=128,
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = paddle_model(config, dict(random_weights(config, seed=3)))
    model.save_pretrained(checkpoint)
    exports = {dtype: str(root / f"export_{dtype}") for dtype in ("float32", "bfloat16")}
    for dtype, out in exports.items():
        export_model(checkpoint, out, dtype=dtype, max_seq_len=MAX_SEQ_LEN, progress=False)
    return config, model, checkpoint, exports["float32"], exports["bfloat16"]


@pytest.fixture(scope="module")
def predictor(built):
    return Predictor(built[3])


def prompts(lengths=(5, 11, 1, 8), seed=0):
    # ids below 256 are plain bytes of the small vocabulary: no special token, no stop id
    return [np.random.RandomState(seed + n).randint(3, 256, n).astype("int64") for n in lengths]


def session_logits(session, ids, mask, steps):
    """Logits [b, vocab] after the prompt, then after each of `steps` greedy tokens of the session itself."""
    out = [
        session.prefill(
            paddle.to_tensor(ids), None if mask is None else paddle.to_tensor(mask), None, ids.shape[1] + steps
        ).numpy()
    ]
    for _ in range(steps):
        out.append(session.step(paddle.to_tensor(out[-1].argmax(-1))).numpy())
    return np.stack(out, axis=1)


def test_float32_predictor_equals_the_dynamic_model_alone_and_batched(built, predictor):
    _, model, *_ = built
    ps = prompts()
    for p in ps:
        ids, scores = predictor.generate(p, max_new_tokens=NEW, eos_token_id=[])
        ref_ids, ref_scores = model.generate(p, max_new_tokens=NEW, eos_token_id=[])
        assert ids.numpy().tolist() == ref_ids.numpy().tolist()
        assert abs(float(scores[0, 0]) - float(ref_scores[0, 0])) < 1e-3
        ours, ref = (session_logits(s, p[None], None, 6) for s in (predictor.session(), ModelSession(model)))
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    batch, mask = left_padded(ps, 0)
    ids, _ = predictor.generate(batch, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    ref_ids, _ = model.generate(batch, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert ids.numpy().tolist() == ref_ids.numpy().tolist()
    ours, ref = (session_logits(s, batch, mask, 6) for s in (predictor.session(), ModelSession(model)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_bfloat16_export_stays_close_to_the_float32_model(built):
    _, model, _, _, bf16_dir = built
    predictor = Predictor(bf16_dir, precision="bfloat16")
    assert predictor.manifest.dtype == "bfloat16" and predictor.manifest.compute_dtype == "float32"
    params = os.path.join(bf16_dir, "glm4.pdiparams")
    assert os.path.getsize(params) < 0.6 * os.path.getsize(params.replace("bfloat16", "float32"))
    for p in prompts((7, 12)):
        ids, _ = predictor.generate(p, max_new_tokens=8, eos_token_id=[])
        ref_ids, _ = model.generate(p, max_new_tokens=8, eos_token_id=[])
        assert ids.numpy().tolist() == ref_ids.numpy().tolist()
        ours, ref = (session_logits(s, p[None], None, 8) for s in (predictor.session(), ModelSession(model)))
        assert np.abs(ours - ref).max() / np.abs(ref).max() <= 2e-2


def test_prompts_of_any_length_run_through_one_export(built, predictor):
    _, model, *_ = built
    for p in prompts((1, 2, 17, 40, MAX_SEQ_LEN - 1)):
        logits = predictor.session().prefill(paddle.to_tensor(p[None]), None, None, len(p) + 1).numpy()
        full = model(paddle.to_tensor(p[None])).logits.numpy()[:, -1]
        np.testing.assert_allclose(logits, full, atol=1e-4, rtol=0)


def test_decode_step_k_equals_the_full_forward_at_position_k(built, predictor, monkeypatch):
    _, model, *_ = built
    sequence = prompts((30,))[0]
    prompt, capacity = 4, len(sequence)
    shapes = []
    run = predictor.run
    monkeypatch.setattr(predictor, "run", lambda *args: shapes.append(args[4][0].shape) or run(*args))
    session = predictor.session()
    full = model(paddle.to_tensor(sequence[None])).logits.numpy()[0]
    logits = session.prefill(paddle.to_tensor(sequence[None, :prompt]), None, None, capacity)
    np.testing.assert_allclose(logits.numpy()[0], full[prompt - 1], atol=1e-4, rtol=0)
    for k in range(prompt, capacity):
        logits = session.step(paddle.to_tensor(sequence[k : k + 1]))
        np.testing.assert_allclose(logits.numpy()[0], full[k], atol=1e-4, rtol=0)
    # every decode step (and the prefill, written in place) sees the whole preallocated cache: the same shapes,
    # so the same cost, at each step
    assert {tuple(s) for s in shapes} == {(1, capacity, 2, 16)}
    # the program wrote each step's keys into the caller's buffers, in place
    assert float(session.cache.keys[0][0, capacity - 1].abs().sum()) > 0


def test_the_program_prefills_a_prompt_in_chunks_over_the_whole_cache(built, predictor):
    # several new tokens at a start > 0 (chunked prefill): the program is the model's one forward, not a
    # prefill-only or decode-only copy
    _, model, *_ = built
    sequence = prompts((20,))[0][None]
    full = model(paddle.to_tensor(sequence)).logits.numpy()[0]
    cache = KVCache(predictor.config, 1, 20)
    sequences = Sequences(1, 20, cache)
    for lo, hi in ((0, 7), (7, 8), (8, 20)):
        step = sequences.claim(hi - lo)
        logits = predictor.run(
            paddle.to_tensor(sequence[:, lo:hi]), step.positions, step.start, sequences.valid, cache.keys, cache.values
        )
        np.testing.assert_allclose(logits.numpy()[0], full[hi - 1], atol=1e-4, rtol=0)


def test_sampling_and_stopping_follow_the_shared_decode_loop(built, predictor):
    _config, model, *_ = built
    p = prompts((6,))[0]
    kwargs = {"max_new_tokens": NEW, "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 11}
    assert predictor.generate(p, **kwargs)[0].numpy().tolist() == model.generate(p, **kwargs)[0].numpy().tolist()
    free, _ = model.generate(p, max_new_tokens=NEW, eos_token_id=[])
    stop = [int(free[0, 5]), int(free[0, 9])]
    ids, _ = predictor.generate(p, max_new_tokens=NEW, eos_token_id=stop)
    assert ids.numpy().tolist() == model.generate(p, max_new_tokens=NEW, eos_token_id=stop)[0].numpy().tolist()
    assert int(ids[0, -1]) in stop

    class Collect:
        cancelled, tokens = False, []

        def put(self, tokens):
            self.tokens.append(int(tokens[0]))

        def end(self):
            pass

    streamer = Collect()
    ids, _ = predictor.generate(p, max_new_tokens=NEW, eos_token_id=[], streamer=streamer)
    assert streamer.tokens == ids.numpy()[0].tolist()
    with pytest.raises(ValueError, match="context"):
        predictor.generate(prompts((MAX_SEQ_LEN - 4,))[0], max_new_tokens=8)


def test_export_refuses_bad_input_with_a_clear_message(built, tmp_path):
    config, _, checkpoint, f32_dir, _ = built
    out = str(tmp_path / "out")
    with pytest.raises(ExportError, match="no such directory"):
        export_model(str(tmp_path / "missing"), out)
    with pytest.raises(ExportError, match=r"no config.json"):
        export_model(str(tmp_path), out)
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text(json.dumps({**config.to_published_dict()}))
    with pytest.raises(ExportError, match=r"published torch layout .*'chatglm'.*glm4-convert --src"):
        export_model(str(published), out)
    with pytest.raises(ExportError, match="already an export directory"):
        export_model(f32_dir, out)
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_model(checkpoint, out, dtype="int8")
    with pytest.raises(ExportError, match="exceeds the model's context"):
        export_model(checkpoint, out, max_seq_len=config.seq_length + 1)
    assert not os.path.exists(out)


def test_predictor_refuses_incomplete_or_foreign_exports(built, tmp_path):
    _, _, checkpoint, f32_dir, _ = built
    with pytest.raises(ExportError, match="holds a checkpoint; export it first"):
        Predictor(checkpoint)
    broken = str(tmp_path / "broken")
    shutil.copytree(f32_dir, broken)
    os.unlink(os.path.join(broken, "glm4.pdiparams"))
    with pytest.raises(ExportError, match=r"glm4.pdiparams is missing"):
        Predictor(broken)
    shutil.copytree(f32_dir, broken, dirs_exist_ok=True)
    manifest = os.path.join(broken, MANIFEST_NAME)
    data = json.loads(Path(manifest).read_text())
    with open(manifest, "w") as f:
        json.dump({**data, "format_version": 99}, f)
    with pytest.raises(ExportError, match="format version 99"):
        Predictor(broken)
    os.unlink(manifest)
    with pytest.raises(ExportError, match="incomplete"):
        Predictor(broken)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(f32_dir, precision="int8")
    with pytest.raises(ValueError, match="needs a GPU"):
        Predictor(f32_dir, precision="float16")
    if not paddle.base.core.supports_bfloat16():
        with pytest.raises(ValueError, match="needs AVX-512"):
            Predictor(f32_dir, precision="bfloat16")


def run_python(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_export_then_generate_with_a_clean_stdout(built, tmp_path):
    _, model, checkpoint, *_ = built
    out = str(tmp_path / "cli_export")
    export = ("-m", "paddle_glm4.inference", "export", "--model", checkpoint, "--out", out, "--max-seq-len")
    done = run_python(*export, "64")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "exported to" in done.stderr
    prompt = "The weather today"
    done = run_python(
        "-m",
        "paddle_glm4",
        "generate",
        "--model",
        out,
        "--engine",
        "inference",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--greedy",
    )
    assert done.returncode == 0, done.stderr
    tokenizer = GLM4Tokenizer.from_pretrained(checkpoint)
    ids, _ = model.generate([tokenizer.encode(prompt)], max_new_tokens=12)
    expected = tokenizer.decode(
        [t for t in ids.numpy()[0] if t not in tokenizer.stop_token_ids], skip_special_tokens=True
    )
    assert done.stdout == expected + "\n"  # the generated text, and nothing Paddle printed
    bad = run_python(*export, "999")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: max_seq_len 999 exceeds")


@pytest.mark.gpu
def test_gpu_predictor_generates_what_the_cpu_one_does(built):
    _, _, _, f32_dir, _ = built
    p = prompts((9,))[0]
    gpu, cpu = Predictor(f32_dir, device="gpu"), Predictor(f32_dir)
    ids = [predictor.generate(p, max_new_tokens=8)[0].numpy().tolist() for predictor in (gpu, cpu)]
    assert ids[0] == ids[1]


@pytest.mark.slow
def test_what_paddle_prints_while_preparing_a_program_goes_to_stderr(built, tmp_path):
    # oneDNN (used for its bf16 mode) prints kernel checks to C's stdout at a program's first run, e.g.
    # ReduceMeanCheckIfOneDNNSupport for a mean. Our exports now compute their norms with the kernels'
    # operators, so a one-op program with a mean makes Paddle print, beside the bf16 export's first run.
    code = f"""
import paddle, paddle.inference as pi
from paddle_glm4 import kernels
from paddle_glm4.inference.predictor import _stdout_to_stderr

class Mean(paddle.nn.Layer):
    def forward(self, x):
        return x.mean(-1, keepdim=True)

paddle.jit.save(Mean(), {str(tmp_path / "mean")!r}, input_spec=[paddle.static.InputSpec([None, 8], "float32")])
kernels.load()  # the export calls the kernels' operators (attention, linear, norms), found only once loaded

def predictor(model, params):
    config = pi.Config(model, params)
    config.enable_mkldnn()
    config.disable_glog_info()
    return pi.create_predictor(config)

empty = [paddle.zeros([1, 1, 2, 16]) for _ in range(4)]
with _stdout_to_stderr():
    glm4 = predictor({os.path.join(built[3], "glm4.json")!r}, {os.path.join(built[3], "glm4.pdiparams")!r})
    glm4.run([paddle.zeros([1, 1], dtype="int64"), paddle.zeros([1, 1], dtype="int64"),
              paddle.to_tensor(0, dtype="int64"), paddle.ones([1, 1], dtype="bool"), *empty])
    predictor({str(tmp_path / "mean.json")!r}, {str(tmp_path / "mean.pdiparams")!r}).run([paddle.ones([2, 8])])
print("generated text")
"""
    script = tmp_path / "prints.py"  # a file: to_static reads the Layer's source
    script.write_text(code, encoding="utf-8")
    done = run_python(str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "generated text\n"
    assert "OneDNN" in done.stderr  # it was printed, to stderr


class Lines:
    """A console.LineReader stand-in: the given lines, then end of input."""

    def __init__(self, *lines):
        self.lines = list(lines)

    def readline(self):
        return self.lines.pop(0) if self.lines else None


def test_an_exports_max_seq_len_is_the_context_for_the_cli_and_the_server_alike(built, predictor, capsys):
    from fastapi.testclient import TestClient

    from paddle_glm4.__main__ import _chat, build_parser
    from paddle_glm4.server.app import create_app

    config, _, _, f32_dir, _ = built
    assert predictor.context_length == MAX_SEQ_LEN < config.seq_length
    tokenizer = GLM4Tokenizer.from_pretrained(f32_dir)
    # the CLI's chat: two turns fit the model's 128 tokens but not the export's 96, so the oldest turn goes
    args = build_parser().parse_args(
        ["chat", "--model", f32_dir, "--engine", "inference", "--max-new-tokens", "8", "--greedy"]
    )
    turns = ["a" * 40, "b" * 40]
    second = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": turns[0]},
            {"role": "assistant", "content": "x" * 8},
            {"role": "user", "content": turns[1]},
        ],
        add_generation_prompt=True,
    )
    assert MAX_SEQ_LEN - 8 < len(second) <= config.seq_length - 8
    assert _chat(args, predictor, tokenizer, Lines(*turns), interactive=False) == 0
    err = capsys.readouterr().err
    assert "oldest turn dropped to fit the context" in err and "error" not in err
    # the server: prompt + max_tokens up to 96 is served, one more is refused, naming 96
    prompt = tokenizer.encode("c" * 50)
    with TestClient(create_app(predictor, tokenizer)) as client:

        def complete(max_tokens):
            return client.post("/v1/completions", json={"prompt": "c" * 50, "max_tokens": max_tokens})

        served = complete(MAX_SEQ_LEN - len(prompt))
        assert served.status_code == 200, served.text
        refused = complete(MAX_SEQ_LEN - len(prompt) + 1)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert f"maximum context length is {MAX_SEQ_LEN} tokens" in refused.json()["error"]["message"]


def test_the_batching_engine_drives_the_predictor_as_it_drives_the_dynamic_model(built, predictor):
    """The continuous-batching scheduler over the exported program (which takes a batch and a cache): prompts
    prefilled in chunks join a running batch; each request gets what it gets alone through the predictor, and,
    greedy, what the dynamic model and predictor.generate give."""
    from paddle_glm4.scheduler import Request, Scheduler

    _, model, *_ = built

    def made():
        kinds = [{}, {"temperature": 0.9, "top_p": 0.9}, {"temperature": 1.1, "top_k": 20}, {"repetition_penalty": 1.3}]
        return [
            Request(
                p.tolist(),
                3 + (5 * n) % 14,
                model.generation_config.merged(eos_token_id=[], **kinds[n % 4]),
                seed=40 + n,
            )
            for n, p in enumerate(prompts((5, 11, 1, 8, 23, 2, 17, 9)))
        ]

    together = Scheduler(predictor, max_num_seqs=3, prefill_chunk=4).run(made())
    alone = [Scheduler(predictor, max_num_seqs=1).run([r])[0] for r in made()]
    dynamic = Scheduler(model, max_num_seqs=3, prefill_chunk=4).run(made())
    for request, single, reference in zip(together, alone, dynamic, strict=True):
        assert request.error is None and len(request.output) == request.max_tokens
        assert request.output == single.output == reference.output
    for request in together[::4]:  # the greedy ones
        ids, _ = predictor.generate(np.array(request.prompt), max_new_tokens=request.max_tokens, eos_token_id=[])
        assert request.output == ids.numpy()[0].tolist()
    # and the server's worker batches through it (rather than one generate at a time)
    from paddle_glm4.server.worker import Worker

    worker = Worker(predictor, max_concurrency=4, max_num_seqs=3)
    try:
        assert isinstance(worker.engine, Scheduler) and worker.engine.max_num_seqs == 3
    finally:
        worker.close()


def test_the_offline_batch_call_runs_an_export(built, predictor):
    """LLM.load(export_dir, engine="inference"): the offline batch call over the predictor gives the dynamic
    model's answers."""
    from paddle_glm4.llm import LLM, Options

    _, model, checkpoint, f32_dir, _ = built
    prompts_ = ["hello there", "a longer prompt than the other one", [5, 9, 33, 41]]
    options = [Options(max_tokens=9), Options(max_tokens=5, temperature=0.8, seed=3), Options(max_tokens=7)]
    exported = LLM.load(f32_dir, engine="inference", max_num_seqs=2).generate(prompts_, options)
    tokenizer = GLM4Tokenizer.from_pretrained(checkpoint)
    assert exported == LLM(model, tokenizer, max_num_seqs=3).generate(prompts_, options)
    assert all(output.token_ids for output in exported)
