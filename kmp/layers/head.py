"""An output head whose logits reach the loss in float32."""

from __future__ import annotations

import keras
from keras import ops

from kmp.errors import UserError

PROJECTIONS = ("compute", "float32")


@keras.saving.register_keras_serializable(package="kmp")
class LMHead(keras.layers.Layer):
    """Vocabulary projection that always returns float32 logits.

    The documented choice is where the matmul runs. `projection="compute"` (default) multiplies
    in the compute dtype (float16/bfloat16 Tensor Cores; the largest matmul of a small GPT) and
    casts the logits to float32, so softmax and cross-entropy are float32. `projection="float32"`
    multiplies in float32: slower, and more exact for very large vocabularies.

    Args:
        vocabulary_size: int. Number of logits.
        projection: str. "compute" or "float32". Defaults to "compute".
        use_bias: bool. Defaults to False.
        kernel_initializer: initializer. Defaults to "glorot_uniform".
        **kwargs: Base layer keyword arguments, e.g. `dtype` and `name`.

    Example:
    >>> import numpy as np
    >>> y = LMHead(10, dtype="mixed_bfloat16")(np.ones((1, 2, 4), "float32"))
    >>> tuple(y.shape), keras.backend.standardize_dtype(y.dtype)
    ((1, 2, 10), 'float32')
    """

    def __init__(self, vocabulary_size, projection="compute", use_bias=False,
                 kernel_initializer="glorot_uniform", **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if projection not in PROJECTIONS:
            raise UserError(
                f"LMHead: unknown projection {projection!r}. Use one of: {', '.join(PROJECTIONS)}."
            )
        self.vocabulary_size = vocabulary_size
        self.projection = projection
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight((input_shape[-1], self.vocabulary_size),
                                      self.kernel_initializer, name="kernel")
        self.bias = (self.add_weight((self.vocabulary_size,), "zeros", name="bias")
                     if self.use_bias else None)

    def call(self, inputs):
        dtype = self.compute_dtype if self.projection == "compute" else "float32"
        logits = ops.matmul(ops.cast(inputs, dtype), ops.cast(self.kernel, dtype))
        logits = ops.cast(logits, "float32")
        return logits + ops.cast(self.bias, "float32") if self.bias is not None else logits

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.vocabulary_size,)

    def compute_output_spec(self, inputs):
        shape = self.compute_output_shape(inputs.shape)
        return keras.KerasTensor(shape, dtype="float32")

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "projection": self.projection,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
