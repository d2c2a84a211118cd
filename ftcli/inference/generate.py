"""Generating a completion: the prompt as training rendered it, transformers' `generate`, the right stops.

    >>> from ftcli.inference.generate import Decoding, complete
    >>> done = complete(target, render(target, example), Decoding(max_new_tokens=64))
    >>> done.text, done.stop_reason, done.new_tokens        # ('2 + 3 = 5.', 'eos', 9)

Generation stops at EOS and at the template's end-of-turn token (e.g. `<|im_end|>`: what training
put in the loss after each answer); the completion is decoded without special tokens. Greedy
when `temperature` is 0 (the default of `ftcli generate`), sampled otherwise, seeded per prompt so
a run of the same command gives the same text. The KV cache is on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ftcli.errors import ConfigError, OutputError
from ftcli.system import Terminated


@dataclass
class Decoding:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int = 42

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < float("inf"):
            problems.append(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0 (got {self.top_k})")
        if not 0 < self.repetition_penalty < float("inf"):
            problems.append(f"--repetition-penalty must be > 0 (got {self.repetition_penalty})")
        from ftcli.config import SEED_MAX

        if not 0 <= self.seed <= SEED_MAX:
            problems.append(f"--seed must be between 0 and {SEED_MAX} (2**32 - 1) (got {self.seed})")
        if problems:
            raise ConfigError("; ".join(problems), hint="see --help for each option's range")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                    "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k or None, "repetition_penalty": self.repetition_penalty}


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # the new tokens, the stop token included when there was one
    text: str
    stop_reason: str  # "eos" | "end_of_turn" | "max_new_tokens"
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """`14 prompt tokens, 7 new tokens, 215.5 tokens/s, stop: end_of_turn`: what each answer reports."""
        return (f"{len(self.prompt_ids)} prompt tokens, {self.new_tokens} new tokens, "
                f"{self.tokens_per_second:,.1f} tokens/s, stop: {self.stop_reason}")


def print_piece(text: str) -> None:
    """Streamed text as it comes, on the ftcli console: model output is never read as Rich markup."""
    from ftcli.console import console

    console.print(text, end="", markup=False, highlight=False, soft_wrap=True)


def stop_ids(target: Any) -> tuple[int, list[int]]:
    """(EOS, end-of-turn ids): the tokens that end an answer for this target's template."""
    from ftcli.data.pipeline import end_of_turn_ids

    eos = target.tokenizer.eos_token_id
    return eos, [i for i in end_of_turn_ids(target.template, target.tokenizer) if i != eos]


def generate_ids(model: Any, target: Any, prompt_ids: list[int], decoding: Decoding,
                 on_text: Callable[[str], None] | None = None) -> Completion:
    """Generate after `prompt_ids` with `model` (the target's, or its base); `on_text` receives text as it comes."""
    import torch
    from transformers import set_seed

    from ftcli.data.pipeline import end_of_turn_text

    eos, turn_end = stop_ids(target)
    tokenizer = target.tokenizer
    stop_text = end_of_turn_text(target.template, tokenizer)
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = dict(
        input_ids=inputs, attention_mask=torch.ones_like(inputs),
        max_new_tokens=_fit_context(model, len(prompt_ids), decoding.max_new_tokens),
        eos_token_id=[eos, *turn_end], pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else eos, use_cache=True, **decoding.generate_kwargs())
    if stop_text:  # an end of turn that is no special token: stop on its text, as the answers were trained
        kwargs.update(stop_strings=[stop_text], tokenizer=tokenizer)
    kwargs["logits_processor"] = finite_logits_check()
    streamer = None
    if on_text is not None:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs["streamer"] = streamer
    set_seed(decoding.seed)
    start = time.perf_counter()
    with torch.no_grad():
        if streamer is None:
            out = model.generate(**kwargs)
        else:
            out = _generate_streaming(model, kwargs, streamer, on_text)
    seconds = time.perf_counter() - start
    new = [int(t) for t in out[0, len(prompt_ids):]]
    reason = "max_new_tokens"
    if new and new[-1] == eos:
        reason = "eos"
    elif new and new[-1] in turn_end:
        reason = "end_of_turn"
    text = tokenizer.decode(new, skip_special_tokens=True)
    if stop_text and stop_text in text:
        text, reason = text[: text.index(stop_text)], "end_of_turn"
    return Completion(prompt_ids, new, text, reason, seconds)


class AnswerInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM/SIGHUP, see ftcli.system.sigterm_as_interrupt) while an answer streamed: the generation
    was stopped and its worker joined before this was raised, so a caller may catch it and go on (chat: stop only
    that answer) or let it end the command (exit 130). `text` is what had been streamed."""

    def __init__(self, text: str = "", terminated: bool = False):
        super().__init__()
        self.text = text
        self.terminated = terminated  # SIGTERM/SIGHUP (ftcli.system.Terminated), not a Ctrl-C: the command ends


def _fit_context(model: Any, prompt_tokens: int, wanted: int) -> int:
    """--max-new-tokens within the model's context: a prompt that fills it is refused, more new tokens than fit are
    capped, each in one line (the model would otherwise run far past what it was built for)."""
    from ftcli.console import err_console
    from ftcli.errors import DataError

    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return wanted
    if prompt_tokens >= context:
        raise DataError(f"the prompt is {prompt_tokens:,} tokens, and the model's context holds {context:,}",
                        hint="shorten the prompt")
    if prompt_tokens + wanted > context:
        err_console.print(f"[yellow]note:[/] --max-new-tokens {wanted:,} capped to {context - prompt_tokens:,}: the "
                          f"prompt's {prompt_tokens:,} tokens and the answer must fit the model's context of "
                          f"{context:,}", soft_wrap=True)
        return context - prompt_tokens
    return wanted


def _generate_streaming(model: Any, kwargs: dict[str, Any], streamer: Any, on_text: Callable[[str], None]) -> Any:
    """`generate` in a worker thread while this thread hands the decoded pieces to `on_text`.

    An interrupt (Ctrl-C) reaches this thread only: it sets the worker's stop flag, which `generate` checks after
    every token (a StoppingCriteria), and waits for the worker to end; the process never exits under a running
    worker (the C++ runtime aborts then: `terminate called without an active exception`)."""
    import threading

    import torch

    from ftcli.inference.stream import stop_on

    result: dict[str, Any] = {}
    stop = threading.Event()
    kwargs = {**kwargs, "stopping_criteria": stop_on(stop)}

    def work() -> None:
        try:
            with torch.no_grad():
                result["out"] = model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = exc
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    shown: list[str] = []
    try:
        for piece in streamer:
            on_text(piece)
            shown.append(piece)
    except KeyboardInterrupt as exc:
        stop.set()
        terminated = _join(worker, stop) == "terminated" or isinstance(exc, Terminated)
        raise AnswerInterrupted("".join(shown), terminated) from None
    joined = _join(worker, stop)
    if joined:
        raise AnswerInterrupted("".join(shown), joined == "terminated")
    if "error" in result:
        raise result["error"]
    return result["out"]


def _join(worker: Any, stop: Any) -> str:
    """Wait for the worker (it stops within a token once asked); a Ctrl-C meanwhile asks it to stop but does not
    cut the wait. "" when none came, "interrupted" for a Ctrl-C, "terminated" for SIGTERM/SIGHUP."""
    came = ""
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt as exc:
            stop.set()
            came = "terminated" if isinstance(exc, Terminated) or came == "terminated" else "interrupted"
    return came


def finite_logits_check() -> Any:
    """A logits processor that refuses scores holding NaN or +inf (or no finite score at all): sampling from them is
    a torch traceback, and greedy decoding of them an empty or garbage answer. One reduction per token."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from ftcli.errors import ModelError

    class _Finite(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if torch.isnan(scores).any() or torch.isposinf(scores).any() or not torch.isfinite(scores).any():
                raise ModelError("the model's outputs are not finite (NaN or inf), so it cannot generate: its "
                                 "weights may hold NaN", hint="check the model (a training run that diverged saves "
                                 "NaN weights); train again from an intact start, or use an earlier checkpoint")
            return scores

    return LogitsProcessorList([_Finite()])


def complete(target: Any, prompt_ids: list[int], decoding: Decoding, on_text: Callable[[str], None] | None = None,
             base: bool = False) -> Completion:
    """One completion by the target (or, with `base`, by its untuned base) for already rendered `prompt_ids`."""
    if not base:
        return generate_ids(target.model, target, prompt_ids, decoding, on_text)
    with target.base_model() as model:
        return generate_ids(model, target, prompt_ids, decoding, on_text)


def check_output_file(path: str, overwrite: bool) -> None:
    """A `.jsonl` file to write at the end: refused if it exists (unless `overwrite`) or its folder does not."""
    from ftcli.files import check_writable, output_path

    out = output_path(path, "--output", what="file")
    if out.suffix.lower() != ".jsonl":
        raise ConfigError(f"--output {out} must be a .jsonl file", hint="name it e.g. answers.jsonl")
    if out.exists() and (out.is_dir() or not overwrite):
        raise OutputError(f"--output {out} already exists",
                          hint="pick a new file name" + ("" if out.is_dir() else ", or pass --overwrite"))
    if not out.parent.is_dir():
        raise OutputError(f"--output {out}: the folder {out.parent} does not exist", hint="create it first")
    check_writable(out, "--output", beside=True)


@contextmanager
def output_lock(path: str | None, overwrite: bool) -> Iterator[None]:
    """Hold the `--output` file's lock for the whole command (one writer per file, as export does), checking the
    file again under it: a second generate or chat into the same file is refused at once instead of one of the two
    results being lost when both write at the end."""
    from ftcli.files import exclusive, output_path

    if path is None:
        yield
        return
    held = False
    try:
        with exclusive(output_path(path, "--output").absolute(), "--output"):
            held = True
            check_output_file(path, overwrite)
            yield
    except OutputError as exc:
        if held:
            raise
        raise OutputError(exc.message, hint="wait for that command to finish, or pick another file name") from None
