"""GPT pieces on KerasHub for the pretraining recipe: config and presets, data, model,
memory estimate, benchmark harness, reports; and what comes after training: quantization,
quantization-aware fine-tuning, LiteRT export."""

from kmp.gpt.config import PRESETS, GPTConfig, add_arguments, from_args, preset
from kmp.gpt.data import TokenCache, build_token_cache, train_dataset, val_dataset
from kmp.gpt.export import export_run
from kmp.gpt.finetune import finetune_run
from kmp.gpt.memory import MemoryEstimate, estimate_memory, memory_table
from kmp.gpt.model import (
    GPTBackbone,
    GPTCausalLM,
    NextTokenCrossentropy,
    build_model,
    flops_per_token,
    lm_loss,
    load_model,
    make_optimizer,
    param_count,
)
from kmp.gpt.quantize import quantize_run
from kmp.gpt.report import sample_text

__all__ = [
    "GPTBackbone", "GPTCausalLM", "GPTConfig", "MemoryEstimate", "NextTokenCrossentropy", "PRESETS",
    "TokenCache", "add_arguments", "build_model", "build_token_cache", "estimate_memory",
    "export_run", "finetune_run", "flops_per_token", "from_args", "lm_loss", "load_model",
    "make_optimizer", "memory_table", "param_count", "preset", "quantize_run", "sample_text",
    "train_dataset", "val_dataset",
]
