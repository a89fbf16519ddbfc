"""`instructune shard`: re-shard a Hugging Face model folder (size, dtype), tensor by tensor."""

import argparse

HELP = "re-shard a HF folder (size, dtype), tensor by tensor"


def main(argv: list[str]) -> int:
    from instructune.checkpoint.shard import DTYPES, reshard

    parser = argparse.ArgumentParser(
        prog="instructune shard",
        description="Re-shard a Hugging Face model folder (single or sharded, safetensors or .bin), tensor by tensor. "
        "The output appears only when complete.",
    )
    parser.add_argument("source", help="model folder")
    parser.add_argument("destination", help="the Hugging Face folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the floating-point weights (default: as they are)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    args = parser.parse_args(argv)
    count = reshard(args.source, args.destination, args.max_shard_size, args.dtype)
    print(f"{args.destination}: {count} tensors")
    return 0
