"""Every user mistake: one clear line, a documented non-zero exit code, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcli.errors import EXIT_CONFIG, EXIT_DATA, EXIT_MODEL, EXIT_OUTPUT

TINY = ["--model", "builtin:tiny-llama"]


def assert_one_line_error(result, exit_code: int, *needles: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ")
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_unknown_method(cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--method", "dpo", *TINY, "--output-dir", out)
    assert_one_line_error(result, EXIT_CONFIG, "--method", "'dpo'")
    assert not out.exists()


@pytest.mark.parametrize("lr", ["0", "-1e-4"])
def test_learning_rate_must_be_positive(cli, tmp_path: Path, lr: str) -> None:
    result = cli("train", *TINY, "--learning-rate", lr, "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_CONFIG, "--learning-rate", "greater than 0")


def test_all_problems_reported_together(cli, tmp_path: Path) -> None:
    result = cli("train", *TINY, "--batch-size", "0", "--lora-dropout", "1.5", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_CONFIG, "--batch-size", "--lora-dropout")


def test_missing_dataset_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("train", *TINY, "--dataset", tmp_path / "nope.jsonl", "--output-dir", out)
    assert_one_line_error(result, EXIT_DATA, "nope.jsonl", "does not exist")
    assert not out.exists()


def test_brackets_in_a_message_are_printed_as_text(cli, tmp_path: Path) -> None:
    # Paths and library errors can hold `[...]`; Rich must not read them as markup (or crash on `[/x]`).
    missing = tmp_path / "data[/bold]" / "rows[v2].jsonl"
    result = cli("train", *TINY, "--dataset", missing, "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_DATA, "rows[v2].jsonl", "data[/bold]")


def test_broken_jsonl_line_is_named(cli, tmp_path: Path) -> None:
    data = tmp_path / "broken.jsonl"
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    data.write_text(f"{good}\n{good}\n{{\"instruction\": \"c\", \n{good}\n")
    out = tmp_path / "run"
    result = cli("train", *TINY, "--dataset", data, "--output-dir", out)
    assert_one_line_error(result, EXIT_DATA, "broken.jsonl:3", "not valid JSON")
    assert not out.exists()


def test_missing_column_is_named(cli, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    result = cli("train", *TINY, "--dataset", data, "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_DATA, "'instruction'", "'output'", "question")


def test_missing_local_model(cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--model", tmp_path / "no-model", "--dataset", "builtin:alpaca-sample", "--output-dir", out)
    assert_one_line_error(result, EXIT_CONFIG, "no-model", "does not exist")  # a path typed wrong: exit 2
    assert not out.exists()


def test_hub_model_offline(cli, tmp_path: Path) -> None:
    result = cli("train", "--model", "ftcli-test-org/not-a-cached-model", "--dataset", "builtin:alpaca-sample",
                 "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_MODEL, "ftcli-test-org/not-a-cached-model", "not in the local cache",
                          "HF_HUB_OFFLINE")


def test_unknown_builtin(cli, tmp_path: Path) -> None:
    result = cli("train", "--model", "builtin:huge-llama", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_MODEL, "builtin:huge-llama", "builtin:tiny-llama")


def test_non_empty_output_dir_refused(cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = cli("train", *TINY, "--dataset", "builtin:alpaca-sample", "--output-dir", out)
    assert_one_line_error(result, EXIT_OUTPUT, "not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_remote_code_needs_opt_in(cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A model whose config points at repository code is refused unless --trust-remote-code."""
    model = tmp_path / "custom-model"
    model.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update({"model_type": "ftcli-custom", "auto_map": {"AutoConfig": "modeling_custom.CustomConfig"}})
    (model / "config.json").write_text(json.dumps(config))
    result = cli("train", "--model", model, "--dataset", "builtin:alpaca-sample", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, EXIT_MODEL, "--trust-remote-code")
