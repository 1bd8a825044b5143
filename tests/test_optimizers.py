"""The optimizer menu: each one learns on real text and resumes bit-exactly; Muon's parameter groups,
its Newton-Schulz step and its AdamW part; the combinations that are refused with one line."""
import json
import os
import shutil

import pytest
import torch

import optimizers
import train
from model import Transformer
from test_train import assert_same_state, final_state, metrics, run_train, tiny_args

# Learning rates that learn at this tiny shape within 20 steps (sgd needs a far larger one).
OPTIMIZERS = {"adamw": {}, "nadamw": {}, "sgd": {"lr": 0.3}, "signsgd": {"lr": 3e-3},
              "sfadamw": {"scheduler": "constant"}, "muon": {"muon_lr": 0.05}}


def optimizer_args(data_dir, out_dir, name):
    return tiny_args(data_dir, out_dir, name, optimizer=name, steps=20, save_every=10, **OPTIMIZERS[name])


@pytest.fixture(scope="module")
def straight_runs(hamlet_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("optimizers"))
    for name in OPTIMIZERS:
        assert run_train(optimizer_args(hamlet_data, out, name)) == 0
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_learns_on_real_text(straight_runs, name):
    records = metrics(os.path.join(straight_runs, name))
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert final_state(os.path.join(straight_runs, name))["config"]["optimizer"] == name
    assert losses[-1] < losses[0] - 0.7  # from chance (~4.2)
    # Below the unigram plateau (~3.25); plain SGD, slowest on Transformers, only just reaches it in 20 steps.
    assert len(vals) == 2 and vals[1] < vals[0] and vals[1] < (3.3 if name == "sgd" else 3.1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_resumes_bit_exactly(straight_runs, hamlet_data, tmp_path, name):
    straight = os.path.join(straight_runs, name)
    os.makedirs(tmp_path / name)
    shutil.copy(os.path.join(straight, "ckpt_0000010.pt"), tmp_path / name)
    assert run_train(optimizer_args(hamlet_data, str(tmp_path), name)) == 0
    ours, reference = final_state(str(tmp_path / name)), final_state(straight)
    assert_same_state(reference, ours)
    # Schedule-free keeps its averaging weights and step count in the groups. (json: a loaded tuple comes back a list.)
    assert ours["optimizer"]["state"] and json.dumps(ours["optimizer"]["param_groups"]) == \
        json.dumps(reference["optimizer"]["param_groups"])
    assert [r["train_loss"] for r in metrics(str(tmp_path / name))] == \
        [r["train_loss"] for r in metrics(straight) if r["step"] > 10]


def test_schedule_free_checkpoints_hold_the_averaged_weights(straight_runs):
    """What sample.py and export.py load is the point schedule-free AdamW evaluates, x, not the one it trains at."""
    ckpt = final_state(os.path.join(straight_runs, "sfadamw"))
    assert all(group["train_mode"] is False for group in ckpt["optimizer"]["param_groups"])
    val = [r["val_loss"] for r in metrics(os.path.join(straight_runs, "sfadamw")) if "val_loss" in r][-1]
    cfg = ckpt["config"]
    model = Transformer(train.model_config(cfg, ckpt["meta"]["vocab_size"]))
    model.load_state_dict(ckpt["model"])
    tokens = train.open_tokens(cfg["data_dir"], "val", ckpt["meta"])
    assert train.evaluate(model, tokens, cfg, torch.device("cpu"), None, rank=0, world=1) == pytest.approx(val, rel=1e-5)


def test_muon_takes_the_matrices_inside_the_blocks_and_adamw_the_rest():
    for tied in (False, True):
        cfg = train.load_config(None, ["--optimizer=muon", "--d_model=64", "--n_layers=2", "--n_heads=4", "--lr=2e-3",
                                       "--muon_lr=0.03", "--weight_decay=0.1", "--muon_weight_decay=0.01",
                                       f"--tie_embeddings={tied}"])
        raw = Transformer(train.model_config(cfg, 65))
        named = dict(raw.named_parameters())
        optimizer = train.make_optimizer(raw, cfg)
        names = {id(p): n for n, p in named.items()}
        groups = [({names[id(p)] for p in g["params"]}, g) for g in optimizer.param_groups]
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)  # each parameter exactly once
        (muon, muon_group), (decay, decay_group), (gains, gains_group) = groups
        assert muon_group["muon"] and not decay_group["muon"] and not gains_group["muon"]
        assert muon == {n for n, p in named.items() if n.startswith("blocks.") and p.dim() == 2} and len(muon) == 2 * 7
        assert decay == ({"tok_emb.weight"} if tied else {"tok_emb.weight", "lm_head.weight"})
        assert gains == {n for n, p in named.items() if p.dim() == 1}
        assert (muon_group["lr"], muon_group["weight_decay"]) == (0.03, 0.01)
        assert (decay_group["lr"], decay_group["weight_decay"]) == (2e-3, 0.1)
        assert (gains_group["lr"], gains_group["weight_decay"]) == (2e-3, 0.0)


def test_muon_orthogonalises_in_fp32_on_cpu():
    torch.manual_seed(0)
    g = torch.randn(96, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # singular values spread 100x, tall
    o = optimizers.orthogonalize(g, steps=5)
    assert o.dtype == torch.float32 and o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3  # every direction of g kept, at about unit scale
    # the same singular vectors as g's (U V^T), up to the singular values' spread
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.95
    # A stack of matrices (how Muon does all of one shape at once) gives each one's own result.
    stack = torch.stack([g, 3 * g.flip(0), torch.randn(96, 32)])
    for one, together in zip(stack, optimizers.orthogonalize(stack, steps=5)):
        torch.testing.assert_close(together, optimizers.orthogonalize(one, steps=5), rtol=1e-4, atol=1e-5)


def test_muon_adamw_part_is_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    ours = optimizers.Muon([{"params": params, "lr": 1e-2, "weight_decay": 0.1}], betas=(0.9, 0.95), eps=1e-8)
    reference = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_muon_update_has_the_chosen_scale():
    """One step from zero momentum (no Nesterov): W moves by lr x scale x orthogonalize(grad)."""
    for adjust, scale in (("original", 2.0), ("match_rms_adamw", 0.2 * 64 ** 0.5)):
        w = torch.zeros(64, 16, requires_grad=True)
        w.grad = torch.randn(64, 16)
        muon = optimizers.Muon([{"params": [w], "muon": True, "lr": 0.1}], momentum=0.0, nesterov=False, adjust_lr=adjust)
        muon.step()
        torch.testing.assert_close(w.detach(), -0.1 * scale * optimizers.orthogonalize(w.grad, 5))


@pytest.mark.parametrize("overrides, env, message", [
    (["--optimizer=sfadamw"], {}, "optimizer 'sfadamw' is schedule-free: set --scheduler=constant"),
    (["--optimizer=muon", "--parallelism=fsdp"], {"WORLD_SIZE": "2"},
     "optimizer 'muon' needs whole weight matrices and FSDP2 shards them: use --parallelism=ddp"),
    (["--optimizer=adam"], {}, "config key 'optimizer' must be one of adamw, nadamw, sgd, signsgd, sfadamw, muon"),
    (["--muon_momentum=1.0"], {}, r"config key 'muon_momentum' must be in \[0, 1\), got 1.0"),
    (["--muon_lr_adjust=rms"], {}, "config key 'muon_lr_adjust' must be one of original, match_rms_adamw"),
])
def test_impossible_optimizer_settings_are_one_line(monkeypatch, overrides, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=message) as e:
        train.load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_sfadamw_without_schedulefree_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "schedulefree", None)  # as if not installed
    with pytest.raises(SystemExit, match="needs the schedulefree package: pip install schedulefree$"):
        train.load_config(None, ["--optimizer=sfadamw", "--scheduler=constant"])


def test_branching_into_another_optimizer_is_refused(straight_runs, hamlet_data, tmp_path):
    ckpt = os.path.join(straight_runs, "adamw", "ckpt_0000010.pt")
    with pytest.raises(SystemExit, match="trained with optimizer 'adamw', this run uses 'muon'"):
        run_train(tiny_args(hamlet_data, str(tmp_path), "branch", optimizer="muon", init_from=ckpt))
