"""Peak memory and step time of full fine-tuning, LoRA and QLoRA, as ratios to full fine-tuning, same model and data.

Each mode trains SmolLM2-135M (the built-in model) on the sample data in a process of its own (so that
each peak is its own): the same batch, length, optimizer and steps, through train.py's own flags.
Per mode: peak resident memory of the process (peak GPU memory on a GPU), seconds per optimizer step
after warm-up (instructune's speed meter), and the parameters that train.

    .venv/bin/python bench/adapters.py                          # ~4 minutes on 2 CPU cores
    .venv/bin/python bench/adapters.py --model <folder> --steps 8   # a larger model (on a lent GPU: a ~1B one)

Last line, machine-readable: lora_memory_ratio, qlora_memory_ratio, lora_step_ratio, qlora_step_ratio.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "full": [],
    "lora": ["--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "[q_proj,v_proj]"],
    "qlora": ["--lora_r", "8", "--lora_alpha", "32", "--lora_target_modules", "[q_proj,v_proj]", "--load_in_4bit", "True",
              "--bnb_4bit_quant_type", "nf4", "--bnb_4bit_double_quant", "True"],
}


def child(mode: str, model: str, steps: int, output_dir: str) -> None:
    """One training run; prints its figures as JSON on the last line."""
    import logging

    import torch

    sys.path.insert(0, str(REPO))
    from instructune.cli import setup_logging
    from instructune.cli.train import main

    setup_logging()
    logging.getLogger("instructune").setLevel(logging.WARNING)
    flags = ["--model_name_or_path", model, "--data_path", str(REPO / "alpaca_data.json"), "--output_dir", output_dir,
             "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--model_max_length", "256",
             "--learning_rate", "1e-4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
             "--disable_tqdm", "True", "--padding_free", "True", "--seed", "1", *MODES[mode]]
    if torch.cuda.is_available():
        flags += ["--bf16", "True"]
    assert main(flags) == 0
    summary = json.loads((Path(output_dir) / "train_results.json").read_text())
    speed = summary["speed"]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"mode": mode, "peak_mb": peak / 2**20, "step_s": speed["measured_seconds"] / (steps - speed["warmup_steps"]),
                      "tokens_per_second": speed["tokens_per_second"], "loss_first": summary["losses"][0]["loss"],
                      "loss_last": summary["losses"][-1]["loss"], "peak_of": "gpu" if torch.cuda.is_available() else "rss"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options.child[0], options.model, options.steps, options.child[1])
    results = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory() as output_dir:
            run = subprocess.run([sys.executable, __file__, "--model", options.model, "--steps", str(options.steps),
                                  "--child", mode, output_dir], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{mode} failed:\n{run.stderr[-3000:]}")
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:6s} peak {r['peak_mb']:8.0f} MB ({r['peak_of']})  {r['step_s']:6.2f} s/step  "
              f"loss {r['loss_first']:.3f} → {r['loss_last']:.3f}", flush=True)
    full = results["full"]
    print(f"\n{options.model}, {options.steps} steps of 4 examples (padding-free, ≤ 256 tokens); ratios to full fine-tuning:")
    for mode, r in results.items():
        print(f"  {mode:6s} memory {r['peak_mb'] / full['peak_mb']:.2f}×  step time {r['step_s'] / full['step_s']:.2f}×")
    print(" ".join(f"{mode}_{what}_ratio={results[mode][key] / full[key]:.3f}" for mode in ("lora", "qlora")
                   for what, key in (("memory", "peak_mb"), ("step", "step_s"))))


if __name__ == "__main__":
    main()
