"""Where the recipe's attention computes its probabilities, per policy, on the active backend:
Keras's own path (dropout 0, so its fused dot_product_attention) against kmp's float32 island.

    KERAS_BACKEND=jax python docs/attention_precision.py

Prints one Markdown row per (policy, route): the worst and median error of the probabilities
in units in the last place (ulp) of the compute dtype, against a float64 softmax of the same
query and key (kmp.diagnostics.attention_precision; float32 scores and softmax give <= 0.5).
"""

import keras

import kmp
from kmp.diagnostics import attention_precision
from kmp.gpt import build_model, preset


def main():
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}\n")
    print("| policy | route | max ulp | median ulp | probabilities in float32? |")
    print("|---|---|---|---|---|")
    for policy in ("mixed_float16", "mixed_bfloat16"):
        kmp.set_policy(policy)
        keras.utils.set_random_seed(0)
        model = build_model(preset("tiny"))  # dropout 0, as every preset
        for hardened in (False, True):
            if hardened:
                kmp.harden(model)
            rows = attention_precision(model, seq_len=256)
            worst = max(rows, key=lambda r: r.max_ulps)
            median = max(r.median_ulps for r in rows)
            print(f"| {policy} | {worst.route} | {worst.max_ulps:.2f} | {median:.2f} | "
                  f"{'yes' if all(r.float32 for r in rows) else 'no'} |")


if __name__ == "__main__":
    main()
