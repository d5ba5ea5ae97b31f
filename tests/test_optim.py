"""AdamW parameter groups, decoupled weight decay and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from titans.config import OptimConfig
from titans.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups


class RMSNorm(nn.Module):
    """A custom norm, recognised by its class name."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dim))  # 2-D on purpose: excluded because it is a norm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rms = RMSNorm(4)
        self.persistent = nn.Parameter(torch.randn(3, 4))
        self.persistent.no_weight_decay = True
        self.memory_init = nn.Parameter(torch.randn(4, 4))
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: counts as an embedding


def ids(params):
    return {id(p) for p in params}


def test_param_groups_split_decay_and_no_decay():
    net = Net()
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([net.proj.weight, net.memory_init])
    assert ids(no_decay["params"]) == ids([net.embed.weight, net.proj.bias, net.norm.weight, net.norm.bias,
                                           net.rms.scale, net.persistent])
    assert len(no_decay["params"]) == 6  # the tied weight appears once


def test_weight_decay_only_on_decayed_params():
    torch.manual_seed(0)
    net = Net()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5)
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == cfg.betas and opt.defaults["eps"] == cfg.eps
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: the only change is the decoupled decay
    opt.step()
    for name, p in net.named_parameters():
        factor = 1 - 0.1 * 0.5 if name in ("proj.weight", "memory_init") else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7, msg=name)


def test_fused_on_cpu():
    opt = build_optimizer(nn.Linear(3, 3), OptimConfig())
    assert opt.defaults["fused"] is True


def test_no_trainable_parameters():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, OptimConfig())


def lrs(cfg: OptimConfig, total: int, steps: int) -> list[float]:
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total_steps=total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(lr=2.0, warmup_steps=4, min_lr_ratio=0.1)
    got = lrs(cfg, total=12, steps=16)
    expected = [0.5, 1.0, 1.5, 2.0]  # linear warmup
    expected += [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8))) for k in range(8)]  # cosine
    expected += [0.2] * 4  # min_lr_ratio * lr from the last step on
    assert got == pytest.approx(expected)
    assert got[8] == pytest.approx(2.0 * 0.55)  # half way through the decay


def test_no_warmup_starts_at_peak():
    assert lrs(OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0), total=4, steps=5) == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_scheduler_state_round_trip():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.2)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, OptimConfig(lr=1.0, warmup_steps=7), total_steps=100)  # other settings
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(6):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(warmup_steps=0, total_steps=0, min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupCosine(warmup_steps=0, total_steps=5, min_lr_ratio=1.5)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_persistent_tokens_and_initial_memory_are_not_decayed(variant):
    from titans.model import TitansLM, preset

    model = TitansLM(preset("tiny", variant)).to(torch.float64)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, undecayed = ({names[id(p)] for p in g["params"]} for g in param_groups(model, weight_decay=0.1))
    marked = {n for n in names.values() if n.endswith("persistent") or ".initial_weights." in n}
    assert marked and marked <= undecayed and not marked & decayed
    assert any(n.endswith("to_q.weight") for n in decayed)
