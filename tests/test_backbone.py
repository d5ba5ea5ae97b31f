"""TitansModel, the backbone on continuous inputs (B, T, features): shapes, exact streaming, causality, the one-line
errors; TitansLM is the same backbone behind a token embedding and keeps its parameter names."""

import pytest
import torch

from titans.model import TitansLM, TitansModel, preset

F64 = torch.float64
VARIANTS = ("mac", "mag", "mal", "lmm", "swa", "deltanet")  # every mixer family; test_model covers all with tokens


def backbone(variant, features=3):
    torch.manual_seed(0)
    return TitansModel(preset("tiny", variant), features).to(F64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_streaming_and_causality(variant):
    model = backbone(variant)
    x = torch.randn(2, 37, 3, dtype=F64)
    whole, state = model(x)
    assert whole.shape == (2, 37, 32) and state.position == 37
    pieces, state, start = [], None, 0
    for n in (16, 5, 1, 15):  # across chunk (8), window and segment (16) ends
        hidden, state = model(x[:, start:start + n], state)
        pieces.append(hidden)
        start += n
    assert torch.allclose(torch.cat(pieces, 1), whole, rtol=0, atol=1e-10)
    changed = x.clone()
    changed[:, 20:] = torch.randn_like(changed[:, 20:])
    after, _ = model(changed)
    assert torch.equal(after[:, :20], whole[:, :20]) and not torch.allclose(after[:, 20:], whole[:, 20:])


def test_step_continues_like_forward():
    model = backbone("mag")
    x = torch.randn(2, 12, 3, dtype=F64)
    whole, _ = model(x)
    hidden, state = model(x[:, :4])
    steps = [hidden]
    for t in range(4, 12):
        hidden, state = model.step(x[:, t:t + 1], state)
        steps.append(hidden)
    assert torch.allclose(torch.cat(steps, 1), whole, rtol=0, atol=1e-10)


def test_bad_inputs_are_one_line_errors():
    model = backbone("lmm")
    for bad, words in ((torch.randn(2, 5, 4, dtype=F64), "(batch, time, 3)"),
                       (torch.randint(0, 3, (2, 5, 3)), "floating"),
                       (torch.randn(0, 5, 3, dtype=F64), "batch 0")):
        with pytest.raises(ValueError, match=r"\(batch, time, 3\)|batch 0") as info:
            model(bad)
        assert "\n" not in str(info.value), words
    with pytest.raises(ValueError, match="in_features"):
        TitansModel(preset("tiny", "lmm"), 0)
    _, lm_state = TitansLM(preset("tiny", "swa")).to(F64)(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="different model"):
        model(torch.randn(2, 3, 3, dtype=F64), lm_state)


def test_lm_is_embedding_backbone_head_with_its_old_parameter_names():
    lm = TitansLM(preset("tiny", "mac", vocab_size=32))
    assert isinstance(lm, TitansModel)
    assert list(dict(lm.named_children())) == ["embed", "blocks", "norm", "head"]
    assert {k.split(".")[0] for k in lm.state_dict()} == {"embed", "blocks", "norm", "head"}
    tokens = torch.randint(0, 32, (1, 9))
    hidden, _ = TitansModel.forward(lm, tokens)
    assert torch.equal(lm.head(hidden), lm(tokens)[0])
