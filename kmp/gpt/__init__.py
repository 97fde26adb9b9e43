"""GPT pieces on KerasHub: config and presets (corpus, tokenizer and model builder to come)."""

from kmp.gpt.config import PRESETS, GPTConfig, add_arguments, from_args, preset

__all__ = ["GPTConfig", "PRESETS", "add_arguments", "from_args", "preset"]
