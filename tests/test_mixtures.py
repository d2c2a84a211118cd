"""Data mixtures (issue 15 item 3): several `--dataset SOURCE[:WEIGHT]`, each rendered by its own format.

Everything runs through the CLI on the built-in tiny model with an Alpaca file and a chat file written here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import read_manifest

MODEL = ("--model", "builtin:tiny-llama", "--seq-length", "96")
ALPACA_ROWS = 120
CHAT_ROWS = 40


def _alpaca(i: int) -> dict:
    return {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else f"numbers {i}", "output": f"{2 * i + 1}"}


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} times two?"},
                         {"role": "assistant", "content": f"It is {2 * i}."}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    (root / "a.jsonl").write_text("".join(json.dumps(_alpaca(i)) + "\n" for i in range(ALPACA_ROWS)))
    (root / "c.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(CHAT_ROWS)))
    return root


def _invoke(*args: str):
    from typer.testing import CliRunner

    from ftcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "200"})


def _rows(folder: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    from datasets import load_from_disk

    ds = load_from_disk(str(folder))
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in ds]


def _prepare(out: Path, *datasets: str, extra: tuple[str, ...] = ()) -> Path:
    args = [a for d in datasets for a in ("--dataset", d)]
    result = _invoke("prepare", *MODEL, *args, "--output-dir", out, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def prepared(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 3:1 mixture, and each source prepared alone, into folders of their own."""
    out = tmp_path_factory.mktemp("prepared")
    return {"mix": _prepare(out / "mix", f"{data / 'a.jsonl'}:3", str(data / "c.jsonl")),
            "a": _prepare(out / "a", str(data / "a.jsonl")),
            "c": _prepare(out / "c", str(data / "c.jsonl"))}


def test_mixture_selects_in_proportion_and_renders_each_source_by_its_format(prepared: dict[str, Path]):
    alone_a, alone_c = set(_rows(prepared["a"])), set(_rows(prepared["c"]))
    mixed = _rows(prepared["mix"])
    assert len(set(mixed)) == len(mixed)  # no example repeated
    # Every mixed example is, token for token and mask for mask, the example its source gives alone.
    origin = ["a" if row in alone_a else "c" if row in alone_c else "?" for row in mixed]
    assert "?" not in origin
    share = origin.count("a") / len(origin)
    assert abs(share - 0.75) <= 0.02, share
    # The largest mixture that repeats nothing: all 40 chat rows, 120 Alpaca rows.
    assert (origin.count("a"), origin.count("c")) == (ALPACA_ROWS, CHAT_ROWS)
    manifest = json.loads((prepared["mix"] / "ftcli_prepared.json").read_text())
    sources = manifest["mixture"]["sources"]
    assert [(s["format"], s["template"], s["rows_used"]) for s in sources] == \
        [("alpaca", "alpaca", origin.count("a")), ("chat", "model", origin.count("c"))]
    assert manifest["format"] == "alpaca+chat" and manifest["stats"]["rows_kept"] == len(mixed)
    assert sum(s["tokens"] for s in sources) == manifest["stats"]["tokens"] == sum(len(r[0]) for r in mixed)


def test_each_format_matches_an_independent_rendering(prepared: dict[str, Path], data: Path):
    """An Alpaca row and a chat row of the mixture against the reference prompt and the model's chat template."""
    from ftcli.data.alpaca import ALPACA_PROMPT_TEMPLATE
    from ftcli.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    mixed = _rows(prepared["mix"])
    # Alpaca: <s> + prompt (masked) + response + </s> (trained).
    row = _alpaca(5)
    prompt = ALPACA_PROMPT_TEMPLATE.format(row["instruction"], "", "")
    p_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (tuple(p_ids + r_ids), tuple([-100] * len(p_ids) + r_ids)) in mixed
    # Chat: the model's chat template, the user turn and the assistant header masked, the answer trained.
    messages = _chat(7)["messages"]
    text = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    found = [labels for input_ids, labels in mixed if list(input_ids) == ids]
    assert len(found) == 1
    head = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert all(t == -100 for t in found[0][:len(head) - 1])
    trained = [t for t in found[0] if t != -100]
    assert tok.decode(trained).startswith("It is 14.") and trained[-1] == tok.eos_token_id


def test_mixture_is_deterministic_from_the_seed(prepared: dict[str, Path], data: Path, tmp_path: Path):
    sources = (f"{data / 'a.jsonl'}:3", str(data / "c.jsonl"))
    again = _prepare(tmp_path / "again", *sources)
    other = _prepare(tmp_path / "other", *sources, extra=("--seed", "7"))
    smaller = _prepare(tmp_path / "smaller", *sources, extra=("--dataset-size", "40", "--seed", "7"))
    assert _rows(again) == _rows(prepared["mix"])
    assert _rows(other) != _rows(prepared["mix"]) and sorted(_rows(other)) == sorted(_rows(prepared["mix"]))
    # --dataset-size: the mixture's size, in the same proportion (30 + 10), drawn with the seed.
    small = _rows(smaller)
    alone_a = set(_rows(prepared["a"]))
    assert len(small) == 40 and sum(r in alone_a for r in small) == 30
    assert set(small) <= set(_rows(other))
    # The weights are proportions: 6:2 is the 3:1 mixture, the same examples under the same fingerprint.
    doubled = _prepare(tmp_path / "doubled", f"{data / 'a.jsonl'}:6", f"{data / 'c.jsonl'}:2")
    assert _rows(doubled) == _rows(prepared["mix"])
    fingerprint = (lambda folder: json.loads((folder / "ftcli_prepared.json").read_text())["source"]["fingerprint"])
    assert fingerprint(doubled) == fingerprint(prepared["mix"]) != fingerprint(other)


def test_single_source_keeps_its_cache_key_and_fingerprint(prepared: dict[str, Path], data: Path):
    """One --dataset is exactly today's: its fingerprint is the file's sha256, and the mixture's entry for
    that source is the very cache entry a run on it alone uses."""
    alone = json.loads((prepared["a"] / "ftcli_prepared.json").read_text())
    digest = hashlib.sha256((data / "a.jsonl").read_bytes()).hexdigest()
    assert alone["source"]["fingerprint"] == f"sha256:{digest}" and "mixture" not in alone
    mixture = json.loads((prepared["mix"] / "ftcli_prepared.json").read_text())
    assert mixture["mixture"]["sources"][0]["key"] == alone["key"]
    assert mixture["mixture"]["sources"][0]["fingerprint"] == alone["source"]["fingerprint"]


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for name, weight in (("w3", "3"), ("w1", "1")):
        result = _invoke("train", "--method", "lora", *MODEL, "--dataset", f"{data / 'a.jsonl'}:{weight}",
                         "--dataset", data / "c.jsonl", "--max-steps", "2", "--output-dir", out / name,
                         *(("--save-steps", "1") if name == "w3" else ()))
        assert result.exit_code == 0, result.output
        done[name] = (out / name, result.output)
    return done


def test_train_reports_each_source_and_fingerprints_the_weights(runs: dict[str, tuple[Path, str]], data: Path):
    (run3, out3), run1 = runs["w3"], runs["w1"][0]
    m3, m1 = read_manifest(run3), read_manifest(run1)
    assert m3["config"]["dataset"] == [f"{data / 'a.jsonl'}:3", str(data / "c.jsonl")]
    used3 = [s["rows_used"] for s in m3["data"]["sources"]]
    used1 = [s["rows_used"] for s in m1["data"]["sources"]]
    assert used3 == [ALPACA_ROWS, CHAT_ROWS] and used1 == [CHAT_ROWS, CHAT_ROWS]
    assert m3["data"]["rows_used"] == sum(used3)
    for s in m3["data"]["sources"]:
        assert f"data: {s['ref']}: weight {s['weight']:g} ({s['share']:.1%})" in out3
        assert f"{s['rows_read']:,} rows read, {s['rows_used']:,} of {s['rows_available']:,} examples used, " \
               f"{s['tokens']:,} tokens" in out3
    # The weight is part of the data fingerprint (the resume identity) ...
    assert m3["data"]["fingerprint"] != m1["data"]["fingerprint"]
    # ... but each source keeps its cache entry: the second run re-used both, whatever their weight.
    for s3, s1 in zip(m3["data"]["sources"], m1["data"]["sources"]):
        assert s1["prepared"] == s3["prepared"] and s1["reused"] is True
    assert m3["data"]["prepared"] != m1["data"]["prepared"]


def test_resuming_with_another_weight_is_refused(runs: dict[str, tuple[Path, str]], data: Path):
    run3 = runs["w3"][0]
    result = _invoke("train", "--method", "lora", *MODEL, "--dataset", f"{data / 'a.jsonl'}:2", "--dataset",
                     data / "c.jsonl", "--max-steps", "2", "--output-dir", run3, "--resume", run3 / "checkpoint-1")
    assert result.exit_code == 2, result.output
    assert "differs from the checkpoint's: data_fingerprint" in result.output
    assert read_manifest(run3)["status"] == "finished"


def test_a_prepared_mixture_trains_like_any_prepared_folder(prepared: dict[str, Path], runs, tmp_path: Path):
    result = _invoke("train", "--method", "lora", *MODEL, "--dataset", prepared["mix"], "--max-steps", "1",
                     "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    data = read_manifest(tmp_path / "run")["data"]
    mixture = read_manifest(runs["w3"][0])["data"]
    assert data["fingerprint"] == mixture["fingerprint"] and data["rows_used"] == ALPACA_ROWS + CHAT_ROWS
    assert [s["rows_used"] for s in data["sources"]] == [ALPACA_ROWS, CHAT_ROWS]


def test_yaml_takes_a_list(data: Path, prepared: dict[str, Path], tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: [{data / 'a.jsonl'}:3, \"{data / 'c.jsonl'}\"]\n")
    out = tmp_path / "yaml"
    result = _invoke("prepare", *MODEL, "--config", config, "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert _rows(out) == _rows(prepared["mix"])


@pytest.mark.parametrize("weight, code, words", [
    ("-1", 2, "the weight -1 must be a finite number above 0"),
    ("0", 2, "the weight 0 must be a finite number above 0"),
    ("nan", 2, "the weight nan must be a finite number above 0"),
    ("abc", 3, "a.jsonl:abc does not exist: 'abc' is not a number, so it is part of the name"),
])
def test_bad_weights_are_refused_in_one_line(data: Path, tmp_path: Path, weight: str, code: int, words: str):
    result = _invoke("prepare", *MODEL, "--dataset", f"{data / 'a.jsonl'}:{weight}", "--dataset", data / "c.jsonl",
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == code, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_other_mixture_mistakes_are_refused(data: Path, tmp_path: Path):
    a, c = str(data / "a.jsonl"), str(data / "c.jsonl")
    lone = _invoke("prepare", *MODEL, "--dataset", f"{a}:0.5", "--output-dir", tmp_path / "o")
    assert lone.exit_code == 2 and "a weight only applies to a mixture" in lone.output
    twice = _invoke("prepare", *MODEL, "--dataset", a, "--dataset", f"{a}:2", "--output-dir", tmp_path / "o")
    assert twice.exit_code == 2 and "is given twice in the mixture" in twice.output
    # 3:1 of 200 needs 150 Alpaca rows; there are 120, and no example is repeated.
    big = _invoke("prepare", *MODEL, "--dataset", f"{a}:3", "--dataset", c, "--dataset-size", "200",
                  "--output-dir", tmp_path / "o")
    assert big.exit_code == 3, big.output
    assert f"needs 150 examples of {a}" in big.output and "--dataset-size 160 or less" in big.output
    assert not (tmp_path / "o").exists()


def test_the_resume_command_of_a_mixture_keeps_each_weight_with_an_absolute_path(data: Path, tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    """What an interrupted run records as `resume_command`: the sources from the flags and from a YAML list."""
    from ftcli.config import build_run_config
    from ftcli.training.checkpoints import resume_command
    from ftcli.training.run import with_absolute_paths

    monkeypatch.chdir(data)
    flags = ["ftcli", "train", "--dataset", "a.jsonl", "--dataset=c.jsonl:0.25"]
    config = with_absolute_paths(build_run_config({"dataset": ["a.jsonl", "c.jsonl:0.25"]}))
    assert f"--dataset {data / 'a.jsonl'} --dataset={data / 'c.jsonl'}:0.25 " in \
        resume_command(flags, tmp_path, config)
    (tmp_path / "run.yaml").write_text('dataset: [a.jsonl, "c.jsonl:0.25"]\n')
    config = build_run_config({}, tmp_path / "run.yaml")
    assert f"--dataset {data / 'a.jsonl'} --dataset {data / 'c.jsonl'}:0.25 " in \
        resume_command(["ftcli", "train", "--config", str(tmp_path / "run.yaml")], tmp_path / "o", config)
