"""What ftcli draws fits the terminal: every command's help, the live training line, `inspect`'s tables.

Help is rendered through the real CLI at 80 and 120 columns (COLUMNS, which Rich reads): every option's
every name is on screen whole and no line is wider than the terminal. The live line is drawn by the
training display itself, driven with a fake trainer state, on a recording terminal of 80, 100 and 120
columns. `inspect` is run at 80 columns on the tiny model and on a finished run.
"""

from __future__ import annotations

import io
import os
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from ftcli.cli import COMMANDS, app

WIDTHS = [80, 120]


def _help(cli, monkeypatch: pytest.MonkeyPatch, width: int, *argv: str) -> str:
    from rich.console import Console

    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    # Rich reads COLUMNS from the os.environ object it captured at import; `datasets.map(num_proc>1)` rebinds
    # os.environ to a copy, after which an in-process test's setenv would no longer reach Rich (a real command
    # starts afresh).
    monkeypatch.setattr(Console, "_environ", os.environ)
    result = cli(*argv, "--help")
    assert result.exit_code == 0, result.output
    return result.stdout


def _shown_params(name: str) -> list:
    """The options and arguments a command's help must show (those not hidden)."""
    import typer.main

    group = typer.main.get_command(app)
    command = group.commands[name]
    return [p for p in command.params if not getattr(p, "hidden", False)]


def _assert_fits(text: str, width: int) -> None:
    lines = text.splitlines()
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, f"{len(too_wide)} lines wider than {width}: {too_wide[:3]}"
    assert "…" not in text, [line for line in lines if "…" in line][:3]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", [name for name, _ in COMMANDS])
def test_every_command_help_shows_every_option_name_whole(cli, monkeypatch: pytest.MonkeyPatch, name: str,
                                                          width: int) -> None:
    text = _help(cli, monkeypatch, width, name)
    _assert_fits(text, width)
    assert len(max(text.splitlines(), key=len)) == width, "the help is not drawn at the asked width"
    words = set(re.findall(r"(?<![\w-])-{1,2}[\w-]+|[A-Z][A-Z_]+", text))
    for param in _shown_params(name):
        names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else \
            [param.metavar or param.name.upper()]
        for flag in names:
            assert flag in words, f"`ftcli {name} --help` at {width} columns does not show {flag} whole"
    # The argument is named as a word, in the usage line too; descriptions are joined, not broken by the source.
    assert "{" not in text.splitlines()[1]
    usage = " ".join(text.split())
    if name in ("export",):
        assert f"{name} [OPTIONS] SOURCE" in usage
    elif name not in ("train", "prepare", "warmup"):
        assert f"{name} [OPTIONS] TARGET" in usage


@pytest.mark.parametrize("width", WIDTHS)
def test_top_level_help_fits(cli, monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    text = _help(cli, monkeypatch, width)
    _assert_fits(text, width)
    for name, _ in COMMANDS:
        assert re.search(rf"│ {name}\s", text), name
    # Each command's summary is one paragraph, wrapped by the terminal: no line of it ends short mid-sentence
    # the way a docstring's own line break would leave it (warmup's summary spans several lines).
    warmup = text[text.index("│ warmup"):text.index("│ export")]
    rows = [line.strip("│ ").rstrip() for line in warmup.splitlines()]
    assert all(len(row) > width - 30 for row in rows[:-1]), rows


def test_prepare_and_warmup_show_only_what_they_read(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    train = _help(cli, monkeypatch, 80, "train")
    prepare = _help(cli, monkeypatch, 80, "prepare")
    warmup = _help(cli, monkeypatch, 80, "warmup")
    for text in (train, prepare, warmup):
        for flag in ("--model", "--dataset", "--seq-length", "--batch-size", "--template", "--config"):
            assert flag in text, flag
    for flag in ("--optim", "--report-to", "--resume", "--learning-rate", "--save-steps", "--nproc-per-node",
                 "--early-stopping-patience", "--num-epochs"):
        assert flag in train and flag not in prepare and flag not in warmup, flag
    assert "--lora-rank" in warmup and "--lora-rank" not in prepare
    assert "--max-prompt-length" in prepare and "--num-proc" in prepare
    # Shorter than train's, and train's own shorter than before (329 lines at 80 columns).
    assert len(prepare.splitlines()) < len(warmup.splitlines()) < len(train.splitlines()) < 250


def test_hidden_train_options_are_still_accepted(cli, tmp_path, small_alpaca) -> None:
    """A whole `train` command line still works with `prepare` (the README's "same flags" promise)."""
    result = cli("prepare", "--model", "builtin:tiny-llama", "--dataset", small_alpaca, "--seq-length", "64",
                 "--method", "lora", "--lr", "3e-4", "--optim", "adamw_torch", "--report-to", "none",
                 "--output-dir", tmp_path / "prepared")
    assert result.exit_code == 0, result.output


# ---- the live training line -------------------------------------------------------------------------

FIELDS = {"loss": 1.2483461697045715, "learning_rate": 1e-4}
PREFERENCE = {"rewards/margins": 0.031, "rewards/accuracies": 0.75, "rewards/chosen": 0.012,
              "rewards/rejected": -0.019}


def _state(step: int, total: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=total, is_world_process_zero=True, epoch=0.5,
                           num_input_tokens_seen=123_456)


def _draw(width: int, logs: dict, evaluates: bool) -> list[str]:
    """The real display, driven like a run at step 85 of 1000, drawn on a terminal `width` columns wide."""
    from ftcli.training.progress import TrainingDisplay

    out = Console(width=width, force_terminal=True, record=True, file=io.StringIO(), color_system=None)
    display = TrainingDisplay(device="cpu", out=out, evaluates=evaluates)
    display.on_train_begin(None, _state(0, 1000), None)
    try:
        display.on_log(None, _state(85, 1000), None, logs={**FIELDS, **logs})
        if evaluates:
            display.on_log(None, _state(85, 1000), None, logs={"eval_loss": 1.3001, "eval_tokens": 100})
        display.on_step_end(None, _state(85, 1000), None)
        screen = Console(width=width, force_terminal=True, record=True, file=io.StringIO(), color_system=None)
        screen.print(*display.progress.get_renderables())
        return screen.export_text().splitlines()
    finally:
        display.close()


@pytest.mark.parametrize("width", [80, 100, 120])
@pytest.mark.parametrize("kind", ["sft", "sft+eval", "dpo"])
def test_progress_line_fits_and_keeps_what_matters(width: int, kind: str) -> None:
    logs = PREFERENCE if kind == "dpo" else {}
    lines = _draw(width, logs, evaluates=kind != "sft")
    assert len(lines) == 1, lines  # nothing wraps
    line = lines[0]
    assert len(line) <= width, line
    assert "…" not in line
    for needed in (" 85/1000 ", "loss 1.2483", "eta ", "━"):
        assert needed in line, (needed, line)
    assert re.search(r"eta \d+:\d\d:\d\d", line), line
    if width >= 100:
        assert "lr 1.00e-04" in line and "tok/s" in line
    if width >= 120 and kind != "sft":
        assert "eval 1.3001" in line


def test_progress_line_drops_fields_by_rank() -> None:
    from ftcli.training.progress import LINE_FIELDS, fit_line

    fields = {"loss": "1.2483", "lr": "1.00e-04", "tps": "12,345", "eta": "0:01:23", "mem": "1.2 GB", "eval": "1.3001",
              "margin": "margin 0.031", "acc": "acc 75%", "rewards": "chosen 0.012 rejected -0.019"}
    words = {"loss": "loss 1.2483", "eval": "eval 1.3001", "margin": "margin", "acc": "acc 75%", "rewards": "chosen",
             "lr": "lr 1.00e-04", "tps": "tok/s", "mem": "mem 1.2 GB", "eta": "eta 0:01:23", "steps": "85/1000",
             "label": "train"}
    # GRPO's line (no eval set): its reward fields instead of DPO's.
    grpo = {k: v for k, v in fields.items() if k not in ("eval", "margin", "acc", "rewards")}
    grpo.update(reward="reward 0.281±0.05", flat="flat 12%", kl="kl 0.004", len="len 31 (clip 90%)")
    grpo_words = {k: v for k, v in words.items() if k not in ("eval", "margin", "acc", "rewards")}
    grpo_words.update(reward="reward 0.281", flat="flat 12%", kl="kl 0.004", len="len 31")
    rank = dict(LINE_FIELDS)
    for line_fields, line_words, evaluates in ((fields, words, True), (grpo, grpo_words, False)):
        for width in range(30, 200, 7):
            out = Console(width=width, force_terminal=True, record=True, file=io.StringIO(), color_system=None)
            out.print(fit_line(85, 1000, line_fields, width, evaluates=evaluates))
            lines = out.export_text().splitlines()
            assert len(lines) == 1 and len(lines[0]) <= width, (width, lines)
            shown = {key for key, word in line_words.items() if word in lines[0]}
            assert {"steps", "eta"} <= shown, (width, lines[0])
            # A field is shown only if every field of this line ranked before it is shown too.
            for key in shown:
                assert all(k in shown for k, r in rank.items() if r < rank[key] and k in line_words), (
                    width, key, lines[0])


def test_piped_progress_lines_are_unchanged() -> None:
    from ftcli.training.progress import TrainingDisplay

    out = Console(width=200, force_terminal=False, record=True, file=io.StringIO())
    display = TrainingDisplay(device="cpu", out=out)
    display.on_train_begin(None, _state(0, 1000), None)
    display.on_log(None, _state(85, 1000), None, logs=dict(FIELDS))
    line = out.export_text().strip()
    assert re.fullmatch(r"step 85/1000  loss 1\.2483  lr 1\.00e-04  [\d,]+ tok/s  eta \d+:\d\d:\d\d  mem .+", line), line


# ---- inspect's tables -------------------------------------------------------------------------------


def test_inspect_model_fits_80_columns(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    for extra in ([], ["--objective", "dpo", "--gpu-memory", "24GB"]):
        result = cli("inspect", "builtin:tiny-llama", *extra)
        assert result.exit_code == 0, result.output
        _assert_fits(result.stdout, 80)
        for text in ("trainable params", "301,120", "weights", "optimizer (AdamW)", "total", "qlora", "fsdp"):
            assert text in result.stdout, text
        assert re.search(r"│ total\s+│\s+[\d.]+ [KMG]iB │", result.stdout), result.stdout


def test_inspect_run_formats_numbers(cli, monkeypatch: pytest.MonkeyPatch, tmp_path, small_alpaca) -> None:
    run = tmp_path / "run"
    trained = cli("train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", small_alpaca,
                  "--max-steps", "2", "--batch-size", "4", "--seq-length", "64", "--report-to", "none",
                  "--output-dir", run)
    assert trained.exit_code == 0, trained.output
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("inspect", run)
    assert result.exit_code == 0, result.output
    _assert_fits(result.stdout, 80)
    assert re.search(r"│ train_loss\s+│ \d+\.\d{4}\s+│", result.stdout), result.stdout
    assert re.search(r"│ train_runtime\s+│ [\d,]+\.\d s\s+│", result.stdout), result.stdout
    assert not re.search(r"\d\.\d{6,}", result.stdout), "a raw float is printed"
