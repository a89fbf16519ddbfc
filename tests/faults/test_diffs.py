"""A diff verifies everything it ships (#9 §4), and a full disk is one line with nothing written (#9 §5)."""

import json
import logging

import pytest

from instructune.checkpoint import diff
from instructune.checkpoint.tensorio import TensorFolder
from instructune.errors import UserError

from conftest import PYTHON, run_command
from test_diff import make_tuned


@pytest.fixture
def made(tiny_llama, tmp_path):
    """(base, diff folder) of an exact diff, sharded."""
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    diff.make_diff(tiny_llama, tuned, tmp_path / "diff", exact=True, max_shard_size="200KB")
    return tiny_llama, tmp_path / "diff"


def refused(base, diff_folder, out, message: str) -> None:
    with pytest.raises(UserError) as error:
        diff.recover(base, diff_folder, out)
    assert str(error.value).startswith(message), str(error.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_the_manifest_covers_every_shipped_file(made, tmp_path):
    base, folder = made
    files = json.loads((folder / diff.MANIFEST).read_text())["files"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    refused(base, folder, tmp_path / "out", f"{folder / 'tokenizer_config.json'}: does not match its checksum")


def test_an_unlisted_file_is_not_shipped(made, tmp_path):
    base, folder = made
    (folder / "added_tokens.json").write_text('{"<evil>": 5}')
    refused(base, folder, tmp_path / "out", f"{folder / 'added_tokens.json'}: not listed in weight_diff.json")


def test_config_is_required(made, tmp_path):
    base, folder = made
    (folder / "config.json").unlink()
    refused(base, folder, tmp_path / "out", f"{folder}: no config.json")


def test_links_are_refused(made, tmp_path):
    """Seen: a tokenizer_config.json link to a file elsewhere was copied into the output."""
    base, folder = made
    elsewhere = tmp_path / "secret.json"
    elsewhere.write_text('{"key": "not for the recovered folder"}')
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to(elsewhere)
    refused(base, folder, tmp_path / "out", f"{folder / 'tokenizer_config.json'}: a symbolic link")


def test_without_a_manifest_float_diffs_warn_and_exact_diffs_are_refused(tiny_llama, tmp_path, caplog):
    """Seen: an exact diff without its manifest recovered with exit 0 into 21 garbage tensors."""
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    for exact in (False, True):
        folder = tmp_path / f"diff-{exact}"
        diff.make_diff(tiny_llama, tuned, folder, exact=exact)
        (folder / diff.MANIFEST).unlink()
        if exact:
            refused(tiny_llama, folder, tmp_path / "out-exact", f"{folder}: no weight_diff.json, and tensor ")
        else:
            caplog.set_level(logging.WARNING, logger="instructune")
            diff.recover(tiny_llama, folder, tmp_path / "out-float")
            assert "nothing can be verified" in caplog.text and "--expected_sum" in caplog.text


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.update(version=99), "manifest version 99"),
    (lambda m: m.update(format="other"), "not an instructune weight-diff manifest"),
    (lambda m: m["tensors"]["lm_head.weight"].pop("raw_sha256"), "tensor lm_head.weight: field 'raw_sha256' must be a str"),
    (lambda m: m["tensors"]["lm_head.weight"].update(dtype="os.system"), "tensor lm_head.weight: unknown dtype"),
    (lambda m: m["files"].update({"../../evil.json": "0"}), "names '../../evil.json'"),
], ids=["version", "format", "field", "dtype", "path"])
def test_a_bad_manifest_is_one_line(made, tmp_path, damage, message):
    base, folder = made
    manifest = json.loads((folder / diff.MANIFEST).read_text())
    damage(manifest)
    (folder / diff.MANIFEST).write_text(json.dumps(manifest))
    refused(base, folder, tmp_path / "out", f"{folder / diff.MANIFEST}: {message}")


def test_an_index_cannot_name_files_outside_its_folder(made, tmp_path):
    """Seen: '../../../../etc/passwd' in an index was opened."""
    base, folder = made
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"model.safetensors.index.json: names '../../../../etc/passwd', which is not a file of"):
        TensorFolder(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(UserError, match="'weight_map' must map tensor names to shard file names"):
        TensorFolder(folder)


def test_stale_partial_folders_are_removed_by_the_next_run(made, tmp_path):
    base, folder = made
    stale = tmp_path / ".out.partial-abc123"  # what a killed recovery leaves
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half")
    diff.recover(base, folder, tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow  # a launched process
def test_a_full_disk_is_one_line_with_nothing_written(tiny_llama, tmp_path):
    """`ulimit -f` (in 1 KiB blocks) stands in for a full disk: the write fails with EFBIG as it would with ENOSPC."""
    target = tmp_path / "resharded"
    result = run_command(["bash", "-c", f'ulimit -f 100; exec "$0" -m instructune.cli shard {tiny_llama} {target}', PYTHON])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: no space left while writing {target}; nothing was written"
    assert not target.exists() and not list(tmp_path.glob(".resharded.partial-*"))
