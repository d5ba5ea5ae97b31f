"""The hybrids' combination of attention and memory, against the paper's equations written out (float64)."""

import torch

from titans.model import TitansLM, preset

F64 = torch.float64


def _rms_norm(x, norm):
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def test_mag_output_is_the_memory_gated_by_attention():
    """MAG (Eqs. 26-28): y = SW-Attn*([p] || x), m = M([p] || x) without the persistent positions, o = norm(m) *
    sigmoid(norm(y)): the memory carries the content and attention gates it (docs/memory.md, MQAR)."""
    torch.manual_seed(0)
    mixer = TitansLM(preset("tiny", "mag", vocab_size=32)).to(F64).blocks[0].mixer
    x = torch.randn(2, 21, mixer.attention.dim, dtype=F64)
    y, _ = mixer.attention(x)
    p = mixer.attention.persistent.unsqueeze(0).expand(2, -1, -1)
    m = mixer.memory(torch.cat([p, x], 1))[0][:, p.shape[1]:]
    gate = mixer.gate
    with torch.no_grad():  # non-trivial norm weights, so a swapped pair of norms is seen
        gate.norm_memory.weight.uniform_(0.5, 1.5)
        gate.norm_attention.weight.uniform_(0.5, 1.5)
        expected = _rms_norm(m, gate.norm_memory) * torch.sigmoid(_rms_norm(y, gate.norm_attention))
        out, _ = mixer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_mac_stores_the_residual_stream_and_gates_the_memory_by_attention():
    """MAC (Eqs. 24-25 with the residual of Section 4.4): one whole segment, M_t = M_{t-1}.store(z) with
    z = RMSNorm(x + y) and o = norm(M*_t(z)) * sigmoid(norm(y)), where y is the attention output; checked by feeding
    the mixer's own y back through the memory."""
    torch.manual_seed(0)
    mixer = TitansLM(preset("tiny", "mac", vocab_size=32)).to(F64).blocks[0].mixer
    x = torch.randn(2, mixer.segment_len, mixer.dim, dtype=F64)
    captured = {}
    mixer.attention.out.register_forward_hook(lambda module, args, out: captured.setdefault("y", out))
    gate = mixer.gate
    with torch.no_grad():
        gate.norm_memory.weight.uniform_(0.5, 1.5)
        gate.norm_attention.weight.uniform_(0.5, 1.5)
        out, _ = mixer(x)
        y = captured["y"]
        z = (x + y) * torch.rsqrt((x + y).pow(2).mean(-1, keepdim=True) + torch.finfo(F64).eps)
        m = mixer.memory(z)[0]
        expected = _rms_norm(m, gate.norm_memory) * torch.sigmoid(_rms_norm(y, gate.norm_attention))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_mac_loads_checkpoints_written_before_it_attended_through_causal_self_attention():
    """State dicts with MAC's attention weights at the mixer level (`query.weight`, ..., `persistent`) load into
    `attention.*` and give the same model."""
    torch.manual_seed(0)
    model = TitansLM(preset("tiny", "mac", vocab_size=32))
    old = {}
    for name, tensor in model.state_dict().items():
        for part in ("query.weight", "key.weight", "value.weight", "out.weight", "persistent"):
            name = name.replace(f"mixer.attention.{part}", f"mixer.{part}")
        old[name] = tensor.clone()
    assert "blocks.0.mixer.query.weight" in old and "blocks.0.mixer.persistent" in old
    torch.manual_seed(1)
    fresh = TitansLM(preset("tiny", "mac", vocab_size=32))
    fresh.load_state_dict(old)  # strict: every old key is consumed, every new one filled
    tokens = torch.randint(0, 32, (1, 40))
    torch.testing.assert_close(fresh(tokens)[0], model(tokens)[0], rtol=0, atol=0)
