"""The backend seam on torch (see kmp.backends)."""

from __future__ import annotations

import contextlib

import torch

from kmp.backends import HostSwitch
from kmp.errors import UserError


def version() -> str:
    return torch.__version__


def accelerator():
    if not torch.cuda.is_available():
        return None
    return {"kind": "gpu", "name": torch.cuda.get_device_name(0),
            "compute_capability": tuple(torch.cuda.get_device_capability(0)),
            "count": torch.cuda.device_count()}


def jit_compile_for(choice):
    if not choice:
        return False, None
    return False, ("torch runs eagerly, as Keras's default there (jit_compile=True means "
                   "torch.compile).")


def float32_matmuls_use_tf32() -> bool:
    # torch >= 2.9 reports every way of setting it here ("tf32", "ieee", or "none": unset).
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if new != "none":
        return new == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def in_compiled_function(value) -> bool:
    return torch.compiler.is_compiling()


def jit(fn):
    return fn


def sync_state(model):
    pass


def forward_backward(model, forward, loss_scale):
    loss, outputs = forward(None)
    tensors = [t for _, t in outputs] + [v.value for v in model.trainable_variables]
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
    found = torch.autograd.grad(loss * loss_scale, [tensors[i] for i in wanted],
                                allow_unused=True)
    grads = [None] * len(tensors)
    for i, g in zip(wanted, found):
        grads[i] = g
    return loss, outputs, grads[:len(outputs)], grads[len(outputs):]


def gpu_memory(reset):
    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(0)
    return {"current": torch.cuda.memory_allocated(0), "peak": torch.cuda.max_memory_allocated(0),
            "resettable": True}


class Switch(HostSwitch):
    """A Python flag: torch runs the step eagerly and reads it as it goes."""

    def read(self):
        return torch.tensor(self.value)


def apply_scaled(optimizer, flags, grads, tvs):
    optimizer._apply_and_update(flags, optimizer._local_grad_norm(grads), grads, tvs)


def replica_id():
    return 0


@contextlib.contextmanager
def distribution(kind, devices=None):
    if kind == "mirrored":
        raise UserError("The mirrored strategy (data-parallel over local devices) runs on the "
                        "tensorflow and jax backends, not on torch. Use KERAS_BACKEND=jax or "
                        "tensorflow, or the default strategy.")
    yield 1
