"""GPT pieces on KerasHub for the pretraining recipe: config and presets, data, model,
memory estimate, benchmark harness, reports; and what comes after training: a finished run
loaded exactly as trained, quantization, quantization-aware fine-tuning, LiteRT export.

The names below are imported on first use: reading a config (`kmp.gpt.config`) loads
neither Keras nor a backend."""

from kmp import lazy_exports

# public name -> the module of kmp.gpt that defines it
_EXPORTS = {
    "add_arguments": "kmp.gpt.config",
    "attach_preprocessor": "kmp.gpt.run",
    "build_model": "kmp.gpt.model",
    "build_token_cache": "kmp.gpt.data",
    "compiled_plan": "kmp.gpt.compiled",
    "compiled_plans": "kmp.gpt.compiled",
    "estimate_memory": "kmp.gpt.memory",
    "export_run": "kmp.gpt.export",
    "finetune_preset": "kmp.gpt.finetune_hub",
    "finetune_run": "kmp.gpt.finetune",
    "FinishedRun": "kmp.gpt.run",
    "flops_per_token": "kmp.gpt.model",
    "from_args": "kmp.gpt.config",
    "GPTBackbone": "kmp.gpt.model",
    "GPTCausalLM": "kmp.gpt.model",
    "GPTConfig": "kmp.gpt.config",
    "lm_loss": "kmp.gpt.model",
    "load_causal_lm": "kmp.gpt.lora",
    "load_finetuned": "kmp.gpt.adapters",
    "load_model": "kmp.gpt.model",
    "make_optimizer": "kmp.gpt.model",
    "memory_table": "kmp.gpt.memory",
    "MemoryEstimate": "kmp.gpt.memory",
    "NextTokenCrossentropy": "kmp.gpt.model",
    "open_run": "kmp.gpt.run",
    "param_count": "kmp.gpt.memory",
    "preset": "kmp.gpt.config",
    "PRESETS": "kmp.gpt.config",
    "quantize_run": "kmp.gpt.quantize",
    "sample_text": "kmp.gpt.report",
    "shape_for_params": "kmp.gpt.plan",
    "TokenCache": "kmp.gpt.data",
    "train_dataset": "kmp.gpt.data",
    "val_dataset": "kmp.gpt.data",
    "what_fits": "kmp.gpt.plan",
    "write_run_preset": "kmp.gpt.hub_preset",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
