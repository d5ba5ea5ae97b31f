"""EleutherAI's lm-evaluation-harness (``lm-eval``, extra ``eval``) for titans runs: model ``titans``.

Importing this module registers :class:`TitansEvalLM` as lm-eval's model ``titans``. lm-eval 0.4 finds models only in
its own registry (no entry points), so its own ``lm_eval`` command does not know ``titans``; run the same command
line through ``python -m titans.harness``, which imports this module first and adds the offline tasks shipped in
:data:`TASKS_DIR` (``titans_corpus_cloze``, ``titans_corpus_ppl``) unless ``--include_path`` is given::

    python -m titans.harness --model titans --model_args run=runs/text --tasks titans_corpus

From Python: ``import titans.harness`` and then ``lm_eval.simple_evaluate(model="titans", model_args=...,
task_manager=lm_eval.tasks.TaskManager(include_path=titans.harness.TASKS_DIR))``.

Model arguments: ``run`` (a run directory: its latest checkpoint; ``pretrained`` is taken as ``run``) or
``checkpoint`` (one checkpoint directory), ``device`` (auto / cpu / cuda / cuda:N), ``batch_size``, ``chunk_len``
(long inputs stream through the model state in pieces of this many tokens; default: the run's ``eval.chunk_len``),
``tokenizer`` (a tokenizer.json; default: the run's), ``prefix`` (the text whose single token stands before a text
scored from its start, since the tokenizers have no BOS / EOS token; default: a newline) and ``max_gen_toks``
(generation's default limit, 256).

Scoring: ``loglikelihood`` and ``loglikelihood_rolling`` stream each whole token sequence through the model with its
carried state, ``chunk_len`` tokens at a time, and sum the log-probabilities of the scored tokens: texts are never
truncated or cut into windows, and memory does not grow with their length. Sequences of a batch are right-padded
(the model is causal, so padding after a sequence changes none of its log-probabilities). ``generate_until`` decodes
greedily, one sequence at a time, until a stop string (cut off the result) or ``max_gen_toks`` tokens.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model fills only an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError("titans.harness needs lm-eval: pip install 'titans[eval]'", name="lm_eval") from None
from titans.data.tokenizer import Tokenizer, load_tokenizer
from titans.evaluate import LoadedRun, greedy_continuation, load_run, run_tokenizer
from titans.model import stream
from titans.runtime import choose_device

__all__ = ["TASKS_DIR", "TitansEvalLM", "main"]

TASKS_DIR = Path(__file__).parent / "tasks"
"""lm-eval task configs that read only files shipped here (``--include_path``)."""


def _device(device: str | None) -> torch.device:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line asks for cuda unless told otherwise
        warnings.warn(f"titans: device {device!r} requested but CUDA is not available; using the CPU", stacklevel=3)
        return torch.device("cpu")
    if device in (None, "", "auto", "cpu", "cuda"):
        return choose_device(device or "auto")
    return torch.device(device)  # cuda:1, mps, ...


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 1  # no memory probing: a run's chunk_len already bounds the activations
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size


@register_model("titans")
class TitansEvalLM(TemplateLM):
    """A titans run as an lm-eval model (see the module docstring for its arguments)."""

    def __init__(self, run: str | None = None, checkpoint: str | None = None, device: str | None = None,
                 batch_size: int | str | None = 1, chunk_len: int | None = None, tokenizer: str | None = None,
                 prefix: str = "\n", max_gen_toks: int = 256, max_batch_size: int | None = None,
                 pretrained: str | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"titans: unknown model_args {sorted(unknown)}; known: run, checkpoint, device, "
                             "batch_size, chunk_len, tokenizer, prefix, max_gen_toks")
        given = [p for p in (run, checkpoint, pretrained) if p]
        if len(given) != 1:
            raise ValueError("titans: give exactly one of model_args run=RUN_DIR or checkpoint=CHECKPOINT_DIR")
        self.run: LoadedRun = load_run(given[0], _device(device))
        self._tok: Tokenizer | None = load_tokenizer(Path(tokenizer)) if tokenizer else run_tokenizer(self.run)
        if self._tok is None:
            raise ValueError(f"titans: {self.run.run_dir} is a {self.run.config.data.task!r} run without a tokenizer; "
                             "lm-eval needs a text run (or model_args tokenizer=PATH)")
        vocab = self.run.config.model.vocab_size
        if self._tok.vocab_size > vocab:
            raise ValueError(f"titans: the tokenizer has {self._tok.vocab_size} tokens but the model only {vocab}")
        prefix_ids = self._tok.encode(prefix)
        if len(prefix_ids) != 1:
            raise ValueError(f"titans: prefix {prefix!r} must be exactly one token, got {len(prefix_ids)}")
        self._prefix = prefix_ids[0]
        self.batch_size = _batch_size(batch_size)
        self.chunk_len = int(chunk_len) if chunk_len else self.run.config.eval.chunk_len
        if self.chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self._prefix  # no end-of-text token: the prefix stands in where lm-eval asks for one

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def device(self) -> torch.device:
        return self.run.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self._tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self._tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_name": self.run.name, "checkpoint": str(self.run.checkpoint), "step": self.run.step}

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_tokens(self, items: list[tuple[list[int], int]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """For each (token ids, n): the summed log-probability of the last n tokens, each given every token before
        it, and whether each of them is the arg-max. Sequences stream through the model state ``chunk_len`` tokens
        at a time, ``batch_size`` of them at once (longest first, right-padded)."""
        results: list[tuple[float, bool] | None] = [None] * len(items)
        for i, (tokens, n) in enumerate(items):
            if n > len(tokens) - 1:
                raise ValueError(f"cannot score {n} of {len(tokens)} tokens: the first has nothing before it")
            if n <= 0:
                results[i] = (0.0, True)
        order = sorted((i for i in range(len(items)) if results[i] is None), key=lambda i: -len(items[i][0]))
        device = self.run.device
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="titans: scoring"):
            rows = order[start:start + self.batch_size]
            length = max(len(items[i][0]) for i in rows) - 1
            inputs = torch.zeros(len(rows), length, dtype=torch.long)
            targets = torch.zeros(len(rows), length, dtype=torch.long)
            scored = torch.zeros(len(rows), length, dtype=torch.bool)
            for r, i in enumerate(rows):
                tokens, n = items[i]
                seq = torch.tensor(tokens, dtype=torch.long)
                inputs[r, :len(seq) - 1], targets[r, :len(seq) - 1] = seq[:-1], seq[1:]
                scored[r, len(seq) - 1 - n:len(seq) - 1] = True
            inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)
            logp = torch.zeros(len(rows), dtype=torch.float64, device=device)
            greedy = torch.ones(len(rows), dtype=torch.bool, device=device)
            for positions, logits, _ in stream(self.run.model, inputs, self.chunk_len, autocast=self.run.autocast):
                mask = scored[:, positions]
                if not mask.any():
                    continue
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                target = targets[:, positions]
                picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                logp += torch.where(mask, picked, torch.zeros_like(picked)).sum(1, dtype=torch.float64)
                greedy &= ~(mask & (logprobs.argmax(-1) != target)).any(1)
            for r, i in enumerate(rows):
                results[i] = (float(logp[r]), bool(greedy[r]))
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = self.score_tokens([(ctx + cont, len(cont)) for _, ctx, cont in requests], disable_tqdm)
        for (pair, _, _), answer in zip(requests, answers):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-probability of each whole text, every token given the prefix token and all text before it."""
        texts = [req.args[0] for req in requests]
        encoded = [self.tok_encode(text) for text in texts]
        answers = self.score_tokens([([self._prefix] + ids, len(ids)) for ids in encoded], disable_tqdm)
        out = []
        for text, (logp, _) in zip(texts, answers):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logp)
            out.append(logp)
        return out

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="titans: generating"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("titans: generate_until decodes greedily only (do_sample false, temperature 0)")
            text = self.greedy_until(context, until, max_new)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def greedy_until(self, context: str, until: list[str], max_new_tokens: int) -> str:
        """Greedy continuation of ``context`` (read through the state ``chunk_len`` tokens at a time), cut before the
        first stop string, at most ``max_new_tokens`` tokens."""
        stops = [s for s in until if s]
        prompt = torch.tensor(self.tok_encode(context) or [self._prefix], dtype=torch.long)
        ids = greedy_continuation(self.run, prompt, max_new_tokens,
                                  lambda ids: any(s in self.tok_decode(ids) for s in stops), self.chunk_len)
        text = self.tok_decode(ids)
        return text[:min((text.find(s) for s in stops if s in text), default=len(text))]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with model ``titans`` registered and the shipped tasks included."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a in ("-h", "--help") or a.split("=")[0] == "--include_path" for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["python -m titans.harness", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0

