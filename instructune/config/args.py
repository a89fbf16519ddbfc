"""What a training run is, in one place: three dataclasses that HfArgumentParser turns into flags.

The split (model / data / training) and the field names follow Stanford Alpaca's train.py, so its
documented command lines keep working; everything else is a Hugging Face TrainingArguments field.
"""

from dataclasses import dataclass, field

import transformers

from instructune.data.templates import TEMPLATES


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={
            "help": "Hugging Face model id, local model folder, or a built-in model name "
            "(smollm2-135m: SmolLM2-135M-Instruct, converted once into the user cache)."
        },
    )
    pad_token: str = field(
        default="[PAD]",
        metadata={
            "help": "Token used for padding when the tokenizer has none. A token already in the vocabulary "
            "(e.g. '<unk>') is reused as is; any other string is added as a new token and the embeddings are "
            "resized, new rows set to the mean of the old ones (Stanford Alpaca's choice, the default)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder."})
    # Adapters (alpaca-lora's and AlpaGasus2-QLoRA's flag names): --lora_r above 0 trains LoRA adapters, not the weights.
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 (the default) fine-tunes every weight instead."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling: the update is lora_alpha / lora_r × B·A."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: str = field(
        default="[q_proj,v_proj]",
        metadata={"help": "Modules that get adapters: a list ('[q_proj,v_proj]' or 'q_proj,v_proj') or 'all-linear' "
                  "(every linear layer but the output layer)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base weights in 4 bits (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base weights in 8 bits (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    bnb_4bit_double_quant: bool = field(default=True, metadata={"help": "Quantise the 4-bit quantisation constants too."})
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype the 4-bit layers compute in (default: bf16 on a GPU, fp32 on the CPU).",
                  "choices": ["bf16", "fp16", "fp32"]},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Also write the base model with the adapter merged in (full precision) into output_dir/merged."},
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default="alpaca_data.json",
        metadata={
            "help": "Instruction data: a JSON list or JSON Lines file (Alpaca, Dolly, Self-Instruct, ShareGPT or "
            "messages records), a local dataset folder, or a Hugging Face dataset id (owner/name). The default is the sample that "
            "ships with instructune, if there is no alpaca_data.json in the current folder."
        },
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "How a record becomes a prompt: 'alpaca' (Alpaca's two templates, with and without input) "
            "or 'chat' (the tokenizer's own chat template).",
            "choices": sorted(TEMPLATES),
        },
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also learn the prompt tokens (by default only the response and EOS)."}
    )
    datasets: str | None = field(
        default=None,
        metadata={"help": "A mix of datasets instead of --data_path: 'a.json:all,b.jsonl:1000,c.jsonl:10%%' (or a YAML "
                  "list; entries may be {path, size, format}); each all, a count or a percentage, sampled with the "
                  "run's seed. Formats: alpaca, dolly, self-instruct, sharegpt, messages (recognised per record)."},
    )
    dedup: bool = field(
        default=True,
        metadata={"help": "Drop exact and normalised (case, white space) duplicates across all datasets."},
    )
    strict_data: bool = field(
        default=False,
        metadata={"help": "Stop at the first record with an empty instruction or output, instead of skipping it "
                  "(skipped records are counted in the data summary)."},
    )
    val_set_size: float = field(
        default=0,
        metadata={"help": "Hold out this many records (or this fraction, if below 1), chosen with the run's seed, "
                  "as a validation set: its loss is measured before and after training (and during, with "
                  "--eval_strategy steps|epoch)."},
    )
    overlong: str = field(
        default="truncate",
        metadata={
            "help": "What to do with records longer than model_max_length: 'truncate' them or 'drop' them.",
            "choices": ["truncate", "drop"],
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Flatten each batch into one row with position ids restarting at each example and no padding: "
                  "the same examples per step and the same result as padded batches, without computing pads."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack examples into rows of up to model_max_length tokens (best fit decreasing, never split); "
                  "a batch is per_device_train_batch_size rows, flattened as with --padding_free: fewer, fuller steps."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenise the data (once: the result is cached)."}
    )
    tokenized_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where tokenised data is cached (default: $INSTRUCTUNE_CACHE/tokenized, "
                  "~/.cache/instructune/tokenized)."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    method: str = field(
        default="sft",
        metadata={"help": "What to train: 'sft' (instruction tuning, on instruction or chat records) or 'dpo' "
                  "(preference tuning, on chosen/rejected pairs, against the starting model as reference).",
                  "choices": ["sft", "dpo"]},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "--method dpo: how far the policy may move from the reference (DPO's β; IPO's τ). Lower "
                  "lets it move further."},
    )
    dpo_loss: str = field(
        default="sigmoid",
        metadata={"help": "--method dpo: 'sigmoid' (DPO) or 'ipo' (IPO: a squared loss on the per-token log-ratios, "
                  "which does not push the margin without bound).", "choices": ["sigmoid", "ipo"]},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "--method dpo: compute the reference's log-probs of every pair once, before the first step, "
                  "and cache them beside the tokenised data; then no reference model is held during training."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face download cache."})
    config: str | None = field(default=None, metadata={"help": "A YAML file of these flags (flags after it override it)."})
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "Optimizer: AdamW in one fused kernel (transformers 5's default). Alpaca's adamw_torch is the "
                  "same AdamW stepped tensor by tensor, about 6x slower to step on the CPU."},
    )
    model_max_length: int = field(
        default=512, metadata={"help": "Maximum sequence length; longer records are truncated or dropped."}
    )
    max_shard_size: str = field(
        default="5GB", metadata={"help": "Largest safetensors shard of the saved model, e.g. '5GB' or '500MB'."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete what output_dir holds before training. Without it (or --resume_from_checkpoint), a "
                  "folder that already holds files is refused, so that two runs never mix in one folder."},
    )
    save_on_signal: str = field(
        default="TERM,USR1,INT",
        metadata={"help": "Signals that make the run finish its step, save a complete checkpoint of it on every rank "
                  "and exit with status 75 (preempted); the same command then resumes it. 'none': the signals' "
                  "default actions."},
    )
    skip_nonfinite_steps: int = field(
        default=0,
        metadata={"help": "Skip up to this many steps whose loss is NaN or infinite (their gradients dropped); the next "
                  "one stops the run. 0: the first one stops it, before the weights take it."},
    )
    # A fine-tune updates every parameter, so DDP's unused-parameter search only costs time and warnings.
    ddp_find_unused_parameters: bool | None = field(default=False)
    eval_tasks: str | None = field(
        default=None,
        metadata={"help": "lm-eval tasks to run during training, comma-separated (e.g. arc_easy,hellaswag); logged as "
                  "lm_eval/<task>/<metric> and kept in train_results.json. DDP and ZeRO-1/2 only."},
    )
    eval_tasks_steps: int = field(default=0, metadata={"help": "Run --eval_tasks every this many steps (0: after the "
                                                                "last step only)."})
    eval_tasks_num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (default: each task's)."})
    eval_tasks_limit: float | None = field(default=None, metadata={"help": "At most this many examples per task (or a "
                                                                          "fraction, below 1)."})
    eval_tasks_include_path: str | None = field(default=None, metadata={"help": "A folder of task YAMLs of your own."})
