"""The package works outside the checkout: the wheel carries ds_configs/, configs/ and the sample data, and an
installed instructune finds them from any directory."""

import os
import shutil
import subprocess
import zipfile

import pytest

from conftest import PYTHON, REPO

SHIPPED = [
    "instructune/resources/alpaca_data.json",
    *(f"instructune/resources/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")),
    *(f"instructune/resources/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")),
    *(f"instructune/resources/configs/models/{p.name}" for p in (REPO / "configs" / "models").glob("*.json")),
    "instructune/serve/static/index.html",
]

# What the demo, `--strategy zero3` and the planner (its shipped example configs) look up, asked of the installed
# package from a foreign directory.
LOOKUP = """
import json, sys, instructune
from instructune.cli import main
from instructune.config import parse_train_args
planned = main(["plan", "--model", "llama-2-7b", "--json"])  # first: a ZeRO-3 run's arguments make models partitioned
_, data, args = parse_train_args(["--config", "configs/smollm2-135m-cpu.yaml", "--strategy", "zero3", "--output_dir", "o"])
print(json.dumps({"package": instructune.__file__, "deepspeed": args.deepspeed, "data_path": data.data_path,
                  "max_steps": args.max_steps}))
sys.exit(planned)
"""


@pytest.mark.slow
def test_wheel_ships_the_configs_and_works_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a clean copy: a build/ folder left in the checkout could add stale modules
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "output"))
    built = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                            "-w", str(tmp_path / "dist")], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("instructune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert len(SHIPPED) >= 10 and all(name in names for name in SHIPPED), sorted(set(SHIPPED) - set(names))
    for name in SHIPPED:  # real copies, equal to the repo's files
        assert zipfile.ZipFile(wheel).read(name) == (REPO / name.removeprefix("instructune/resources/")).read_bytes()

    site = tmp_path / "site"  # the wheel installed on its own, ahead of the checkout's editable install
    installed = subprocess.run([PYTHON, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    looked_up = subprocess.run([PYTHON, "-c", LOOKUP], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert looked_up.returncode == 0, looked_up.stderr[-2000:]
    import json

    *planned, found = looked_up.stdout.strip().splitlines()
    found, planned = json.loads(found), "\n".join(planned)
    resources = site / "instructune" / "resources"
    assert found["package"].startswith(str(site))
    assert found["deepspeed"] == str(resources / "ds_configs" / "zero3.json")
    assert found["data_path"] == str(resources / "alpaca_data.json") and found["max_steps"] == 64
    helped = subprocess.run([str(site / "bin" / "instructune"), "train", "--help"], capture_output=True, text=True,
                            cwd=elsewhere, env=env)
    assert helped.returncode == 0 and "--data_path" in helped.stdout and "--strategy NAME" in helped.stdout, helped.stderr
    assert json.loads(planned[planned.index("["):])[0]["strategy"] == "ddp"
