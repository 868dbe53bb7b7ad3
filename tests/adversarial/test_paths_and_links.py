"""Paths and links: a file name read from a file is a plain name in its directory, a link may not lead out of the
source, only regular files are read, and a copy never grants more access than its source.

Each attack runs the real command line and checks: exit code 2, one `error:` line naming the file (and field),
and the whole sandbox (source, destination's parent, the files an escape would hit) byte- and mode-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from corpus import UNSAFE_NAMES, build_templates, copy_tree
from hypothesis import given, settings
from hypothesis import strategies as st
from sandbox import no_hang, refused  # noqa: F401 (no_hang: an autouse fixture)

from converters import paddle_to_torch, torch_to_paddle
from paddle_glm4.inference import __main__ as inference_cli
from paddle_glm4.source_files import UnsafeFileError, plain_name

pytestmark = pytest.mark.torch_free

SIDE_AND_CHECKPOINT_FILES = [
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
    "config.json",
    "model.safetensors.index.json",
    "model-00002-of-00005.safetensors",
]


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return build_templates(tmp_path_factory)


@pytest.fixture
def src(tmp_path, templates) -> Path:
    return copy_tree(templates[0], tmp_path / "src")


@pytest.fixture
def paddle_src(tmp_path, templates) -> Path:
    return copy_tree(templates[1], tmp_path / "paddle")


def plant_victims(root: Path) -> None:
    """Files where an escaping name would land, so that a write there would show in the snapshot."""
    for name in ("escaped.safetensors", "config.json", "tokenizer.model"):
        (root / name).write_text("a user's file")


# ---- names read from files -----------------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(alphabet="./\\x\0", max_size=12),
        st.lists(st.sampled_from(["..", ".", "", "x", "model.safetensors"]), min_size=1, max_size=4).map("/".join),
    )
)
def test_a_plain_name_never_leaves_its_directory(name):
    """Any text: an accepted name is an entry directly inside the directory, and an ordinary file name is
    accepted."""
    directory = "/srv/checkpoint"
    try:
        plain_name(name, "test")
    except UnsafeFileError:
        accepted = False
    else:
        accepted = True
        path = os.path.normpath(os.path.join(directory, name))
        assert os.path.dirname(path) == directory and os.path.basename(path) == name
    if name in ("x", "model.safetensors", "model-00001-of-00002.safetensors"):
        assert accepted


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_index_file_names_must_be_plain(tmp_path, src, capsys, name):
    plant_victims(tmp_path)
    shutil.copy(src / "model-00001-of-00005.safetensors", tmp_path / "escaped.safetensors")  # a valid shard outside
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "out")],
        tmp_path,
        "model.safetensors.index.json",
        f"weight_map[{first!r}]",
    )
    # a string that is not a plain name, or not a (short enough) string at all: the index's schema says so first
    assert "not a plain file name" in err or "must be a string of at most 255 characters" in err, err


@pytest.mark.parametrize("name", UNSAFE_NAMES[:4], ids=repr)
def test_a_paddle_checkpoints_index_names_must_be_plain_too(tmp_path, paddle_src, capsys, name):
    """The same rule where checkpoints are loaded (checkpoint.inspect: from_pretrained, paddle_to_torch)."""
    index = json.loads((paddle_src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (paddle_src / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(
        capsys,
        paddle_to_torch.main,
        ["--src", str(paddle_src), "--dst", str(tmp_path / "out")],
        tmp_path,
        "model.safetensors.index.json",
        "not a plain file name",
    )


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("name", [*UNSAFE_NAMES, "config.json", "tokenizer.model", "notes.txt"], ids=repr)
def test_manifest_file_names_must_be_plain_safetensors_names(tmp_path, paddle_src, capsys, name, verify):
    """paddle_to_torch writes the files a conversion manifest records: a crafted name is refused, not written
    (nor silently worked around), with or without verification."""
    plant_victims(tmp_path)
    manifest_path = paddle_src / "conversion_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["published_layout"]["files"][1]["name"] = name
    manifest_path.write_text(json.dumps(manifest))
    argv = ["--src", str(paddle_src), "--dst", str(tmp_path / "out")] + ([] if verify else ["--no-verify"])
    refused(capsys, paddle_to_torch.main, argv, tmp_path, str(manifest_path), "published_layout.files[1].name")


def test_a_manifests_recorded_index_must_name_the_recorded_files(tmp_path, paddle_src, capsys):
    plant_victims(tmp_path)
    manifest_path = paddle_src / "conversion_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    index = json.loads(manifest["published_layout"]["index"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../escaped.safetensors"
    manifest["published_layout"]["index"] = json.dumps(index)
    manifest_path.write_text(json.dumps(manifest))
    refused(
        capsys,
        paddle_to_torch.main,
        ["--src", str(paddle_src), "--dst", str(tmp_path / "out"), "--no-verify"],
        tmp_path,
        str(manifest_path),
        "published_layout.index",
    )


def test_the_recorded_layout_still_round_trips(tmp_path, src, paddle_src, capsys):
    """The rules refuse only what they should: the untouched manifest reproduces the published files."""
    assert paddle_to_torch.main(["--src", str(paddle_src), "--dst", str(tmp_path / "back")]) == 0
    for path in src.glob("model*"):
        assert (tmp_path / "back" / path.name).read_bytes() == path.read_bytes()


# ---- links ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIDE_AND_CHECKPOINT_FILES)
def test_links_leaving_the_source_are_refused(tmp_path, src, capsys, name):
    """The link leads to a file with the very same bytes: only the link itself is refused."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(src / name, outside / name)
    os.chmod(outside / name, 0o600)  # a secret: it must not come out readable, nor at all
    (src / name).symlink_to(outside / name)
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "out")],
        tmp_path,
        str(src / name),
        "outside",
        "not followed",
    )


def test_a_link_to_a_secret_is_refused_by_export_too(tmp_path, paddle_src, capsys):
    secret = tmp_path / "secret"
    secret.write_text("password")
    os.chmod(secret, 0o600)
    (paddle_src / "tokenizer.model").unlink()
    (paddle_src / "tokenizer.model").symlink_to(secret)
    refused(
        capsys,
        inference_cli.main,
        ["export", "--model", str(paddle_src), "--out", str(tmp_path / "out")],
        tmp_path,
        "tokenizer.model",
        "outside",
    )


def test_links_inside_the_source_are_followed(tmp_path, src, capsys):
    (src / "sub").mkdir()
    shutil.move(src / "tokenizer.model", src / "sub" / "tokenizer.model")
    (src / "tokenizer.model").symlink_to(Path("sub") / "tokenizer.model")
    assert torch_to_paddle.main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 0
    copied = tmp_path / "out" / "tokenizer.model"
    assert not copied.is_symlink() and copied.read_bytes() == (src / "sub" / "tokenizer.model").read_bytes()


def test_a_hugging_face_cache_snapshot_is_read(tmp_path, templates, capsys):
    """huggingface_hub stores downloads as links from snapshots/REVISION/ into the repository's blobs/."""
    repo = tmp_path / "hub" / "models--THUDM--glm-4-9b-chat"
    snapshot_dir = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for i, path in enumerate(sorted(templates[0].iterdir())):
        shutil.copy(path, repo / "blobs" / f"blob{i}")
        (snapshot_dir / path.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    assert torch_to_paddle.main(["--src", str(snapshot_dir), "--dst", str(tmp_path / "out")]) == 0
    # and a link from a snapshot into another repository's blobs is still refused
    other = tmp_path / "hub" / "models--other--model" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(snapshot_dir / "tokenizer.model", other / "tokenizer.model")
    (snapshot_dir / "tokenizer.model").unlink()
    (snapshot_dir / "tokenizer.model").symlink_to(other / "tokenizer.model")
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(snapshot_dir), "--dst", str(tmp_path / "out2")],
        tmp_path,
        "tokenizer.model",
        "outside",
    )


# ---- files that are not regular --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIDE_AND_CHECKPOINT_FILES)
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_files_that_are_not_regular_are_refused_without_blocking(tmp_path, src, capsys, name, kind):
    (src / name).unlink()
    if kind == "fifo":
        os.mkfifo(src / name)  # nobody ever writes: reading it would block forever
    else:
        (src / name).mkdir()
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "out")],
        tmp_path,
        str(src / name),
        "not a regular file",
    )


def test_dev_zero_as_the_tokenizer_is_refused(tmp_path, src, capsys):
    """An endless file: linked, it leaves the source; the loader's own rule refuses it either way."""
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.model").symlink_to("/dev/zero")
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "out")],
        tmp_path,
        "tokenizer.model",
        "/dev/zero",
    )
    from paddle_glm4.source_files import UnsafeFileError, open_regular

    with pytest.raises(UnsafeFileError, match="character device, not a regular file"):
        open_regular("/dev/zero")


# ---- permissions -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_outputs_never_grant_more_than_their_sources(tmp_path, src, mode):
    for path in src.iterdir():
        os.chmod(path, mode)
    os.chmod(src / "tokenizer.model", 0o600)  # a private file stays private in the copy
    out, back = tmp_path / "out", tmp_path / "back"
    assert torch_to_paddle.main(["--src", str(src), "--dst", str(out)]) == 0
    assert paddle_to_torch.main(["--src", str(out), "--dst", str(back)]) == 0
    for directory in (out, back):
        assert stat.S_IMODE(os.stat(directory / "tokenizer.model").st_mode) & 0o077 == 0
        for path in directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & ~mode & 0o777 == 0, (path, oct(path.stat().st_mode))
        assert stat.S_IMODE(directory.stat().st_mode) & 0o007 == (0o005 if mode & 0o004 else 0)


# ---- an export's program files, which Paddle Inference opens itself ----------------------------------------------
@pytest.fixture(scope="module")
def export_template(templates, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "export"
    assert inference_cli.main(["export", "--model", str(templates[1]), "--out", str(out), "--max-seq-len", "32"]) == 0
    return out


@pytest.mark.parametrize("name", ["glm4.json", "glm4.pdiparams"])
@pytest.mark.parametrize("kind", ["link out", "fifo"])
def test_an_exports_program_files_must_be_its_own_regular_files(tmp_path, export_template, capsys, name, kind):
    export = copy_tree(export_template, tmp_path / "export")
    if kind == "link out":
        shutil.move(export / name, tmp_path / name)
        (export / name).symlink_to(tmp_path / name)
    else:
        (export / name).unlink()
        os.mkfifo(export / name)
    from paddle_glm4 import __main__ as glm4_cli

    refused(
        capsys,
        glm4_cli.main,
        ["generate", "--model", str(export), "--engine", "inference", "--prompt", "hi"],
        tmp_path,
        str(export / name),
        "outside" if kind == "link out" else "not a regular file",
    )
