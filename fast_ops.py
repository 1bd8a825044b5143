"""Faster, leaner versions of model.py's modules, for fp32 training on x86 CPUs.

model.py is the reference; everything here computes the same function (tests/test_model.py
compares outputs and gradients against it) and is swapped in by `install(model)`, which
Transformer calls unless fast ops are turned off (`fast_ops: false` in a config, or
PLAINLM_FAST_OPS=0). Each swapped module checks per call that its fast path pays and
otherwise runs model.py's forward, so GPUs, autocast, float64 and tiny shapes are plain.

What is here, and what each buys (measured with bench.py on a 2-core AMD EPYC):
- Linear: fp32 `x @ W.T` through oneDNN instead of MKL, 10-15% faster per matmul at
  bench.py's shapes. Weight gradients stay with MKL, faster for that layout.
- RMSNorm: backward keeps x and 1/rms(x) only (autograd would also keep x / rms(x)).
- RoPE: backward is the inverse rotation and keeps only the tables (6 passes over x, not ~10).
- SwiGLU + down projection: backward keeps gate and up only and recomputes silu and the
  product (autograd would keep two more tokens x d_ff tensors per layer, the largest ones).
Together: 764 -> 494 MB of activations per forward at bench.py's CPU shape.

When each pays was measured per op, forward + backward, at three shapes (768 tokens x 128 wide,
2048 x 256 as in the default config, 4096 x 384 as in bench.py; `python bench.py --ops`):
RMSNorm and RoPE are faster at all three (1.1-2x); the oneDNN linear and SwiGLUDown lose below
about 400k input elements (0.75-0.96x at 768 x 128 and 768 x 384), where a call's fixed cost
outweighs what it saves, and win above (1.05-1.14x). Hence MIN_MATMUL_INPUT.
"""
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

import model

ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
MIN_MATMUL_INPUT = 384 * 1024  # elements of a matmul's input below which the plain F.linear is faster


def pays(x, min_numel=0):
    """Where the fast paths are measured to pay: fp32 on an x86 CPU, outside autocast, x big enough."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and x.numel() >= min_numel)


def install(transformer):
    """Swap the fast subclasses in for model.py's modules, in place: parameters, names and
    state dicts stay the same. Only modules of exactly model.py's types are swapped, so a
    module a researcher replaced (a LoRA linear, another norm) is left alone."""
    swaps = {nn.Linear: FastLinear, model.RMSNorm: FastRMSNorm, model.Attention: FastAttention,
             model.FeedForward: FastFeedForward}
    for module in transformer.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
    return transformer


def has_hooks(module):
    """A module whose forward someone watches (hooks) or replaced must really run its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks or nn.modules.module._global_backward_hooks)


# -----------------------------------------------------------------------------
# oneDNN linear, as a custom op (so torch.compile can trace it) with its own backward.

@torch.library.custom_op("plainlm::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # A transposed weight (backward's) is read in place: measured faster than copying it first.
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")


@onednn_linear.register_fake  # output shape, for torch.compile's tracing
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
    grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2)  # MKL is the faster one for this layout
    return grad_x, grad_weight


onednn_linear.register_autograd(_onednn_linear_backward,
                                setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def linear(x, weight):
    """x @ weight.T: oneDNN where it pays, else F.linear."""
    return onednn_linear(x, weight) if pays(x, MIN_MATMUL_INPUT) else F.linear(x, weight)


class FastLinear(nn.Linear):
    def forward(self, x):
        if self.bias is None:
            return linear(x, self.weight)
        return super().forward(x)


# -----------------------------------------------------------------------------
# RMSNorm and RoPE with backwards that keep less.

class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight in fp32 (or better). Backward keeps x and 1/rms(x) only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x_up = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x_up.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x_up * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat, grad = x.to(rstd.dtype) * rstd, grad.to(rstd.dtype)
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        grad_x_hat = grad * weight
        grad_x = rstd * (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_weight.type_as(weight), None


class FastRMSNorm(model.RMSNorm):
    def forward(self, x):
        if pays(x):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


def rotate(x, cos, sin, direction=1):
    """model.apply_rope in three passes over x (direction -1 turns back). rotate_half(x) is
    (-x2, x1) for the halves x1, x2 of the last dimension; each half uses its own sin columns."""
    half = x.shape[-1] // 2
    x_up = x.to(torch.promote_types(x.dtype, torch.float32))
    out = x_up * cos
    out[..., :half].addcmul_(x_up[..., half:], sin[..., :half], value=-direction)
    out[..., half:].addcmul_(x_up[..., :half], sin[..., half:], value=direction)
    return out.type_as(x)


class RoPEFunction(torch.autograd.Function):
    """The gradient of a rotation is the rotation back (rotate() with direction -1, which relies
    on rope_tables repeating each angle in both halves), so backward keeps only the tables."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, direction=-1), None, None


class FastAttention(model.Attention):
    def rope(self, x, cos, sin):
        if pays(x):
            return RoPEFunction.apply(x, cos, sin)
        return super().rope(x, cos, sin)


# -----------------------------------------------------------------------------
# SwiGLU and the down projection in one Function.

class SwiGLUDown(torch.autograd.Function):
    """(silu(gate) * up) @ w_down.T. Backward keeps gate and up only and recomputes the rest."""

    @staticmethod
    def forward(ctx, gate, up, w_down):
        ctx.save_for_backward(gate, up, w_down)
        return linear(F.silu(gate) * up, w_down)

    @staticmethod
    def backward(ctx, grad):
        gate, up, w_down = ctx.saved_tensors
        silu = F.silu(gate)
        grad_hidden = linear(grad, w_down.t())
        grad_w_down = grad.flatten(0, -2).t() @ (silu * up).flatten(0, -2)
        grad_up = grad_hidden * silu
        del silu  # (tokens x d_ff) temporaries are this backward's peak: free each one early
        grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
        return grad_gate, grad_up, grad_w_down


class FastFeedForward(model.FeedForward):
    def forward(self, x):
        # The fused path skips w_down's own forward: only when nobody hooks or replaced it.
        if (self.glu and type(self.w_down) is FastLinear and not has_hooks(self.w_down) and pays(x)
                and x.numel() // x.shape[-1] * self.w_down.in_features >= MIN_MATMUL_INPUT):
            return SwiGLUDown.apply(self.w_gate(x), self.w_up(x), self.w_down.weight)
        return super().forward(x)
