"""The memory planner: will a training configuration fit, under which strategy, and how to launch it, from the model's
config alone (a meta-device model: nothing is downloaded or allocated).

Per process (one per GPU) it adds up what training holds at its peak:
- model states (parameters, gradients, Adam's two moments): DeepSpeed's own formulas for ZeRO-2/3 in 16-bit mixed
  precision (the figures of `estimate_zero2/3_model_states_mem_needs_all_cold`, given the same parameter counts);
  for DDP, FSDP and adapters the same bookkeeping for what they keep (instructune loads weights in fp32, so DDP and
  FSDP keep fp32 weights and gradients; DDP's gradient buckets are a second copy of the gradients);
- buffers: DeepSpeed's communication buckets (the sizes HF fills in for "auto": hidden²), ZeRO-3's largest gathered
  layer, FSDP's gathered units (the root module and two decoder layers: the current one and the prefetched next);
- activations from the config's shapes: per token and layer, the tensors a decoder layer saves for backward (its
  input, the norms, q/k/v and the attention output, the MLP's 2 or 4 intermediate tensors), with gradient
  checkpointing only each layer's input plus one layer recomputed at a time; attention scores (heads × length per
  token) only where attention is not memory-efficient (eager, or SDPA's math path on the CPU);
- logits: fp32 copies (the loss's upcast, its log-softmax and its gradient) at the positions that have targets;
- a runtime overhead per process (the CUDA context and libraries; on the CPU, the measured import footprint).
An option fits when its total stays within the device's memory less the headroom (10% by default).
"""

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from instructune.errors import ConfigError, UserError
from instructune.modeling.models import head_dim

GIB = 2**30
RESOURCES = Path(__file__).resolve().parents[1] / "resources"
EXAMPLE_CONFIGS = RESOURCES / "configs" / "models"  # Llama-2 7B/13B/70B config.json files: planning works offline
# Fastest first: fewer bytes moved per step. LoRA and QLoRA train adapters, not the model: listed, chosen only when
# asked for (--lora_r) or when no full fine-tune fits.
FULL = ("ddp", "zero2", "fsdp", "zero3", "zero2_offload", "fsdp_offload", "zero3_offload")
ADAPTERS = ("lora", "qlora")
BUCKET = 500_000_000  # ds_configs/zero2.json's allgather_bucket_size (elements)
# QLoRA's NF4 weights: 4 bits, plus a fp32 absmax per 64 weights, itself quantised to 8 bits per 256 (double quant)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class Shape:
    """What the planner needs of a model, counted on the meta device."""
    name: str
    params: int  # tied weights once
    largest_layer: int  # the most parameters one module holds directly (DeepSpeed's largest_layer_params)
    layer_params: int  # one decoder layer (FSDP's unit)
    layers: int
    hidden: int
    kv_hidden: int  # key/value width (grouped-query attention: heads_kv × head size)
    intermediate: int
    gated_mlp: bool  # gate and up projections (LLaMA, Mistral, Qwen): 4 saved MLP tensors instead of 2
    heads: int
    vocab: int
    linear_params: int  # in the decoder layers' Linear modules: what 4-bit quantises
    lora_params: dict  # {r: adapter parameters} computed for the requested targets


@dataclass
class Hardware:
    gpus: int = 8  # per node; on the CPU: processes per node
    nodes: int = 1
    gpu_mem: float = 80 * GIB  # bytes per device (on the CPU: the node's memory shared by its processes)
    cpu_mem: float = 1024 * GIB  # bytes per node
    device: str = "gpu"  # gpu | cpu
    runtime_overhead: float | None = None  # bytes per process; None: 1 GiB of CUDA context on a GPU, 0.6 GiB on the CPU
    headroom: float = 0.10

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Workload:
    seq_len: int = 512
    micro_batch: int = 4
    gradient_checkpointing: bool = False
    lora_r: int = 0
    load_in_4bit: bool = False
    target_fraction: float = 1.0  # positions with a target (logits are kept only there); 1.0 is the safe bound
    method: str = "sft"  # dpo: a micro-batch of pairs is twice the sequences, beside a reference model
    precompute_ref_log_probs: bool = False  # dpo: no reference held

    # Workload field ← the flag (typed argument) it comes from, the same in train.py and `instructune plan`
    FLAGS = {"seq_len": "model_max_length", "micro_batch": "per_device_train_batch_size",
             "gradient_checkpointing": "gradient_checkpointing", "lora_r": "lora_r", "load_in_4bit": "load_in_4bit",
             "target_fraction": "target_fraction", "method": "method",
             "precompute_ref_log_probs": "precompute_ref_log_probs"}

    @classmethod
    def from_args(cls, *sources) -> "Workload":
        """The workload that typed arguments describe (train's ModelArguments and TrainingArguments, or `instructune
        plan`'s flags): each field from the first source that sets its flag, else the default above."""
        return cls(**{name: getattr(source, flag) for name, flag in cls.FLAGS.items()
                      for source in reversed(sources) if getattr(source, flag, None) is not None})


@dataclass
class Option:
    strategy: str
    fits: bool
    gpu_model_states_bytes: int  # parameters + gradients + optimizer states per process
    gpu_buffers_bytes: int
    gpu_activations_bytes: int
    gpu_logits_bytes: int
    gpu_runtime_bytes: int
    gpu_reference_bytes: int  # DPO's frozen reference, as the strategy places it (an adapter's is its base: none)
    gpu_total_bytes: int
    cpu_total_bytes: int  # per node
    command: str = ""


def deepspeed_zero2(params: int, gpus: int, nodes: int, offload: bool) -> tuple[int, int]:
    """(CPU per node, GPU) bytes of ZeRO-2 model states, DeepSpeed's formula (additional_buffer_factor 1.5)."""
    world = gpus * nodes
    if offload:
        return int(params * max(4 * world, 16) * 1.5), 2 * params
    return int(params * 4 * gpus * 1.5), 2 * params + int(18 * params / world)


def deepspeed_zero3(params: int, largest: int, gpus: int, nodes: int, offload: bool) -> tuple[int, int]:
    """(CPU per node, GPU) bytes of ZeRO-3 model states, DeepSpeed's formula (zero.Init, offload of parameters and
    optimizer both or neither, additional_buffer_factor 1.5)."""
    if offload:
        return int(params * 18 / nodes * 1.5), 4 * largest
    return int(largest * 4 * gpus * 1.5), 4 * largest + int(18 * params / (gpus * nodes))


def reference_bytes(strategy: str, params: int, world: int, nodes: int, on_gpu: bool) -> tuple[int, int]:
    """(per device, CPU per node) bytes of DPO's frozen reference (training/preference.py): whole under DDP and
    ZeRO-2, partitioned under ZeRO-3 and FSDP (on the CPU with their offload), none with an adapter (its base is the
    reference). DeepSpeed runs it in bf16 on a GPU (its engine casts the copy); FSDP and DDP keep the fp32 load. Its
    activations are not kept (no gradient), so only its weights count."""
    if strategy in ADAPTERS:
        return 0, 0
    element = 2 if on_gpu and strategy.startswith("zero") else 4
    if strategy in ("zero3_offload", "fsdp_offload"):
        return 0, element * params // nodes
    if strategy in ("zero3", "fsdp"):
        return element * params // world, 0
    return element * params, 0


def activation_bytes(shape: Shape, work: Workload, element: int, memory_efficient_attention: bool) -> int:
    tokens = work.seq_len * work.micro_batch
    per_token_layer = 9 * shape.hidden + 2 * shape.kv_hidden + (4 if shape.gated_mlp else 2) * shape.intermediate
    if not memory_efficient_attention:
        per_token_layer += 2 * shape.heads * work.seq_len  # the scores and their softmax, per head, per token
    full_layer = tokens * per_token_layer * element
    outside_layers = tokens * 4 * shape.hidden * element  # embeddings, final norm, the LM head's input
    if work.gradient_checkpointing:
        return tokens * shape.hidden * element * shape.layers + full_layer + outside_layers
    return full_layer * shape.layers + outside_layers


def logits_bytes(shape: Shape, work: Workload, element: int) -> int:
    kept = math.ceil(work.seq_len * work.micro_batch * work.target_fraction)
    return kept * shape.vocab * (element + 12)  # the logits, and fp32: upcast, log-softmax, gradient


def plan(shape: Shape, hardware: Hardware, work: Workload) -> list[Option]:
    """Every option, in FULL then ADAPTERS order, with its figures and whether it fits."""
    gpus, nodes, world, P, L = hardware.gpus, hardware.nodes, hardware.world, shape.params, shape.largest_layer
    on_gpu = hardware.device == "gpu"
    dpo = work.method == "dpo"
    if dpo:  # each pair is two sequences (chosen and rejected) in one padded batch
        work = dataclasses.replace(work, micro_batch=2 * work.micro_batch)
    element = 2 if on_gpu else 4  # bf16 activations on a GPU; fp32 on the CPU (no fast bf16 there)
    runtime = int(hardware.runtime_overhead if hardware.runtime_overhead is not None else (1.0 if on_gpu else 0.6) * GIB)
    activations = activation_bytes(shape, work, element, memory_efficient_attention=on_gpu)
    logits = logits_bytes(shape, work, element)
    fp32_load = 4 * P  # every process reads the weights in fp32 before they are placed or sharded
    budget = hardware.gpu_mem * (1 - hardware.headroom)
    cpu_budget = hardware.cpu_mem * (1 - hardware.headroom)
    lora = shape.lora_params.get(work.lora_r or 8, 0)

    def option(name: str, states: int, buffers: int, cpu_states: int, load_peak: int, acts: int = activations):
        reference, cpu_reference = reference_bytes(name, P, world, nodes, on_gpu) if dpo and not \
            work.precompute_ref_log_probs else (0, 0)
        total = int(states + buffers + acts + logits + runtime + reference)
        if on_gpu:
            cpu = int(gpus * (runtime + load_peak) + cpu_states + cpu_reference)
            fits = total <= budget and cpu <= cpu_budget
        else:  # the processes are on the CPU: all of theirs comes out of the node's memory
            cpu = int(gpus * total + cpu_states + cpu_reference)
            fits = cpu <= cpu_budget
        return Option(name, fits, int(states), int(buffers), int(acts), int(logits), runtime, reference, total, cpu)

    options = [option("ddp", 16 * P, 4 * P, 0, fp32_load)]  # fp32 weights, gradients, Adam; DDP's gradient buckets
    for offload in (False, True):
        cpu, gpu = deepspeed_zero2(P, gpus, nodes, offload)
        if not on_gpu:  # fp32 training: fp32 weights whole, and fp32 gradients, master copy and Adam partitioned
            gpu = 4 * P + (16 * P // world if not offload else 0)
        ds_buffers = (shape.hidden**2 + BUCKET) * element  # reduce bucket (hidden², HF's "auto") and allgather bucket
        options.append(option("zero2_offload" if offload else "zero2", gpu, ds_buffers, cpu if offload else 0, fp32_load))
    for offload in (False, True):
        cpu, gpu = deepspeed_zero3(P, L, gpus, nodes, offload)
        if not on_gpu:  # fp32: the partitioned weights are fp32 too, beside the fp32 master copy
            gpu = 4 * L + (20 * P // world if not offload else 0)
        ds_buffers = int(1.9 * shape.hidden**2) * element  # reduce and prefetch buckets (hidden², 0.9·hidden²)
        options.append(option("zero3_offload" if offload else "zero3", gpu, ds_buffers, cpu if offload else 0,
                              4 * L * 1.5 if not offload else 0))  # zero.Init: each process loads its shards only
    root = P - shape.layers * shape.layer_params
    gathered = (root + 2 * shape.layer_params) * (2 * element)  # gathered 16-bit weights and their gradients
    options.append(option("fsdp", 16 * P // world, gathered, 0, fp32_load))
    options.append(option("fsdp_offload", 0, gathered, 16 * P * gpus // world, fp32_load))
    lora_acts = activations + work.seq_len * work.micro_batch * shape.layers * 4 * shape.hidden * element  # adapters' inputs
    options.append(option("lora", 4 * P + 20 * lora, 0, 0, fp32_load, lora_acts))
    quantised = int(shape.linear_params * NF4_BYTES) + 4 * (P - shape.linear_params)  # the rest stays fp32
    dequantised = 2 * L  # one weight dequantised at a time
    options.append(option("qlora", quantised + 20 * lora, dequantised, 0, 4 * L, lora_acts))
    order = FULL + ADAPTERS
    options.sort(key=lambda o: order.index(o.strategy))
    return options


def choose(options: list[Option], work: Workload) -> Option | None:
    """The fastest option that fits: among the adapters when --lora_r is asked for (QLoRA with --load_in_4bit),
    else among full fine-tunes, else an adapter that fits."""
    by_name = {o.strategy: o for o in options}
    if work.lora_r:
        wanted = by_name["qlora" if work.load_in_4bit else "lora"]
        return wanted if wanted.fits else None
    return next((by_name[n] for n in FULL if by_name[n].fits), None) or next((by_name[n] for n in ADAPTERS if by_name[n].fits), None)


# ---- reading a model's shape from its config (a meta-device model)

def load_config(model: str):
    """A model folder, a config.json, a shipped example (llama-2-7b, llama-2-13b, llama-2-70b), a built-in name or a
    hub id already in the local cache; never a download."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from instructune.modeling.models import resolve_model_path

    examples = sorted(p.stem for p in EXAMPLE_CONFIGS.glob("*.json"))
    candidates = [Path(model), EXAMPLE_CONFIGS / f"{model}.json"]
    for path in candidates:
        if path.is_file():
            try:
                values = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            if not isinstance(values, dict) or "model_type" not in values:
                raise UserError(f"{path}: a model config is a JSON object with a model_type")
            if values["model_type"] not in CONFIG_MAPPING:
                raise UserError(f"{path}: model_type {values['model_type']!r} is no architecture that transformers knows")
            name = values.pop("_name_or_path", str(path))  # the examples name their hub id: the command uses it
            try:
                config = AutoConfig.for_model(values.pop("model_type"), **values)
            except Exception as e:  # the config class's own checks (a zero head count, a bad type)
                raise UserError(f"{path}: not a valid config: {type(e).__name__}: {e}".splitlines()[0]) from None
            config._name_or_path = name
            return config
    try:
        return AutoConfig.from_pretrained(resolve_model_path(model), local_files_only=True)
    except (OSError, ValueError, UserError):
        raise UserError(f"--model {model}: no config.json there or in the local cache (nothing is downloaded); "
                        f"shipped examples: {', '.join(examples)}") from None


def shape_of(model: str, lora_targets: list[str] | str = ("q_proj", "v_proj"), ranks: tuple[int, ...] = (8,)) -> Shape:
    config = load_config(model)
    try:
        return _shape(model, config, lora_targets, ranks)
    except UserError:
        raise
    except Exception as e:  # a config of no causal LM, or with sizes no model has (negative, zero)
        raise UserError(f"--model {model}: no causal language model can be built from its config: "
                        f"{type(e).__name__}: {e}".splitlines()[0]) from None


def _shape(model: str, config, lora_targets, ranks) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layers = next(m for m in meta.modules() if isinstance(m, torch.nn.ModuleList))
    text = config.get_text_config()
    params = sum(p.numel() for p in meta.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in meta.modules())
    if not len(layers) or params <= 0:
        raise UserError(f"--model {model}: its config gives a model of {len(layers)} layers and {params} parameters")
    linears = [(name, m) for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [name for name, _ in linears]
    targeted = [m for name, m in linears if lora_targets == "all-linear" or name.rsplit(".", 1)[-1] in lora_targets]
    heads = text.num_attention_heads
    head_size = head_dim(text)
    return Shape(
        name=getattr(config, "_name_or_path", "") or model, params=params, largest_layer=largest,
        layer_params=sum(p.numel() for p in layers[0].parameters()), layers=len(layers), hidden=text.hidden_size,
        kv_hidden=(getattr(text, "num_key_value_heads", None) or heads) * head_size,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * text.hidden_size,
        gated_mlp=any(n.endswith("gate_proj") or n.endswith("gate_up_proj") for n in names), heads=heads,
        vocab=text.vocab_size, linear_params=sum(m.weight.numel() for _, m in linears),
        lora_params={r: sum(r * (m.in_features + m.out_features) for m in targeted) for r in ranks})


# ---- the plan as text, and the command that runs the choice

def command_for(option: Option, model: str, hardware: Hardware, work: Workload) -> str:
    flags = [f"--model_name_or_path {model}"]  # train.py's own flags: what the planner assumed
    if option.strategy in FULL and option.strategy != "ddp":
        flags.append(f"--strategy {option.strategy}")
    if option.strategy in ADAPTERS:
        flags.append(f"--lora_r {work.lora_r or 8}")
        if option.strategy == "qlora":
            flags.append("--load_in_4bit True")
    if work.method == "dpo":
        flags.append("--method dpo" + (" --precompute_ref_log_probs True" if work.precompute_ref_log_probs else ""))
    flags += [f"--per_device_train_batch_size {work.micro_batch}", f"--model_max_length {work.seq_len}"]
    if hardware.device == "gpu":
        flags.append("--bf16 True")
    if work.gradient_checkpointing:
        flags.append("--gradient_checkpointing True")
    if hardware.nodes > 1:
        launcher = f"MASTER_ADDR=<node-1> NNODES={hardware.nodes} NPROC_PER_NODE={hardware.gpus} scripts/launch_torchrun.sh"
    else:
        launcher = f"torchrun --nproc_per_node {hardware.gpus} train.py"
    return f"{launcher} {' '.join(flags)} --data_path <data> --output_dir <dir>"


def gib(n: float) -> str:
    return f"{n / GIB:7.1f}"


def table(shape: Shape, hardware: Hardware, work: Workload, options: list[Option], chosen: Option | None) -> str:
    where = "GPU" if hardware.device == "gpu" else "process"
    lines = [
        f"{shape.name}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}; {hardware.nodes} node(s) × {hardware.gpus} {'GPUs' if hardware.device == 'gpu' else 'processes'}, "
        f"{hardware.gpu_mem / GIB:.0f} GiB per {where}, {hardware.cpu_mem / GIB:.0f} GiB CPU per node",
        f"{dpo_line(work)}micro-batch {work.micro_batch} × {work.seq_len} tokens, gradient checkpointing "
        f"{'on' if work.gradient_checkpointing else 'off'}; GiB per {where} (CPU: per node), "
        f"fits = within {1 - hardware.headroom:.0%} of memory",
        "",
        f"{'strategy':14s} {'states':>7s} {'buffers':>7s} {'activ.':>7s} {'logits':>7s} {'runtime':>7s} {'ref.':>7s} "
        f"{'total':>7s} {'CPU':>7s}  fits",
    ]
    for o in options:
        lines.append(f"{o.strategy:14s} {gib(o.gpu_model_states_bytes)} {gib(o.gpu_buffers_bytes)} "
                     f"{gib(o.gpu_activations_bytes)} {gib(o.gpu_logits_bytes)} {gib(o.gpu_runtime_bytes)} "
                     f"{gib(o.gpu_reference_bytes)} {gib(o.gpu_total_bytes)} {gib(o.cpu_total_bytes)}  "
                     f"{'yes' if o.fits else 'no'}"
                     f"{'  ← chosen' if o is chosen else ''}")
    lines.append("")
    if chosen:
        lines += [f"fastest that fits: {chosen.strategy}", f"  {chosen.command}"]
    else:
        hint = "" if work.gradient_checkpointing else "; try --gradient_checkpointing"
        lines.append(f"nothing fits: a smaller micro-batch or sequence, more GPUs{hint}")
    return "\n".join(lines)


def dpo_line(work: Workload) -> str:
    if work.method != "dpo":
        return ""
    reference = "precomputed log-probs (none held)" if work.precompute_ref_log_probs else "a frozen copy (ref.)"
    pairs = f"{work.micro_batch} pair{'s' if work.micro_batch != 1 else ''}"
    return f"DPO: {pairs} = {2 * work.micro_batch} sequences per micro-batch, reference: {reference}; "


def to_json(options: list[Option], chosen: Option | None) -> str:
    return json.dumps([{**asdict(o), "chosen": o is chosen} for o in options], indent=2)


# ---- train.py --strategy auto

def detect_hardware() -> Hardware:
    """This node as torchrun describes it (LOCAL_WORLD_SIZE processes, WORLD_SIZE in all), its GPUs' and RAM's sizes."""
    import os

    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nodes = max(1, int(os.environ.get("WORLD_SIZE", local)) // local)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        return Hardware(local, nodes, torch.cuda.get_device_properties(0).total_memory, ram, "gpu")
    return Hardware(local, nodes, ram, ram, "cpu")


def auto_strategy(model_args, training_args) -> str:
    """The strategy `--strategy auto` stands for: the fastest full fine-tune that fits this hardware with the run's
    typed arguments (DDP for adapters), said in one log line; a ConfigError when none fits."""
    import logging

    from instructune.modeling.adapters import target_modules

    work = Workload.from_args(model_args, training_args)
    hardware = detect_hardware()
    shape = shape_of(model_args.model_name_or_path, target_modules(model_args.lora_target_modules),
                     ranks=(work.lora_r or 8,))
    options = plan(shape, hardware, work)
    chosen = choose(options, work)
    noun = "GPU" if hardware.device == "gpu" else "CPU process"
    where = f"{hardware.world} {noun}{'' if hardware.world == 1 else 'es' if noun.endswith('s') else 's'}"
    if chosen is None or (chosen.strategy in ADAPTERS and not work.lora_r):
        adapter = "; LoRA would fit (--lora_r 8)" if chosen else ""
        raise ConfigError(f"--strategy auto: no strategy fits {shape.name} on {where} with micro-batch {work.micro_batch} "
                          f"× {work.seq_len}{adapter}; `instructune plan` shows the figures")
    name = "ddp" if chosen.strategy in ADAPTERS else chosen.strategy
    on_gpu = hardware.device == "gpu"

    def needs(o: Option) -> float:  # GiB of the memory that decides whether it fits
        return (o.gpu_total_bytes if on_gpu else o.cpu_total_bytes) / GIB

    have = (hardware.gpu_mem if on_gpu else hardware.cpu_mem) / GIB
    why = f"{needs(chosen):.1f} GiB of {have:.0f} GiB {'per GPU' if on_gpu else 'on this node'}"
    faster = [o for o in options if o.strategy in FULL[: FULL.index(name)]]
    if faster:
        why += "; faster ones need " + ", ".join(f"{o.strategy} {needs(o):.1f}" for o in faster)
    logging.getLogger("instructune").info("--strategy auto: %s (%s; %s)", name, why, where)
    return name
