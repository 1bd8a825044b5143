"""Faster, leaner versions of model.py's modules: the loss on every device, the rest for fp32
training on x86 CPUs.

model.py is the reference; everything here computes the same function (tests/test_model.py
compares outputs and gradients against it) and is swapped in by `install(model)`, which
Transformer calls unless fast ops are turned off (`fast_ops: false` in a config, or
PLAINLM_FAST_OPS=0). Each swapped module checks per call that its fast path pays and
otherwise runs model.py's forward.

On every device and dtype, with targets and at least MIN_CHUNKED_LOGITS logits:
- LM head + cross-entropy in chunks (ChunkedCrossEntropy): never more than LOSS_CHUNK_LOGITS
  logits at once, instead of the (tokens x vocab) logits, their softmax and their gradient, which
  with a real vocabulary are larger than all other activations together.

On fp32 x86 CPUs (measured with bench.py on a 2-core AMD EPYC):
- Linear: fp32 `x @ W.T` through oneDNN instead of MKL, 10-15% faster per matmul at
  bench.py's shapes. Weight gradients stay with MKL, faster for that layout.
- RMSNorm: backward keeps x and 1/rms(x) only (autograd would also keep x / rms(x)) and runs in
  ATen's fused LayerNorm backward kernel: forward + backward 1.4-3x faster than the plain module's
  (`bench.py --ops`: 1.45x at 768 x 128, 2.3x at 2048 x 128, 3.1x at 4096 x 384).
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
             model.FeedForward: FastFeedForward, model.Transformer: FastTransformer}
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


def linear(x, weight, min_numel=MIN_MATMUL_INPUT):
    """x @ weight.T: oneDNN where it pays, else F.linear."""
    return onednn_linear(x, weight) if pays(x, min_numel) else F.linear(x, weight)


class FastLinear(nn.Linear):
    def forward(self, x):
        if self.bias is None:
            return linear(x, self.weight)
        return super().forward(x)


# -----------------------------------------------------------------------------
# RMSNorm and RoPE with backwards that keep less.

class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight for fp32 (or fp64) x and weight. Backward keeps x and 1/rms(x) only and
    runs in ATen's fused LayerNorm backward kernel, told that every row's mean is 0: that is the
    RMSNorm gradient except for the term LayerNorm gets from subtracting the mean, which is
    rstd * mean(grad * weight) per row and is added back. One fused kernel instead of ~9 passes."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [x.shape[-1]], torch.zeros_like(rstd), rstd, weight, None, [True, True, False])
        grad_x.add_(rstd * (grad @ weight).unsqueeze(-1), alpha=1.0 / x.shape[-1])
        return grad_x, grad_weight, None


class FastRMSNorm(model.RMSNorm):
    def forward(self, x):
        if pays(x) and self.weight.dtype == x.dtype:
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


# -----------------------------------------------------------------------------
# The LM head and the cross-entropy, chunk by chunk: on every device and dtype.

LOSS_CHUNK_LOGITS = 2**23  # logits held at once (32 MB in fp32): rows per chunk = this / padded vocab
MIN_CHUNKED_LOGITS = 2**23  # below this many logits in all, the plain loss runs (its memory is small then)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (x @ weight.T)[:, :vocab_size] against targets (-1: ignored) that holds
    only LOSS_CHUNK_LOGITS logits at a time. When gradients are wanted, forward forms each chunk's
    gradients of x and weight right away (softmax minus one-hot, times weight or x) and frees the
    chunk; backward only scales them. reduction "mean" or "sum". Chunks stay under glibc's largest
    mmap threshold (32 MB), so they are reused from the heap instead of being page-faulted in anew."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, reduction):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)  # what autocast would multiply (no copies in fp32)
        valid = targets != -1
        scale = 1.0 / valid.sum() if reduction == "mean" else torch.ones((), device=x.device)
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        rows = max(1, LOSS_CHUNK_LOGITS // weight.shape[0])
        for start in range(0, x.shape[0], rows):
            xs, ts, ok = x_c[start:start + rows], targets[start:start + rows], valid[start:start + rows]
            # oneDNN at any size here: with the vocabulary's 50k+ outputs it ran these 1.5x faster than MKL
            logits = linear(xs, w_c, min_numel=0).float()
            logits[:, vocab_size:] = float("-inf")  # padded rows of the head: never predicted
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, ts.clamp(min=0)[:, None]).squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if grad_x is None and grad_w is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
            grad.scatter_add_(1, ts.clamp(min=0)[:, None], -ok[:, None].float())  # minus the one-hot
            grad = grad.mul_((ok * scale)[:, None]).to(dtype)  # ignored rows contribute nothing
            if grad_x is not None:
                grad_x[start:start + rows] = linear(grad, w_c.t(), min_numel=0)
            if grad_w is not None and dtype == torch.float32:
                grad_w.addmm_(grad.t(), xs)  # in place: no weight-sized temporary per chunk
            elif grad_w is not None:
                grad_w += grad.t() @ xs
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_loss.to(grad_x.dtype) if grad_x is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None


class FastTransformer(model.Transformer):
    def loss(self, x, targets, reduction="mean"):
        head = self.lm_head
        if (type(head) is not FastLinear or has_hooks(head)
                or x.numel() // x.shape[-1] * head.out_features < MIN_CHUNKED_LOGITS):
            return super().loss(x, targets, reduction)
        return ChunkedCrossEntropy.apply(x.flatten(0, -2), head.weight, targets.flatten(), self.cfg.vocab_size, reduction)
