"""FP32 islands: layers that keep the numerically fragile parts in float32."""

from kmp.layers.attention import CausalSelfAttention
from kmp.layers.harden import AttentionChoice, attention_choices, harden
from kmp.layers.head import LMHead
from kmp.layers.islands import LayerNorm, RMSNorm, Softmax

__all__ = ["AttentionChoice", "CausalSelfAttention", "LMHead", "LayerNorm", "RMSNorm", "Softmax",
           "attention_choices", "harden"]
