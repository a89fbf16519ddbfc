"""Peak memory and wall time of `instructune diff` against an Alpaca-style in-memory reference.

The reference is what Stanford Alpaca's weight_diff.py does: load both models whole in fp32 with
transformers, add or subtract the state dicts, save_pretrained. Ours streams tensor by tensor.
Both run on the same random LLaMA (~400M parameters by default, saved in 500MB safetensors shards),
each operation in a fresh process, peak RSS from the kernel (ru_maxrss), time excluding imports.

    .venv/bin/python bench/weight_diff.py                 # ~400M parameters: ~10 GB of disk, ~5 minutes
    .venv/bin/python bench/weight_diff.py --layers 4      # a quick look

The last line is machine-readable: peak_rss_ratio=X time_ratio=Y (ours / reference; the worse of
make_diff and recover for memory, both together for time). Goal: peak_rss_ratio <= 0.25, time_ratio <= 1.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, resource, sys, time
{imports}
start = time.perf_counter()
{call}
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

REFERENCE_IMPORTS = "import torch\nfrom transformers import AutoModelForCausalLM"
REFERENCE_MAKE = """
tuned = AutoModelForCausalLM.from_pretrained({tuned!r}, dtype=torch.float32)
raw = AutoModelForCausalLM.from_pretrained({raw!r}, dtype=torch.float32)
state, raw_state = tuned.state_dict(), raw.state_dict()
for key in state:
    state[key].add_(-raw_state[key])
tuned.save_pretrained({out!r}, max_shard_size="500MB")
"""
REFERENCE_RECOVER = """
raw = AutoModelForCausalLM.from_pretrained({raw!r}, dtype=torch.float32)
recovered = AutoModelForCausalLM.from_pretrained({diff!r}, dtype=torch.float32)
state, raw_state = recovered.state_dict(), raw.state_dict()
for key in state:
    state[key].add_(raw_state[key])
recovered.save_pretrained({out!r}, max_shard_size="500MB")
"""
OURS_IMPORTS = "from instructune import diff"
OURS_MAKE = "diff.make_diff({raw!r}, {tuned!r}, {out!r}, max_shard_size='500MB')"
OURS_RECOVER = "diff.recover({raw!r}, {diff!r}, {out!r})"

CREATE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers={layers},
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
model = LlamaForCausalLM(config)
print("parameters", sum(p.numel() for p in model.parameters()))
model.save_pretrained({raw!r}, max_shard_size="500MB")
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 1e-3)
model.save_pretrained({tuned!r}, max_shard_size="500MB")
"""


def run(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"benchmark step failed:\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=26, help="decoder layers (26: ~400M parameters)")
    parser.add_argument("--workdir", help="where the models go (default: a temporary folder, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        raw, tuned = str(work / "raw"), str(work / "tuned")
        created = subprocess.run([sys.executable, "-c", CREATE.format(layers=args.layers, raw=raw, tuned=tuned)],
                                 capture_output=True, text=True, check=True)
        parameters = int(next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("parameters ")))
        print(f"random LLaMA, {parameters / 1e6:.0f}M parameters, fp32 ({parameters * 4 / 1e9:.2f} GB), 500MB shards")
        results = {}
        for who, imports, make, recover in (("reference", REFERENCE_IMPORTS, REFERENCE_MAKE, REFERENCE_RECOVER),
                                            ("instructune", OURS_IMPORTS, OURS_MAKE, OURS_RECOVER)):
            diff_dir, out_dir = str(work / f"{who}-diff"), str(work / f"{who}-recovered")
            results[who, "make_diff"] = run(MEASURE.format(imports=imports, call=make.format(raw=raw, tuned=tuned, out=diff_dir)))
            results[who, "recover"] = run(MEASURE.format(imports=imports, call=recover.format(raw=raw, diff=diff_dir, out=out_dir)))
        print(f"{'operation':10s} {'reference s':>12s} {'ours s':>8s} {'ratio':>6s} {'reference MB':>13s} {'ours MB':>8s} {'ratio':>6s}")
        for operation in ("make_diff", "recover"):
            ref, ours = results["reference", operation], results["instructune", operation]
            print(f"{operation:10s} {ref['seconds']:12.1f} {ours['seconds']:8.1f} {ours['seconds'] / ref['seconds']:6.2f} "
                  f"{ref['peak_rss_mb']:13.0f} {ours['peak_rss_mb']:8.0f} {ours['peak_rss_mb'] / ref['peak_rss_mb']:6.2f}")
        peak = max(results["instructune", op]["peak_rss_mb"] / results["reference", op]["peak_rss_mb"] for op in ("make_diff", "recover"))
        time = sum(results["instructune", op]["seconds"] for op in ("make_diff", "recover")) / sum(
            results["reference", op]["seconds"] for op in ("make_diff", "recover"))
        print(f"peak_rss_ratio={peak:.3f} time_ratio={time:.3f}")


if __name__ == "__main__":
    main()
