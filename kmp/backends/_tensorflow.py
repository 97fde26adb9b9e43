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
