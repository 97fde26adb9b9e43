"""The backend seam on TensorFlow (see kmp.backends)."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from kmp._keras import tf_strategy_supports_no_merge_call


def version() -> str:
    return tf.__version__


def accelerator():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return {"kind": "gpu", "name": details.get("device_name", gpus[0].name),
                "compute_capability": details.get("compute_capability"), "count": len(gpus)}
    tpus = tf.config.list_logical_devices("TPU")
    if tpus:
        return {"kind": "tpu", "name": "TPU", "compute_capability": None, "count": len(tpus)}
    return None


def jit_compile_for(choice):
    return choice, None


def float32_matmuls_use_tf32() -> bool:
    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


def in_compiled_function(value) -> bool:
    return tf.inside_function()


def jit(fn):
    return fn


def sync_state(model):
    pass


def forward_backward(model, forward, loss_scale):
    with tf.GradientTape(persistent=True) as tape:
        loss, outputs = forward(None)
        scaled = loss * loss_scale
    grads = tape.gradient(scaled, [t for _, t in outputs])
    var_grads = tape.gradient(scaled, model.trainable_variables)
    return loss, outputs, grads, var_grads


def gpu_memory(reset):
    if not tf.config.list_physical_devices("GPU"):
        return None
    if reset:
        tf.config.experimental.reset_memory_stats("GPU:0")
    info = tf.config.experimental.get_memory_info("GPU:0")
    return {"current": info["current"], "peak": info["peak"], "resettable": True}


class Switch:
    """A tf.Variable: assigned between steps, read inside the compiled step."""

    def __init__(self, initial):
        with tf.init_scope():
            self._var = tf.Variable(bool(initial), trainable=False, name="kmp_switch")

    def set(self, value):
        self._var.assign(bool(value))

    def read(self):
        return self._var.read_value()


def apply_scaled(optimizer, flags, grads, tvs):
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise RuntimeError("kmp.LossScaleOptimizer.apply() must be called in a replica "
                           "context (inside strategy.run), as Keras's own apply.")
    # The one fix that matters across replicas: decide on the all-reduced flags, so every
    # replica skips when any replica saw an inf/NaN (Keras decides on replica 0's flags).
    if ctx.num_replicas_in_sync > 1:
        flags = ctx.all_reduce(tf.distribute.ReduceOp.SUM, flags)
    grad_norm = optimizer._local_grad_norm(grads)
    if tf_strategy_supports_no_merge_call():
        optimizer._apply_and_update(flags, grad_norm, grads, tvs)
        return

    def cross_replica(distribution, finite, flags, grad_norm, grads, tvs):
        first = distribution.experimental_local_results

        def apply_fn():
            distribution.extended.call_for_each_replica(optimizer._apply_finite,
                                                        args=(grads, tvs))
            return tf.no_op()

        # A cond in cross-replica context: the inner apply calls merge_call itself.
        finite0 = first(finite)[0]
        tf.cond(finite0, apply_fn, tf.no_op)
        optimizer._update_state(finite0, first(flags)[0], first(grad_norm)[0])

    finite = tf.equal(tf.reduce_sum(flags), 0)
    ctx.merge_call(cross_replica, args=(finite, flags, grad_norm, grads, tvs))


def replica_id():
    ctx = tf.distribute.get_replica_context()
    return ctx.replica_id_in_sync_group if ctx is not None else 0


@contextlib.contextmanager
def distribution(kind, devices=None):
    strategy = (tf.distribute.MirroredStrategy(devices) if kind == "mirrored"
                else tf.distribute.get_strategy())
    with strategy.scope():
        yield strategy.num_replicas_in_sync


# Element-wise kernels with hand-written gradients (`kmp.backends.kernel`). TensorFlow runs a
# graph op by op (XLA off: its CPU backend loses more on oneDNN's bfloat16 matmuls than fusion
# gains, docs/benchmarks.md), so each op is a pass over the tensor; these take fewer passes
# than autodiff of the composed forward.
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


def gelu_tanh(x):
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(c (x + a x^3))), written x sigmoid(2c x (1 + a x^2)):
    6 passes forward and 7 backward against 8 and about 14 for `tf.nn.gelu`'s autodiff."""
    return _gelu_tanh(tf.convert_to_tensor(x))  # a variable is read here, outside the gradient


@tf.custom_gradient
def _gelu_tanh(x):
    s = tf.sigmoid(x * (tf.square(x) * (2 * _GELU_C * _GELU_A) + 2 * _GELU_C))

    def grad(dy):  # d/dx = s + x s (1 - s) (2c + 6ca x^2)
        inner = x * (tf.square(x) * (6 * _GELU_C * _GELU_A) + 2 * _GELU_C)
        return dy * (s + tf.raw_ops.SigmoidGrad(y=s, dy=inner))

    return x * s, grad


def next_token_crossentropy(labels, logits):
    """Per-token softmax cross-entropy of float32 `logits` against int `labels`: TensorFlow's
    log-softmax kernel forward (max, sum and output in one op) and its output kept for the
    gradient, exp(log p) - onehot, the onehot subtracted in place at the targets."""
    labels = tf.cast(labels, tf.int32)

    @tf.custom_gradient
    def crossentropy(logits):
        log_p = tf.nn.log_softmax(logits)

        def grad(upstream):
            shape = tf.shape(labels)
            rows = tf.reshape(tf.range(tf.reduce_prod(shape)), shape)
            where = tf.stack([rows // shape[-1], rows % shape[-1], labels], axis=-1)
            return tf.tensor_scatter_nd_sub(tf.exp(log_p) * upstream[..., None], where,
                                            upstream)

        return -tf.gather(log_p, labels, batch_dims=2), grad

    return crossentropy(logits)


def attention_island(query, key, value, mask, scale):
    """The float32 attention island of `kmp.layers.attention.float32_attention` for query,
    key and value of shape (batch, length, heads, width) in the compute dtype and a boolean
    `mask` (batch, query length, key length) or None -> (batch, length, heads, width).

    The same forward as the composed island (float32 scores of the scaled query, masked,
    float32 softmax, the probabilities rounded to the compute dtype for the product with the
    values), in (batch, heads, length, width) layout from one transpose of each input, and a
    hand-written backward: the softmax's gradient in float32, none through the mask, and the
    score gradient rounded to the compute dtype for its products with the query and key, which
    run as bfloat16/float16 matmuls like every other gradient of the step instead of float32
    ones (TensorFlow has no CPU matmul of half-precision inputs into float32).
    """
    from kmp.layers.islands import _MASKED  # kmp.layers.Softmax's mask value

    compute = value.dtype
    q, k, v = (tf.transpose(t, [0, 2, 1, 3]) for t in (query, key, value))
    keep = None if mask is None else tf.cast(mask, tf.bool)[:, None]

    @tf.custom_gradient
    def core(q, k, v):
        scores = tf.matmul(tf.cast(q, tf.float32) * scale, tf.cast(k, tf.float32),
                           transpose_b=True)
        if keep is not None:
            scores = tf.where(keep, scores, _MASKED)
        p = tf.nn.softmax(scores)
        p_low = tf.cast(p, compute)
        out = tf.matmul(p_low, v)

        def grad(dout):  # the scale folded into dout: one rounding of a small tensor
            scaled = tf.cast(tf.cast(dout, tf.float32) * scale, compute)
            dp = tf.cast(tf.matmul(scaled, v, transpose_b=True), tf.float32)
            ds = tf.cast(p * (dp - tf.reduce_sum(dp * p, -1, keepdims=True)), compute)
            return (tf.matmul(ds, k), tf.matmul(ds, q, transpose_a=True),
                    tf.matmul(p_low, dout, transpose_a=True))

        return out, grad

    return tf.transpose(core(q, k, v), [0, 2, 1, 3])


def layer_norm(x, gamma, beta, epsilon):
    """Layer normalization over the last axis, computed in float32 and returned in `x`'s
    dtype (as `keras.ops.layer_normalization`), with a hand-written gradient: about 11 passes
    over the activations forward and backward, against about twice that for the autodiff of
    Keras's composed form, which also broadcasts the scale into a full-size tensor."""
    dtype = x.dtype

    @tf.custom_gradient
    def norm(x, gamma, beta):
        centered = x - tf.reduce_mean(x, -1, keepdims=True)
        inv = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), -1, keepdims=True) + epsilon)
        normed = centered * inv

        def grad(dy):
            dy = tf.cast(dy, tf.float32)
            rows = tf.range(tf.rank(dy) - 1)
            g = dy * gamma
            dx = inv * (g - tf.reduce_mean(g, -1, keepdims=True)
                        - normed * tf.reduce_mean(g * normed, -1, keepdims=True))
            return dx, tf.reduce_sum(dy * normed, rows), tf.reduce_sum(dy, rows)

        return normed * gamma + beta, grad

    out = norm(tf.cast(x, tf.float32), tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32))
    return tf.cast(out, dtype)
