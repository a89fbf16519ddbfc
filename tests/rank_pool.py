"""Two gloo ranks kept alive for the whole test run and handed 2-process jobs one at a time, like DeepSpeed's
reused test worker pool: `pool.torchrun(SCRIPT, *ARGS)` gives what `torchrun --nproc_per_node 2 SCRIPT ARGS`
would (exit code, stdout, stderr), without paying 6-8 s of imports and a process group start per rank per job.

The ranks are started by torchrun itself (tests/helpers/rank_worker.py), so each job sees torchrun's environment.
Tests about a launcher (torchrun, the deepspeed launcher, 2 nodes, Slurm, a job killed with SIGKILL) still launch
for real. A job that times out or kills a rank costs the pool: it is restarted for the next job.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
from pathlib import Path

from conftest import PYTHON, REPO, free_port


class RankPool:
    def __init__(self, folder: Path):
        self.folder = folder
        self.launcher = None
        self.jobs = 0

    def start(self) -> None:
        key = secrets.token_hex(16)
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(180)
            environment = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_POOL_KEY": key,
                           "RANK_POOL_ADDRESS": "127.0.0.1:%d" % server.getsockname()[1]}
            self.log = self.folder / f"pool-{self.jobs}.log"
            with self.log.open("w") as log:  # the launcher keeps its own copy of the descriptor
                self.launcher = subprocess.Popen(
                    [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                     "tests/helpers/rank_worker.py"], cwd=REPO, env=environment, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.ranks = [None, None]
            for _ in range(2):
                connection, _ = server.accept()
                control = connection.makefile("rw")
                hello = json.loads(control.readline())
                assert hello["key"] == key, "a stranger answered the rank pool"
                self.ranks[hello["rank"]] = (connection, control)

    def stop(self) -> None:
        if self.launcher is not None:
            for connection, control in self.ranks:
                control.close()
                connection.close()
            try:
                self.launcher.wait(timeout=30)
                self.launcher = None
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        os.killpg(self.launcher.pid, signal.SIGKILL)
        self.launcher.wait()
        self.launcher = None

    def torchrun(self, script: str, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        if self.launcher is None or self.launcher.poll() is not None:
            self.start()
        self.jobs += 1
        outputs = [{name: str(self.folder / f"job{self.jobs}-rank{rank}.{name}") for name in ("stdout", "stderr")}
                   for rank in range(2)]
        for (connection, control), output in zip(self.ranks, outputs):
            control.write(json.dumps({"script": script, "args": [str(a) for a in args], "env": env, **output}) + "\n")
            control.flush()
        codes = []
        try:
            for connection, control in self.ranks:
                connection.settimeout(timeout)
                reply = control.readline()
                codes.append(json.loads(reply)["code"] if reply else -9)
        except (OSError, ValueError):
            codes.append(-9)
        if -9 in codes:  # a rank died or hangs: the pool cannot be trusted with the next job
            self.kill()
        code = next((c for c in codes if c != 0), 0)

        def both(name):
            text = "".join(Path(o[name]).read_text() if Path(o[name]).exists() else "" for o in outputs)
            return text + (f"\n[rank pool: a rank died or timed out; see {self.log}]" if name == "stderr" and code == -9 else "")

        return subprocess.CompletedProcess([script, *args], code, both("stdout"), both("stderr"))
