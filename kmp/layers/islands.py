"""Float32 islands: softmax and normalization that compute in float32 under any policy."""

from __future__ import annotations

import keras
from keras import ops

# A mask value that stays finite in float32 and drives exp() to exactly 0.
_MASKED = -1e9


class _Float32Island(keras.layers.Layer):
    """Base: no autocast of inputs; call() computes in float32 and casts to the compute dtype."""

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)


@keras.saving.register_keras_serializable(package="kmp")
class Softmax(_Float32Island):
    """Softmax computed in float32, returned in the layer's compute dtype.

    Under mixed_float16 the exponentials and their sum are float32, so long rows neither
    overflow nor lose mass to rounding; only the result is rounded to half precision.

    Args:
        axis: int or tuple of int. Axis or axes to normalize. Defaults to -1.
        **kwargs: Base layer keyword arguments, e.g. `dtype` and `name`.

    Call args:
        inputs: Tensor of scores, any float dtype.
        mask: Optional bool/int tensor broadcastable to `inputs`; False/0 entries get
            probability 0.

    Example:
    >>> import numpy as np
    >>> y = Softmax(dtype="mixed_float16")(np.array([[1.0, 2.0, 3.0]]))
    >>> keras.backend.standardize_dtype(y.dtype)
    'float16'
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.supports_masking = True

    def call(self, inputs, mask=None):
        x = ops.cast(inputs, "float32")
        if mask is not None:
            x = x + ops.cast(ops.logical_not(ops.cast(mask, "bool")), "float32") * _MASKED
        axis = self.axis
        if isinstance(axis, (tuple, list)) and len(axis) == 1:
            axis = axis[0]
        if isinstance(axis, (tuple, list)):  # keras' attention may normalize several axes
            y = ops.exp(x - ops.logsumexp(x, axis=axis, keepdims=True))
        else:
            y = ops.softmax(x, axis=axis)
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package="kmp")
class LayerNorm(_Float32Island):
    """Layer normalization with float32 statistics and float32 scale/offset.

    Args:
        epsilon: float. Added to the variance. Defaults to 1e-5.
        center: bool. Learn an offset. Defaults to True.
        scale: bool. Learn a scale. Defaults to True.
        **kwargs: Base layer keyword arguments, e.g. `dtype` and `name`.

    Example:
    >>> import numpy as np
    >>> tuple(LayerNorm()(np.ones((2, 4))).shape)
    (2, 4)
    """

    def __init__(self, epsilon=1e-5, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        self.epsilon, self.center, self.scale = epsilon, center, scale

    def build(self, input_shape):
        dim = input_shape[-1]
        self.gamma = self.add_weight((dim,), "ones", name="gamma") if self.scale else None
        self.beta = self.add_weight((dim,), "zeros", name="beta") if self.center else None

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        mean = ops.mean(x, axis=-1, keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * ops.rsqrt(var + self.epsilon)
        if self.gamma is not None:
            y = y * ops.cast(self.gamma, "float32")
        if self.beta is not None:
            y = y + ops.cast(self.beta, "float32")
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "center": self.center,
                "scale": self.scale}


@keras.saving.register_keras_serializable(package="kmp")
class RMSNorm(_Float32Island):
    """Root-mean-square normalization (Zhang & Sennrich, 2019) computed in float32.

    Args:
        epsilon: float. Added to the mean square. Defaults to 1e-6.
        **kwargs: Base layer keyword arguments, e.g. `dtype` and `name`.

    Example:
    >>> import numpy as np
    >>> tuple(RMSNorm()(np.ones((2, 4))).shape)
    (2, 4)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.gamma = self.add_weight((input_shape[-1],), "ones", name="gamma")

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        y = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(y * ops.cast(self.gamma, "float32"), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
