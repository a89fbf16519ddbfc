"""The CPU-only adjustments of a training command line, in one place (measured: shared notes, cpu-distributed.md).

Without them, on a machine with no GPU the Trainer silently trains each torchrun rank alone (Accelerate finds no
device backend without use_cpu), Alpaca's `--tf32 True` is a parser error, and DeepSpeed's optimizer offload swaps
in a C++ Adam that g++ must build first. They can go when transformers and Accelerate treat a CPU-only machine as a
device of its own (use_cpu implied) and --tf32 is ignored where it cannot apply.
"""

import logging
import os

import torch

logger = logging.getLogger("instructune")


def main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes in bf16 natively (x86 flags avx512_bf16 or amx_bf16; other machines: assumed yes)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open(cpuinfo) if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))


def device_flags(argv: list[str]) -> list[str]:
    """Parser input for this machine: `--bf16 auto` decided; without CUDA, train on the CPU without being told, and
    drop CUDA-only flags."""
    argv = bf16_decided(argv)
    if not on_cpu():
        return argv
    argv = list(argv)
    if "--tf32" in argv:
        # TrainingArguments raises for --tf32 True without an Ampere GPU; Alpaca's command passes it.
        i = argv.index("--tf32")
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        del argv[i : i + 1 + has_value]
        logger.info("--tf32 ignored: no CUDA GPU on this machine")
    if "--use_cpu" not in argv:
        # Without use_cpu, Accelerate finds no device backend and each torchrun rank trains alone,
        # unwrapped, on the full data, while all of them write the same output_dir.
        argv += ["--use_cpu", "True"]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            logger.info(f"no GPU: training on the CPU, {os.environ['WORLD_SIZE']} processes over gloo")
        else:
            logger.info("no GPU: training on the CPU")
    return argv


def bf16_decided(argv: list[str]) -> list[str]:
    """`--bf16 auto`: bf16 autocast where the device computes in bf16 natively (a GPU that supports it; a CPU with
    AVX-512-BF16 or AMX, where the first batch's loss is then checked against fp32's: training/precision.py), fp32
    elsewhere, where bf16 would be emulated, many times slower."""
    if "--bf16" not in argv or argv.index("--bf16") + 1 >= len(argv) or argv[argv.index("--bf16") + 1] != "auto":
        return argv
    native = torch.cuda.is_bf16_supported() if not on_cpu() else cpu_has_bf16()
    where = "this GPU" if not on_cpu() else "this CPU (AVX-512-BF16 or AMX)"
    if main_process():
        logger.info(f"--bf16 auto: {where} computes in bf16 natively: training in bf16 autocast" if native else
                    "--bf16 auto: no native bf16 on this machine (it would be emulated, many times slower): fp32")
    i = argv.index("--bf16")
    return [*argv[:i + 1], str(native), *argv[i + 2:]]


def adjust_for_device(args) -> None:
    """After parsing: DeepSpeed with optimizer offload keeps torch's AdamW on a CPU-only machine, and bf16 on a CPU
    without bf16 arithmetic gets a warning.

    Accelerate would swap in DeepSpeedCPUAdam, a C++ extension that g++ builds on first use (35 s, 2 GB of compiler
    memory) to do on the CPU what torch's AdamW already does there.
    """
    if on_cpu() and args.deepspeed:
        args.hf_deepspeed_config.config["zero_force_ds_cpu_optimizer"] = False
    if on_cpu() and args.bf16 and not cpu_has_bf16() and main_process():
        logger.warning("--bf16 on a CPU without bf16 instructions (AVX-512-BF16 or AMX): every bf16 operation is "
                       "emulated, many times slower than fp32; drop --bf16 to train in fp32")
