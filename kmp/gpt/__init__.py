"""GPT pieces on KerasHub for the pretraining recipe: config and presets, data, model, reports."""

from kmp.gpt.config import PRESETS, GPTConfig, add_arguments, from_args, preset
from kmp.gpt.data import TokenCache, build_token_cache, train_dataset, val_dataset
from kmp.gpt.model import (
    NextTokenCrossentropy,
    build_model,
    flops_per_token,
    lm_loss,
    load_model,
    make_optimizer,
    param_count,
)
from kmp.gpt.report import sample_text

__all__ = [
    "GPTConfig", "NextTokenCrossentropy", "PRESETS", "TokenCache", "add_arguments",
    "build_model", "build_token_cache", "flops_per_token", "from_args", "lm_loss", "load_model",
    "make_optimizer", "param_count", "preset", "sample_text", "train_dataset", "val_dataset",
]
