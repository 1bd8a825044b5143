"""The two optimizers train.py offers that torch.optim does not ship in a form that fits here.

Muon: momentum, orthogonalised by a few Newton-Schulz iterations, for the hidden weight matrices
(Jordan et al. 2024, as in modded-nanogpt); AdamW for every other parameter, in the same optimizer
object, so the training loop, the loss scaler and checkpoints see one optimizer. torch.optim.Muon
exists, but it orthogonalises in bfloat16, which made a whole training step about 10x slower on a
CPU without fast bf16 matmuls (1,058 vs ~100 ms at 4 layers x 128 wide); here the iterations run in
bf16 on CUDA and in fp32 everywhere else.

Signum: signSGD with momentum (Bernstein et al. 2018): each step moves every weight by lr in the
direction of the sign of its gradients' exponential moving average (not Lion's interpolation).
"""
import math

import torch
from torch.optim.adamw import adamw

# The quintic Newton-Schulz coefficients of Muon's reference implementation: they push every
# singular value into roughly [0.7, 1.2] in five iterations, which trains as well as exact ones.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
LR_ADJUSTMENTS = ("original", "match_rms_adamw")


def orthogonalize(g, steps):
    """Approximately U V^T of g = U S V^T: the update with all its singular values set to about 1.
    g is one matrix or a stack of same-shaped ones (..., rows, cols), done together in batched matmuls."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # spectral <= Frobenius <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def lr_scale(shape, adjust):
    """original: max(1, rows/cols)^0.5, Muon's own; match_rms_adamw: 0.2 sqrt(max(rows, cols)),
    which gives updates the RMS of AdamW's, so AdamW's learning rate and weight decay carry over."""
    rows, cols = shape
    return max(1.0, rows / cols) ** 0.5 if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """Groups with "muon": True take Muon steps (2-D parameters only); the others take AdamW steps
    (torch's own functional AdamW, with AdamW's state names). Every group has its own lr and weight decay."""

    def __init__(self, groups, momentum=0.95, nesterov=True, adjust_lr="original", ns_steps=5,
                 betas=(0.9, 0.95), eps=1e-8):
        defaults = dict(lr=1e-3, weight_decay=0.0, muon=False, momentum=momentum, nesterov=nesterov,
                        adjust_lr=adjust_lr, ns_steps=ns_steps, betas=betas, eps=eps)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(params, group)
            elif params:
                self._adamw_step(params, group)

    def _muon_step(self, params, group):
        by_shape = {}  # matrices of one shape are orthogonalised together: a few batched matmuls, not many small ones
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            by_shape.setdefault(tuple(p.shape), []).append((p, update))
        for shape, pairs in by_shape.items():
            ortho = orthogonalize(torch.stack([update for _, update in pairs]), group["ns_steps"])
            for (p, _), o in zip(pairs, ortho):
                if group["weight_decay"]:  # decoupled, as in AdamW
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"] * lr_scale(shape, group["adjust_lr"]))

    def _adamw_step(self, params, group):
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=True,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class Signum(torch.optim.Optimizer):
    """p <- p (1 - lr wd) - lr sign(m), m <- momentum m + (1 - momentum) grad; momentum 0 is plain signSGD."""

    def __init__(self, groups, lr=1e-3, momentum=0.9, weight_decay=0.0):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(buf.sign(), alpha=-group["lr"])
