"""One of the two ranks of the test run's rank pool (tests/rank_pool.py): started once by torchrun, it imports
torch, transformers, DeepSpeed and instructune and joins the gloo process group once, then runs jobs one after
another. A job is what `torchrun --nproc_per_node 2 SCRIPT ARGS` would run in this rank: SCRIPT as __main__ with
those arguments and environment, its stdout and stderr in files, its exit code sent back.

Between jobs every process-wide setting a run leaves behind is put back (reset_after_job), so that a job sees
what a fresh process would.
"""

import gc
import importlib
import json
import os
import runpy
import socket
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=300))  # a rank left waiting fails the job, not the run

import accelerate.state  # noqa: E402
import transformers  # noqa: E402
import transformers.integrations.deepspeed  # noqa: E402

import instructune.cli  # noqa: E402
from instructune.training import distributed  # noqa: E402

for module in ("deepspeed", "peft", "instructune.training.recipe"):  # the imports paid once are the point
    importlib.import_module(module)


class JobEnded(Exception):
    """What exit_process does in a pool rank: end the job, keep the process (and its process group)."""

    def __init__(self, code: int):
        self.code = code


def end_job(code: int = 0):
    raise JobEnded(code)


distributed.exit_process = end_job


@contextmanager
def redirected(fd: int, path: str):
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    with open(path, "w") as target:
        os.dup2(target.fileno(), fd)
    try:
        yield
    finally:
        stream.flush()
        os.dup2(saved, fd)
        os.close(saved)


def exit_code(code) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # sys.exit("message") prints it and exits 1


def run_job(job: dict) -> int:
    script = job["script"]
    sys.argv = [script, *job["args"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` would
    os.environ.update(job["env"])
    with redirected(1, job["stdout"]), redirected(2, job["stderr"]):
        try:
            runpy.run_path(script, run_name="__main__")
            return 0
        except SystemExit as e:
            return exit_code(e.code)
        except JobEnded as e:
            return e.code
        except BaseException:
            traceback.print_exc()
            return 1


def reset_after_job(environment: dict, path: list, cwd: str) -> None:
    """What a run sets process-wide: Accelerate's shared state (and the FSDP-on-CPU switch in it), transformers'
    DeepSpeed config (is_deepspeed_zero3_enabled reads it), the environment TrainingArguments writes
    (ACCELERATE_USE_DEEPSPEED, FSDP_*), the default dtype, and transformers' warnings shown once per process."""
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()
    transformers.integrations.deepspeed.unset_hf_deepspeed_config()
    os.environ.clear()
    os.environ.update(environment)
    sys.path[:] = path
    os.chdir(cwd)
    torch.set_default_dtype(torch.float32)
    transformers.utils.logging.warning_once.cache_clear()
    gc.collect()


def serve(control) -> None:
    environment, path, cwd = dict(os.environ), list(sys.path), os.getcwd()
    for line in control:
        code = run_job(json.loads(line))
        reset_after_job(environment, path, cwd)
        dist.barrier()  # both ranks are done before either reports
        control.write(json.dumps({"code": code}) + "\n")
        control.flush()


if __name__ == "__main__":
    instructune.cli.setup_logging()
    host, port = os.environ["RANK_POOL_ADDRESS"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as connection, connection.makefile("rw") as control:
        control.write(json.dumps({"rank": dist.get_rank(), "key": os.environ["RANK_POOL_KEY"]}) + "\n")
        control.flush()
        serve(control)
    dist.destroy_process_group()
    os._exit(0)
