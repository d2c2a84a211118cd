"""The README and docs/ are executable: every `ftcli ...` command they show is checked against the real CLI, and run.

What this file proves, for every `ftcli` command line in README.md and docs/*.md (fenced shell blocks, `$ ftcli` lines of
output blocks, `a && ftcli ...` chains, `printf ... | ftcli ...` pipes, and inline code spans that start
with `ftcli `):

1. `test_readme_command_uses_real_flags` (fast, no torch): the subcommand exists and every flag it uses
   (`--xyz`, `--xyz=value`, `--no-xyz`, `-o`) is an option of that subcommand in the Typer app itself. A
   flag renamed in the code fails here, naming the README line.
2. `test_every_readme_command_is_run_or_listed`: each command is either in RUN (it is executed below) or in
   NOT_RUN with the reason; a new README command that is in neither fails, and so does a stale entry.
3. `test_readme_command_runs` (slow): the RUN commands are executed in document order (README.md, then
   DOCS_ORDER), each distinct command once (docs repeat some of the README's), through bash (so
   quoting, globs and pipes behave as in the reader's shell) and the real `ftcli` CLI (`python -m ftcli`),
   in one shared folder, so that `ftcli generate runs/quickstart` finds what the quick start trained. The
   flags are the README's; the only changes are the ones each RUN entry lists (the built-in tiny model and
   sample data for a hub model or dataset, `...` filled in), and the inputs the README assumes the reader
   has (`sft.jsonl`, `dev.jsonl`, a LoRA run in `runs/lora-1`) are made by the entry's `setup`. Each run
   must end with the exit code the README states (0 unless it says otherwise), and what it says the
   command makes (a finished run folder, an export, an answers file) must be there. The checkpoint
   example's `# ... Ctrl-C, a SIGTERM from the scheduler ...` happens too: its first command is stopped
   with SIGTERM once checkpoint-50 is complete (exit 130, as documented) and its `--resume` line must then
   finish the run (all 100 steps, `resumed_from` recorded).

The commands depend on each other: run the whole file (not one `-k` case of the last test alone). Child
processes run with OMP_NUM_THREADS=1 (as the README's own timings do): on a shared 2-core machine the
default two torch threads made the quick start 3-10x slower.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import SMALL_ALPACA_ROWS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The order the docs' commands run in (each can rely on what an earlier one made): the README's old section order.
DOCS_ORDER = ("training.md", "preference-tuning.md", "grpo.md", "evaluation.md", "performance.md", "data.md", "conversations.md",
              "inspect.md", "export.md", "inference.md", "reliability.md", "architecture.md", "development.md")
DOCS = [README, *(ROOT / "docs" / name for name in DOCS_ORDER)]


# ---------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadmeCommand:
    line: int                         # line of its document the command starts on
    text: str                         # the `ftcli ...` command as written (continuations joined, comment cut)
    stdin_from: Optional[str] = None  # `printf '...'` piped into it
    piped_to: Optional[str] = None    # `jq ...` it is piped into
    source: str = "README.md"         # the document, relative to the repository root

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}: {self.text[:70]}"


def shell_segments(line: str) -> list[tuple[Optional[str], str]]:
    """Split a shell line at unquoted `&&`, `||`, `|`, `;`, dropping an unquoted `# comment`:
    [(the operator before the segment, the segment's raw text)]."""
    segments: list[tuple[Optional[str], str]] = []
    current: list[str] = []
    quote: Optional[str] = None
    before: Optional[str] = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            current.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(line):
                current.append(line[i + 1])
                i += 1
        elif c in "'\"":
            quote = c
            current.append(c)
        elif c == "\\" and i + 1 < len(line):
            current += [c, line[i + 1]]
            i += 1
        elif c == "#" and (not current or current[-1].isspace()):
            break
        elif c in "|&;":
            j = i
            while j < len(line) and line[j] in "|&;":
                j += 1
            segments.append((before, "".join(current).strip()))
            current, before, i = [], line[i:j], j
            continue
        else:
            current.append(c)
        i += 1
    segments.append((before, "".join(current).strip()))
    return segments


def _commands_in_shell_line(line_no: int, line: str) -> list[ReadmeCommand]:
    segments = shell_segments(line)
    found = []
    for k, (before, segment) in enumerate(segments):
        if segment.startswith("$ "):
            segment = segment[2:].lstrip()
        if not segment.startswith("ftcli "):
            continue
        stdin_from = segments[k - 1][1] if before == "|" else None
        piped_to = segments[k + 1][1] if k + 1 < len(segments) and segments[k + 1][0] == "|" else None
        found.append(ReadmeCommand(line_no, " ".join(segment.split()), stdin_from, piped_to))
    return found


def extract_commands(text: str, source: str = "README.md") -> list[ReadmeCommand]:
    """Every `ftcli` command of one document, in document order."""
    lines = text.splitlines()
    commands: list[ReadmeCommand] = []
    prose: list[str] = []  # the README with fenced blocks blanked out (line numbers kept) for inline spans
    i = 0
    while i < len(lines):
        if not re.match(r"\s*(```|~~~)", lines[i]):
            prose.append(lines[i])
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not re.match(r"\s*(```|~~~)", lines[i]):
            i += 1
        block = lines[start + 1:i]
        prose += [""] * (i + 1 - start)
        i += 1
        # In a block that shows `$ command` lines, the other lines are the commands' output.
        prompted = any(b.lstrip().startswith("$ ") for b in block)
        j = 0
        while j < len(block):
            first, joined = j, block[j]
            while joined.endswith("\\") and j + 1 < len(block):
                j += 1
                joined = joined[:-1] + " " + block[j]
            j += 1
            joined = joined.strip()
            if prompted and not joined.startswith("$ "):
                continue
            commands += [replace(c, source=source) for c in _commands_in_shell_line(start + 2 + first, joined)]
    body = "\n".join(prose)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body):
        span = " ".join(match.group(1).split())
        if span.startswith("ftcli "):
            commands.append(ReadmeCommand(body.count("\n", 0, match.start()) + 1, span, source=source))
    return sorted(commands, key=lambda c: c.line)


def test_docs_order_lists_every_doc() -> None:
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md")) == sorted(DOCS_ORDER), "add the new doc to DOCS_ORDER"


COMMANDS = [c for doc in DOCS if doc.exists()
            for c in extract_commands(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))]


# ---------------------------------------------------------------------------------------------------------
# What is run, and what is not (keys: the command exactly as the README writes it)
# ---------------------------------------------------------------------------------------------------------

class Workdir:
    """The shared folder the README's commands run in, and the environment they run with."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.made: dict[str, list[str]] = {}  # command text -> the runs/ folders it created
        bindir = path.parent / f"{path.name}-bin"
        bindir.mkdir(exist_ok=True)
        shim = bindir / "ftcli"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ftcli "$@"\n')
        shim.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        self.env.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", FTCLI_HOME=str(home),
                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        OMP_NUM_THREADS="1", COLUMNS="250")

    def ftcli(self, *args: str, timeout: float = 300) -> None:
        """A setup step through the real CLI (not a README command)."""
        proc = subprocess.run(["ftcli", *args], cwd=self.path, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"setup `ftcli {shlex.join(args)}` exited {proc.returncode}:\n" + tail(proc)

    def write_jsonl(self, name: str, rows: list[dict]) -> None:
        path = self.path / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def copy_run_made_by(self, command: str, dest: str) -> None:
        """`dest` as a copy of the run folder an earlier README command created (`runs/lora-<time>`)."""
        made = self.made.get(command)
        assert made, f"setup needs the run folder made by `{command}`, which did not run or made none"
        if not (self.path / dest).exists():
            shutil.copytree(self.path / made[0], self.path / dest)

    def set_aside(self, name: str) -> None:
        """An earlier section's example left `name`; this section's example starts without it."""
        path = self.path / name
        if path.exists():
            path.rename(path.with_name(f"{path.name}.earlier-{time.monotonic_ns()}"))


def tail(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    text = (proc.stdout or "") + (proc.stderr or "")
    return "\n".join(text.splitlines()[-lines:])


CHAT_ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("Name a color.", "Blue."), ("Say hello.", "Hello!"), ("Add 2 and 3.", "5."),
                          ("Name a fruit.", "An apple."), ("Is 7 odd?", "Yes."), ("Opposite of hot?", "Cold."),
                          ("Name an animal.", "A cat."), ("Spell cat.", "C-A-T.")]]
PREF_ROWS = [{"prompt": f"What is {a} + {b}?\n", "chosen": str(a + b), "rejected": f"{a}{b}"}
             for a in range(2, 10) for b in range(1, 6)]  # 40 pairs: --eval-split 0.05 holds out 2
# KTO's labeled rows: 8 desirable, 4 undesirable (a short run: a KTO step is four forward passes)
FEEDBACK_ROWS = [{"prompt": f"What is {a} + {b}?\n", "completion": str(a + b) if b != 3 else f"{a}{b}", "label": b != 3}
                 for a in range(2, 6) for b in range(1, 4)]
QUESTIONS = [{"messages": [{"role": "user", "content": q}]} for q in ("Name a color.", "Say hello.")]
TINY = "builtin:tiny-llama"
SAMPLE = "builtin:alpaca-sample"
# The README's LoRA run (its loop: train, eval, generate, export); later examples copy its run folder.
QUICK_LORA = ("ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --num-epochs 3 "
              "--learning-rate 3e-3 --eval-split 0.1 --output-dir runs/lora")
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"


def qa_csv(w: Workdir) -> None:
    """`qa.csv`: the README's "your own data" file, question and answer columns."""
    path = w.path / "qa.csv"
    if not path.exists():
        rows = [(r["instruction"] + (" " + r["input"] if r["input"] else ""), r["output"]) for r in SMALL_ALPACA_ROWS]
        path.write_text("question,answer\n" + "".join(f'"{q}","{a}"\n' for q, a in rows), encoding="utf-8")


def chat_run(w: Workdir) -> None:
    """`runs/chat-1`: a LoRA run on chat data (the README's generate/chat examples assume one)."""
    w.write_jsonl("chat-train.jsonl", CHAT_ROWS * 2)
    if not (w.path / "runs/chat-1").exists():
        w.ftcli("train", "--method", "lora", "--model", TINY, "--dataset", "chat-train.jsonl",
                "--output-dir", "runs/chat-1")


def qlora_run(w: Workdir) -> None:
    """`runs/qlora-70b`: a QLoRA run of the built-in model (10 steps) stands in for the 70B one."""
    if not (w.path / "runs/qlora-70b").exists():
        w.ftcli("train", "--method", "qlora", "--model", TINY, "--dataset", SAMPLE, "--max-steps", "10",
                "--output-dir", "runs/qlora-70b")


def manifest(w: Workdir, run: str) -> dict:
    return json.loads((w.path / run / "ftcli_run.json").read_text())


def jsonl_rows(w: Workdir, name: str) -> list[dict]:
    return [json.loads(line) for line in (w.path / name).read_text().splitlines() if line.strip()]


def check_resumed(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    m = manifest(w, "runs/a")
    assert m.get("resumed_from"), "the manifest records no resume"
    assert m["metrics"]["steps"] == 100, f"the resumed run ended at step {m['metrics']['steps']}, not 100"
    steps = [json.loads(line) for line in (w.path / "runs/a/metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "loss" in s]) == 100, "metrics.jsonl does not cover the whole run"


def check_config_repeats_quickstart(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (w.path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("NEW") == losses("runs/quickstart"), "`--config ftcli_config.yaml` did not repeat the run"


def check_eval_repeats_final_loss(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    final = manifest(w, "runs/a")["eval"]["final_loss"]
    assert f"{final:.4f}" in proc.stdout, f"the run's final eval loss {final:.4f} is not what `eval` printed"


def check_json_loss(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    assert json.loads(proc.stdout)["loss"] > 0


def check_answers(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    rows = jsonl_rows(w, "answers.jsonl")
    assert [r["prompt"] for r in rows] == QUESTIONS, "answers.jsonl does not hold one row per prompt, in order"
    assert all(r["completion_ids"] and "<|im_start|>user" in r["rendered_prompt"] for r in rows), rows[0]


def check_chat_log(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    assert len(jsonl_rows(w, "chat.jsonl")) == 2, "chat.jsonl does not hold one row per answer (2 lines typed)"


def check_jq_run_metrics(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    assert json.loads(proc.stdout)["run"]["metrics"], "`| jq .run.metrics` would print null"


# Online RL (README's GRPO section, docs/grpo.md): prompts with reference answers, and the reward files exactly as
# the documents show them (each taken from its ```python block).
MATHS = [{"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)}
         for a, b in [(7, 5), (3, 9), (12, 4), (6, 6), (8, 13), (2, 17), (15, 3), (9, 9)]]
MATHS_HELD = [{"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)}
              for a, b in [(4, 11), (14, 5)]]


def python_block(doc: Path, first_line: str) -> str:
    """The ```python block of `doc` whose first line is `first_line`."""
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"{doc.name} has no python block starting {first_line!r}")


def grpo_files(w: Workdir) -> None:
    w.write_jsonl("maths.jsonl", MATHS)
    w.write_jsonl("maths-held.jsonl", MATHS_HELD)
    (w.path / "rewards.py").write_text(python_block(README, "# rewards.py"), encoding="utf-8")


def letters_files(w: Workdir) -> None:
    w.write_jsonl("letters.jsonl", [{"prompt": f"Write some letters, round {i}:"} for i in range(24)])
    w.write_jsonl("letters-held.jsonl", [{"prompt": f"Write some letters, round {100 + i}:"} for i in range(6)])
    (w.path / "letters.py").write_text(python_block(ROOT / "docs" / "grpo.md", "# letters.py"), encoding="utf-8")


def sft_then_grpo(w: Workdir) -> None:
    """runs/sft-1 (docs/preference-tuning.md's SFT run, made here when that document's commands did not run first)."""
    grpo_files(w)
    if not (w.path / "runs/sft-1").exists():
        w.write_jsonl("sft.jsonl", CHAT_ROWS * 2)
        w.ftcli("train", "--method", "lora", "--model", TINY, "--dataset", "sft.jsonl", "--output-dir", "runs/sft-1")


def check_letters_learned(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    rewards = [r["reward"] for r in jsonl_rows(w, "runs/letters/metrics.jsonl")]
    assert len(rewards) == 24 and rewards[-1] > rewards[0] + 0.1, f"the reward did not rise: {rewards}"


def check_tuned_above_base(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    base, tuned = map(float, re.search(r"mean reward: base (\S+) -> (\S+)", proc.stdout).groups())
    assert tuned > base + 0.1, f"held-out reward base {base} -> tuned {tuned}"


def check_nothing_created(w: Workdir, proc: subprocess.CompletedProcess) -> None:
    assert not (w.path / "runs/typo").exists(), "a refused run left runs/typo behind"


@dataclass(frozen=True)
class Run:
    """How a README command is run. Unset fields: as written, in the shared folder, exit code 0."""
    replace: tuple[tuple[str, str], ...] = ()         # (as written, as run): each must occur in the command
    setup: Optional[Callable[[Workdir], None]] = None  # inputs the README assumes the reader has
    stdin: str = ""                                     # what the reader types
    exit_code: int = 0
    creates: tuple[str, ...] = ()                       # paths that must exist afterwards
    output_has: tuple[str, ...] = ()                    # text the command must print (stdout or stderr)
    check: Optional[Callable[[Workdir, subprocess.CompletedProcess], None]] = None
    interrupt_when: Optional[str] = None                # SIGTERM the command once this path exists
    env: dict[str, str] = field(default_factory=dict)


HUB_TO_BUILTIN = (("meta-llama/Llama-3.1-8B-Instruct", TINY),)
HUB_DATA_TO_BUILTIN = (("tatsu-lab/alpaca", SAMPLE),)
FULL_RUN = ("model.safetensors", "tokenizer.json", "ftcli_run.json")
EXPORTED = ("ftcli_export.json", "model.safetensors", "config.json", "README.md")

RUN: dict[str, Run] = {
    # Quick start
    "ftcli train --method full --model builtin:tiny-llama --dataset builtin:alpaca-sample --num-epochs 5 "
    "--learning-rate 1e-3 --output-dir runs/quickstart": Run(creates=tuple(f"runs/quickstart/{f}" for f in FULL_RUN)),
    'ftcli generate runs/quickstart --prompt "Make an acronym from the first letters of the words in the input." '
    '--input "apple blanket" --compare-base --max-new-tokens 32': Run(output_has=("tuned:", "base:")),
    # Your own data, pick a real model (the hub model -> the built-in one)
    f"ftcli train --method lora --model {QWEN} --dataset qa.csv --columns instruction=question,output=answer "
    "--output-dir runs/qa": Run(replace=((QWEN, TINY),), setup=qa_csv, creates=("runs/qa/adapter_model.safetensors",)),
    f"ftcli prepare --model {QWEN} --dataset qa.csv --columns instruction=question,output=answer": Run(
        replace=((QWEN, TINY),), setup=qa_csv),
    "ftcli inspect meta-llama/Llama-3.1-8B-Instruct --seq-length 2048 --gpu-memory 24GB": Run(replace=HUB_TO_BUILTIN),
    # The loop: train, eval, generate, export
    QUICK_LORA: Run(output_has=("eval loss: base",), creates=("runs/lora/adapter_model.safetensors",)),
    "ftcli eval runs/lora --compare-base": Run(output_has=("base",)),
    'ftcli generate runs/lora --prompt "Give an antonym." --input "hot" --compare-base --max-new-tokens 16': Run(
        output_has=("tuned:", "base:")),
    "ftcli export runs/lora --output models/lora": Run(creates=tuple(f"models/lora/{f}" for f in EXPORTED)),
    "ftcli inspect runs/lora": Run(output_has=("finished",)),
    "ftcli train --help": Run(output_has=("--method",)),
    # ftcli train: the run folder, checkpoints and resuming
    "ftcli train --config ftcli_config.yaml --output-dir NEW": Run(
        setup=lambda w: shutil.copy(w.path / "runs/quickstart/ftcli_config.yaml", w.path / "ftcli_config.yaml"),
        creates=tuple(f"NEW/{f}" for f in FULL_RUN), check=check_config_repeats_quickstart),
    # "... Ctrl-C, a SIGTERM from the scheduler ...": stopped after its first checkpoint, then resumed.
    "ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --save-steps 50 "
    "--save-total-limit 3 --output-dir runs/a": Run(
        interrupt_when="runs/a/checkpoint-50/ftcli_checkpoint.json", env={"FTCLI_DEBUG_STEP_DELAY": "0.05"},
        exit_code=130, output_has=("--resume",)),
    "ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --save-steps 50 "
    "--save-total-limit 3 --output-dir runs/a --resume": Run(check=check_resumed),
    # Preference tuning: SFT, DPO on top, export
    "ftcli train --method lora --model meta-llama/Llama-3.2-1B-Instruct --dataset sft.jsonl --output-dir runs/sft-1":
        Run(replace=(("meta-llama/Llama-3.2-1B-Instruct", TINY),),
            setup=lambda w: w.write_jsonl("sft.jsonl", CHAT_ROWS * 2)),
    "ftcli train --objective dpo --method lora --model runs/sft-1 --dataset prefs.jsonl --eval-split 0.05 "
    "--output-dir runs/dpo-1": Run(setup=lambda w: w.write_jsonl("prefs.jsonl", PREF_ROWS),
                                   creates=("runs/dpo-1/adapter_model.safetensors",)),
    "ftcli export runs/dpo-1 --output models/dpo-1": Run(creates=tuple(f"models/dpo-1/{f}" for f in EXPORTED)),
    "ftcli inspect prefs.jsonl": Run(setup=lambda w: w.write_jsonl("prefs.jsonl", PREF_ROWS)),
    # KTO on labeled rows, ORPO from the base model, SimPO continuing the SFT run (docs/preference-tuning.md)
    "ftcli train --objective kto --method lora --model runs/sft-1 --dataset feedback.jsonl --output-dir runs/kto-1":
        Run(setup=lambda w: w.write_jsonl("feedback.jsonl", FEEDBACK_ROWS), output_has=("KTO weights",),
            creates=("runs/kto-1/adapter_model.safetensors",)),
    "ftcli train --objective orpo --method lora --model meta-llama/Llama-3.2-1B-Instruct --dataset prefs.jsonl "
    "--output-dir runs/orpo-1": Run(replace=(("meta-llama/Llama-3.2-1B-Instruct", TINY),),
                                    setup=lambda w: w.write_jsonl("prefs.jsonl", PREF_ROWS),
                                    creates=("runs/orpo-1/adapter_model.safetensors",)),
    "ftcli train --objective simpo --method lora --model runs/sft-1 --dataset prefs.jsonl --output-dir runs/simpo-1":
        Run(setup=lambda w: w.write_jsonl("prefs.jsonl", PREF_ROWS), creates=("runs/simpo-1/adapter_model.safetensors",)),
    # Reward models: on the same pairs, continuing the SFT run
    "ftcli train --objective reward --method lora --model runs/sft-1 --dataset prefs.jsonl --eval-split 0.05 "
    "--output-dir runs/rm-1": Run(setup=lambda w: w.write_jsonl("prefs.jsonl", PREF_ROWS),
                                  creates=("runs/rm-1/adapter_model.safetensors",)),
    "ftcli eval runs/rm-1": Run(output_has=("pairwise accuracy",)),
    "ftcli export runs/rm-1 --output models/rm-1": Run(creates=tuple(f"models/rm-1/{f}" for f in EXPORTED)),
    # Evaluation (a new example in runs/a: the checkpoint example's runs/a would be refused, exit 5)
    "ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --eval-split 0.1 "
    "--eval-steps 20 --early-stopping-patience 3 --load-best --save-steps 20 --output-dir runs/a": Run(
        setup=lambda w: w.set_aside("runs/a"), output_has=("eval loss: base",)),
    "ftcli eval runs/a": Run(check=check_eval_repeats_final_loss),
    "ftcli eval runs/a --dataset dev.jsonl --compare-base": Run(
        setup=lambda w: w.write_jsonl("dev.jsonl", SMALL_ALPACA_ROWS), output_has=("eval loss: base",)),
    "ftcli eval meta-llama/Llama-3.1-8B-Instruct --dataset dev.jsonl --seq-length 4096 --json": Run(
        replace=HUB_TO_BUILTIN, setup=lambda w: w.write_jsonl("dev.jsonl", SMALL_ALPACA_ROWS), check=check_json_loss),
    # Performance, data, warmup
    "ftcli --help": Run(output_has=("train", "prepare", "export")),
    "ftcli prepare --model meta-llama/Llama-3.1-8B-Instruct --dataset 'data/*.jsonl' --seq-length 1024": Run(
        replace=HUB_TO_BUILTIN,
        setup=lambda w: (w.write_jsonl("data/part-1.jsonl", SMALL_ALPACA_ROWS[:4]),
                         w.write_jsonl("data/part-2.jsonl", SMALL_ALPACA_ROWS[4:]))),
    "ftcli train --method lora --model meta-llama/Llama-3.1-8B-Instruct --dataset 'data/*.jsonl' --seq-length 1024":
        Run(replace=HUB_TO_BUILTIN, output_has=("reusing prepared data",)),  # README: "# reuses it"
    "ftcli train ... --dataset alpaca.jsonl --dataset chat.jsonl:0.25": Run(
        replace=(("...", f"--method lora --model {TINY} --output-dir runs/mixture"),),
        setup=lambda w: (w.write_jsonl("alpaca.jsonl", SMALL_ALPACA_ROWS), w.write_jsonl("chat.jsonl", CHAT_ROWS)),
        creates=("runs/mixture/adapter_model.safetensors",)),
    "ftcli warmup --help": Run(output_has=("--compile",)),
    # inspect
    "ftcli inspect meta-llama/Llama-3.1-8B-Instruct --seq-length 4096 --gpu-memory 80GB": Run(replace=HUB_TO_BUILTIN),
    "ftcli inspect runs/lora-20261128-120000": Run(
        setup=lambda w: w.copy_run_made_by(QUICK_LORA, "runs/lora-20261128-120000")),
    "ftcli inspect runs/lora-20261128-120000 --json": Run(
        setup=lambda w: w.copy_run_made_by(QUICK_LORA, "runs/lora-20261128-120000"), check=check_jq_run_metrics),
    "ftcli inspect data/train.jsonl --model meta-llama/Llama-3.1-8B-Instruct --seq-length 2048": Run(
        replace=HUB_TO_BUILTIN, setup=lambda w: w.write_jsonl("data/train.jsonl", SMALL_ALPACA_ROWS)),
    # export (runs/lora-1: the quick start's LoRA run; runs/qlora-70b: a QLoRA run of the tiny model)
    "ftcli export runs/lora-1 --output models/lora-1": Run(
        setup=lambda w: w.copy_run_made_by(QUICK_LORA, "runs/lora-1"),
        creates=tuple(f"models/lora-1/{f}" for f in EXPORTED)),
    "ftcli export runs/qlora-70b --output models/qlora-70b --max-shard-size 5GB": Run(
        setup=qlora_run, creates=tuple(f"models/qlora-70b/{f}" for f in EXPORTED)),
    # generate and chat (runs/chat-1: a LoRA run on chat data)
    'ftcli generate runs/lora-1 --prompt "Add 2 and 3."': Run(setup=lambda w: w.copy_run_made_by(QUICK_LORA,
                                                                                             "runs/lora-1")),
    'ftcli generate runs/lora-1 --prompt "Add 2 and 3." --compare-base --show-prompt': Run(
        setup=lambda w: w.copy_run_made_by(QUICK_LORA, "runs/lora-1"), output_has=("tuned:", "base:", "### Response:")),
    "ftcli generate runs/chat-1 --prompts-file questions.jsonl --output answers.jsonl": Run(
        setup=lambda w: (chat_run(w), w.write_jsonl("questions.jsonl", QUESTIONS)),
        check=check_answers),
    'ftcli chat runs/chat-1 --system "You are terse."': Run(setup=chat_run, stdin="Name a color.\n/exit\n"),
    # `printf 'Hi\nWhat did I just say?\n' | ftcli chat ...` (the mixture example's chat.jsonl is data, set aside)
    "ftcli chat runs/chat-1 --output chat.jsonl": Run(
        setup=lambda w: (chat_run(w), w.set_aside("chat.jsonl")),
        check=check_chat_log),
    # The reference scripts, on the built-in model and data (same flags otherwise)
    "ftcli train --method full --model meta-llama/Llama-3.2-3B-Instruct --dtype bfloat16 --batch-size 8 "
    "--seq-length 2048 --learning-rate 5e-5 --dataset tatsu-lab/alpaca --dataset-size 500 --output-dir runs/3b-full":
        Run(replace=(("meta-llama/Llama-3.2-3B-Instruct", TINY), *HUB_DATA_TO_BUILTIN),
            creates=tuple(f"runs/3b-full/{f}" for f in FULL_RUN)),
    "ftcli train --method lora --model meta-llama/Llama-3.1-8B-Instruct --dtype bfloat16 --batch-size 4 "
    "--learning-rate 1e-4 --lora-rank 8 --dataset tatsu-lab/alpaca --dataset-size 500 --output-dir runs/8b-lora":
        Run(replace=(*HUB_TO_BUILTIN, *HUB_DATA_TO_BUILTIN), creates=("runs/8b-lora/adapter_model.safetensors",)),
    "ftcli train --method qlora --model meta-llama/Llama-3.1-70B-Instruct --dtype bfloat16 --batch-size 8 "
    "--learning-rate 1e-4 --dataset tatsu-lab/alpaca --dataset-size 500 --output-dir runs/70b-qlora":
        Run(replace=(("meta-llama/Llama-3.1-70B-Instruct", TINY), *HUB_DATA_TO_BUILTIN),
            creates=("runs/70b-qlora/adapter_model.safetensors",)),
    # Online RL: the README's GRPO section (Qwen -> the built-in model), then docs/grpo.md
    f"ftcli train --objective grpo --method lora --model {QWEN} --dataset maths.jsonl --reward rewards.py:correct "
    "--reward builtin:length-penalty=200 --output-dir runs/grpo": Run(
        replace=((QWEN, TINY),), setup=grpo_files,
        creates=("runs/grpo/adapter_model.safetensors", "runs/grpo/completions.jsonl")),
    "ftcli eval runs/grpo --reward rewards.py:correct --dataset maths-held.jsonl": Run(
        setup=grpo_files, output_has=("mean reward: base",)),
    "ftcli inspect runs/grpo": Run(output_has=("latest completions",)),
    "ftcli train --objective grpo --method lora --model runs/sft-1 --dataset maths.jsonl --reward builtin:math-match "
    "--output-dir runs/grpo-1": Run(setup=sft_then_grpo, creates=("runs/grpo-1/adapter_model.safetensors",)),
    "ftcli eval runs/grpo-1 --reward builtin:math-match --dataset maths-held.jsonl": Run(
        setup=grpo_files, output_has=("mean reward: base",)),
    "ftcli export runs/grpo-1 --output models/grpo-1": Run(creates=tuple(f"models/grpo-1/{f}" for f in EXPORTED)),
    "ftcli train --objective grpo --method full --model builtin:tiny-llama --dataset letters.jsonl --reward "
    "letters.py:share_e --learning-rate 2e-2 --max-completion-length 16 --output-dir runs/letters": Run(
        setup=letters_files, check=check_letters_learned),
    "ftcli eval runs/letters --reward letters.py:share_e --dataset letters-held.jsonl": Run(
        setup=letters_files, check=check_tuned_above_base),
    "ftcli inspect runs/letters": Run(output_has=("latest completions", "letters.py:share_e")),
    "ftcli inspect maths.jsonl --objective grpo --model builtin:tiny-llama": Run(
        setup=grpo_files, output_has=("reward columns",)),
    "ftcli train --objective grpo --model builtin:tiny-llama --dataset maths.jsonl --reward rewards.py:corect "
    "--output-dir runs/typo": Run(setup=grpo_files, exit_code=2, output_has=("rewards.py has no function corect",),
                                  check=check_nothing_created),
}

PROSE = "names a command (or one of its flags) in a sentence: not a command line"
PLACEHOLDER = "a synopsis: its MODEL / RUN / TARGET / DIR / mix/ is a placeholder no README command makes"
ELIDED = "`...` stands for the reader's own flags"
MULTI = "needs several GPUs or machines (8 processes, or a second machine's rendezvous)"
COMPILE = "torch.compile on CPU: about 100 s cold by the README's own figure, too long here (tests/test_warmup.py)"
EXAMPLE = ("an examples/ file on a hub model and dataset: tests/test_examples.py loads it and trains that kind of run "
           "on the built-in model")
NETWORK = "fetches llama.cpp's converter from the package index on first use: no network here (tests/test_gguf.py)"

NOT_RUN: dict[str, str] = {
    **{f"ftcli {name}": PROSE for name in ("train", "prepare", "warmup", "export", "generate", "chat", "inspect",
                                           "eval")},
    "ftcli train --method full|lora|qlora|fsdp": PROSE,
    "ftcli train --method full": PROSE,
    "ftcli train --method lora": PROSE,
    "ftcli train --method fsdp": PROSE,
    "ftcli train --objective dpo": PROSE,
    "ftcli train --objective reward": PROSE,
    "ftcli train --objective NAME --help": PLACEHOLDER,
    "ftcli train --objective grpo --reward-model runs/rm-1": PROSE,
    "ftcli eval RUN --reward model:RM --dataset prompts.jsonl": PLACEHOLDER,
    "ftcli prepare --objective dpo": PROSE,
    "ftcli prepare --objective kto": PROSE,
    "ftcli inspect MODEL --objective orpo": PLACEHOLDER,
    "ftcli prepare --output-dir": PROSE,
    "ftcli --debug train ...": ELIDED,
    "ftcli generate ... > answers.txt": ELIDED,
    "ftcli inspect MODEL --objective dpo [--precompute-ref]": PLACEHOLDER,
    "ftcli inspect RUN": PLACEHOLDER,
    "ftcli eval TARGET": PLACEHOLDER,
    "ftcli eval RUN": PLACEHOLDER,
    "ftcli eval MODEL": PLACEHOLDER,
    "ftcli train --dataset DIR": PLACEHOLDER,
    "ftcli train --dataset mix/": PLACEHOLDER,
    "ftcli train --method lora --model meta-llama/Llama-3.1-8B-Instruct --dataset tatsu-lab/alpaca":
        "a hub model and dataset; on the built-in ones it is the README's LoRA line, which runs",
    "ftcli inspect MODEL": PLACEHOLDER,
    "ftcli inspect FILE": PLACEHOLDER,
    "ftcli inspect FILE --model MODEL": PLACEHOLDER,
    "ftcli chat RUN": PLACEHOLDER,
    "ftcli train --config examples/lora-qwen2.5-0.5b.yaml": EXAMPLE,
    "ftcli train --config examples/lora-llama-3.1-8b.yaml --num-epochs 2": EXAMPLE,
    "ftcli export runs/lora --output models/lora-gguf --format gguf": NETWORK,
    "ftcli train --method fsdp --model meta-llama/Llama-3.1-70B-Instruct --nproc-per-node 8": MULTI,
    "ftcli train --method fsdp --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr 10.0.0.1 "
    "--master-port 29500 ...": MULTI,
    "ftcli train --method fsdp --nnodes 2 --node-rank 1 --nproc-per-node 8 --master-addr 10.0.0.1 "
    "--master-port 29500 ...": MULTI,
    "ftcli train --method fsdp --model meta-llama/Llama-3.1-70B-Instruct --nnodes 2 --node-rank 0 "
    "--nproc-per-node 1 --master-addr HOST0 --dataset tatsu-lab/alpaca --dataset-size 500 "
    "--output-dir runs/70b-fsdp": MULTI,
    "ftcli warmup --method lora --model meta-llama/Llama-3.1-8B-Instruct --dataset tatsu-lab/alpaca --batch-size 8":
        COMPILE,
    "ftcli train --method lora --model meta-llama/Llama-3.1-8B-Instruct --dataset tatsu-lab/alpaca --batch-size 8 "
    "--compile": COMPILE,
    "ftcli export runs/lora-1 --output models/lora-1-gguf --format gguf": NETWORK,
    "ftcli export runs/lora-1 --output models/lora-1-q8 --format gguf --gguf-type q8_0": NETWORK,
    "ftcli train --objective grpo": PROSE,
    "ftcli prepare --objective grpo": PROSE,
    "ftcli eval --reward": PROSE,
    "ftcli eval RUN --reward ... --dataset PROMPTS": PLACEHOLDER,
    "ftcli inspect MODEL --objective grpo": PLACEHOLDER,
}

# Each distinct command once, where it first appears (docs repeat some README commands).
TO_RUN = [c for i, c in enumerate(COMMANDS) if c.text in RUN and c.text not in {d.text for d in COMMANDS[:i]}]


# ---------------------------------------------------------------------------------------------------------
# 1. Flags: every command against the real Typer app (no torch)
# ---------------------------------------------------------------------------------------------------------

def _option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":  # (Typer may vendor its own click: no isinstance)
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def flag_problems(command: ReadmeCommand) -> list[str]:
    import typer

    from ftcli.cli import app

    group = typer.main.get_command(app)
    argv = [a.strip("[]") for a in command.argv[1:]]  # `[--precompute-ref]`: an optional flag, shown in brackets
    problems = []
    while argv and argv[0].startswith("-"):
        flag = argv.pop(0).split("=", 1)[0]
        if flag not in _option_names(group):
            problems.append(f"`ftcli {flag}` is not an option of ftcli")
    if not argv:
        return problems if command.argv[1:] in ([], ["--help"], ["--version"]) or problems else ["no subcommand"]
    name = argv.pop(0)
    if name not in group.commands:
        return problems + [f"no such command `ftcli {name}` (commands: {', '.join(group.commands)})"]
    known = _option_names(group.commands[name])
    for token in argv:
        if token == "--":
            break
        if re.match(r"^--?[A-Za-z]", token) and token.split("=", 1)[0] not in known:
            problems.append(f"`{token.split('=', 1)[0]}` is not an option of `ftcli {name}`")
    return problems


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_uses_real_flags(command: ReadmeCommand) -> None:
    problems = flag_problems(command)
    assert not problems, f"{command.source} line {command.line}: `{command.text}`: " + "; ".join(problems)


def test_extraction_finds_the_readme_commands() -> None:
    """The extractor itself: the quick start's chained command, an inline span, a continued line, a pipe."""
    texts = {c.text for c in COMMANDS}
    assert len(COMMANDS) >= 60, len(COMMANDS)
    assert any(t.startswith("ftcli train --method full --model builtin:tiny-llama") for t in texts)
    assert any(t.startswith("ftcli generate runs/quickstart --prompt") for t in texts)
    assert any("--eval-steps 20 --early-stopping-patience 3" in t for t in texts)  # joined across `\`
    assert any(c.stdin_from and c.stdin_from.startswith("printf ") for c in COMMANDS)
    assert not any("#" in t for t in texts), "a `# comment` was kept"


# ---------------------------------------------------------------------------------------------------------
# 2. Every command is run or listed with its reason
# ---------------------------------------------------------------------------------------------------------

def test_every_readme_command_is_run_or_listed() -> None:
    texts = {c.text for c in COMMANDS}
    neither = [f"{c.source}:{c.line}: {c.text}" for c in COMMANDS if c.text not in RUN and c.text not in NOT_RUN]
    both = sorted(set(RUN) & set(NOT_RUN))
    stale = sorted(k for k in [*RUN, *NOT_RUN] if k not in texts)
    bad_replace = [f"{k}: {old!r}" for k, run in RUN.items() for old, _ in run.replace if old not in k]
    assert not neither, ("README commands neither run nor listed in NOT_RUN (add one or the other):\n"
                         + "\n".join(neither))
    assert not both, f"in both RUN and NOT_RUN: {both}"
    assert not stale, "RUN / NOT_RUN entries that match no README command (the README changed?):\n" + "\n".join(stale)
    assert not bad_replace, f"replacements that do not occur in their command: {bad_replace}"


# ---------------------------------------------------------------------------------------------------------
# 3. Run them, in README order, in one folder
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, ftcli_home: Path) -> Workdir:
    return Workdir(tmp_path_factory.mktemp("readme"), ftcli_home)


def _option_value(argv: list[str], flag: str) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _execute(w: Workdir, command: ReadmeCommand, run: Run, text: str) -> subprocess.CompletedProcess:
    script = f"{command.stdin_from} | {text}" if command.stdin_from else f"exec {text}"
    env = {**w.env, **run.env}
    if run.interrupt_when is None:
        return subprocess.run(["bash", "-c", script], cwd=w.path, env=env, input=run.stdin, capture_output=True,
                              text=True, timeout=600)
    proc = subprocess.Popen(["bash", "-c", script], cwd=w.path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (w.path / run.interrupt_when).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    signalled = proc.poll() is None
    if signalled:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert signalled, f"it ended (exit {proc.returncode}) before {run.interrupt_when} appeared:\n" + tail(result)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("command", TO_RUN, ids=[c.id for c in TO_RUN])
def test_readme_command_runs(command: ReadmeCommand, workdir: Workdir) -> None:
    w, run = workdir, RUN[command.text]
    if run.setup:
        run.setup(w)
    text = command.text
    for old, new in run.replace:
        text = text.replace(old, new)
    before = set(os.listdir(w.path / "runs")) if (w.path / "runs").is_dir() else set()
    proc = _execute(w, command, run, text)
    where = f"{command.source} line {command.line}: `{command.text}`"
    if text != command.text:
        where += f"\n  run as `{text}`"
    assert proc.returncode == run.exit_code, (
        f"{where}\n  exited {proc.returncode}, the README says {run.exit_code}:\n{tail(proc)}")
    after = set(os.listdir(w.path / "runs")) if (w.path / "runs").is_dir() else set()
    w.made[command.text] = sorted(f"runs/{d}" for d in after - before)

    argv = shlex.split(text)
    name = next((a for a in argv[1:] if not a.startswith("-")), None)
    expected = list(run.creates)
    if name == "train" and run.exit_code == 0 and "--help" not in argv:
        out = _option_value(argv, "--output-dir")
        runs = [out] if out else w.made[command.text]
        assert runs, f"{where}\n  made no run folder under runs/"
        for folder in runs:
            status = manifest(w, folder)["status"]
            assert status == "finished", f"{where}\n  {folder}/ftcli_run.json says {status!r}"
    if name == "export" and run.exit_code == 0:
        expected.append(f"{_option_value(argv, '--output')}/ftcli_export.json")
    missing = [p for p in expected if not (w.path / p).exists()]
    assert not missing, f"{where}\n  did not make {missing}:\n{tail(proc)}"
    output = proc.stdout + proc.stderr
    absent = [s for s in run.output_has if s not in output]
    assert not absent, f"{where}\n  printed none of {absent}:\n{tail(proc)}"
    if run.check:
        try:
            run.check(w, proc)
        except (AssertionError, KeyError, ValueError) as exc:
            pytest.fail(f"{where}\n  {type(exc).__name__}: {exc}\n{tail(proc)}")
