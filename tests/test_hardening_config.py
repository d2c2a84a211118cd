"""Issue 18, config part: options, YAML run files, models and `inspect`, each mistake one line and an exit code.

Every test goes through the real CLI on the built-in tiny model; config mistakes are refused before
anything is loaded or written, so most of these take a fraction of a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_small_alpaca
from ftcli.errors import EXIT_CONFIG, EXIT_MODEL, EXIT_OUTPUT

TINY = ["--model", "builtin:tiny-llama"]


def one_line_error(result, exit_code: int, *needles: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_alpaca(tmp_path_factory.mktemp("data") / "small.jsonl")


def train_refused(cli, tmp_path: Path, data: Path, *args: str, config: str | bytes | None = None) -> object:
    """`train ARGS` (with a YAML run file when `config` is given) that must stop before writing a run folder."""
    out = tmp_path / "run"
    extra: list[str] = []
    if config is not None:
        path = tmp_path / "run.yaml"
        path.write_bytes(config if isinstance(config, bytes) else config.encode("utf-8"))
        extra = ["--config", str(path)]
    result = cli("train", *TINY, "--dataset", data, "--max-steps", "2", "--output-dir", out, *args, *extra)
    assert not out.exists(), "a refused configuration must leave no run folder"
    return result


# ---- 1. non-finite floats ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--lr", "nan"], "--learning-rate"),
    (["--num-epochs", "inf"], "--num-epochs"),
    (["--lora-alpha", "inf"], "--lora-alpha"),
    (["--lora-dropout", "nan"], "--lora-dropout"),
    (["--eval-split", "nan"], "--eval-split"),
    (["--eval-split", "0.1", "--early-stopping-threshold", "inf"], "--early-stopping-threshold"),
])
def test_non_finite_float_flags_are_refused(cli, tmp_path: Path, data: Path, args: list[str], flag: str) -> None:
    result = train_refused(cli, tmp_path, data, *args)
    one_line_error(result, EXIT_CONFIG, flag, "finite")


@pytest.mark.parametrize("line, flag", [
    ("learning_rate: .inf", "--learning-rate"),
    ("learning_rate: inf", "--learning-rate"),
    ("num_epochs: .nan", "--num-epochs"),
    ("lora-alpha: -.inf", "--lora-alpha"),
])
def test_non_finite_floats_in_yaml_are_refused(cli, tmp_path: Path, data: Path, line: str, flag: str) -> None:
    result = train_refused(cli, tmp_path, data, config=line + "\n")
    one_line_error(result, EXIT_CONFIG, flag, "finite", "run.yaml")


# ---- 2. --packing with --padding-free -----------------------------------------------------------------


def test_packing_and_padding_free_together_are_refused(cli, tmp_path: Path, data: Path) -> None:
    result = train_refused(cli, tmp_path, data, "--packing", "--padding-free")
    one_line_error(result, EXIT_CONFIG, "--packing", "--padding-free")
    result = train_refused(cli, tmp_path, data, config="packing: true\npadding-free: true\n")
    one_line_error(result, EXIT_CONFIG, "--packing", "--padding-free")


# ---- 3. the same key twice in YAML ------------------------------------------------------------------


def test_yaml_key_given_twice_is_refused_with_its_line(cli, tmp_path: Path, data: Path) -> None:
    result = train_refused(cli, tmp_path, data, config="batch_size: 2\nseed: 1\nbatch_size: 4\n")
    one_line_error(result, EXIT_CONFIG, "batch_size", "run.yaml:3", "line 1")


def test_yaml_key_in_snake_and_kebab_case_is_refused(cli, tmp_path: Path, data: Path) -> None:
    result = train_refused(cli, tmp_path, data, config="batch_size: 2\nbatch-size: 4\n")
    one_line_error(result, EXIT_CONFIG, "batch_size", "batch-size", "run.yaml:2")


def test_yaml_nested_key_given_twice_is_refused(cli, tmp_path: Path, data: Path) -> None:
    result = train_refused(cli, tmp_path, data, config="columns:\n  output: a\n  output: b\n")
    one_line_error(result, EXIT_CONFIG, "output", "run.yaml:3")


# ---- 4. booleans are not numbers --------------------------------------------------------------------


@pytest.mark.parametrize("line, flag", [
    ("batch_size: true", "--batch-size"),
    ("learning_rate: false", "--learning-rate"),
    ("lora_alpha: yes", "--lora-alpha"),
    ("dataset_size: true", "--dataset-size"),
    ("seq_length: true", "--seq-length"),
])
def test_yaml_bool_for_a_number_is_refused(cli, tmp_path: Path, data: Path, line: str, flag: str) -> None:
    result = train_refused(cli, tmp_path, data, config=line + "\n")
    one_line_error(result, EXIT_CONFIG, flag, "true/false is not a number")


# ---- 5. YAML takes the flags' string forms ------------------------------------------------------------


def test_yaml_takes_the_string_forms_of_the_flags(cli, tmp_path: Path) -> None:
    rows = [{"question": f"Say {w}.", "answer": f"{w}!"} for w in ("hi", "yes", "no", "ok")]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text("method: lora\nlora_target_modules: q_proj, v_proj\n"
                      "columns: instruction=question,output=answer\n", encoding="utf-8")
    out = tmp_path / "run"
    result = cli("train", *TINY, "--dataset", qa, "--max-steps", "1", "--batch-size", "2",
                 "--output-dir", out, "--config", config)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "ftcli_run.json").read_text())["config"]
    assert saved["lora_target_modules"] == ["q_proj", "v_proj"]
    assert saved["columns"] == {"instruction": "question", "output": "answer"}
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]


def test_yaml_and_flag_string_forms_fail_alike(cli, tmp_path: Path, data: Path) -> None:
    flag = one_line_error(train_refused(cli, tmp_path, data, "--columns", "instruction"), EXIT_CONFIG)
    yaml = one_line_error(train_refused(cli, tmp_path, data, config="columns: instruction\n"), EXIT_CONFIG)
    assert "'instruction' is not FIELD=COLUMN" in flag and "'instruction' is not FIELD=COLUMN" in yaml, (flag, yaml)


# ---- 6. a run file that is not UTF-8 -----------------------------------------------------------------


def test_config_file_that_is_not_utf8(cli, tmp_path: Path, data: Path) -> None:
    result = train_refused(cli, tmp_path, data, config=b"seed: 1\nmodel: caf\xe9\n")
    one_line_error(result, EXIT_CONFIG, "run.yaml", "UTF-8")


def test_config_path_that_is_a_folder(cli, tmp_path: Path, data: Path) -> None:
    result = cli("train", *TINY, "--dataset", data, "--output-dir", tmp_path / "run", "--config", tmp_path)
    one_line_error(result, EXIT_CONFIG, str(tmp_path), "folder")


# ---- 7. no LoRA targets --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, config", [
    (["--lora-target-modules", ""], None),
    (["--lora-target-modules", " , "], None),
    ([], "lora_target_modules: []\n"),
    ([], "lora_target_modules: ''\n"),
])
def test_empty_lora_target_modules_are_refused(cli, tmp_path: Path, data: Path, args, config) -> None:
    result = train_refused(cli, tmp_path, data, "--method", "lora", *args, config=config)
    one_line_error(result, EXIT_CONFIG, "--lora-target-modules", "empty")


# ---- 8. FTCLI_HOME that is a file ------------------------------------------------------------------------


@pytest.mark.parametrize("below", [False, True])
def test_ftcli_home_that_is_a_file(cli, tmp_path: Path, data: Path, monkeypatch, below: bool) -> None:
    home_file = tmp_path / "home"
    home_file.write_text("not a folder\n")
    home = home_file / "cache" if below else home_file
    monkeypatch.setenv("FTCLI_HOME", str(home))
    for args in (["inspect", "builtin:tiny-llama"],
                 ["prepare", *TINY, "--dataset", data],
                 ["train", *TINY, "--dataset", data, "--max-steps", "1", "--output-dir", tmp_path / "run"]):
        result = cli(*args)
        one_line_error(result, EXIT_OUTPUT, "FTCLI_HOME", str(home_file), "not a folder")
    assert home_file.read_text() == "not a folder\n"
    run = tmp_path / "run"
    assert not run.exists() or json.loads((run / "ftcli_run.json").read_text())["status"] != "running"


# ---- 9. an unreachable hub fails fast -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "train"])
def test_unreachable_hub_fails_fast_in_one_line(tmp_path: Path, data: Path, command: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "ftcli", command, "made-up-org/made-up-model"]
    if command == "train":
        args[-1:] = ["--model", "made-up-org/made-up-model", "--dataset", str(data),
                     "--output-dir", str(tmp_path / "run")]
    start = time.monotonic()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_MODEL, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "made-up-org/made-up-model" in err and "unreachable" in err and "127.0.0.1:9" in err, err
    assert "Retrying" not in proc.stdout + proc.stderr
    # huggingface_hub's retries sleep 23 s (1 + 2 + 4 + 8 + 8) on top of the start-up. inspect asks the hub before
    # importing torch; train imports transformers (and torch) first, 10-15 s on a busy machine, so its bound is
    # the retries' sleep alone.
    bound = 10 if command == "inspect" else 23
    assert elapsed < bound, f"took {elapsed:.1f} s to report an unreachable hub (bound {bound} s)"


# ---- 10. a run manifest whose config is not a mapping ---------------------------------------------------------


@pytest.mark.parametrize("field, value", [("config", ["lora"]), ("config", "lora"), ("resolved", 3),
                                           ("data", []), ("metrics", "x")])
def test_inspect_run_with_a_damaged_manifest_section(cli, tmp_path: Path, field: str, value) -> None:
    run = tmp_path / "run"
    run.mkdir()
    manifest = {"status": "finished", "config": {"method": "full"}, "resolved": {}, "data": {}, field: value}
    (run / "ftcli_run.json").write_text(json.dumps(manifest))
    for extra in ([], ["--json"]):
        result = cli("inspect", run, *extra)
        one_line_error(result, EXIT_MODEL, "ftcli_run.json", f"'{field}'", "not a mapping")
        assert result.stdout == ""


# ---- 11. inspect --example beyond the rows -------------------------------------------------------------------


def test_inspect_example_beyond_the_rows(cli, data: Path) -> None:
    result = cli("inspect", data, "--example", "999")
    one_line_error(result, EXIT_CONFIG, "--example 999", "8 examples", "0..7")
    result = cli("inspect", data, "--example", "7", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["example"]["index"] == 7


# ---- 12. a model that is not a causal LM ---------------------------------------------------------------------


BERT = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 128}
T5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 64, "d_ff": 128,
      "num_layers": 2, "num_heads": 2, "vocab_size": 1000, "is_encoder_decoder": True}


@pytest.mark.parametrize("name, config", [("bert", BERT), ("t5", T5)])
def test_a_non_causal_model_is_named_as_such(cli, tmp_path: Path, data: Path, name: str, config: dict) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("inspect", folder)
    one_line_error(result, EXIT_MODEL, str(folder), "not a causal language model", "cannot train")
    assert "memory" not in result.stdout
    result = cli("train", "--model", folder, "--dataset", data, "--output-dir", tmp_path / "run")
    one_line_error(result, EXIT_MODEL, str(folder), "not a causal language model")
    assert not (tmp_path / "run").exists()
