"""GPTQ's column loop (Frantar et al. 2022, algorithm 1) in NumPy, for kmp's GPTQ calibration.

Keras 3.15.1 runs the loop (`keras.src.quantizers.gptq.gptq_quantize_matrix`) one eager
backend op at a time: about 30 ops per input feature, several of them `slice_update`, which
TensorFlow executes through a slow eager fallback (2.5 ms each on a 2-core CPU). The tiny
preset's 12 matrices took 38 s; GPT-2 124M has 20 times the columns. The loop is sequential
over columns but each step is a few vector operations, so NumPy does it in milliseconds.

`quantize_matrix` mirrors Keras's function step for step (the same blocks, the same moments at
which group scales are taken, the same rounding and clipping) and returns what it returns, so
Keras's GPTQ layer code stores the result unchanged. Its scale and zero point come from Keras's
own `compute_scale_zero`. tests/test_quantize.py compares the two on seeded matrices.
"""

import keras
import numpy as np


def quantize_matrix(weights_transpose, upper, *, compute_scale_zero, blocksize=128,
                    group_size=-1):
    """GPTQ-quantizes `weights_transpose` (out_features, in_features) with `upper`, the upper
    Cholesky factor of the inverse Hessian (in_features, in_features): each feature is rounded
    in turn and its error moved onto the features after it.

    Returns Keras's (quantized int32 (out, in), scale (out, groups), zero (out, groups), g_idx
    float32 (in,)), as tensors of the Keras backend.
    """
    ops = keras.ops
    weights = np.array(ops.convert_to_numpy(weights_transpose), dtype=np.float32)
    upper = np.asarray(ops.convert_to_numpy(upper), dtype=np.float32)
    rows, features = weights.shape
    group = features if group_size == -1 else group_size
    quantized = np.zeros((rows, features), dtype=np.int32)
    scales, zeros = [], []
    for start in range(0, features, blocksize):
        end = min(start + blocksize, features)
        group_start = -1  # Keras: each block takes its first group's scale anew
        block = weights[:, start:end].copy()  # updated column by column
        errors = np.zeros_like(block)
        for j in range(end - start):
            column = start + j
            first = (column // group) * group
            if first != group_start:  # Keras: from the weights as of the last block's end
                s, z, q = compute_scale_zero(ops.convert_to_tensor(
                    weights[:, first:min(first + group, features)]))
                scales.append(s)
                zeros.append(z)
                scale = np.asarray(ops.convert_to_numpy(s), dtype=np.float32)[:, 0]
                zero = np.asarray(ops.convert_to_numpy(z)).astype(np.float32)[:, 0]
                maxq = np.float32(ops.convert_to_numpy(q))
                safe = np.where(scale == 0, np.float32(1e-8), scale)
                group_start = first
            levels = np.clip(np.round(block[:, j] / safe + zero), 0, maxq)
            quantized[:, column] = levels.astype(np.int32)
            error = (block[:, j] - scale * (levels - zero)) / upper[column, column]
            errors[:, j] = error
            block[:, j + 1:] -= np.outer(error, upper[column, column + 1:end])
        if end < features:
            weights[:, end:] -= errors @ upper[start:end, end:]
    g_idx = ops.cast(ops.divide(ops.arange(0, features, dtype="int32"), group), "float32")
    return (ops.convert_to_tensor(quantized), ops.concatenate(scales, axis=1),
            ops.concatenate(zeros, axis=1), g_idx)
