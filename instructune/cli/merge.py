"""`instructune merge`: a LoRA adapter merged into its base model, streaming, in full precision."""

import argparse

HELP = "merge a LoRA adapter into its base model (streaming, full precision)"


def main(argv: list[str]) -> int:
    from instructune.checkpoint.shard import DTYPES
    from instructune.modeling.adapters import merge
    from instructune.modeling.models import resolve_model_path

    parser = argparse.ArgumentParser(
        prog="instructune merge",
        description="Write BASE + ADAPTER as a complete Hugging Face folder, one tensor at a time: every adapted "
        "weight becomes W + lora_alpha/r × B·A, computed in fp32 from the unquantised base (a QLoRA adapter too), "
        "with the adapter's tokenizer. The output appears only when complete.",
    )
    parser.add_argument("--base", required=True, help="the base model folder (or built-in name) the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter folder (training's output_dir with --lora_r)")
    parser.add_argument("--output", required=True, help="the Hugging Face folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the floating-point weights (default: the base's)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    args = parser.parse_args(argv)
    count = merge(resolve_model_path(args.base), args.adapter, args.output, args.max_shard_size, args.dtype)
    print(f"{args.output}: {count} tensors merged")
    return 0
