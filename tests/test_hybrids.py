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


def test_mac_output_is_attention_gated_by_the_memory():
    """MAC (Eq. 25): o = y (x) M*_t(y), the attention output (which has read the memory's h) gated by the memory."""
    torch.manual_seed(0)
    gate = TitansLM(preset("tiny", "mac", vocab_size=32)).blocks[0].mixer.gate
    y, m = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        gate.norm_memory.weight.uniform_(0.5, 1.5)
        gate.norm_attention.weight.uniform_(0.5, 1.5)
        torch.testing.assert_close(gate(y, m), _rms_norm(y, gate.norm_attention) * torch.sigmoid(
            _rms_norm(m, gate.norm_memory)))
