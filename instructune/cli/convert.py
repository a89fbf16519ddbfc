"""`instructune convert`: a DeepSpeed ZeRO-2/3 or FSDP sharded checkpoint → a complete Hugging Face folder."""

import argparse

HELP = "a DeepSpeed ZeRO or FSDP sharded checkpoint → a HF folder"


def main(argv: list[str]) -> int:
    from instructune.checkpoint.convert import convert_checkpoint
    from instructune.checkpoint.shard import DTYPES

    parser = argparse.ArgumentParser(
        prog="instructune convert",
        description="A DeepSpeed ZeRO-2/3 checkpoint (checkpoint-N/ with global_stepN/, or a folder with latest) or "
        "an FSDP sharded checkpoint (pytorch_model_fsdp_0/) → a complete Hugging Face folder. The output appears "
        "only when complete.",
    )
    parser.add_argument("source", help="checkpoint folder")
    parser.add_argument("destination", help="the Hugging Face folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the floating-point weights")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load the checkpoint's pickles even if they hold more than plain weights (unpickling can "
                        "run code: only for files you trust)")
    args = parser.parse_args(argv)
    count = convert_checkpoint(args.source, args.destination, args.dtype, args.max_shard_size, args.trust_checkpoint)
    print(f"{args.destination}: {count} tensors")
    return 0
