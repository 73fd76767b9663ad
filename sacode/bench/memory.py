"""Tensor memory counted op by op on any device (``meta`` included), with CUDA's mixed precision emulated.

How much memory a training step needs is, up to the allocator, the bytes of the tensors alive at its peak. Which
tensors exist, their shapes and their dtypes are decided by the operators (and autograd's saved tensors), not by the
device, so they can be counted on ``meta`` tensors, which carry shapes and dtypes but no data and cost no time:

* :class:`LiveTensorBytes` — a dispatch mode that adds the bytes of every new tensor storage made inside it and
  subtracts them when the storage is freed; it keeps the current and the peak total. It sees what autograd saves for
  the backward pass and every gradient and temporary, and it does not see tensors made before it was entered (the
  weights, counted from their parameter counts instead).
* :class:`CudaAutocastEmulation` — a function mode that applies the casting rules of ``torch.autocast("cuda")``
  (matrix products and convolutions in the low-precision dtype; normalisations, softmax and exponentials in float32;
  concatenation at the widest dtype) to the operators a diffusers UNet and VAE call, on any device, and replaces
  ``scaled_dot_product_attention`` by a fused flash-attention kernel, which saves only its output and the row-wise
  log-sum-exp for the backward pass (as CUDA's flash and memory-efficient kernels do) instead of the attention matrix
  that the unfused ``math`` path saves. On ``meta`` tensors PyTorch would otherwise take the ``math`` path and
  ``torch.autocast`` does not apply at all.

What this does not count (it does not transfer from a tensor count to a GPU): the CUDA context, the caching
allocator's rounding and fragmentation (reserved minus allocated memory), cuBLAS/cuDNN workspaces, and any operator
whose CUDA implementation allocates differently from its composite one. ``bench sd-throughput`` prints the counted
and the measured peak side by side when it runs on a GPU.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GiB = 2**30


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages made inside the mode that are still alive (``current``) and their maximum
    (``peak``) since entering or the last :meth:`reset_peak`."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[st] = nbytes
        self.current += nbytes
        weakref.finalize(st, self._freed, nbytes)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:          # storages made outside the mode (weights, inputs):
            if isinstance(t, torch.Tensor):                  # their views and in-place updates cost nothing new
                st = t.untyped_storage()
                if st not in self._seen:
                    self._seen[st] = 0
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.current)
        return out


# torch.autocast("cuda") casting rules (PyTorch's autocast op lists) for the functions diffusers' UNet, VAE and the
# loss call; everything else runs in the dtype of its inputs, as under autocast
LOWER_PRECISION = {F.linear, torch.conv2d, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
                   F.scaled_dot_product_attention, torch.Tensor.matmul, torch.Tensor.__matmul__}
FLOAT32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.exp,
           torch.Tensor.exp, torch.log, torch.Tensor.log, torch.sum, torch.Tensor.sum, torch.pow, torch.Tensor.pow,
           torch.rsqrt, torch.Tensor.rsqrt, F.mse_loss}
PROMOTE = {torch.cat, torch.stack}


def _cast(x, dtype: torch.dtype):
    """Cast floating tensors other than float64 to ``dtype`` (autocast's eligibility rule), recursing into lists."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype not in (torch.float64, dtype) else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


class CudaAutocastEmulation(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` casting rules and fused flash attention, on any device (see the module).

    Args:
        dtype: the low-precision dtype (bfloat16 or float16); None keeps every dtype (flash attention only).
        flash_attention: compute ``scaled_dot_product_attention`` with the fused flash kernel.
    """

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, flash_attention: bool = True):
        super().__init__()
        self.dtype, self.flash = dtype, flash_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None:
            if func in LOWER_PRECISION:
                args, kwargs = _cast(args, self.dtype), {k: _cast(v, self.dtype) for k, v in kwargs.items()}
            elif func in FLOAT32:
                args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
            elif func in PROMOTE and args and isinstance(args[0], (list, tuple)):
                floats = [t.dtype for t in args[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
                if floats:
                    widest = max(floats, key=lambda d: torch.finfo(d).bits)
                    args = (_cast(args[0], widest), *args[1:])
        if func is F.scaled_dot_product_attention and self.flash:
            return flash_attention(*args, **kwargs)
        return func(*args, **kwargs)


def checkpointing_under(context) -> object:
    """A gradient-checkpointing function for diffusers' ``enable_gradient_checkpointing`` (non-reentrant
    ``torch.utils.checkpoint``, as diffusers' default) whose recomputation in the backward pass runs under
    ``context()``, e.g. a :class:`CudaAutocastEmulation` (a mode entered around the forward pass is not active when
    autograd recomputes; ``torch.autocast`` itself is restored by ``checkpoint``)."""
    from contextlib import nullcontext

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (nullcontext(), context()))
    return checkpointed


def flash_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None, **kw):
    """softmax(q k^T scale) v by the fused flash-attention operator (it saves the output and the log-sum-exp)."""
    if kw.get("enable_gqa"):
        raise ValueError("grouped-query attention is not emulated")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def saved_for_backward_bytes(fn, exclude=()) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages autograd saved for the backward pass while running fn, leaving out
    the storages of the tensors ``exclude``, e.g. the weights) — an independent count (autograd's saved-tensor
    hooks) that :class:`LiveTensorBytes` is checked against."""
    storages = WeakIdKeyDictionary()
    skip = WeakIdKeyDictionary({t.untyped_storage(): True for t in exclude})

    def pack(t):
        st = t.untyped_storage()
        if st not in storages and st not in skip:
            storages[st] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())
