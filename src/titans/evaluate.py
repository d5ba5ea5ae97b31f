"""Evaluation of a trained run: held-out perplexity and bits per byte, synthetic-task accuracy by length, the
needle-in-a-haystack grid (context length x needle depth) and BABILong accuracy by length.

Every long context streams through the model state in pieces of ``eval.chunk_len`` tokens, so memory use stays flat
with the length (for the memory and sliding-window models; full attention keeps its growing key/value cache).
Accuracies are teacher-forced exact matches: an answer counts when the arg-max prediction at every answer token is
right. The text benchmarks also report the score their papers report, of a greedy continuation of the prompt:
RULER's ``string_match_all`` for the S-NIAH grid, BABILong's ``compare_answers`` for BABILong. Each ``eval_*``
function writes ``<name>.json`` and ``<name>.png`` into an output directory.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from titans.batches import EVAL_SEED_OFFSET, Batch, make_task_from_config, open_text_stream, text_tokenizer_name
from titans.checkpoint import (CheckpointError, atomic_write, check_model_state, load_checkpoint, resolve_checkpoint,
                               upgrade_model_state)
from titans.config import RunConfig
from titans.data.corpus import default_data_dir, load_manifest
from titans.data.synthetic import NeedleTask, SyntheticDataset
from titans.data.tokenizer import Tokenizer, load_tokenizer
from titans.forecast import Forecaster, build_forecaster
from titans.model import TitansLM, stream
from titans.plots import plot_accuracy_vs_length, plot_loss_by_position, plot_needle_heatmap
from titans.runtime import autocast_for
from titans.scoring import Scores, score_batch
from titans.typed_yaml import ConfigError, from_dict

__all__ = ["LoadedRun", "load_run", "run_tokenizer", "evaluate_text", "evaluate_synthetic", "needle_grid",
           "eval_lm", "eval_synthetic", "eval_needle", "eval_babilong", "greedy_continuation", "write_json",
           "BABILONG_NEW_TOKENS"]

BABILONG_NEW_TOKENS = 20  # BABILong's generate_kwargs max_new_tokens


@dataclass
class LoadedRun:
    """A model restored from a checkpoint, with its run config."""

    model: TitansLM | Forecaster
    config: RunConfig
    step: int
    checkpoint: Path
    run_dir: Path
    device: torch.device

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        return autocast_for(self.device, self.config.train.precision)[0]

    @property
    def name(self) -> str:
        dlinear = self.config.data.task == "forecast" and self.config.forecast.model == "dlinear"
        return f"{self.config.name} ({'dlinear' if dlinear else self.config.model.variant}, step {self.step})"


def load_run(path: str | Path, device: str | torch.device = "cpu", *, forecast_ok: bool = False) -> LoadedRun:
    """The model of a checkpoint directory, or of a run directory's latest checkpoint, in eval mode: a TitansLM, or
    with ``forecast_ok`` the Forecaster of a forecast run (a one-line error for one without)."""
    checkpoint = resolve_checkpoint(path)
    loaded = load_checkpoint(checkpoint, restore_rng=False)
    saved = loaded["extra"].get("config") if isinstance(loaded["extra"], dict) else None
    if saved is None:
        raise CheckpointError(f"{checkpoint}: not a training checkpoint of titans (no run config saved in it)")
    try:
        config = from_dict(RunConfig, saved)
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint}: invalid run config ({exc})") from None
    if config.data.task == "forecast" and not forecast_ok:
        raise ValueError(f"{checkpoint.parent.parent} is a forecast run (data.task forecast): titans eval reads it, "
                         "this command reads language-model runs only")
    build = (lambda: build_forecaster(config)) if config.data.task == "forecast" else (lambda: TitansLM(config.model))
    with torch.device("meta"):  # shapes first: a hostile config (vocab_size 10**13) must not allocate anything
        skeleton = build()
    upgrade_model_state(skeleton, loaded["model_state"])
    try:
        check_model_state(checkpoint, skeleton, loaded["model_state"])
    except CheckpointError as exc:
        raise CheckpointError(f"weights do not fit the saved model config: {exc}") from None
    model = build()
    try:
        model.load_state_dict(loaded["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the saved model config ({exc})") from None
    device = torch.device(device)
    return LoadedRun(model.to(device).eval(), config, loaded["step"], checkpoint, checkpoint.parent.parent, device)


def run_tokenizer(run: LoadedRun) -> Tokenizer | None:
    """The tokenizer of a text run (copied into its run directory, else the corpus's); None for synthetic runs."""
    if run.config.data.task != "text":
        return None
    path = run.run_dir / "tokenizer.json"
    if not path.is_file():
        data_dir = Path(run.config.data.data_dir) if run.config.data.data_dir else default_data_dir()
        path = data_dir / "tokens" / text_tokenizer_name(run.config) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer for {run.run_dir}: neither {run.run_dir / 'tokenizer.json'} nor "
                                f"{path} exists")
    return load_tokenizer(path)


def write_json(path: Path, result: dict) -> Path:
    atomic_write(path, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    return path


def _stack(examples: list[dict]) -> Batch:
    return Batch(*(torch.stack([e[k] for e in examples]) for k in ("inputs", "targets", "loss_mask")))


def _score_examples(run: LoadedRun, examples: list[dict], batch_size: int) -> Scores:
    """Exact-match scores of examples, batched when they have the same length."""
    scores = Scores()
    for start in range(0, len(examples), batch_size):
        group = examples[start:start + batch_size]
        batches = [_stack(group)] if len({len(e["inputs"]) for e in group}) == 1 else [_stack([e]) for e in group]
        for batch in batches:
            scores += score_batch(run.model, batch.to(run.device), run.config.eval.chunk_len, run.autocast)
    return scores


@torch.no_grad()
def greedy_continuation(run: LoadedRun, prompt: torch.Tensor, max_new_tokens: int,
                        done: Callable[[list[int]], bool] = lambda ids: False,
                        chunk_len: int | None = None) -> list[int]:
    """Up to ``max_new_tokens`` greedy tokens after ``prompt`` (1-d ids), which streams through the model state in
    pieces of ``chunk_len`` tokens (default ``eval.chunk_len``); generation ends early once ``done(tokens so far)``
    (for a score, or a stop string, that the tokens after that point cannot change)."""
    x = prompt.reshape(1, -1).to(run.device)
    if x.shape[1] == 0:
        raise ValueError("the prompt is empty: generation continues at least one token")
    logits, state = None, None
    for _, logits, state in stream(run.model, x, chunk_len or run.config.eval.chunk_len, autocast=run.autocast):
        pass
    out: list[int] = []
    while len(out) < max_new_tokens and not (out and done(out)):
        token = logits[:, -1].float().argmax(-1, keepdim=True)
        out.append(int(token))
        if len(out) < max_new_tokens:
            with run.autocast():
                logits, state = run.model.step(token, state)  # the single-token decoding path
    return out


# ------------------------------------------------------------------------------------------------ real text
@torch.no_grad()
def evaluate_text(run: LoadedRun, *, split: str = "validation", seq_len: int | None = None,
                  max_tokens: int | None = None, batch_size: int | None = None) -> dict:
    """Loss, perplexity, bits per token and bits per byte over consecutive windows of ``seq_len`` tokens (default:
    the training length) of a held-out split, up to ``max_tokens`` predicted tokens (default: all). Windows stream
    through the model state in pieces; the mean loss at each position of the window is kept too.

    Bits per byte use the split's bytes per token (``titans.data.corpus`` manifest), exact for the whole split."""
    config = run.config
    if config.data.task != "text":
        raise ValueError(f"perplexity needs a text run; {run.run_dir} was trained on the {config.data.task} task")
    seq_len = seq_len or config.train.seq_len
    batch_size = batch_size or config.eval.batch_size
    text = open_text_stream(config, split)
    windows = (len(text) - 1) // seq_len
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows < 1:
        raise ValueError(f"the {split} split ({len(text)} tokens) is shorter than one window of {seq_len}")
    tokens = torch.from_numpy(np.asarray(text.tokens[:windows * seq_len + 1], dtype=np.int64))
    loss_by_position = torch.zeros(seq_len, dtype=torch.float64)
    for first in range(0, windows, batch_size):
        rows = range(first, min(first + batch_size, windows))
        x = torch.stack([tokens[r * seq_len:(r + 1) * seq_len + 1] for r in rows]).to(run.device)
        for positions, logits, _ in stream(run.model, x[:, :-1], config.eval.chunk_len, autocast=run.autocast):
            loss = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:][:, positions], reduction="none")
            loss_by_position[positions] += loss.sum(0).double().cpu()
    predicted = windows * seq_len
    loss = float(loss_by_position.sum()) / predicted
    manifest = load_manifest(Path(config.data.data_dir) if config.data.data_dir else None)
    split_tokens = manifest.tokenizers[text_tokenizer_name(config)]["tokens"][split]
    bytes_per_token = manifest.splits[split]["bytes"] / split_tokens
    bits = loss / math.log(2)
    return {"split": split, "seq_len": seq_len, "tokens": predicted, "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": bits, "bytes_per_token": bytes_per_token,
            "bits_per_byte": bits / bytes_per_token, "loss_by_position": (loss_by_position / windows).tolist()}


def eval_lm(run: LoadedRun, out_dir: str | Path, **kwargs) -> dict:
    """:func:`evaluate_text`, written to ``lm_<split>.json`` and a loss-by-position plot ``lm_<split>.png``."""
    result = {"run": run.name, "checkpoint": str(run.checkpoint), **evaluate_text(run, **kwargs)}
    out = Path(out_dir) / f"lm_{result['split']}"
    plot_loss_by_position(result["loss_by_position"], out.with_suffix(".png"),
                          f"{run.name}: {result['split']} loss by position (bpb {result['bits_per_byte']:.3f})")
    write_json(out.with_suffix(".json"), result)
    return result


# ------------------------------------------------------------------------------------------------ synthetic
def evaluate_synthetic(run: LoadedRun, lengths: Sequence[int], samples: int, *, seed: int | None = None) -> dict:
    """Accuracy of the run's synthetic task at each sequence length (``copy``: the gap grows, the copied length
    stays), on ``samples`` held-out examples per length (the DNA tasks: windows of the genome's test split)."""
    config = run.config
    if config.data.task == "text":
        raise ValueError(f"{run.run_dir} is a text run; evaluate it with the lm task")
    seed = config.train.seed + EVAL_SEED_OFFSET if seed is None else seed
    by_length = {}
    for length in lengths:
        overrides = {}
        if config.data.task == "copy":
            copied = make_task_from_config(config).length
            if length < 2 * copied:
                raise ValueError(f"copy sequences of {copied} tokens need lengths >= {2 * copied}, got {length}")
            overrides["gap"] = length - 2 * copied
        task = make_task_from_config(config, seq_len=length, split="test", **overrides)
        dataset = SyntheticDataset(task, samples, seed=seed)
        scores = _score_examples(run, [dataset[i] for i in range(samples)], config.eval.batch_size)
        by_length[int(length)] = {"accuracy": scores.accuracy, "sequence_accuracy": scores.sequence_accuracy,
                                  "loss": scores.loss, "scored": scores.count}
    return {"task": config.data.task, "train_seq_len": config.train.seq_len, "samples": samples,
            "by_length": by_length}


def eval_synthetic(run: LoadedRun, out_dir: str | Path, lengths: Sequence[int], samples: int) -> dict:
    """:func:`evaluate_synthetic`, written to ``<task>.json`` and an accuracy-versus-length plot ``<task>.png``."""
    result = {"run": run.name, "checkpoint": str(run.checkpoint), **evaluate_synthetic(run, lengths, samples)}
    out = Path(out_dir) / result["task"]
    plot_accuracy_vs_length({run.name: {n: r["accuracy"] for n, r in result["by_length"].items()}},
                            out.with_suffix(".png"), f"{result['task']}: accuracy by sequence length "
                                                     f"(trained at {result['train_seq_len']})")
    write_json(out.with_suffix(".json"), result)
    return result


# ------------------------------------------------------------------------------------------------ needles
def needle_grid(run: LoadedRun, make_example: Callable[[int, float, int], dict], lengths: Sequence[int],
                depths: Sequence[float], samples: int) -> list[list[float]]:
    """Exact-match accuracy of ``make_example(length, depth, index)`` examples for every (length, depth) cell:
    rows are lengths, columns depths (fractions of the context)."""
    grid = []
    for length in lengths:
        row = []
        for depth in depths:
            examples = [make_example(length, depth, i) for i in range(samples)]
            row.append(_score_examples(run, examples, run.config.eval.batch_size).sequence_accuracy)
        grid.append(row)
    return grid


def ruler_generation_score(run: LoadedRun, sample, tokenizer: Tokenizer, max_new_tokens: int) -> float:
    """RULER's score (:func:`~titans.data.niah.generation_score`, as a fraction) of the greedy continuation of one
    S-NIAH prompt. Generation stops once the answer appears: RULER's ``string_match_all`` only asks whether it is
    there, so the tokens after it cannot change the score."""
    from titans.data.niah import generation_score, postprocess_prediction

    answer = sample.answer.lower()

    def found(ids: list[int]) -> bool:
        return answer in postprocess_prediction(tokenizer.decode(ids)).lower()

    ids = greedy_continuation(run, sample.token_ids[:sample.prompt_length], max_new_tokens, found)
    return generation_score([tokenizer.decode(ids)], [sample]) / 100

def _synthetic_needle(run: LoadedRun, seed: int) -> Callable[[int, float, int], dict]:
    """Examples of the synthetic needle task: the run's own task settings when it trained on needles."""
    config = run.config

    def make(length: int, depth: float, index: int) -> dict:
        if config.data.task == "needle":
            task = make_task_from_config(config, seq_len=length, depth=depth)
        else:
            task = NeedleTask(vocab_size=config.model.vocab_size, seq_len=length, depth=depth)
        return SyntheticDataset(task, index + 1, seed=seed)[index]

    return make


def _ruler_grids(run: LoadedRun, task: str, lengths: Sequence[int], depths: Sequence[float], samples: int,
                 seed: int, new_tokens: int | None) -> dict[str, list[list[float]]]:
    """The S-NIAH grids (fractions): ``accuracy``, teacher-forced exact match of the whole answer;
    ``token_accuracy``, the share of the answer's tokens predicted right (partial recall, where exact match is 0);
    ``generation``, RULER's generation score (absent when ``new_tokens`` is 0)."""
    from titans.data.niah import NIAHGenerator

    tokenizer = run_tokenizer(run)
    generator = NIAHGenerator(task, tokenizer)
    grids = {"accuracy": [], "token_accuracy": []} | ({"generation": []} if new_tokens != 0 else {})
    for length in lengths:
        for grid in grids.values():
            grid.append([])
        for depth in depths:
            cell = [generator.sample(length, depth=100 * depth, seed=seed, index=i) for i in range(samples)]
            scores = _score_examples(run, [s.as_example() for s in cell], run.config.eval.batch_size)
            grids["accuracy"][-1].append(scores.sequence_accuracy)
            grids["token_accuracy"][-1].append(scores.accuracy)
            if new_tokens != 0:
                grids["generation"][-1].append(float(np.mean([ruler_generation_score(
                    run, s, tokenizer, generator.answer_budget if new_tokens is None else new_tokens) for s in cell])))
    return grids


def eval_needle(run: LoadedRun, out_dir: str | Path, lengths: Sequence[int], depths: Sequence[float], samples: int,
                task: str | None = None, seed: int = 42, new_tokens: int | None = None) -> dict:
    """The needle grid, written to ``needle_<task>.json`` and a heatmap ``needle_<task>.png``.

    ``task``: ``synthetic`` (the synthetic needle task: a marked token among random ones, asked for at the end) or a
    RULER single-needle task (``niah_single_1``/``2``/``3``) for text runs; default: synthetic for synthetic runs,
    ``niah_single_1`` for text runs. RULER tasks also get ``token_accuracy``, per cell the share of the answer's
    tokens predicted right, and RULER's own metric: ``generation`` holds, per cell, the mean
    :func:`~titans.data.niah.generation_score` (as a fraction) of greedy continuations of the prompts of up to
    ``new_tokens`` tokens (default: RULER's 128; 0: no generation)."""
    task = task or ("niah_single_1" if run.config.data.task == "text" else "synthetic")
    extra = {}
    if task == "synthetic":
        grid = needle_grid(run, _synthetic_needle(run, seed), lengths, depths, samples)
    elif run.config.data.task != "text":
        raise ValueError(f"the {task} needle is text; {run.run_dir} was trained on the {run.config.data.task} task "
                         f"(use --task synthetic)")
    else:
        extra = _ruler_grids(run, task, lengths, depths, samples, seed, new_tokens)
        grid = extra.pop("accuracy")
    result = {"run": run.name, "checkpoint": str(run.checkpoint), "task": task, "lengths": list(lengths),
              "depths": list(depths), "samples": samples, "accuracy": grid,
              "mean_accuracy": float(np.mean(grid))}
    for name, other in extra.items():
        result.update({name: other, f"mean_{name}": float(np.mean(other))})
    out = Path(out_dir) / f"needle_{task}"
    plot_needle_heatmap(grid, lengths, depths, out.with_suffix(".png"), f"{run.name}: {task}")
    write_json(out.with_suffix(".json"), result)
    return result


# ------------------------------------------------------------------------------------------------ BABILong
def eval_babilong(run: LoadedRun, out_dir: str | Path, lengths: Sequence[int], samples: int, task: str = "qa1",
                  split: str = "test", seed: int = 0, new_tokens: int | None = None) -> dict:
    """BABILong accuracy at each context length in tokens, with background from the corpus's ``split`` books:
    ``by_length`` the teacher-forced exact match of the answer, ``generation_by_length`` BABILong's own verdict
    (:meth:`~titans.data.babilong.BabilongSample.score`) on a greedy continuation of context and question of up to
    ``new_tokens`` tokens (default: :data:`BABILONG_NEW_TOKENS`; 0: no generation, no ``generation_by_length``).
    Written to ``babilong_<task>.json`` and ``.png``."""
    from titans.data.babilong import BabilongGenerator

    tokenizer = run_tokenizer(run)
    if tokenizer is None:
        raise ValueError(f"BABILong is text; {run.run_dir} was trained on the {run.config.data.task} task")
    data_dir = Path(run.config.data.data_dir) if run.config.data.data_dir else None
    generator = BabilongGenerator.from_corpus(task, tokenizer, split, data_dir)
    by_length, generation = {}, {}
    for length in lengths:
        cell = [generator.sample(length, seed=seed, index=i) for i in range(samples)]
        by_length[int(length)] = _score_examples(run, [s.as_example() for s in cell],
                                                 run.config.eval.batch_size).sequence_accuracy
        if new_tokens != 0:
            budget = BABILONG_NEW_TOKENS if new_tokens is None else new_tokens
            generation[int(length)] = float(np.mean([_babilong_generation(run, s, tokenizer, budget) for s in cell]))
    result = {"run": run.name, "checkpoint": str(run.checkpoint), "task": task, "split": split, "samples": samples,
              "by_length": by_length}
    if new_tokens != 0:
        result["generation_by_length"] = generation
    out = Path(out_dir) / f"babilong_{task}"
    plot_accuracy_vs_length({run.name: by_length}, out.with_suffix(".png"), f"BABILong {task}: accuracy by length")
    write_json(out.with_suffix(".json"), result)
    return result


def _babilong_generation(run: LoadedRun, sample, tokenizer: Tokenizer, new_tokens: int) -> bool:
    """BABILong's verdict on the greedy continuation of one sample's context and question. Generation stops at the
    first full stop: BABILong judges only the first sentence."""
    prompt = torch.cat([sample.context_ids, sample.question_ids])
    ids = greedy_continuation(run, prompt, new_tokens, lambda ids: "." in tokenizer.decode(ids))
    return sample.score(tokenizer.decode(ids))
