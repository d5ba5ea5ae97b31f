"""Evaluation: streamed scores against whole-sequence ones and hand counts, the needle grid with an oracle and a blind
model, held-out text (loss and bits per byte against an independent computation), memory inspection."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titans import evaluate
from titans.batches import Batch
from titans.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from titans.cli import main
from titans.config import RunConfig
from titans.data import corpus
from titans.data.corpus import Source, parse_gutenberg_files, prepare
from titans.data.synthetic import NeedleTask
from titans.evaluate import LoadedRun
from titans.inspection import inspect_memory
from titans.model import TitansConfig, TitansLM
from titans.scoring import Scores, score_batch
from titans.train import train
from titans.typed_yaml import from_dict, to_dict


def config(task: str = "pattern", **model) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"variant": "mac", "vocab_size": 16, "dim": 16, "layers": 2, "heads": 2, "window": 8,
                  "segment_len": 8, "chunk_size": 4, "num_persistent": 2, **model},
        "data": {"task": task, "kwargs": {"max_period": 4} if task == "pattern" else {}},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 16},
        "eval": {"batch_size": 4, "samples": 4, "lengths": [16, 32], "depths": [0.0, 1.0], "chunk_len": 8}})


def loaded(model: nn.Module, run_config: RunConfig, tmp_path: Path) -> LoadedRun:
    return LoadedRun(model, run_config, 0, tmp_path, tmp_path, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ scores
class FixedLogits(nn.Module):
    """Predicts token `prediction[t]` at every position t of a 4-token stream (a streaming model with a clock)."""

    def __init__(self, prediction: list[int], vocab: int = 4):
        super().__init__()
        self.prediction, self.vocab = prediction, vocab

    def forward(self, tokens, state=None):
        start = state or 0
        logits = torch.full((*tokens.shape, self.vocab), -5.0)
        for t in range(tokens.shape[1]):
            logits[:, t, self.prediction[start + t]] = 5.0
        return logits, start + tokens.shape[1]


def test_scores_by_hand():
    targets = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    batch = Batch(torch.zeros_like(targets), targets, mask)
    scores = score_batch(FixedLogits([0, 1, 1, 1]), batch, piece_len=3)
    # row 0: positions 0, 1 right, 3 wrong; row 1: positions 1, 2 right
    assert (scores.correct, scores.count, scores.sequences_correct, scores.sequences) == (4, 5, 1, 2)
    right = -math.log(math.exp(5) / (math.exp(5) + 3 * math.exp(-5)))
    wrong = -math.log(math.exp(-5) / (math.exp(5) + 3 * math.exp(-5)))
    assert scores.loss == pytest.approx((4 * right + wrong) / 5)
    assert scores.accuracy == 0.8 and scores.sequence_accuracy == 0.5
    merged = Scores.from_tensor((scores + scores).to_tensor())
    assert merged.count == 10 and merged.loss == pytest.approx(scores.loss)


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer"])
def test_streamed_scores_equal_one_pass(variant):
    torch.manual_seed(0)
    model = TitansLM(config(variant=variant).model).eval()
    inputs = torch.randint(0, 16, (3, 24))
    targets = torch.randint(0, 16, (3, 24))
    mask = torch.rand(3, 24) < 0.5
    batch = Batch(inputs, targets, mask)
    streamed, whole = score_batch(model, batch, 5), score_batch(model, batch, 24)
    assert streamed.loss == pytest.approx(whole.loss, rel=1e-5)
    assert (streamed.correct, streamed.sequences_correct) == (whole.correct, whole.sequences_correct)
    logits, _ = model(inputs)
    reference = F.cross_entropy(logits[mask], targets[mask])
    assert whole.loss == pytest.approx(reference.item(), rel=1e-5)
    assert whole.correct == int(((logits.argmax(-1) == targets) & mask).sum())


# ------------------------------------------------------------------------------------------------ needles
class NeedleOracle(nn.Module):
    """Remembers the token after the needle (across calls, in its state) and predicts it everywhere."""

    def __init__(self, task: NeedleTask, blind: bool = False):
        super().__init__()
        self.task, self.blind = task, blind

    def forward(self, tokens, state=None):
        found, previous = state if state is not None else (torch.zeros(tokens.shape[0], dtype=torch.long),
                                                           torch.full((tokens.shape[0],), -1))
        logits = torch.zeros(*tokens.shape, self.task.vocab_size)
        for t in range(tokens.shape[1]):
            found = torch.where(previous == self.task.needle, tokens[:, t], found)
            previous = tokens[:, t]
            logits[torch.arange(tokens.shape[0]), t, self.task.query if self.blind else found] = 1.0
        return logits, (found, previous)


@pytest.mark.parametrize("blind, expected", [(False, 1.0), (True, 0.0)])
def test_needle_grid_streams_the_context(tmp_path, blind, expected):
    run_config = config("needle", vocab_size=32)
    run = loaded(NeedleOracle(NeedleTask(vocab_size=32, seq_len=8), blind), run_config, tmp_path)
    result = evaluate.eval_needle(run, tmp_path, lengths=[16, 40], depths=[0.0, 0.5, 1.0], samples=3)
    assert result["accuracy"] == [[expected] * 3] * 2 and result["task"] == "synthetic"
    saved = json.loads((tmp_path / "needle_synthetic.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and (tmp_path / "needle_synthetic.png").is_file()


def test_synthetic_accuracy_by_length_writes_json_and_plot(tmp_path):
    torch.manual_seed(0)
    run_config = config("copy", vocab_size=16)
    run_config = from_dict(RunConfig, {**to_dict(run_config), "data": {"task": "copy", "kwargs": {"length": 8}}})
    run = loaded(TitansLM(run_config.model).eval(), run_config, tmp_path)
    result = evaluate.eval_synthetic(run, tmp_path, [16, 40], samples=4)
    assert sorted(result["by_length"]) == [16, 40]
    assert all(r["scored"] == 4 * 8 for r in result["by_length"].values())  # the copy is scored, not the gap
    assert (tmp_path / "copy.json").is_file() and (tmp_path / "copy.png").is_file()
    with pytest.raises(ValueError, match="lengths >= 16"):
        evaluate.evaluate_synthetic(run, [12], samples=1)


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_load_run_reads_checkpoints_of_older_releases(tmp_path, variant):
    """`titans eval`'s path upgrades a checkpoint of an older release and computes what it did: MAC's attention
    weights at the mixer level (before it attended through CausalSelfAttention), MAL without `series_gate` (g = 1).
    Resuming training from the MAL one fails with a one-line error: its optimizer state lacks the new parameter."""
    run_config = config(variant=variant)
    torch.manual_seed(0)
    model = TitansLM(run_config.model.replace(series_gate_init=1.0)).eval()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("series_gate")}
    if variant == "mac":
        old = {k.replace("mixer.attention.", "mixer."): v for k, v in old.items()}
        assert "blocks.0.mixer.query.weight" in old
    old_optimizer = torch.optim.AdamW(p for n, p in model.named_parameters() if not n.endswith("series_gate"))
    model.state_dict = lambda: old  # save exactly the old release's keys
    path = save_checkpoint(tmp_path / "run", 1, model, old_optimizer, extra={"config": to_dict(run_config)})
    run = evaluate.load_run(path)
    tokens = torch.randint(0, 16, (2, 20))
    torch.testing.assert_close(run.model(tokens)[0], TitansLM.forward(model, tokens)[0], rtol=0, atol=0)
    fresh = TitansLM(run_config.model)
    optimizer = torch.optim.AdamW(fresh.parameters())
    if variant == "mal":
        assert all(torch.equal(b.mixer.series_gate, torch.ones(16)) for b in run.model.blocks)
        with pytest.raises(CheckpointError, match="series_gate and 1 more parameters, so its optimizer state cannot"):
            load_checkpoint(path, fresh, optimizer, restore_rng=False)
    else:
        assert load_checkpoint(path, fresh, optimizer, restore_rng=False)["step"] == 1


def test_load_run_needs_a_training_checkpoint(tmp_path):
    model = TitansLM(config().model)
    path = save_checkpoint(tmp_path / "run", 1, model, extra={})
    with pytest.raises(CheckpointError, match="no run config"):
        evaluate.load_run(path)
    path = save_checkpoint(tmp_path / "other", 1, model, extra={"config": to_dict(config(dim=32))})
    with pytest.raises(CheckpointError, match="do not fit the saved model config"):
        evaluate.load_run(path)


# ------------------------------------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A byte-level corpus built by titans.data.corpus.prepare from a fixture archive."""
    root = tmp_path_factory.mktemp("corpus")
    books = {"train_a": "the memory of the titan is long and the memory is deep. " * 30,
             "train_b": "a neural memory learns at test time; the memory of the past. " * 30,
             "held_val": "the validation book tells of other things entirely, é and ü. " * 12,
             "held_test": "the test book is different again. " * 12}
    archive = root / "books-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for name, text in books.items():
            data = text.encode()
            info = tarfile.TarInfo(f"books-1.0/texts/{name}_gut.txt")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    source = Source("books", "books==1.0", "*/texts/*_gut.txt", parse_gutenberg_files, validation=("held_val",),
                    test=("held_test",))
    patch = pytest.MonkeyPatch()
    patch.setattr(corpus, "fetch", lambda spec, **kwargs: archive)
    prepare(root / "data", tokenizer="bytes", sources=[source])
    patch.undo()
    return root / "data"


def text_config(data_dir: Path) -> RunConfig:
    return from_dict(RunConfig, {**to_dict(config(vocab_size=256)),
                                 "data": {"task": "text", "tokenizer": "byte", "data_dir": str(data_dir)}})


def test_held_out_text_loss_and_bits_per_byte(tmp_path, text_corpus):
    torch.manual_seed(0)
    run_config = text_config(text_corpus)
    run = loaded(TitansLM(run_config.model).eval(), run_config, tmp_path)
    result = evaluate.eval_lm(run, tmp_path, seq_len=16, max_tokens=160, batch_size=3)
    assert result["tokens"] == 160 and len(result["loss_by_position"]) == 16

    text = "the validation book tells of other things entirely, é and ü. " * 12
    ids = torch.tensor(list(text.encode()))[:161]
    windows = torch.stack([ids[i * 16:(i + 1) * 16 + 1] for i in range(10)])
    logits, _ = run.model(windows[:, :-1])  # one pass, no streaming
    reference = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:])
    assert result["loss"] == pytest.approx(reference.item(), rel=1e-5)
    assert result["bytes_per_token"] == 1.0  # byte tokens
    assert result["bits_per_byte"] == pytest.approx(reference.item() / math.log(2), rel=1e-5)
    assert (tmp_path / "lm_validation.json").is_file() and (tmp_path / "lm_validation.png").is_file()


def test_text_run_trains_evaluates_and_generates(tmp_path, text_corpus, capsys):
    run_dir = tmp_path / "run"
    train(text_config(text_corpus), run_dir, progress=False)
    capsys.readouterr()
    assert (run_dir / "tokenizer.json").is_file()  # generation does not depend on the corpus directory
    run = evaluate.load_run(run_dir)
    tokenizer = evaluate.run_tokenizer(run)
    assert tokenizer.decode(tokenizer.encode("memory é")) == "memory é"

    assert main(["generate", str(run_dir), "--prompt", "the memory", "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.encode()) >= 6  # six bytes decoded (invalid UTF-8 shown as U+FFFD)
    assert main(["eval", str(run_dir), "--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "eval" / "lm_validation.json").read_text())
    assert result["tokens"] == 64 and f"bits/byte {result['bits_per_byte']:.4f}" in out
    assert main(["inspect", str(run_dir), "--text", "the memory of the titan"]) == 0
    assert json.loads((run_dir / "inspect" / "memory.json").read_text())["tokens"] == 23
    with pytest.raises(ValueError, match="needs a text run"):
        evaluate.evaluate_text(loaded(run.model, config(vocab_size=256), tmp_path))


# ------------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_memory_learns_each_piece_it_reads(variant):
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant=variant, vocab_size=16, dim=64, layers=2, heads=2, segment_len=8,
                                  chunk_size=4, num_persistent=2)).eval()
    records = inspect_memory(model, torch.randint(0, 16, (30,)), piece_len=8)
    assert [(r.piece, r.layer) for r in records] == [(p, layer) for p in range(4) for layer in range(2)]
    assert [r.tokens for r in records if r.layer == 0] == ([8, 8, 8, 6] if variant == "mac" else [10, 8, 8, 6])
    assert all(r.inner_loss_after < r.inner_loss_before and r.weight_change > 0 for r in records)


def test_memory_weight_change_matches_the_state():
    """Piece 0's weight change equals the distance between M_0 and the weights in the state after it."""
    from titans.ops import current_weights

    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant="lmm", vocab_size=16, dim=16, layers=1, heads=2, chunk_size=4)).eval()
    tokens = torch.randint(0, 16, (1, 12))
    record = inspect_memory(model, tokens, piece_len=12)[0]
    memory = model.blocks[0].mixer.memory
    with torch.no_grad():
        _, state = model(tokens)
        after = current_weights(memory.memory, state.layers[0].memory, memory.max_grad_norm, memory.normalize_chunk_lr)
        before = memory.initial_state(1).memory.weights
        change = math.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
        size = max(math.sqrt(sum((w ** 2).sum() for w in ws.values())) for ws in (before, after))
    assert record.weight_change == pytest.approx(change / size)
    assert set(record.signals) == {"theta", "eta", "alpha", "surprise", "clip"}
    assert [len(head) for head in record.signals["theta"]] == [record.tokens] * 2  # heads x tokens (persistent too)


def test_inspect_needs_a_memory():
    with pytest.raises(ValueError, match="no neural memory"):
        inspect_memory(TitansLM(TitansConfig(variant="swa", vocab_size=16, dim=16, layers=1, heads=2)),
                       torch.zeros(8, dtype=torch.long), 4)


class PrefixOracle(nn.Module):
    """Recognises which of `samples` it is reading and predicts its next token (a batch of one)."""

    def __init__(self, samples: list, miss_last: bool = False):
        super().__init__()
        self.samples, self.miss_last = samples, miss_last  # miss_last: wrong on the answer's last token only

    def forward(self, tokens, state=None):
        seen = tokens[0] if state is None else torch.cat([state, tokens[0]])
        logits = torch.zeros(*tokens.shape, 256)
        for t in range(tokens.shape[1]):
            n = len(seen) - tokens.shape[1] + t + 1
            ids = next((s.token_ids for s in self.samples if torch.equal(s.token_ids[:n], seen[:n])), [])
            right = int(ids[n]) if n < len(ids) else 0  # past the answer, or off every sample: byte 0
            logits[0, t, (right + 1) % 256 if self.miss_last and n == len(ids) - 1 else right] = 1.0
        return logits, seen

    def step(self, tokens, state):  # decoding reads one token at a time through TitansLM.step's signature
        return self(tokens, state)


def test_ruler_needle_grid(tmp_path, text_corpus, monkeypatch):
    from titans.data import niah
    from titans.data.tokenizer import ByteTokenizer

    fixtures = Path(__file__).parent / "fixtures" / "niah"
    essays = [p.read_text() for p in sorted((fixtures / "essays").glob("*.txt"))]
    words = [(fixtures / f).read_text().split() for f in ("adjectives.txt", "nouns.txt")]
    monkeypatch.setattr(niah, "load_essays", lambda cache_dir=None: essays)
    monkeypatch.setattr(niah, "load_key_words", lambda cache_dir=None: tuple(words))
    generator = niah.NIAHGenerator("niah_single_2", ByteTokenizer(), essays=essays, adjectives=words[0],
                                   nouns=words[1])
    lengths, depths = [700, 900], [0.0, 1.0]
    samples = [generator.sample(n, depth=100 * d, seed=42, index=i) for n in lengths for d in depths for i in range(2)]
    assert len({s.needle_position for s in samples}) > 2  # the depth moves the needle
    for miss_last, accuracy in ((False, 1.0), (True, 0.0)):
        run = loaded(PrefixOracle(samples, miss_last), text_config(text_corpus), tmp_path)
        result = evaluate.eval_needle(run, tmp_path, lengths, depths, samples=2, task="niah_single_2")
        assert result["accuracy"] == [[accuracy] * 2] * 2
        # the share of answer tokens right: all, or all but each answer's last
        answer_tokens = [[sum(int(s.as_example()["loss_mask"].sum()) for s in samples[4 * a + 2 * b:4 * a + 2 * b + 2])
                          for b in range(2)] for a in range(2)]
        expected = [1 - miss_last * 2 / n for row in answer_tokens for n in row]
        assert sum(result["token_accuracy"], []) == pytest.approx(expected)
        # RULER's score of the greedy continuation: the whole answer, or one character short of it
        assert result["generation"] == [[accuracy] * 2] * 2 and result["mean_generation"] == accuracy
    assert (tmp_path / "needle_niah_single_2.png").is_file()
    assert json.loads((tmp_path / "needle_niah_single_2.json").read_text())["generation"] == [[0.0] * 2] * 2
    result = evaluate.eval_needle(run, tmp_path, lengths, depths, samples=2, task="niah_single_2", new_tokens=0)
    assert result["accuracy"] == [[0.0] * 2] * 2 and "generation" not in result  # teacher-forced accuracy only


def test_greedy_continuation_streams_the_prompt():
    """The prompt streams through the state in eval.chunk_len pieces: the continuation is the model's own greedy
    generation from the whole prompt; `done` ends it early."""
    run_config = config()
    torch.manual_seed(0)
    model = TitansLM(run_config.model).eval()
    run = loaded(model, run_config, Path("."))
    prompt = torch.randint(0, 16, (21,))  # chunk_len 8: three pieces, the last one short
    expected = model.generate(prompt[None], 6)[0, 21:].tolist()
    assert evaluate.greedy_continuation(run, prompt, 6) == expected
    assert evaluate.greedy_continuation(run, prompt, 6, done=lambda ids: len(ids) == 2) == expected[:2]
    with pytest.raises(ValueError, match="empty"):
        evaluate.greedy_continuation(run, prompt[:0], 6)


def test_babilong_accuracy_by_length(tmp_path, text_corpus):
    """BABILong samples over the corpus's test books; every token of the answer is scored."""
    run_config = text_config(text_corpus)
    torch.manual_seed(0)
    run = loaded(TitansLM(run_config.model).eval(), run_config, tmp_path)
    result = evaluate.eval_babilong(run, tmp_path, lengths=[0, 64], samples=2, task="qa1")
    assert sorted(result["by_length"]) == [0, 64] and all(0 <= a <= 1 for a in result["by_length"].values())
    assert sorted(result["generation_by_length"]) == [0, 64]
    assert all(0 <= a <= 1 for a in result["generation_by_length"].values())
    assert (tmp_path / "babilong_qa1.json").is_file() and (tmp_path / "babilong_qa1.png").is_file()

    from titans.data.babilong import BabilongGenerator
    from titans.data.tokenizer import ByteTokenizer

    generator = BabilongGenerator.from_corpus("qa1", ByteTokenizer(), "test", text_corpus)
    samples = [generator.sample(64, seed=0, index=i) for i in range(2)]

    for oracle, accuracy in ((PrefixOracle(samples), 1.0), (PrefixOracle(samples, miss_last=True), 0.0)):
        run = loaded(oracle, run_config, tmp_path)
        result = evaluate.eval_babilong(run, tmp_path, lengths=[64], samples=2)
        assert result["by_length"] == {64: accuracy}
        assert result["generation_by_length"] == {64: accuracy}  # BABILong's verdict on the greedy continuation
    assert "generation_by_length" not in evaluate.eval_babilong(run, tmp_path, lengths=[64], samples=2, new_tokens=0)
