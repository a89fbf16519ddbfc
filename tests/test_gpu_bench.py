"""bench/gpu.sh, the GPU run kept ready for a lent machine, works: its dry run takes every step on the CPU at toy
sizes and writes the results page with each benchmark's figures."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.md"
    run = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-3000:]
    page = out.read_text()
    rows = dict(re.findall(r"^\| (\w+) \| ([\w ]+?) \|", page, re.M))
    expected = {"model": "ok", "throughput": "ok" if (SHARED_DATA / "random_9k.json").exists() else "skipped",
                "throughput_flash": "skipped", "throughput_flex": "skipped", "throughput_compile": "skipped",
                "plan": "ok", "adapters": "ok", "serve": "ok"}
    assert {k: rows.get(k) for k in expected} == expected, page[:3000]
    figures = ["ratio_model_ddp=", "lora_memory_ratio=", "qlora_step_ratio=", "ttft_p50_ratio_2="]
    if expected["throughput"] == "ok":
        figures += ["useful_tokens_per_s_ratio=", "packing_ratio="]
    for figure in figures:
        assert re.search(rf"^\| \w+ \| ok \| \d+ \| `[^`]*{figure}\d", page, re.M), figure
    assert "## serve" in page and "continuous" in page  # each step's output follows the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_script_refuses_a_machine_without_gpu(tmp_path):
    """Without --dry-run on a machine whose torch sees no GPU: one line that says what to do, and nothing written."""
    run = subprocess.run(["bash", "bench/gpu.sh", "--out", str(tmp_path / "gpu.md")], cwd=REPO, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert run.returncode == 2 and "sees no CUDA GPU" in run.stderr and "--dry-run" in run.stderr
    assert not (tmp_path / "gpu.md").exists()
