"""The weight converter: torch (published or transformers layout) <-> Paddle, on small checkpoints with the
real GLM-4-9B tensor names, written the way users get them (see checkpoint_builders)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from checkpoint_builders import (
    big_checkpoint,
    published_state,
    thudm_inv_freq,
    torch_dtype,
    tree_digest,
    write_hf,
    write_published,
)
from conftest import (
    CHAT_REFERENCE,
    hf_state,
    paddle_model,
    paddle_state,
    reference_logits,
    reference_model,
    requires_reference,
    small_config,
)
from converters import mapping, paddle_to_torch, pipeline, torch_to_paddle
from converters.transpose import transpose_into
from paddle_glm4 import GLM4Config, GLM4ForCausalLM
from paddle_glm4.checkpoint import index_json, plan_shards
from paddle_glm4.demo import random_weights
from paddle_glm4.integrations.paddlenlp import checkpoint_dir
from paddle_glm4.safetensors_file import SafetensorsReader, SafetensorsWriter, cast

ROOT = Path(__file__).resolve().parents[1]
IDS = np.array([[1, 17, 42, 99, 256, 300, 511, 7]])
SHARD = 100_000  # bytes: cuts the small model into 5 files, with lm_head bigger than a shard


@pytest.fixture(scope="module")
def reference():
    config = small_config()
    model = reference_model(config)
    return config, model, paddle_state(config, hf_state(model)), reference_logits(model, IDS)


def logits_of(directory) -> np.ndarray:
    import paddle

    model = GLM4ForCausalLM.from_pretrained(str(directory))
    return model(paddle.to_tensor(IDS)).logits.numpy()


def tensors_of(directory) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (dtype, raw array)} of every tensor in a checkpoint directory."""
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with SafetensorsReader(str(path)) as reader:
            out.update({name: (reader.dtype(name), reader.read(name)) for name in reader.names()})
    return out


# ---- the real checkpoint's names --------------------------------------------------------------------------
@pytest.mark.torch_free
@requires_reference("config.json", "model.safetensors.index.json")
def test_mapping_names_and_shards_match_the_real_index():
    config = GLM4Config.from_file(str(CHAT_REFERENCE / "config.json"))
    real = (CHAT_REFERENCE / "model.safetensors.index.json").read_text()
    published = {spec.published for spec in mapping.tensor_specs(config)} | {mapping.PUBLISHED_INV_FREQ}
    assert published == set(json.loads(real)["weight_map"])
    # and the canonical writer's plan (module order, transformers' 2GB rule) gives the real index byte for byte
    sizes = {spec.published: 2 * int(np.prod(spec.shape)) for spec in mapping.tensor_specs(config)}
    sizes[mapping.PUBLISHED_INV_FREQ] = 2 * config.rotary_dim // 2
    order = [(name, sizes[name]) for name in mapping.published_order(config)]
    shards = plan_shards(order, 2 * 10**9, transformers_rule=True)
    assert index_json(shards, sum(sizes.values())) == real


@pytest.mark.torch_free
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float16, np.float64])
@pytest.mark.parametrize(
    "shape, columns",
    [
        ((1, 1), slice(None)),
        ((300, 37), slice(None)),
        ((5000, 72), slice(8, 64)),
        ((17, 2000), slice(3, 1999)),
        ((4608, 40), slice(None)),
    ],
)
def test_transpose_into_equals_numpys_transpose(dtype, shape, columns):
    """The converter's fast transpose, on whole matrices and on column slices (the converter's blocks),
    with widths that are and are not a whole number of 16-byte units, into a column slice of the output."""
    matrix = np.random.default_rng(0).integers(0, 1 << 15, size=shape).astype(dtype)[:, columns]
    out = np.zeros((matrix.shape[1], matrix.shape[0] + 5), dtype)
    transpose_into(out[:, 2:-3], matrix)
    assert np.array_equal(out[:, 2:-3], matrix.T)
    assert not out[:, :2].any() and not out[:, -3:].any()  # nothing written beside it


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_published_inv_freq_is_thudms_bit_for_bit(dtype):
    for head_dim in (16, 32, 64, 128, 256):
        config = small_config(head_dim=head_dim)
        theirs = thudm_inv_freq(config, dtype).view(torch_dtype("float16")).numpy().view(np.uint16)
        assert np.array_equal(mapping.published_inv_freq(config, dtype).view(np.uint16), theirs)


# ---- conversions ------------------------------------------------------------------------------------------
@pytest.mark.torch_free
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_published_checkpoint_converts_without_torch(tmp_path, dtype):
    """The converter needs numpy, not torch, and numpy 1.x as well as 2.x (`make test-paddlenlp` runs this under
    numpy 1.26): a published-layout checkpoint, its inv_freq computed in its dtype, converts, verifies, and
    converts back to the same files byte for byte."""
    config = small_config(dtype=dtype)
    state = dict(random_weights(config, seed=1))
    src, paddle_dir, back = tmp_path / "src", tmp_path / "paddle", tmp_path / "back"
    paddle_to_torch.write_published_checkpoint(str(src), config, state, max_shard_size=SHARD)
    summary = torch_to_paddle.convert(str(src), str(paddle_dir), progress=False)
    assert summary.layout.startswith("published") and summary.dtype == dtype and summary.verified
    converted = tensors_of(paddle_dir)
    assert set(converted) == set(state)
    for name, array in state.items():
        assert converted[name][0] == dtype and np.array_equal(converted[name][1], cast(array, "float32", dtype))
    paddle_to_torch.export(str(paddle_dir), str(back), progress=False)
    for path in src.glob("model*"):
        assert (back / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("layout", ["published", "hf"])
def test_converts_and_loads_with_reference_logits(tmp_path, reference, layout, sharded):
    config, model, state, expected = reference
    src = tmp_path / "src"
    if layout == "published":
        write_published(src, config, state, max_shard_size=SHARD if sharded else None)
    else:
        write_hf(src, model, max_shard_size="100KB" if sharded else None)
    assert (src / "model.safetensors.index.json").exists() == sharded

    summary = torch_to_paddle.convert(str(src), str(tmp_path / "dst"), progress=False)

    dst = tmp_path / "dst"
    assert layout in summary.layout or (layout == "hf" and "transformers" in summary.layout)
    assert (summary.tensors, summary.dtype, summary.verified) == (len(mapping.tensor_specs(config)), "float32", True)
    assert np.abs(logits_of(dst) - expected).max() <= 1e-4
    for name in pipeline.SIDE_FILES:
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    manifest = json.loads((dst / pipeline.MANIFEST).read_text())
    assert set(manifest["sha256"]) == set(os.listdir(dst)) - {pipeline.MANIFEST}
    for name, digest in manifest["sha256"].items():
        assert digest == pipeline._sha256(str(dst / name)), name
    assert manifest["source"]["layout"] == layout and manifest["verified"] is True
    assert ("published_layout" in manifest) == (layout == "published")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bf16_to_bf16_is_bit_exact(tmp_path, reference):
    config, _, state, _ = reference
    src = write_published(tmp_path / "src", config, state, dtype="bfloat16", max_shard_size=SHARD)
    torch_to_paddle.convert(str(src), str(tmp_path / "dst"), progress=False)
    source = tensors_of(src)
    written = tensors_of(tmp_path / "dst")
    assert {dtype for dtype, _ in written.values()} == {"bfloat16"}
    for spec in mapping.tensor_specs(config):
        parts = [source[name][1] for name in spec.source_names("published")]
        assert np.array_equal(written[spec.paddle][1], mapping.to_paddle(spec, parts)), spec.paddle


@pytest.mark.parametrize(
    "src_dtype, dst_dtype",
    [("bfloat16", "float32"), ("float32", "bfloat16"), ("float32", "float16"), ("float16", "float32")],
)
def test_a_cast_equals_torchs_cast_of_the_source(tmp_path, reference, src_dtype, dst_dtype):
    import torch

    config, _, state, _ = reference
    src = write_published(tmp_path / "src", config, state, dtype=src_dtype)
    summary = torch_to_paddle.convert(str(src), str(tmp_path / "dst"), dtype=dst_dtype, progress=False)
    assert (summary.source_dtype, summary.dtype) == (src_dtype, dst_dtype)
    torch_state = published_state(config, state, src_dtype)
    written = tensors_of(tmp_path / "dst")
    for spec in mapping.tensor_specs(config):
        cast_by_torch = torch_state[spec.published].to(torch_dtype(dst_dtype))
        if dst_dtype == "bfloat16":
            expected = cast_by_torch.view(torch.int16).numpy().view(np.uint16)
        else:
            expected = cast_by_torch.numpy()
        assert written[spec.paddle][0] == dst_dtype
        assert np.array_equal(written[spec.paddle][1], mapping.to_paddle(spec, [expected])), spec.paddle
    assert GLM4Config.from_pretrained(str(tmp_path / "dst")).dtype == dst_dtype


def test_tied_embeddings_have_no_lm_head(tmp_path):
    config = small_config(tie_word_embeddings=True)
    model = reference_model(config, seed=1)
    model.tie_weights()  # the fixture draws lm_head separately; tie it as a real tied model is
    write_hf(tmp_path / "src", model)
    assert "lm_head.weight" not in tensors_of(tmp_path / "src")
    torch_to_paddle.convert(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)
    assert np.abs(logits_of(tmp_path / "dst") - reference_logits(model, IDS)).max() <= 1e-4


def test_conversion_streams_in_blocks(tmp_path, monkeypatch):
    """Numpy never holds a whole converted tensor: the largest (64 MB here) goes out in blocks of rows.
    (Source tensors are memory-mapped, which tracemalloc does not count: that is the page cache, mapped
    one tensor at a time; benchmarks/converter.py measures the whole RSS.)"""
    config = small_config(vocab_size=65536, hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    rng = np.random.default_rng(0)
    state = {spec.paddle: rng.standard_normal(spec.shape, dtype=np.float32) for spec in mapping.tensor_specs(config)}
    src = write_published(tmp_path / "src", config, state, side_files=False)
    largest = 65536 * 256 * 4
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 2 << 20)
    tracemalloc.start()
    try:
        torch_to_paddle.convert(str(src), str(tmp_path / "dst"), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the blocks in the stages, the one being computed, and a block's worth of temporaries
    assert peak < (pipeline.IN_FLIGHT + 4) * pipeline.BLOCK_BYTES < largest / 4, f"numpy peak {peak / 1e6:.0f} MB"
    written = tensors_of(tmp_path / "dst")  # and the blocks add up to the right tensors
    assert all(np.array_equal(written[name][1], array) for name, array in state.items())


# ---- back to torch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, sharded", [("bfloat16", True), ("float32", False)])
def test_round_trip_is_byte_identical(tmp_path, reference, dtype, sharded, monkeypatch):
    config, _, state, _ = reference
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 4096)  # many blocks per tensor, both ways
    src = write_published(tmp_path / "src", config, state, dtype=dtype, max_shard_size=SHARD if sharded else None)
    torch_to_paddle.convert(str(src), str(tmp_path / "paddle"), progress=False)
    summary = paddle_to_torch.export(str(tmp_path / "paddle"), str(tmp_path / "back"), progress=False)
    assert summary.notes == ["reproduced the source's recorded file layout"]
    assert_same_files(src, tmp_path / "back")


def assert_same_files(original: Path, copy: Path):
    """Every file of `original` is in `copy`, byte for byte; `copy` has only its manifest besides."""
    expected, actual = tree_digest(original), tree_digest(copy)
    assert actual.pop(pipeline.MANIFEST)
    assert actual == expected


def test_round_trip_through_float32_is_byte_identical(tmp_path, reference):
    config, _, state, _ = reference
    src = write_published(tmp_path / "src", config, state, dtype="bfloat16", max_shard_size=SHARD)
    torch_to_paddle.convert(str(src), str(tmp_path / "paddle"), dtype="float32", progress=False)
    paddle_to_torch.export(str(tmp_path / "paddle"), str(tmp_path / "back"), dtype="bfloat16", progress=False)
    assert_same_files(src, tmp_path / "back")


def test_round_trip_reproduces_an_unusual_file_layout(tmp_path, reference):
    """Byte identity does not rely on the source being written the usual way: its layout is recorded."""
    config, _, state, _ = reference
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config.to_published_dict(), indent=4))
    torch_state = {name: tensor.numpy() for name, tensor in published_state(config, state, "float32").items()}
    names = sorted(torch_state, reverse=True)  # neither module nor alphabetical order
    with SafetensorsWriter(
        str(src / "model.safetensors"),
        [(n, "float32", torch_state[n].shape) for n in names],
        metadata={"creator": "someone else"},
    ) as writer:
        for name in names:
            writer.write(name, torch_state[name])
    torch_to_paddle.convert(str(src), str(tmp_path / "paddle"), progress=False)
    paddle_to_torch.export(str(tmp_path / "paddle"), str(tmp_path / "back"), progress=False)
    assert_same_files(src, tmp_path / "back")


def test_canonical_layout_is_what_transformers_writes(tmp_path, reference):
    """Without a recorded layout, the weights and index come out as transformers + safetensors write them."""
    config, _, state, _ = reference
    src = write_published(tmp_path / "src", config, state, dtype="bfloat16", max_shard_size=SHARD)
    torch_to_paddle.convert(str(src), str(tmp_path / "paddle"), progress=False)
    (tmp_path / "paddle" / pipeline.MANIFEST).unlink()
    summary = paddle_to_torch.export(
        str(tmp_path / "paddle"), str(tmp_path / "back"), max_shard_size=SHARD, progress=False
    )
    assert summary.notes[0].startswith("canonical")
    original, back = tree_digest(src), tree_digest(tmp_path / "back")
    weights = [name for name in original if name.startswith("model")]
    assert len(weights) > 3 and all(back[name] == original[name] for name in weights)
    assert GLM4Config.from_pretrained(str(tmp_path / "back")) == GLM4Config.from_pretrained(str(src))
    # write_published_checkpoint (no torch needed) writes the same bytes
    paddle_to_torch.write_published_checkpoint(
        str(tmp_path / "numpy"), config, state, dtype="bfloat16", max_shard_size=SHARD
    )
    assert all(tree_digest(tmp_path / "numpy")[name] == original[name] for name in weights)


def test_export_of_a_saved_model_converts_back_bit_exactly(tmp_path, reference):
    config, _, state, _ = reference
    paddle_model(config, state).save_pretrained(str(tmp_path / "saved"))
    summary = paddle_to_torch.export(str(tmp_path / "saved"), str(tmp_path / "torch"), progress=False)
    assert "canonical" in summary.notes[0]
    assert {"config.json", "conversion_manifest.json", "model.safetensors"} <= set(os.listdir(tmp_path / "torch"))
    torch_to_paddle.convert(str(tmp_path / "torch"), str(tmp_path / "again"), progress=False)
    again = tensors_of(tmp_path / "again")
    assert all(np.array_equal(again[name][1], array) for name, array in state.items())


# ---- command line -----------------------------------------------------------------------------------------
FLAGS = ("--src", "--dst", "--dtype", "--max-shard-size", "--overwrite", "--no-verify", "--debug")


@pytest.mark.torch_free
@pytest.mark.parametrize("module", [torch_to_paddle, paddle_to_torch])
def test_help_explains_every_flag(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text
    assert all(dtype in text for dtype in ("bfloat16", "float16", "float32")) and "default" in text
    if module is torch_to_paddle:
        assert "--paddlenlp-name NAME" in text and "PPNLP_HOME" in text and "AutoModelForCausalLM" in text


@pytest.mark.slow
def test_console_script_and_module_entry_points():
    for command in (
        [str(ROOT / ".venv" / "bin" / "glm4-convert"), "--help"],
        [sys.executable, "-m", "converters.paddle_to_torch", "--help"],
    ):
        if not os.path.exists(command[0]):
            pytest.skip(f"{command[0]} is not installed")
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0 and "--max-shard-size" in result.stdout


def test_the_converter_imports_no_paddle():
    # the converter stands on numpy and safetensors: a broken or absent Paddle must not stop a conversion
    script = (
        "import sys, converters.torch_to_paddle, converters.paddle_to_torch\n"
        "print(sorted(m for m in sys.modules if m == 'paddle' or m.startswith('paddle.')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "converters.torch_to_paddle", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0 and "--src" in result.stdout
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    ]
    assert "converters.mapping" in imported  # -X importtime did report the converter's imports
    assert [name for name in imported if name.split(".")[0] == "paddle"] == []


def test_cli_converts_and_prints_a_summary(tmp_path, reference, capsys):
    config, _, state, _ = reference
    src = write_published(tmp_path / "src", config, state, max_shard_size=SHARD)
    code = torch_to_paddle.main(
        [
            "--src",
            str(src),
            "--dst",
            str(tmp_path / "dst"),
            "--dtype",
            "bfloat16",
            "--max-shard-size",
            "200KB",
            "--no-verify",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for expected in ("published", "17 tensors in bfloat16", str(tmp_path / "dst"), "MB/s", "--no-verify"):
        assert expected in out
    assert len(out.splitlines()) <= 12
    assert json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())["weight_map"]
    assert paddle_to_torch.main(["--src", str(tmp_path / "dst"), "--dst", str(tmp_path / "back")]) == 0


def test_overwrite_replaces_a_checkpoint_and_nothing_else(tmp_path, reference, capsys):
    config, _, state, _ = reference
    src = write_published(tmp_path / "src", config, state)
    dst = tmp_path / "dst"
    args = ["--src", str(src), "--dst", str(dst)]
    assert torch_to_paddle.main(args) == 0
    assert torch_to_paddle.main([*args, "--overwrite", "--dtype", "bfloat16"]) == 0
    assert GLM4Config.from_pretrained(str(dst)).dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert torch_to_paddle.main(["--src", str(src), "--dst", str(other), "--overwrite"]) == 2
    assert "does not look like a checkpoint" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "mine"


def test_paddlenlp_name_writes_where_paddlenlp_looks(tmp_path, reference, capsys, monkeypatch):
    config, _, state, expected = reference
    src = write_published(tmp_path / "src", config, state)
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path / "ppnlp"))  # PaddleNLP's cache root, read by cache_dir
    monkeypatch.chdir(tmp_path)  # a name is also a relative path: keep any directory it names inside tmp_path
    name = "THUDM/glm-4-9b-chat"
    args = ["--src", str(src), "--paddlenlp-name", name]
    assert torch_to_paddle.main(args) == 0
    dst = tmp_path / "ppnlp" / "models" / "THUDM" / "glm-4-9b-chat"
    assert f"from_pretrained('{name}')" in capsys.readouterr().out
    assert checkpoint_dir(name) == str(dst)  # what the PaddleNLP integration loads for that name
    assert np.abs(logits_of(dst) - expected).max() <= 1e-4
    assert json.loads((dst / pipeline.MANIFEST).read_text())["verified"] is True
    # the same refusal and --overwrite as with --dst
    before = tree_digest(dst)
    assert torch_to_paddle.main(args) == 2
    assert "already exists" in capsys.readouterr().err and tree_digest(dst) == before
    assert torch_to_paddle.main([*args, "--overwrite", "--dtype", "bfloat16"]) == 0
    assert GLM4Config.from_pretrained(str(dst)).dtype == "bfloat16"


def test_paddleformers_name_writes_where_paddleformers_looks(tmp_path, reference, capsys, monkeypatch):
    config, _, state, expected = reference
    src = write_published(tmp_path / "src", config, state)
    monkeypatch.setenv("PF_HOME", str(tmp_path / "pf"))  # PaddleFormers' home, read by its check_repo
    monkeypatch.chdir(tmp_path)
    name = "THUDM/glm-4-9b-chat"
    assert torch_to_paddle.main(["--src", str(src), "--paddleformers-name", name]) == 0
    dst = tmp_path / "pf" / "THUDM" / "glm-4-9b-chat"
    assert f"from_pretrained('{name}')" in capsys.readouterr().out
    assert np.abs(logits_of(dst) - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "destinations, message",
    [
        ((), "--dst DST_DIR or --paddlenlp-name NAME or --paddleformers-name NAME"),
        (("--dst", "dst", "--paddlenlp-name", "THUDM/glm-4-9b"), "give only one"),
        (("--paddlenlp-name", "THUDM/glm-4-9b", "--paddleformers-name", "THUDM/glm-4-9b"), "give only one"),
    ],
)
def test_paddlenlp_name_or_dst_exactly_one(tmp_path, template, capsys, monkeypatch, destinations, message):
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path / "ppnlp"))
    monkeypatch.setenv("PF_HOME", str(tmp_path / "pf"))
    monkeypatch.chdir(tmp_path)
    code = torch_to_paddle.main(["--src", str(template), *destinations])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert os.listdir(tmp_path) == []  # neither destination created


# ---- bad input: a clear one-line error, exit code 2, and neither --src nor --dst changed --------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory, reference):
    config, _, state, _ = reference
    return write_published(tmp_path_factory.mktemp("template") / "src", config, state, max_shard_size=SHARD)


@pytest.fixture
def src(tmp_path, template):
    return Path(shutil.copytree(template, tmp_path / "src"))


def index_of(src: Path) -> dict:
    return json.loads((src / "model.safetensors.index.json").read_text())


def shard_of(src: Path, name: str) -> Path:
    return src / index_of(src)["weight_map"][name]


def rewrite_shard(path: Path, change):
    """Rewrite a shard with `change(tensors dict)` applied, keeping the index in step."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    index = index_of(path.parent)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name or k in tensors}
    index["weight_map"].update(dict.fromkeys(tensors, path.name))
    (path.parent / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def fails(capsys, src, dst, *messages, extra=(), module=torch_to_paddle):
    """Run the CLI; assert exit code 2, one `error:` line holding `messages`, and src, dst unchanged."""
    src, dst = Path(src), Path(dst)
    before = tree_digest(src), tree_digest(dst)
    neighbours = sorted(os.listdir(dst.parent)) if dst.parent.exists() else None
    code = module.main(["--src", str(src), "--dst", str(dst), *extra])
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # after at most the line announcing what was detected
    assert code == 2, stderr
    assert err.startswith("error: ") and stderr.count("error") == 1 and "Traceback" not in stderr, stderr
    for message in messages:
        assert message in err, err
    assert (tree_digest(src), tree_digest(dst)) == before
    assert (sorted(os.listdir(dst.parent)) if dst.parent.exists() else None) == neighbours  # no temp dirs left
    return err


NAME = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"


def test_missing_shard(src, tmp_path, capsys):
    shard = shard_of(src, NAME)
    shard.unlink()
    fails(capsys, src, tmp_path / "dst", "model.safetensors.index.json", shard.name, "holding", "missing")


def test_truncated_header(src, tmp_path, capsys):
    shard = shard_of(src, NAME)
    shard.write_bytes(shard.read_bytes()[:40])
    fails(capsys, src, tmp_path / "dst", str(shard), "corrupted or truncated header")


def test_corrupted_header(src, tmp_path, capsys):
    shard = shard_of(src, NAME)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#" * 12
    shard.write_bytes(bytes(data))
    fails(capsys, src, tmp_path / "dst", str(shard), "not valid JSON")


def test_truncated_data(src, tmp_path, capsys):
    shard = shard_of(src, NAME)
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(capsys, src, tmp_path / "dst", str(shard), "truncated")


def test_index_points_to_a_missing_tensor(src, tmp_path, capsys):
    index = index_of(src)
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][NAME])
    index["weight_map"][NAME] = other
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(capsys, src, tmp_path / "dst", "model.safetensors.index.json", NAME, other, "no such tensor")


def test_unknown_tensor(src, tmp_path, capsys):
    shard = shard_of(src, NAME)
    rewrite_shard(shard, lambda t: t.update({"transformer.encoder.layers.2.mlp.dense_h_to_4h.weight": t[NAME]}))
    fails(
        capsys,
        src,
        tmp_path / "dst",
        str(shard),
        "unexpected tensor",
        "transformer.encoder.layers.2.mlp.dense_h_to_4h.weight",
        "2 layers",
    )


def test_missing_tensor(src, tmp_path, capsys):
    rewrite_shard(shard_of(src, NAME), lambda t: t.pop(NAME))
    fails(capsys, src, tmp_path / "dst", "model.safetensors.index.json", "missing tensor", NAME)


def test_shape_contradicts_config(src, tmp_path, capsys):
    config = json.loads((src / "config.json").read_text())
    config["ffn_hidden_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    fails(capsys, src, tmp_path / "dst", "has shape", "config.json", "implies")


@pytest.mark.parametrize("dtype", [np.int8, np.float64])
def test_unsupported_dtype(src, tmp_path, capsys, dtype):
    shard = shard_of(src, NAME)
    rewrite_shard(shard, lambda t: t.update({NAME: t[NAME].astype(dtype)}))
    fails(capsys, src, tmp_path / "dst", str(shard), NAME, f"dtype {np.dtype(dtype).name}")


def test_unknown_dtype_code(src, tmp_path, capsys):
    shard = shard_of(src, NAME)
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"F8_X"', 1))
    fails(capsys, src, tmp_path / "dst", str(shard), "unsupported dtype 'F8_X'")


def test_inv_freq_contradicts_config(src, tmp_path, capsys):
    shard = shard_of(src, mapping.PUBLISHED_INV_FREQ)
    rewrite_shard(shard, lambda t: t.update({mapping.PUBLISHED_INV_FREQ: np.ones(16, np.float32)}))
    fails(capsys, src, tmp_path / "dst", mapping.PUBLISHED_INV_FREQ, "[16]", "[4]")


def test_inv_freq_with_another_base(src, tmp_path, capsys):
    shard = shard_of(src, mapping.PUBLISHED_INV_FREQ)
    rewrite_shard(shard, lambda t: t.update({mapping.PUBLISHED_INV_FREQ: t[mapping.PUBLISHED_INV_FREQ] ** 1.5}))
    fails(capsys, src, tmp_path / "dst", mapping.PUBLISHED_INV_FREQ, "rotary embedding")


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_dst_equal_to_or_inside_src(src, capsys, where):
    dst = src if where == "equal" else src / "paddle"
    fails(capsys, src, dst, "inside --src")


def test_src_inside_dst(src, tmp_path, capsys):
    fails(capsys, src, tmp_path, "inside --dst", extra=["--overwrite"])


def test_existing_dst_without_overwrite(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    fails(capsys, src, dst, "already exists", "--overwrite")


def test_no_config(src, tmp_path, capsys):
    (src / "config.json").unlink()
    fails(capsys, src, tmp_path / "dst", str(src / "config.json"), "missing")


def test_missing_src(tmp_path, capsys):
    fails(capsys, tmp_path / "nowhere", tmp_path / "dst", "no such directory")


def test_pickle_only_checkpoint_is_never_unpickled(tmp_path, template, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(template / "config.json", src)
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    fails(capsys, src, tmp_path / "dst", "pytorch_model.bin", "pickle")
    assert not marker.exists()


def test_already_paddle(tmp_path, reference, capsys):
    config, _, state, _ = reference
    paddle_model(config, state).save_pretrained(str(tmp_path / "src"))
    fails(capsys, tmp_path / "src", tmp_path / "dst", "already in the Paddle layout")


def test_bad_shard_size(src, tmp_path, capsys):
    fails(capsys, src, tmp_path / "dst", "cannot read size", extra=["--max-shard-size", "lots"])


def test_reverse_rejects_bad_input_too(tmp_path, reference, capsys):
    config, _, state, _ = reference
    paddle_model(config, state).save_pretrained(str(tmp_path / "paddle"))
    fails(capsys, tmp_path / "paddle", tmp_path / "paddle" / "torch", "inside --src", module=paddle_to_torch)
    rewrite = tmp_path / "paddle" / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(rewrite)
    tensors.pop("model.norm.weight")
    save_file(tensors, rewrite)
    fails(
        capsys, tmp_path / "paddle", tmp_path / "torch", "missing tensor", "model.norm.weight", module=paddle_to_torch
    )


# ---- failures while writing ------------------------------------------------------------------------------
def test_a_full_disk_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    real_put, calls = SafetensorsWriter._put, []

    def put(self, data):
        calls.append(len(data))
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        real_put(self, data)

    monkeypatch.setattr(SafetensorsWriter, "_put", put)
    fails(capsys, src, tmp_path / "out" / "dst", "No space left on device", ".safetensors")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 kB filesystem (tmpfs), when this process may mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_leaves_nothing(src, tiny_disk, capsys):
    fails(capsys, src, tiny_disk / "dst", "No space left on device")
    assert os.listdir(tiny_disk) == []


def test_verification_catches_bytes_that_read_back_different(src, tmp_path, capsys, monkeypatch):
    """As if the disk (or a bug in the writing) changed a bit of one block after it was written."""
    real_write = SafetensorsWriter.write

    def write(self, name, array):
        real_write(self, name, array)
        if name.endswith("down_proj.weight"):
            self.flush()
            with open(self.path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 1]))

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    fails(capsys, src, tmp_path / "dst", "down_proj.weight", "reads back different")


@pytest.mark.slow
@pytest.mark.torch_free
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupted_run_leaves_nothing(tmp_path, signum):
    src = big_checkpoint(tmp_path / "src")
    before = tree_digest(src)
    dst = tmp_path / "out" / "dst"
    process = subprocess.Popen(
        [sys.executable, "-m", "converters.torch_to_paddle", "--src", str(src), "--dst", str(dst)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") and any(p.glob("*.safetensors")) for p in (tmp_path / "out").glob(".*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert not (tmp_path / "out").exists()  # not even the parent directory it created
    assert tree_digest(src) == before
