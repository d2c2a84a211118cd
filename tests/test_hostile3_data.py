"""Issue 26 (hostile round 3), data, DPO, evaluation and options: each item of the report through the real CLI on
the built-in tiny model, with data files written here. Every refusal is one line with the documented exit code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import read_manifest, write_small_alpaca
from ftcli.errors import EXIT_CONFIG, EXIT_DATA
from test_errors import assert_one_line_error

TINY = ["--model", "builtin:tiny-llama"]
DPO = ["train", "--objective", "dpo", "--method", "lora", *TINY, "--max-steps", 1, "--batch-size", 2,
       "--seq-length", 64]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftcli.console import console

    monkeypatch.setattr(console, "width", 1000)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n: int = 8) -> list[dict]:
    return [{"prompt": f"Question {i}?\n", "chosen": f"Good answer {i}.", "rejected": f"bad {i}"} for i in range(n)]


# ---- D9: a malformed first DPO row is one line, like a later one -----------------------------------------------

@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "Hi", "chosen": "Hello", "rejected": None}, "'rejected' must be a string"),
    ({"prompt": "Hi", "chosen": 3, "rejected": 4}, "'chosen' must be a string"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "share no leading"),
])
def test_malformed_first_pair_is_one_line(cli, tmp_path: Path, bad: dict, needle: str) -> None:
    rest = pairs(3) if bad["rejected"] is None else [bad] * 3  # the same column types throughout
    data = write_jsonl(tmp_path / "p.jsonl", [bad, *rest])
    out = tmp_path / "run"
    result = cli(*DPO, "--dataset", data, "--output-dir", out)
    assert_one_line_error(result, EXIT_DATA, "row 1:", needle)
    assert not out.exists()


# ---- D20, R24: pairs that teach nothing are dropped, each with its reason --------------------------------------

def msgs(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


@pytest.mark.parametrize("rows, dropped", [
    ([*pairs(6), {"prompt": "Pi", "chosen": "same", "rejected": "same"},
      {"chosen": "Whole same text", "rejected": "Whole same text"}, {"prompt": "Q", "chosen": "", "rejected": "no"}],
     "3 pairs dropped: 1 with an empty answer, 2 with identical chosen and rejected answers"),
    ([*({"chosen": msgs(f"Q{i}", f"good {i}"), "rejected": msgs(f"Q{i}", f"bad {i}")} for i in range(6)),
      {"chosen": msgs("Hi", "x"), "rejected": msgs("Hi", "x")},
      {"prompt": "Q", "chosen": msgs("only a question"), "rejected": msgs("Q", "an answer")}],
     "2 pairs dropped: 1 with an answer with no assistant message, 1 with identical chosen and rejected answers"),
])
def test_pairs_that_teach_nothing_are_dropped_with_their_reason(cli, tmp_path: Path, rows: list[dict],
                                                                 dropped: str) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    result = cli(*DPO, "--dataset", data, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert f"{len(rows)} rows read" in text and "6 examples used" in text
    assert dropped in text


@pytest.mark.parametrize("rows", [
    [{"prompt": "Pi", "chosen": "same", "rejected": "same"}] * 4,
    [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}] * 4,
])
def test_all_identical_pairs_are_refused(cli, tmp_path: Path, rows: list[dict]) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "run"
    err = assert_one_line_error(cli(*DPO, "--dataset", data, "--output-dir", out), EXIT_DATA,
                                "4 chosen and rejected identical", "nothing to prefer")
    assert str(data) in err
    assert not out.exists()


# ---- D8: text no tokenizer can encode is refused where it is read, naming the line ---------------------------

SURROGATE_ROW = '{"instruction": "Say hi", "input": "", "output": "bad \\ud800 surrogate"}\n'


def test_lone_surrogates_in_data_are_refused_naming_the_line(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "surr.jsonl")
    data.write_text(data.read_text() + SURROGATE_ROW)
    where = f"{data}:9: 'output': a lone surrogate \\ud800"
    assert_one_line_error(cli("train", "--method", "full", *TINY, "--dataset", data, "--max-steps", 1,
                              "--output-dir", tmp_path / "run"), EXIT_DATA, where)
    assert not (tmp_path / "run").exists()
    assert_one_line_error(cli("eval", "builtin:tiny-llama", "--dataset", data), EXIT_DATA, where)
    prefs = tmp_path / "prefs.json"  # a JSON array: named by row
    prefs.write_text(json.dumps(pairs(3))[:-1] + ', {"prompt": "Hi", "chosen": "a \\udc00", "rejected": "b"}]')
    assert_one_line_error(cli(*DPO, "--dataset", prefs, "--output-dir", tmp_path / "dpo"), EXIT_DATA,
                          f"{prefs}: row 4: 'chosen': a lone surrogate \\udc00")
    ok = tmp_path / "emoji.jsonl"  # a surrogate pair is one character: read as it is
    ok.write_text('{"text": "smile \\ud83d\\ude00"}\n')
    from ftcli.data.sources import load_rows

    assert load_rows(str(ok)).dataset[0]["text"] == "smile \U0001F600"


def test_text_that_is_not_utf8_in_prompts_is_refused(cli, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n'
                       '{"messages": [{"role": "user", "content": "hi \\ud800"}]}\n')
    assert_one_line_error(cli("generate", "builtin:tiny-llama", "--prompts-file", prompts), EXIT_DATA,
                          f"--prompts-file {prompts}:2: 'messages': a lone surrogate")
    raw = tmp_path / "p.txt"
    raw.write_bytes(b"Hi\n\xff\xfe bad\n")
    assert_one_line_error(cli("generate", "builtin:tiny-llama", "--prompts-file", raw), EXIT_DATA,
                          f"--prompts-file {raw}:2: not valid UTF-8")
    # argv holds bytes that are not UTF-8 as surrogates (surrogateescape)
    assert_one_line_error(cli("generate", "builtin:tiny-llama", "--prompt", "hi \udced\udca0\udc80"), EXIT_DATA,
                          "--prompt: byte 0xed, which is not UTF-8")
    out = tmp_path / "chat.jsonl"
    result = cli("chat", "builtin:tiny-llama", "--max-new-tokens", 2, "--output", out,
                 input=b"Hi\nthere \xff bad\n")
    assert result.exit_code == EXIT_DATA and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: chat input line 2: byte 0xff, which is not UTF-8")
    assert len(out.read_text().splitlines()) == 1  # the first answer is kept


# ---- D6: eval scores preference pairs as the DPO run did -------------------------------------------------------

def eval_json(cli, *args: object) -> dict:
    result = cli("eval", *args, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_eval_of_a_dpo_run_repeats_its_final_eval_metrics(cli, tmp_path: Path, method: str) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", pairs(12))
    run = tmp_path / "run"
    result = cli("train", "--objective", "dpo", "--method", method, *TINY, "--max-steps", 2, "--batch-size", 4,
                 "--seq-length", 64, "--learning-rate", "1e-2", "--eval-split", 4, "--dataset", data,
                 "--output-dir", run)
    assert result.exit_code == 0, result.stdout + result.stderr
    final = read_manifest(run)["eval"]["final_metrics"]
    report = eval_json(cli, run)
    assert report["objective"] == "dpo" and report["pairs"] == 4
    assert report["reference"] == ("adapter disabled" if method == "lora" else "builtin:tiny-llama")
    for name in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert report[name] == pytest.approx(final[f"eval_{name}"], rel=1e-4, abs=1e-6), name
    assert report["loss"] == pytest.approx(read_manifest(run)["eval"]["final_loss"], rel=1e-4)
    assert abs(report["rewards/margins"]) > 0  # the policy moved away from its reference
    # any pairs file, scored against the same reference
    other = write_jsonl(tmp_path / "q.jsonl", pairs(5))
    assert eval_json(cli, run, "--dataset", other)["pairs"] == 5


def test_pairs_need_a_reference_and_eval_takes_one_dataset(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    assert_one_line_error(cli("eval", "builtin:tiny-llama", "--dataset", data), EXIT_CONFIG,
                          "preference pairs are scored against a reference model")
    alp = write_small_alpaca(tmp_path / "a.jsonl")
    assert_one_line_error(cli("eval", "builtin:tiny-llama", "--dataset", alp, "--dataset", data), EXIT_CONFIG,
                          "--dataset given 2 times")  # R6


# ---- D16: a loss that is not finite is strict JSON (null) and a failure ---------------------------------------

def test_non_finite_eval_loss_is_valid_json_and_exit_1(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ftcli.evaluation.loss as loss

    real = loss.evaluate_loss

    def nan_loss(*args, **kwargs):  # as a model with NaN weights scores (other tests load such a model)
        result = real(*args, **kwargs)
        result.loss, result.perplexity = float("nan"), float("inf")
        return result

    monkeypatch.setattr(loss, "evaluate_loss", nan_loss)
    data = write_small_alpaca(tmp_path / "a.jsonl")
    result = cli("eval", "builtin:tiny-llama", "--dataset", data, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout, parse_constant=lambda word: pytest.fail(f"bare {word} in the JSON"))
    assert report["loss"] is None and report["perplexity"] is None
    assert report["non_finite"] == ["loss", "perplexity"] and report["examples"] == 8
    assert result.stderr.strip().splitlines()[-1].startswith("error: the eval loss of builtin:tiny-llama is not finite")
    result = cli("eval", "builtin:tiny-llama", "--dataset", data)  # the table, then the same error
    assert result.exit_code == 1 and "nan" in result.stdout and "not finite" in result.stderr


# ---- D10, R25: one seed range, and YAML values of the wrong shape name their key --------------------------------

@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_outside_its_range_is_refused_before_loading(cli, tmp_path: Path, seed: str) -> None:
    assert_one_line_error(cli("train", "--method", "full", *TINY, "--seed", seed, "--output-dir", tmp_path / "r"),
                          EXIT_CONFIG, "--seed", f"(got {seed})")
    assert not (tmp_path / "r").exists()
    assert_one_line_error(cli("generate", "builtin:tiny-llama", "--prompt", "Hi", "--seed", seed), EXIT_CONFIG,
                          "--seed must be between 0 and 4294967295")
    assert_one_line_error(cli("chat", "builtin:tiny-llama", "--seed", seed, input="Hi\n"), EXIT_CONFIG, "--seed")


def test_yaml_seed_and_wrong_shapes_name_their_key(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 99999999999999999999\noptim: {name: adamw}\n")
    assert_one_line_error(cli("train", "--config", cfg, "--method", "full", *TINY, "--output-dir", tmp_path / "r"),
                          EXIT_CONFIG, "--seed: Input should be less than or equal to 4294967295",
                          "--optim: Input should be a valid string (got {'name': 'adamw'})")


# ---- D22, R17: the DPO reference cache is verified like the prepared-data cache --------------------------------

def test_damaged_reference_cache_is_rebuilt_with_a_note(cli, tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    data = write_jsonl(tmp_path / "p.jsonl", pairs(6))
    args = ["train", "--objective", "dpo", "--method", "full", *TINY, "--max-steps", 1, "--batch-size", 2,
            "--seq-length", 64, "--precompute-ref", "--dataset", data, "--output-dir"]

    def run(name: str) -> str:
        result = cli(*args, tmp_path / name)
        assert result.exit_code == 0, result.stdout + result.stderr
        return " ".join(result.stdout.split())

    text = run("r1")
    cached = Path(text.split("computed once and cached in ")[1].split(" ")[0])
    umask = os.umask(0o022)
    os.umask(umask)
    assert cached.stat().st_mode & 0o777 == 0o666 & ~umask
    assert "reused from" in run("r2")
    loss = json.loads((tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    with safe_open(str(cached), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(cached))
    save_file({k: torch.full_like(v, 50.0) for k, v in tensors.items()}, str(cached), metadata=metadata)  # same size
    text = run("r3")
    assert f"the cached reference log-probs {cached} are damaged (checksum mismatch): computing them again" in text
    assert json.loads((tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()[0])["loss"] == \
        pytest.approx(loss, rel=1e-5)

    os.truncate(cached, 100)
    assert "are damaged (unreadable" in run("r4")
    assert "reused from" in run("r5")  # rebuilt, and trusted again


# ---- R7-R11, R22: options refused before loading, or noted -----------------------------------------------------

def test_dpo_mixture_is_refused_up_front(cli, tmp_path: Path) -> None:
    a, b = write_jsonl(tmp_path / "a.jsonl", pairs(3)), write_jsonl(tmp_path / "b.jsonl", pairs(4))
    assert_one_line_error(cli(*DPO, "--dataset", a, "--dataset", b, "--output-dir", tmp_path / "r"), EXIT_CONFIG,
                          "--objective dpo trains on one preference dataset, not a mixture")
    assert not (tmp_path / "r").exists()


def test_a_path_named_like_a_weight_is_read(cli, tmp_path: Path) -> None:
    folder = tmp_path / "d:5"  # R9: `d:5` exists and `d` does not: it is the name, not `d` with weight 5
    folder.mkdir()
    write_small_alpaca(folder / "a.jsonl")
    other = write_small_alpaca(tmp_path / "b.jsonl")
    train = ["train", "--method", "full", *TINY, "--max-steps", 1]
    result = cli(*train, "--dataset", folder, "--output-dir", tmp_path / "r1")
    assert result.exit_code == 0, result.stdout + result.stderr
    result = cli(*train, "--dataset", f"{folder}:3", "--dataset", f"{other}:1", "--output-dir", tmp_path / "r2")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "weight 3 (75.0%)" in " ".join(result.stdout.split())
    named = write_small_alpaca(tmp_path / "t:5")
    assert_one_line_error(cli(*train, "--dataset", named, "--output-dir", tmp_path / "r3"), EXIT_DATA,
                          f"dataset file {named} has an unsupported type")


def test_tiny_mixture_weight_warmup_longer_than_the_run_and_symlinked_devices(cli, tmp_path: Path) -> None:
    a, b = write_small_alpaca(tmp_path / "a.jsonl"), write_small_alpaca(tmp_path / "b.jsonl")
    result = cli("train", "--method", "full", *TINY, "--dataset", a, "--dataset", f"{b}:1e-300", "--max-steps", 2,
                 "--warmup-steps", 1000, "--output-dir", tmp_path / "r")
    assert result.exit_code == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert f"{b} contributes no example to a mixture" in text  # R8
    assert "note: the warmup (1,000 steps) is as long as the run (2 optimizer steps) or longer" in text  # R10
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    assert_one_line_error(cli("eval", "builtin:tiny-llama", "--dataset", zero), EXIT_DATA,
                          f"dataset file {zero} is not a regular file (a link to /dev/zero)")  # R22


def test_tracker_problems_are_found_before_loading(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_small_alpaca(tmp_path / "a.jsonl")
    args = ["train", "--method", "full", *TINY, "--dataset", data, "--max-steps", 1, "--report-to", "mlflow"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")
    assert_one_line_error(cli(*args, "--output-dir", tmp_path / "r1"), EXIT_CONFIG,
                          "the tracking server MLFLOW_TRACKING_URI=http://127.0.0.1:9/ cannot be reached")
    assert not (tmp_path / "r1").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")  # the user's own file store works
    result = cli(*args, "--output-dir", tmp_path / "r2")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert (tmp_path / "mlruns").is_dir()


# ---- D5: PiSSA/OLoRA's rank is at most the narrowest adapted layer ---------------------------------------------

def test_pissa_rank_above_the_layer_size_is_refused(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "a.jsonl")
    train = ["train", "--method", "lora", *TINY, "--dataset", data, "--max-steps", 1, "--lora-init", "pissa"]
    out = tmp_path / "huge"
    assert_one_line_error(cli(*train, "--lora-rank", 64, "--output-dir", out), EXIT_CONFIG,
                          "--lora-rank 64 with --lora-init pissa: the rank must be at most min(in, out)",
                          "is 64 x 32", "use --lora-rank 32 or less")
    assert not out.exists() or not any(out.iterdir())
    result = cli(*train, "--lora-rank", 32, "--output-dir", tmp_path / "ok")  # the largest rank: saved and loadable
    assert result.exit_code == 0, result.stdout + result.stderr
    result = cli("eval", tmp_path / "ok", "--dataset", data)
    assert result.exit_code == 0, result.stdout + result.stderr
