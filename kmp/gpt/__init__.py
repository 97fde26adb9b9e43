"""GPT pieces on KerasHub for the pretraining recipe: config and presets, data, model,
memory estimate, benchmark harness, reports; and what comes after training: a finished run
loaded exactly as trained, quantization, quantization-aware fine-tuning, LiteRT export.

The names below are imported on first use: reading a config (`kmp.gpt.config`) loads
neither Keras nor a backend."""

import importlib

# public name -> the module of kmp.gpt that defines it
_EXPORTS = {
    "add_arguments": "config",
    "attach_preprocessor": "run",
    "build_model": "model",
    "build_token_cache": "data",
    "estimate_memory": "memory",
    "export_run": "export",
    "finetune_run": "finetune",
    "FinishedRun": "run",
    "flops_per_token": "model",
    "from_args": "config",
    "GPTBackbone": "model",
    "GPTCausalLM": "model",
    "GPTConfig": "config",
    "lm_loss": "model",
    "load_model": "model",
    "make_optimizer": "model",
    "memory_table": "memory",
    "MemoryEstimate": "memory",
    "NextTokenCrossentropy": "model",
    "open_run": "run",
    "param_count": "model",
    "preset": "config",
    "PRESETS": "config",
    "quantize_run": "quantize",
    "sample_text": "report",
    "TokenCache": "data",
    "train_dataset": "data",
    "val_dataset": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kmp.gpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kmp.gpt.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
