"""Deleting what is not ours: an existing destination is replaced only if it is empty or this project's own
output (its manifest lists every file in it), whatever the flags say: `glm4-convert --overwrite`,
`paddle_to_torch --overwrite`, `glm4 demo --out DIR`, `python -m paddle_glm4.inference export --overwrite`.

Every refusal is checked the same way: exit code 2, one `error:` line, and the sandbox (the destination with
everything in it, the source, their neighbours) identical to the byte and the mode bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from corpus import build_templates, copy_tree
from sandbox import outside, refused, snapshot

from converters import paddle_to_torch, torch_to_paddle
from paddle_glm4 import __main__ as glm4_cli
from paddle_glm4.inference import __main__ as inference_cli

pytestmark = pytest.mark.torch_free


# What a user may have where the output goes; `make(directory, templates)` builds it. None of it is ours to delete.
def users_folder(d, t):
    d.mkdir()
    (d / "config.json").write_text("{}")  # a config.json alone once sufficed
    (d / "thesis.tex").write_text("years of work")


def another_checkpoint(d, t):  # a checkpoint someone saved by other means: no manifest of ours
    copy_tree(t[1], d)
    (d / "conversion_manifest.json").unlink()


def forged_manifest(d, t):
    d.mkdir()
    (d / "conversion_manifest.json").write_text(json.dumps({"tool": "something else", "sha256": {}}))
    (d / "data.bin").write_text("not ours")


def manifest_not_an_object(d, t):
    d.mkdir()
    (d / "conversion_manifest.json").write_text(json.dumps(["model.safetensors"]))
    (d / "model.safetensors").write_text("not ours")


def manifest_not_json(d, t):
    d.mkdir()
    (d / "conversion_manifest.json").write_text("{")
    (d / "model.safetensors").write_text("not ours")


def ours_plus_a_users_file(d, t):
    copy_tree(t[1], d)
    (d / "notes.txt").write_text("the user's notes, written into the output afterwards")


def ours_plus_a_subdirectory(d, t):
    copy_tree(t[1], d)
    (d / "runs").mkdir()
    (d / "runs" / "log.txt").write_text("a fine-tuning log")


def ours_with_a_listed_name_that_is_a_directory(d, t):
    copy_tree(t[1], d)
    (d / "tokenizer.model").unlink()
    (d / "tokenizer.model").mkdir()
    (d / "tokenizer.model" / "precious").write_text("kept")


def ours_with_a_link_in_it(d, t):
    copy_tree(t[1], d)
    (d / "tokenizer.model").unlink()
    (d / "tokenizer.model").symlink_to(d.parent / "linked_from_the_output")


def a_link_to_ours(d, t):
    copy_tree(t[1], d.parent / "real_output")
    d.symlink_to(d.parent / "real_output")


def a_file(d, t):
    d.write_text("a file where the directory would go")


FOREIGN = [
    users_folder,
    another_checkpoint,
    forged_manifest,
    manifest_not_an_object,
    manifest_not_json,
    ours_plus_a_users_file,
    ours_plus_a_subdirectory,
    ours_with_a_listed_name_that_is_a_directory,
    ours_with_a_link_in_it,
    a_link_to_ours,
    a_file,
]


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return build_templates(tmp_path_factory)


@pytest.fixture
def src(tmp_path, templates) -> Path:
    return copy_tree(templates[0], tmp_path / "src")


# ---- the converter, both directions ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", FOREIGN, ids=lambda f: f.__name__)
def test_convert_never_replaces_what_is_not_ours(tmp_path, src, templates, capsys, make):
    (tmp_path / "linked_from_the_output").write_text("outside")
    make(tmp_path / "dst", templates)
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "dst"), "--overwrite"],
        tmp_path,
        "--dst",
        "not replacing",
    )


@pytest.mark.parametrize("make", FOREIGN[:3] + FOREIGN[5:7], ids=lambda f: f.__name__)
def test_paddle_to_torch_never_replaces_what_is_not_ours(tmp_path, templates, capsys, make):
    paddle = copy_tree(templates[1], tmp_path / "paddle")
    make(tmp_path / "dst", templates)
    refused(
        capsys,
        paddle_to_torch.main,
        ["--src", str(paddle), "--dst", str(tmp_path / "dst"), "--overwrite"],
        tmp_path,
        "--dst",
        "not replacing",
    )


@pytest.mark.parametrize("existing", ["ours", "empty"])
def test_convert_replaces_its_own_output_or_an_empty_directory(tmp_path, src, templates, capsys, existing):
    dst = tmp_path / "dst"
    if existing == "ours":
        copy_tree(templates[1], dst)
        (dst / "config.json").write_text((dst / "config.json").read_text())  # still ours after a touch
    else:
        dst.mkdir()
    neighbours = snapshot(tmp_path)
    assert torch_to_paddle.main(["--src", str(src), "--dst", str(dst), "--overwrite", "--dtype", "float32"]) == 0
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float32"
    assert outside(snapshot(tmp_path), "dst") == outside(neighbours, "dst")  # the source and the rest untouched


def test_without_overwrite_even_our_own_output_stays(tmp_path, src, templates, capsys):
    copy_tree(templates[1], tmp_path / "dst")
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "dst")],
        tmp_path,
        "already exists",
        "--overwrite",
    )


# ---- the demo ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["paddle", "published"])
@pytest.mark.parametrize("make", [users_folder, another_checkpoint, ours_plus_a_users_file], ids=lambda f: f.__name__)
def test_demo_out_never_deletes_what_is_not_its_own(tmp_path, templates, capsys, which, make):
    out = tmp_path / "out"
    out.mkdir()
    make(out / which, templates)
    refused(
        capsys,
        glm4_cli.main,
        ["demo", "--out", str(out), "--max-new-tokens", "1"],
        tmp_path,
        str(out / which),
        "not replacing",
    )


def test_demo_out_replaces_its_own_earlier_output(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "mine.txt").write_text("beside the demo's directory")
    for _ in range(2):
        assert glm4_cli.main(["demo", "--out", str(out), "--max-new-tokens", "2"]) == 0
    assert sorted(os.listdir(out)) == ["paddle", "published"]
    assert (tmp_path / "mine.txt").read_text() == "beside the demo's directory"
    assert "new ids (2)" in capsys.readouterr().out


# ---- the export -------------------------------------------------------------------------------------------------
def an_export_plus_a_users_file(d, t):
    d.mkdir()
    (d / "export.json").write_text(json.dumps({"format": "paddle_glm4.inference"}))
    (d / "glm4.json").write_text("{}")
    (d / "deploy.yaml").write_text("the user's deployment")


def a_forged_export(d, t):
    d.mkdir()
    (d / "export.json").write_text(json.dumps({"format": "something else"}))
    (d / "glm4.json").write_text("{}")


@pytest.mark.parametrize(
    "make",
    [users_folder, another_checkpoint, an_export_plus_a_users_file, a_forged_export, a_link_to_ours, a_file],
    ids=lambda f: f.__name__,
)
def test_export_never_replaces_what_is_not_an_export(tmp_path, templates, capsys, make):
    paddle = copy_tree(templates[1], tmp_path / "paddle")
    make(tmp_path / "out", templates)
    refused(
        capsys,
        inference_cli.main,
        ["export", "--model", str(paddle), "--out", str(tmp_path / "out"), "--overwrite"],
        tmp_path,
        "--out",
        "not replacing",
    )


def test_export_into_an_existing_directory_needs_overwrite(tmp_path, templates, capsys):
    paddle = copy_tree(templates[1], tmp_path / "paddle")
    out = tmp_path / "out"
    out.mkdir()
    refused(
        capsys,
        inference_cli.main,
        ["export", "--model", str(paddle), "--out", str(out)],
        tmp_path,
        "already exists",
        "--overwrite",
    )


def test_export_replaces_an_earlier_export_atomically(tmp_path, templates, capsys):
    paddle = copy_tree(templates[1], tmp_path / "paddle")
    out = tmp_path / "out"
    argv = ["export", "--model", str(paddle), "--out", str(out), "--max-seq-len", "64"]
    assert inference_cli.main(argv) == 0
    first = snapshot(out)
    assert inference_cli.main([*argv[:-1], "32", "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["max_seq_len"] == 32
    assert sorted(snapshot(out)) == sorted(first)  # the same files, nothing left of the old one beside them
    assert sorted(os.listdir(tmp_path)) == ["out", "paddle"]  # no partial directory left
    refused(
        capsys,
        inference_cli.main,
        ["export", "--model", str(paddle), "--out", str(paddle / "sub")],
        tmp_path,
        "inside the checkpoint",
    )
