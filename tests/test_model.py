"""Tests for model.py: the properties a Llama-style decoder must have, checked on tiny models."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fast_ops
from fast_ops import RMSNormFunction, RoPEFunction, SwiGLUDown
from model import KVCache, ModelConfig, Transformer, apply_rope, rope_tables


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread gains nothing, and on a shared machine OpenMP
    threads waiting for each other made some tests 10-50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed=0, fast_ops=True, **overrides):
    """A tiny model (built in milliseconds); overrides change any ModelConfig field."""
    kw = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**kw), fast_ops=fast_ops)


@pytest.fixture
def fast_everywhere(monkeypatch):
    """Tiny tensors take model.py's plain path (the fast ops do not pay there): this makes every
    fast op run at any size, so the tests below exercise them."""
    if not fast_ops.ONEDNN:
        pytest.skip("fast_ops are used on x86 CPUs only")
    monkeypatch.setattr(fast_ops, "MIN_MATMUL_INPUT", 0)
    monkeypatch.setattr(fast_ops, "MIN_CHUNKED_LOGITS", 0)
    monkeypatch.setattr(fast_ops, "LOSS_CHUNK_LOGITS", 7 * 128)  # 7 rows of a 128-row head: several chunks, the last short


def random_tokens(shape, vocab_size, seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def scramble(model, std=0.3):
    """Large random weights: at init a tiny model mostly repeats one token, which would hide
    position or cache bugs from a generation test; scrambled, its output depends on everything."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


# Variants that exercise every code path: GQA, QK-norm, relu2, untied head.
VARIANTS = [
    dict(),
    dict(n_kv_heads=2, qk_norm=True),
    dict(n_kv_heads=1, mlp="relu2", tie_embeddings=False),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causality(overrides):
    model = make_model(**overrides)
    idx = random_tokens((2, 16), 100)
    logits, _ = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 100
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(new_logits[:, t], logits[:, t])  # the test can see a change


def test_rope_scores_depend_only_on_relative_position():
    head_dim, shift = 16, 37
    cos, sin = rope_tables(head_dim, 128, theta=10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 10, head_dim), torch.randn(1, 2, 10, head_dim)
    pos = torch.arange(10)
    scores = apply_rope(q, cos[pos], sin[pos]) @ apply_rope(k, cos[pos], sin[pos]).transpose(-2, -1)
    pos = pos + shift
    shifted = apply_rope(q, cos[pos], sin[pos]) @ apply_rope(k, cos[pos], sin[pos]).transpose(-2, -1)
    torch.testing.assert_close(shifted, scores, rtol=0, atol=1e-4)
    # ...but they do depend on the relative position (the same q, k one step further apart).
    one_apart = apply_rope(q[:, :, :1], cos[1:2], sin[1:2]) @ apply_rope(k[:, :, :1], cos[:1], sin[:1]).mT
    assert not torch.allclose(one_apart, scores[:, :, :1, :1], atol=1e-3)


def test_rope_is_rotate_half_layout():
    """Pair (i, i + head_dim/2) turns by angle pos * theta^(-2i/head_dim), as in HF Llama,
    so exported weights need no permutation."""
    head_dim, theta = 8, 500.0
    cos, sin = rope_tables(head_dim, 20, theta)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 20, head_dim)
    half = head_dim // 2
    angle = torch.arange(20.0)[:, None] * theta ** (-2 * torch.arange(half) / head_dim)
    rotated = torch.view_as_real(torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle))
    expected = torch.cat((rotated[..., 0], rotated[..., 1]), dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def reference_rope(x, cos, sin):
    """RoPE as the usual one-liner, written out independently of model.py."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def reference_attention(attn, x, cos, sin):
    """Plain multi-head attention written out by hand, each group of query heads sharing one
    key/value head (k and v repeated per group, as HF's repeat_kv does)."""
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(B, T, KV, D).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(B, T, KV, D).transpose(1, 2)
    if attn.qk_norm:
        q, k = rms_norm(q, attn.q_norm.weight), rms_norm(k, attn.k_norm.weight)
    q, k = reference_rope(q, cos, sin), reference_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads,qk_norm", [(4, False), (2, True), (1, False)])
def test_attention_matches_hand_written_reference(n_kv_heads, qk_norm):
    model = make_model(n_kv_heads=n_kv_heads, qk_norm=qk_norm)
    attn = model.blocks[0].attn
    torch.manual_seed(2)
    x = torch.randn(2, 12, 32)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def reference_forward(model, idx):
    """The whole model from its description: pre-norm blocks, RoPE attention, SwiGLU or
    squared-ReLU feed-forward, final RMSNorm, LM head cut to vocab_size columns."""
    c = model.cfg
    cos, sin = rope_tables(c.head_dim, idx.shape[1], c.rope_theta)
    x = model.tok_emb.weight[idx]
    for block in model.blocks:
        x = x + reference_attention(block.attn, rms_norm(x, block.attn_norm.weight), cos, sin)
        h, mlp = rms_norm(x, block.mlp_norm.weight), block.mlp
        if c.mlp == "glu":
            h = torch.nn.functional.silu(h @ mlp.w_gate.weight.T) * (h @ mlp.w_up.weight.T)
        else:
            h = torch.relu(h @ mlp.w_up.weight.T) ** 2
        x = x + h @ mlp.w_down.weight.T
    return (rms_norm(x, model.norm.weight) @ model.lm_head.weight.T)[..., :c.vocab_size]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_forward_matches_hand_written_reference(overrides):
    model = scramble(make_model(rope_theta=500.0, **overrides))
    with torch.no_grad():  # random norm gains too, so each one must be applied in its place
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    idx = random_tokens((2, 12), 100)
    torch.testing.assert_close(model(idx)[0], reference_forward(model, idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_gradients_match_hand_written_reference(overrides):
    """model.py's plain model: autograd through it gives the gradients of the description above."""
    model = scramble(make_model(rope_theta=500.0, fast_ops=False, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    idx, targets = random_tokens((2, 12), 100), random_tokens((2, 12), 100, seed=2)
    model(idx, targets)[1].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = reference_forward(model, idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_fast_ops_match_the_plain_model(overrides, fast_everywhere):
    """fast_ops.py's modules (oneDNN linear, RMSNorm, RoPE and SwiGLU-down backwards) give the
    outputs and gradients of model.py's plain modules, with the same parameter names."""
    plain, fast = (scramble(make_model(rope_theta=500.0, fast_ops=f, **overrides)) for f in (False, True))
    fast.load_state_dict(plain.state_dict())
    assert {type(m).__name__ for m in fast.modules()} >= {"FastLinear", "FastRMSNorm", "FastAttention", "FastFeedForward"}
    assert not any(type(m).__module__ == "fast_ops" for m in plain.modules())
    idx, targets = random_tokens((2, 12), 100), random_tokens((2, 12), 100, seed=2)
    outputs = []
    for model in (plain, fast):
        logits, loss = model(idx)[0], model(idx, targets)[1]
        loss.backward()
        outputs.append(((logits.detach(), loss.detach()), {name: p.grad for name, p in model.named_parameters()}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    assert outputs[1][1].keys() == outputs[0][1].keys()
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fast_ops_run_only_where_they_pay(monkeypatch):
    """At bench.py's size the oneDNN matmul and the fused SwiGLU-down run; at a tiny size (where
    measured slower) and under autocast the plain F.linear path does; fast_ops=False and
    PLAINLM_FAST_OPS=0 keep model.py's modules."""
    if not fast_ops.ONEDNN:
        pytest.skip("fast_ops are used on x86 CPUs only")
    calls = {"onednn": 0, "swiglu": 0}
    real_linear, real_swiglu = fast_ops.onednn_linear, fast_ops.SwiGLUDown.apply

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(fast_ops, "onednn_linear", count("onednn", real_linear))
    monkeypatch.setattr(fast_ops.SwiGLUDown, "apply", count("swiglu", real_swiglu))
    model = make_model(d_model=128, n_layers=1, n_heads=2, max_seq_len=256)
    with torch.no_grad():
        model(random_tokens((2, 64), 100))  # 128 tokens x 128: below MIN_MATMUL_INPUT
        assert calls == {"onednn": 0, "swiglu": 0}
        model(random_tokens((16, 256), 100))  # 4096 tokens x 128: above
        assert calls["onednn"] > 0 and calls["swiglu"] == 1
        calls.update(onednn=0, swiglu=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(random_tokens((16, 256), 100))
        assert calls == {"onednn": 0, "swiglu": 0}
    assert not any(type(m).__module__ == "fast_ops" for m in make_model(fast_ops=False).modules())
    monkeypatch.setenv("PLAINLM_FAST_OPS", "0")
    assert not any(type(m).__module__ == "fast_ops" for m in make_model().modules())


def test_hooks_and_module_swaps_work_with_fast_ops(fast_everywhere):
    """Every module's forward runs: a hook on w_down fires, and a replaced w_down (here a
    LoRA-style wrapper) is used and trained, even where the fused SwiGLU-down would run."""
    model = make_model()
    seen = []
    model.blocks[0].mlp.w_down.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    idx = random_tokens((2, 8), 100)
    model(idx)
    assert seen == [(2, 8, 32)]

    class LoRA(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.a = base, torch.nn.Parameter(torch.zeros(base.out_features, 4))
            self.b = torch.nn.Parameter(torch.randn(4, base.in_features))

        def forward(self, x):
            return self.base(x) + x @ (self.a @ self.b).T

    model.blocks[1].mlp.w_down = LoRA(model.blocks[1].mlp.w_down)
    model(idx, idx)[1].backward()
    assert model.blocks[1].mlp.w_down.a.grad.abs().sum() > 0


def test_gradients_under_bf16_autocast_match_reference():
    """GPUs train under bf16 autocast: the hand-written backwards must get its dtypes right
    there too (checked with CPU autocast; bf16 rounding makes the tolerance loose)."""
    model = scramble(make_model(), std=0.1)
    idx, targets = random_tokens((2, 12), 100), random_tokens((2, 12), 100, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets)[1]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = reference_forward(model, idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    for name, p in model.named_parameters():
        assert grads[name].dtype == torch.float32, name
        torch.testing.assert_close(grads[name], p.grad, rtol=0.05, atol=0.05 * p.grad.abs().max().item(), msg=name)


def test_custom_backwards_pass_gradcheck():
    """fast_ops.py's hand-written backwards against finite differences in float64 (where its
    linear() uses F.linear), with odd shapes."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, weight))
    x_t = torch.randn(2, 5, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()  # as q under qk_norm
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x_t, weight))
    gate, up = (torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w_down = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, w_down))
    cos, sin = (t.double() for t in rope_tables(6, 4, 100.0))
    q = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: RoPEFunction.apply(q, cos, sin), (q,))


@pytest.mark.skipif(not fast_ops.ONEDNN, reason="oneDNN matmuls are used on x86 CPUs only")
def test_onednn_linear_matches_f_linear():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 96, requires_grad=True)
    weight = torch.randn(160, 96, requires_grad=True)
    out = fast_ops.onednn_linear(x, weight)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    want_out = torch.nn.functional.linear(x, weight)
    want_out.backward(grad)
    for a, b in zip(got, (want_out.detach(), x.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_backward_keeps_few_activations(fast_everywhere):
    """What one forward pass keeps for backward with fast_ops: per layer, the block input and
    normed input of each half, q, k, v, the attention output, and the SwiGLU's gate and up;
    nothing more (model.py's plain RMSNorm and SwiGLU keep four more tensors per layer)."""
    model = make_model(d_model=64, d_ff=256, n_layers=3, max_seq_len=128)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, T, c = 4, 128, model.cfg
    idx = random_tokens((B, T), 100)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    activation = B * T * c.d_model * 4
    big = [n for n in saved.values() if n >= activation]
    per_layer = 8 * activation + 2 * B * T * c.d_ff * 4
    final = 2 * activation + B * T * c.padded_vocab * 4  # final norm's input and output, the logits
    assert sum(big) <= c.n_layers * per_layer + final, (sum(big), c.n_layers * per_layer + final)
    assert len(big) <= c.n_layers * 10 + 3


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model is exactly the multi-head model whose k/v heads are copied per group."""
    gqa = make_model(n_kv_heads=2)
    mha = make_model(n_kv_heads=4)
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("wk.weight", "wv.weight")):  # (2 * head_dim, d) -> (4 * head_dim, d)
            state[name] = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = random_tokens((2, 16), 100)
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], rtol=1e-5, atol=1e-5)


def test_single_kv_head_trains_and_generates():
    model = make_model(n_kv_heads=1)
    assert model.blocks[0].attn.wk.weight.shape == (8, 32)
    idx = random_tokens((2, 16), 100)
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.wk.weight.grad.abs().sum() > 0
    out = model.generate(idx[:, :4], max_new_tokens=10, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :4], idx[:, :4])


def test_tied_embeddings_share_one_tensor():
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert sum(p.data_ptr() == model.tok_emb.weight.data_ptr() for p in model.parameters()) == 1
    untied = make_model(tie_embeddings=False)
    assert len(list(model.parameters())) == len(list(untied.parameters())) - 1
    assert "lm_head.weight" not in dict(model.named_parameters())
    # Still one tensor after an optimizer step (the update reaches both uses).
    idx = random_tokens((2, 8), 100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(idx, idx)[1].backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, model.tok_emb.weight)


def test_untied_embeddings_are_separate():
    model = make_model(tie_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    pointers = [p.data_ptr() for p in model.parameters()]
    assert model.tok_emb.weight.data_ptr() in pointers and model.lm_head.weight.data_ptr() in pointers
    assert not torch.equal(model.lm_head.weight, model.tok_emb.weight)


def test_parameter_names_follow_contract():
    """export.py and checkpoints rely on these exact names."""
    model = make_model(n_layers=1, qk_norm=True, tie_embeddings=False)
    block = ["attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
             "attn.q_norm.weight", "attn.k_norm.weight", "mlp_norm.weight",
             "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight"]
    expected = {"tok_emb.weight", "norm.weight", "lm_head.weight"} | {f"blocks.0.{n}" for n in block}
    assert set(model.state_dict()) == expected
    relu2 = make_model(n_layers=1, mlp="relu2")
    assert {n for n in relu2.state_dict() if ".mlp." in n} == {"blocks.0.mlp.w_up.weight", "blocks.0.mlp.w_down.weight"}
    assert "rope_cos" not in model.state_dict()  # derived from the config, not saved


def hand_param_count(c):
    """Count every weight from the architecture description, independently of the module."""
    hd = c.d_model // c.n_heads
    attn = c.d_model * hd * (c.n_heads + 2 * c.n_kv_heads) + c.n_heads * hd * c.d_model  # wq, wk, wv, wo
    attn += 2 * hd if c.qk_norm else 0  # per-head RMSNorm gains on q and k
    mlp = (3 if c.mlp == "glu" else 2) * c.d_model * c.d_ff
    block = attn + mlp + 2 * c.d_model  # + two RMSNorm gains
    embedding = math.ceil(c.vocab_size / 64) * 64 * c.d_model
    head = 0 if c.tie_embeddings else embedding
    return embedding + c.n_layers * block + c.d_model + head, c.n_layers * block + c.d_model


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(mlp="relu2", tie_embeddings=False),
    dict(n_kv_heads=2, qk_norm=True, d_ff=80),
    dict(n_kv_heads=1, mlp="relu2", qk_norm=True, tie_embeddings=False, vocab_size=64),
])
def test_param_count_matches_hand_formula(overrides):
    model = make_model(**overrides)
    total, non_embedding = hand_param_count(model.cfg)
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == non_embedding


def test_default_sizes():
    # d_ff: 8/3 d (GLU) or 4 d (relu2), rounded up to a multiple of 64.
    assert ModelConfig(d_model=384, n_heads=6).d_ff == 1024
    assert ModelConfig(d_model=256, n_heads=4).d_ff == 704
    assert ModelConfig(d_model=384, n_heads=6, mlp="relu2").d_ff == 1536
    assert ModelConfig(d_model=384, n_heads=6, d_ff=1000).d_ff == 1000
    assert ModelConfig(n_heads=12).n_kv_heads == 12
    assert ModelConfig(vocab_size=65).padded_vocab == 128
    assert ModelConfig(vocab_size=50257).padded_vocab == 50304
    # The 6-layer / 384-wide / 6-head char model quoted in the docs.
    model = Transformer(ModelConfig(vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_seq_len=256, tie_embeddings=True))
    assert model.num_params() == 10_670_976
    assert ModelConfig().tie_embeddings is False  # train.py's default, since its keys come from ModelConfig


@pytest.mark.parametrize("vocab_size,d_model,n_layers,n_heads,tie", [
    (65, 384, 6, 6, True),
    (65, 384, 6, 6, False),
    (50257, 256, 4, 4, True),
    (50257, 768, 2, 12, False),
])
def test_initial_loss_is_log_vocab(vocab_size, d_model, n_layers, n_heads, tie):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                    n_heads=n_heads, tie_embeddings=tie, max_seq_len=64))
    idx, targets = random_tokens((4, 64), vocab_size, seed=1), random_tokens((4, 64), vocab_size, seed=2)
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(vocab_size)) < 0.1


def test_overfits_one_batch():
    model = make_model(vocab_size=50, d_model=64)
    idx, targets = random_tokens((4, 32), 50, seed=1), random_tokens((4, 32), 50, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1


def test_padded_vocab_never_predicted_and_loss_ignores_minus_one():
    model = make_model(vocab_size=65, tie_embeddings=False)
    assert model.lm_head.weight.shape[0] == 128
    with torch.no_grad():  # make the padding rows win every argmax if they were visible
        model.lm_head.weight[65:] = 10.0 * model.lm_head.weight[:65].abs().max()
    idx = random_tokens((2, 16), 65)
    targets = random_tokens((2, 16), 65, seed=2)
    targets[0, :5] = -1
    targets[1, 10:] = -1
    logits, loss = model(idx)[0], model(idx, targets)[1]
    assert logits.shape == (2, 16, 65)
    keep = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    assert loss.dtype == torch.float32
    loss.backward()
    assert model.lm_head.weight.grad[65:].abs().sum() == 0
    out = model.generate(idx[:, :2], max_new_tokens=20, temperature=1.0)
    assert out.max() < 65


def test_eager_and_compiled_agree(fast_everywhere):
    """One compile (fullgraph: no graph breaks) of a tiny GQA + QK-norm model, forward and backward,
    through every fast op (the oneDNN custom op, the autograd Functions, the chunked loss) and with
    activation checkpointing, against the eager model without checkpointing."""
    model = make_model(n_layers=2, n_kv_heads=2, qk_norm=True, max_seq_len=16)
    idx, targets = random_tokens((2, 16), 100), random_tokens((2, 16), 100, seed=2)
    model.checkpoint_every = 2  # block 0 recomputed, block 1 not
    _, loss = torch.compile(model, fullgraph=True)(idx, targets)
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.checkpoint_every = 0
    _, eager_loss = model(idx, targets)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("tie,vocab_size", [(True, 100), (False, 65)])
def test_chunked_loss_equals_the_plain_loss(tie, vocab_size, fast_everywhere):
    """fast_ops's chunked LM head + cross-entropy: the loss and gradients of model.py's
    F.cross_entropy(lm_head(x)), with ignored targets, a padded vocabulary (65 -> 128 rows), tied
    and untied heads, "sum" (evaluation) and two accumulated micro-batches; the logits it never
    holds at once are still returned without targets."""
    plain, fast = (make_model(fast_ops=f, vocab_size=vocab_size, tie_embeddings=tie) for f in (False, True))
    fast.load_state_dict(plain.state_dict())
    batches = [(random_tokens((2, 12), vocab_size, seed=s), random_tokens((2, 12), vocab_size, seed=s + 10)) for s in (1, 2)]
    batches[0][1][0, :5] = -1
    for model in (plain, fast):
        for idx, targets in batches:  # gradient accumulation: half of each micro-batch's loss
            (model(idx, targets)[1] / 2).backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    if vocab_size == 65:
        assert fast.lm_head.weight.grad[65:].abs().sum() == 0  # padded rows: never predicted
    idx, targets = batches[0]
    with torch.no_grad():
        for reduction in ("mean", "sum"):
            torch.testing.assert_close(fast(idx, targets, reduction=reduction)[1], plain(idx, targets, reduction=reduction)[1])
        torch.testing.assert_close(fast(idx)[0], plain(idx)[0])
    for model in (plain, fast):  # GPUs train under bf16 autocast: the same there, within bf16 rounding
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets)[1]
        assert loss.dtype == torch.float32
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0.05, atol=0.02 * p.grad.abs().max().item(), msg=name)


def test_chunked_loss_holds_one_chunk_of_logits(monkeypatch):
    """What the memory saving rests on: with targets, no tensor of (tokens x vocab) is kept for
    backward or allocated at once, only LOSS_CHUNK_LOGITS-sized pieces (counted with a dispatch mode)."""
    if not fast_ops.ONEDNN:
        pytest.skip("fast_ops are used on x86 CPUs only")
    monkeypatch.setattr(fast_ops, "MIN_CHUNKED_LOGITS", 0)
    monkeypatch.setattr(fast_ops, "LOSS_CHUNK_LOGITS", 16 * 1024)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        """The most elements any op's output had."""
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    idx = random_tokens((4, 32), 1000)  # 128 tokens x 1024 padded vocab: 131k logits
    for fast in (False, True):
        Largest.biggest = 0
        with Largest():
            make_model(vocab_size=1000, n_layers=1, fast_ops=fast)(idx, idx)[1].backward()
        if fast:  # the largest are the weight-sized (1024 x 32) head gradient and chunks of 16 x 1024
            assert Largest.biggest == 1024 * 32
        else:
            assert Largest.biggest >= 128 * 1024


@pytest.mark.parametrize("overrides", VARIANTS)
def test_kv_cache_logits_match_full_forward(overrides):
    model = scramble(make_model(**overrides))
    idx = random_tokens((2, 20), 100)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.cfg, 2, model.cfg.max_seq_len, idx.device, torch.float32)
        prefill, _ = model(idx[:, :8], cache=cache)  # the prompt, then one token at a time
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, rtol=1e-4, atol=1e-4)


def greedy_by_recomputing(model, idx, max_new_tokens, window):
    """What generate() must produce: each step re-encodes the context from scratch. Once the
    context fills the window (max_seq_len), generate drops to its newest half and grows again
    (so its cache never has to shift); this reference follows the same context lengths."""
    context = min(idx.shape[1], window)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -context:])
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
        context = max(1, window // 2) if context == window else context + 1
    return idx


@pytest.mark.parametrize("overrides", VARIANTS)
def test_kv_cache_generate_matches_recompute(overrides):
    model = scramble(make_model(max_seq_len=64, **overrides))
    prompt = random_tokens((2, 5), 100)
    with torch.no_grad():
        expected = greedy_by_recomputing(model, prompt, 30, window=64)
    assert len(expected[:, 5:].unique()) > 10  # a varied continuation, not one repeated token
    streamed = []
    assert torch.equal(model.generate(prompt, 30, temperature=0, on_token=streamed.append), expected)
    assert torch.equal(torch.cat(streamed, dim=1), expected[:, 5:])  # each token once, in order
    assert torch.equal(model.generate(prompt, 30, temperature=1.0, top_k=1), expected)


def test_generate_past_max_seq_len():
    """Past max_seq_len generation keeps going on the newest half-window (documented above);
    it never errors and equals the recomputed reference with the same context lengths.
    A prompt longer than the window is cut to its last max_seq_len tokens."""
    model = scramble(make_model(max_seq_len=16, n_kv_heads=2))
    for prompt_len in (5, 20):
        prompt = random_tokens((2, prompt_len), 100)
        out = model.generate(prompt, 40, temperature=0)
        assert out.shape == (2, prompt_len + 40)
        with torch.no_grad():
            assert torch.equal(out, greedy_by_recomputing(model, prompt, 40, window=16))
    tiny_window = make_model(max_seq_len=1)
    assert tiny_window.generate(prompt, 3, temperature=0.5, top_k=5).shape == (2, 23)


def test_generate_sampling_is_seeded_and_respects_top_k():
    model = make_model()
    prompt = random_tokens((1, 4), 100)
    torch.manual_seed(5)
    a = model.generate(prompt, 20, temperature=1.0, top_k=3)
    torch.manual_seed(5)
    b = model.generate(prompt, 20, temperature=1.0, top_k=3)
    assert torch.equal(a, b)
    with torch.no_grad():
        logits, _ = model(a[:, :-1])
    top3 = logits[0, 3:].topk(3).indices  # the 3 best tokens at every generated position
    assert (top3 == a[0, 4:, None]).any(dim=-1).all()


def test_forward_rejects_sequences_longer_than_max_seq_len():
    model = make_model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def hand_flops_per_token(c, seq_len):
    """6 FLOPs per matmul weight per token (2 forward, 4 backward), plus attention's two
    seq_len-long products per head (q.k and p.v), also x3 for forward + backward."""
    hd = c.d_model // c.n_heads
    weights = c.n_layers * (2 * c.d_model * c.n_heads * hd + 2 * c.d_model * c.n_kv_heads * hd
                            + (3 if c.mlp == "glu" else 2) * c.d_model * c.d_ff)
    weights += c.d_model * math.ceil(c.vocab_size / 64) * 64  # LM head (the embedding is a lookup)
    return 6 * weights + 3 * c.n_layers * 4 * seq_len * c.n_heads * hd


@pytest.mark.parametrize("overrides", VARIANTS)
def test_flops_per_token(overrides):
    model = make_model(fast_ops=False, **overrides)  # the FLOP counter sees F.linear, not oneDNN's op
    seq_len = 32
    assert model.flops_per_token(seq_len) == hand_flops_per_token(model.cfg, seq_len)
    # Cross-check against torch's FLOP counter on a real forward + backward. The math SDPA
    # backend is written as matmuls the counter sees (the fused CPU kernel is invisible to it).
    idx = random_tokens((1, seq_len), 100)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx)[1].backward()
    assert counter.get_total_flops() == model.flops_per_token(seq_len) * seq_len


@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(n_heads=8, n_kv_heads=16), "not divisible by n_kv_heads"),
    (dict(d_model=36, n_heads=4), "must be even"),
    (dict(mlp="gelu"), "mlp must be"),
    (dict(n_heads=0), "n_heads must be a positive integer"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(d_ff=0), "d_ff must be a positive integer"),
])
def test_config_rejects_bad_shapes(overrides, message):
    kw = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4)
    kw.update(overrides)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_under_autocast_the_residual_stream_is_fp32_and_the_kv_cache_is_in_autocast_dtype(monkeypatch):
    """Sampling on a GPU runs under bf16 autocast: keys and values are cached in bf16 (half the memory,
    no casts). Weights held in bf16 (FSDP's param_dtype) still give fp32 blocks' inputs, as autocast does."""
    model = scramble(make_model(max_seq_len=32, fast_ops=False))
    caches, inputs = [], []
    real = KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a: (caches.append(a[-1]), real(self, *a))[1])
    prompt = random_tokens((1, 4), 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, 6, temperature=0)
    assert caches == [torch.bfloat16] and out.shape == (1, 10)
    model.generate(prompt, 2, temperature=0)
    assert caches[-1] == torch.float32  # without autocast: the weights' dtype
    model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0].dtype))
    model.to(torch.bfloat16)  # as FSDP's bf16 all-gather hands the weights to forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(prompt, prompt)
    assert inputs == [torch.float32]
