"""Every variant's production mixer and whole TitansLM equal a naive float64 reference written from the paper's
equations (tests/reference_models.py), whole and streamed in pieces; the initialisation the docstrings promise is
pinned. All parameters are randomised first (MAC's zero memory output projection, M_0's zero last layer and unit
norm weights would hide a wrong read path, a swapped gate or a dropped norm)."""

import math

import pytest
import torch

from reference_models import lm_reference, mixer_reference
from titans.model import VARIANTS, TitansConfig, TitansLM, build_mixer

F64 = torch.float64
ATOL = 1e-10
PERSISTENT_VARIANTS = ("mac", "mag", "mal", "lmm")


def config(variant, **kw):
    # T in the tests (1, 4, 13, 17) is a multiple of none of window 5, segment 6, chunk 4 together, and the segment
    # is not a multiple of the chunk (MAC reads a memory with pending tokens).
    shape = dict(variant=variant, vocab_size=11, dim=16, layers=2, heads=2, window=5, segment_len=6, chunk_size=4,
                 num_persistent=3, ffn_hidden=24)
    return TitansConfig(**{**shape, **kw})


def randomise(module, seed):
    """Every parameter drawn afresh: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), the rest N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=F64)
            owner = name.split(".")[-2] if "." in name else ""
            if name.endswith("ln_weight") or ("norm" in owner and name.endswith("weight")):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.5 * noise)
    return module


def mixer_of(cfg, seed=0):
    torch.manual_seed(seed)
    return randomise(build_mixer(cfg).to(F64), seed)


def run_in_pieces(module, inputs, pieces):
    state, outputs, start = None, [], 0
    for n in pieces:
        out, state = module(inputs[:, start:start + n], state)
        outputs.append(out)
        start += n
    assert start == inputs.shape[1]
    return torch.cat(outputs, 1)


CASES = [pytest.param(variant, persistent, id=f"{variant}-p{persistent}") for variant in VARIANTS
         for persistent in ((0, 3) if variant in PERSISTENT_VARIANTS else (0,))]


@pytest.mark.parametrize("variant,persistent", CASES)
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 4), (2, 13), (1, 17)])
def test_mixer_equals_reference(variant, persistent, batch, length):
    cfg = config(variant, num_persistent=persistent)
    mixer = mixer_of(cfg, seed=length)
    x = torch.randn(batch, length, cfg.dim, dtype=F64, generator=torch.Generator().manual_seed(length))
    expected = mixer_reference(mixer, cfg, x)
    with torch.no_grad():
        out, _ = mixer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant,persistent", CASES)
def test_mixer_streamed_in_pieces_equals_reference(variant, persistent):
    cfg = config(variant, num_persistent=persistent)
    mixer = mixer_of(cfg, seed=1)
    x = torch.randn(2, 17, cfg.dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = mixer_reference(mixer, cfg, x)
    with torch.no_grad():
        for pieces in ([1, 5, 2, 9], [7, 10]):  # across segment (6), chunk (4) and window (5) boundaries
            torch.testing.assert_close(run_in_pieces(mixer, x, pieces), expected, rtol=0, atol=ATOL, msg=str(pieces))


@pytest.mark.parametrize("trains", [False, True], ids=["memory-by-its-output", "memory-through-attention"])
def test_mal_gradients_equal_reference(trains):
    """MAL's gradient paths (attention_trains_memory): every parameter's gradient equals the reference's."""
    cfg = config("mal", attention_trains_memory=trains)
    mixer = mixer_of(cfg, seed=4)
    x = torch.randn(2, 13, cfg.dim, dtype=F64, generator=torch.Generator().manual_seed(4))
    cotangent = torch.randn(2, 13, cfg.dim, dtype=F64, generator=torch.Generator().manual_seed(5))
    expected = torch.autograd.grad((mixer_reference(mixer, cfg, x) * cotangent).sum(), list(mixer.parameters()))
    got = torch.autograd.grad((mixer(x)[0] * cotangent).sum(), list(mixer.parameters()))
    for (name, _), want, have in zip(mixer.named_parameters(), expected, got):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-9, msg=name)


# The ablation switches and other knobs each reference follows: a linear memory without momentum, forgetting,
# convolutions, RoPE, surprise clipping or chunk-lr normalisation; a deep memory at chunk 1; memory heads != heads.
SWITCHES = [
    dict(memory_depth=1, momentum=False, forgetting=False, memory_conv=False, rope=False, max_grad_norm=None,
         normalize_chunk_lr=False),
    dict(memory_depth=3, chunk_size=1, max_grad_norm=0.5, window=1, segment_len=1),
    dict(memory_heads=4, chunk_size=3, window=20, segment_len=20),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=["plain", "deep-online", "heads4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixer_equals_reference_with_switches(variant, switches):
    cfg = config(variant, **switches)
    mixer = mixer_of(cfg, seed=2)
    x = torch.randn(2, 9, cfg.dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    expected = mixer_reference(mixer, cfg, x)
    with torch.no_grad():
        out, _ = mixer(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(run_in_pieces(mixer, x, [2, 3, 4]), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_logits_equal_reference_whole_and_streamed(variant, tie):
    cfg = config(variant, tie_embeddings=tie)
    torch.manual_seed(3)
    model = randomise(TitansLM(cfg).to(F64), 3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    expected = lm_reference(model, tokens)
    with torch.no_grad():
        logits, _ = model(tokens)
        torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(run_in_pieces(model, tokens, [3, 1, 7]), expected, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_embedding_initialisation_is_pinned(tie):
    """Untied: embeddings ~ N(0, 1), the scale of the normalised activations they feed; tied: the embedding is the
    LM head, ~ N(0, 0.02^2) (GPT-2), so the first logits are small (model.py)."""
    torch.manual_seed(0)
    model = TitansLM(config("swa", vocab_size=512, dim=64, layers=1, tie_embeddings=tie))
    weight = model.embed.weight
    std = 0.02 if tie else 1.0
    assert abs(weight.mean().item()) < 0.05 * std
    assert abs(weight.std().item() - std) < 0.03 * std  # 32768 draws: the sample std is within ~0.4%
    assert (model.head.weight is weight) == tie
    if not tie:  # the untied head keeps nn.Linear's default U(-1/sqrt(dim), 1/sqrt(dim))
        bound = 1 / math.sqrt(64)
        assert model.head.weight.abs().max() <= bound and model.head.weight.abs().max() > 0.9 * bound


def test_memory_initialisation_is_pinned():
    """M_0 reads 0 (zero last layer, random hidden layers); the gates start at init_lr, init_momentum, init_decay."""
    def logit(p):
        return math.log(p / (1 - p))

    for variant in PERSISTENT_VARIANTS:
        torch.manual_seed(0)
        cfg = config(variant, init_lr=0.2, max_lr=0.5, init_momentum=0.3, init_decay=0.01)
        memory = build_mixer(cfg).memory
        names = list(memory.initial_weights)
        assert not memory.initial_weights[names[-1]].any()
        assert all(memory.initial_weights[n].std() > 0.1 for n in names[:-1])
        for linear, value in ((memory.to_lr, 0.2 / 0.5), (memory.to_momentum, 0.3), (memory.to_decay, 0.01)):
            torch.testing.assert_close(linear.bias, torch.full_like(linear.bias, logit(value)))
            assert linear.weight.std() < 0.03
