"""scripts/setup.sh stops at a failed step with pip's message and a non-zero exit (it used to print
'instructune ready' and exit 0 after a failed pinned torch)."""

import pytest

from conftest import run_command


@pytest.mark.slow
def test_setup_fails_loudly_when_torch_cannot_be_installed(tmp_path):
    result = run_command(["bash", "scripts/setup.sh"], VENV=str(tmp_path / "venv"), TORCH_SPEC="torch==0.0.1")
    assert result.returncode != 0
    assert "ERROR:" in result.stderr and "torch==0.0.1" in result.stderr  # pip's own message, shown
    assert "instructune ready" not in result.stdout
    assert not list((tmp_path / "venv").glob("lib/python*/site-packages/instructune*"))  # no later step ran
