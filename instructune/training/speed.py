"""How fast training is: tokens/s (all real tokens, and target tokens), padding fraction and MFU, in every run.

MFU is model FLOPs per second over the devices' peak: 6 × the parameters that multiply (every
weight but the embedding lookups, the LM head included even when tied) per real token, plus
attention's 12 × layers × attention width × n² for each example of n tokens (the PaLM and nanoGPT
convention: the causal half is not discounted). Pad tokens count for nothing, so removing them shows.
The Trainer's own `floating_point_ops` is not used: it counts pads and leaves out the LM head and
attention. The peak is the datasheet's dense bf16 rate on known GPUs and a measured fp32 matmul rate
on the CPU (cached per CPU model and thread count).

Figures are steady-state: the first WARMUP_STEPS optimizer steps (allocation, first-call overheads)
are left out; each logged window covers the steps since the previous log.
"""

import json
import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from instructune.modeling.models import head_dim

logger = logging.getLogger("instructune")

WARMUP_STEPS = 2

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity).
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "B200": 2250e12, "GH200": 989e12,
}


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token: all but embedding tables, plus a tied LM head."""
    from instructune.modeling.models import parameter_count as count

    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = sum(count(p) for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:  # tied: the lookup table is also the LM head
        total += count(head.weight)
    return total


def attention_width(config) -> tuple[int, int]:
    """(layers, heads × head dim) of a decoder config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.num_hidden_layers, config.num_attention_heads * head_dim(config)


def device_peak_flops(device: torch.device, bf16: bool = False) -> tuple[float | None, str]:
    """(peak FLOP/s of one device in the precision the run computes in, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():  # longer names first where they share a prefix
            if key in name:
                return peak, f"{name}: datasheet dense bf16"
        return None, f"{name}: no datasheet figure known, MFU not reported"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return cpu_peak_flops(dtype), f"CPU: measured {_name(dtype)} matmul, {torch.get_num_threads()} threads"


def cpu_peak_flops(dtype: torch.dtype = torch.float32) -> float:
    """The CPU's measured matmul rate in `dtype`, cached per CPU model, thread count and dtype: with AMX, bf16's is
    several times fp32's, and a bf16 run measured against the fp32 peak would report an MFU it does not have."""
    from instructune.files import atomic_file, cache_root

    key = f"{_cpu_model()}|threads={torch.get_num_threads()}" + ("" if dtype == torch.float32 else f"|{_name(dtype)}")
    path = cache_root() / "cpu_peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_matmul_flops(dtype=dtype)
        with atomic_file(path) as f:
            f.write(json.dumps(known, indent=1))
    return known[key]


def measure_matmul_flops(size: int = 1024, seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """The best matmul rate of this process in `dtype` (FLOP/s) over a short burst."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # first call: thread pool start-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class SpeedMeter(TrainerCallback):
    """Counts what each micro-batch holds (as device tensors: no sync per step) and turns the counts of each
    logging window into figures; `summary()` is the whole run after warm-up. The trainer calls `count` for
    each micro-batch and `take_window` when it logs; as a callback it sees optimizer steps end."""

    FIELDS = ("positions", "tokens", "targets", "attention_units")  # attention_units: Σ n² over examples

    def __init__(self, model, device: torch.device, world_size: int = 1, bf16: bool = False):
        layers, width = attention_width(model.config)
        self.flops_per_token = 6 * matmul_parameters(model)
        self.flops_per_attention_unit = 12 * layers * width
        self.peak, self.peak_source = device_peak_flops(device, bf16)
        self.world_size = world_size
        self.window = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.total = dict.fromkeys(self.FIELDS, 0.0) | {"seconds": 0.0}
        self.steps, self.started = 0, None

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == WARMUP_STEPS:  # measuring starts now (also after a resume, from its own first steps)
            self.window.zero_()
            self.started = time.perf_counter()

    def count(self, batch: dict) -> None:
        labels = batch["labels"]
        mask = batch.get("attention_mask")
        if mask is not None:  # padded rows
            lengths = mask.sum(dim=1)
        else:  # flattened: an example starts wherever the position ids restart at 0
            starts = torch.nonzero(batch["position_ids"].reshape(-1) == 0).reshape(-1)
            ends = torch.cat([starts[1:], starts.new_tensor([labels.numel()])])
            lengths = ends - starts
            lengths = lengths[lengths > 1]  # packed rows' padding: blocks of one token (batching.py)
        counts = torch.stack([
            torch.tensor(labels.numel(), device=lengths.device), lengths.sum(),
            (labels[:, 1:] != -100).sum(), (lengths.double() ** 2).sum(),
        ]).to(self.window)
        self.window += counts

    def take_window(self) -> dict:
        """Figures for the steps since the last call (nothing during warm-up); resets the window.
        Every rank calls it at the same step (the Trainer logs on all of them): it sums the ranks' counts."""
        if self.steps <= WARMUP_STEPS:  # the same answer on every rank: all are at the same step
            return {}
        now = time.perf_counter()
        counts, self.window = self.window, torch.zeros_like(self.window)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        values = dict(zip(self.FIELDS, counts.tolist())) | {"seconds": now - self.started}
        self.started = now
        if not values["positions"]:  # no step since the last window (the flush after training)
            return {}
        for name, value in values.items():
            self.total[name] += value
        return self.figures(values)

    def figures(self, counts: dict) -> dict:
        seconds = counts["seconds"]
        flops = self.flops_per_token * counts["tokens"] + self.flops_per_attention_unit * counts["attention_units"]
        figures = {
            "tokens_per_second": counts["tokens"] / seconds,
            "target_tokens_per_second": counts["targets"] / seconds,
            "padding_fraction": 1 - counts["tokens"] / counts["positions"] if counts["positions"] else 0.0,
        }
        if self.peak:
            figures["mfu"] = flops / seconds / (self.peak * self.world_size)
        return figures

    def summary(self) -> dict:
        if not self.total["seconds"]:
            return {"note": f"too short: the first {WARMUP_STEPS} steps are warm-up and not measured"}
        return self.figures(self.total) | {
            "measured_seconds": self.total["seconds"], "tokens": self.total["tokens"],
            "target_tokens": self.total["targets"], "peak_flops_per_device": self.peak, "peak_source": self.peak_source,
            "flops_per_token": self.flops_per_token, "warmup_steps": WARMUP_STEPS,
        }
