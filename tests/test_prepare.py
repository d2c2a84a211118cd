"""`ftcli prepare` and the data layer through the CLI: every source kind and format, the loss masks
token by token, the cache (hits, misses on content and tokenizer changes), prepared folders, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import SMALL_ALPACA_ROWS
from ftcli.errors import EXIT_CONFIG, EXIT_DATA
from test_errors import assert_one_line_error

TINY = ["--model", "builtin:tiny-llama"]
MANIFEST = "ftcli_prepared.json"
CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "See you"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from ftcli.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(cli, dataset, out: Path, *extra: str):
    result = cli("prepare", *TINY, "--dataset", dataset, "--output-dir", out, *extra)
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads((out / MANIFEST).read_text())


def load(out: Path):
    from datasets import load_from_disk

    return load_from_disk(str(out))


def trained_texts(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The trained stretches of one example, decoded (special tokens kept)."""
    from ftcli.data import explain_example

    runs, current = [], []
    for piece, in_loss in explain_example(ids, labels, tokenizer):
        if in_loss:
            current.append(piece)
        elif current:
            runs.append("".join(current))
            current = []
    if current:
        runs.append("".join(current))
    return runs


# --- sources ---------------------------------------------------------------------------------------------

def _alpaca_files(kind: str, tmp_path: Path) -> str:
    rows = SMALL_ALPACA_ROWS
    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", rows))
    if kind == "json-array":
        (tmp_path / "d.json").write_text(json.dumps(rows))
        return str(tmp_path / "d.json")
    if kind == "json-records":
        (tmp_path / "d.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
        return str(tmp_path / "d.json")
    if kind == "csv":
        with (tmp_path / "d.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return str(tmp_path / "d.csv")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "folder":
        (tmp_path / "folder").mkdir()
        write_jsonl(tmp_path / "folder" / "a.jsonl", rows[:3])
        (tmp_path / "folder" / "b.json").write_text(json.dumps(rows[3:]))
        return str(tmp_path / "folder")
    if kind == "glob":
        (tmp_path / "parts").mkdir()
        write_jsonl(tmp_path / "parts" / "part1.jsonl", rows[:5])
        write_jsonl(tmp_path / "parts" / "part2.jsonl", rows[5:])
        (tmp_path / "parts" / "notes.md").write_text("not data")
        return str(tmp_path / "parts" / "*.jsonl")
    if kind == "hub-folder":  # a local copy of a hub dataset repository: read by datasets.load_dataset
        (tmp_path / "repo" / "data").mkdir(parents=True)
        (tmp_path / "repo" / "README.md").write_text("# a dataset\n")
        write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", rows)
        write_jsonl(tmp_path / "repo" / "data" / "test.jsonl", rows[:2])
        return str(tmp_path / "repo")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "json-records", "csv", "parquet", "folder", "glob",
                                  "hub-folder"])
def test_local_sources(cli, tmp_path: Path, kind: str) -> None:
    ref = _alpaca_files(kind, tmp_path)
    manifest = prepare(cli, ref, tmp_path / "out")
    assert manifest["format"] == "alpaca" and manifest["template"] == "alpaca"
    assert manifest["stats"]["rows_read"] == manifest["stats"]["rows_kept"] == 8
    assert manifest["source"]["kind"] == ("hub" if kind == "hub-folder" else "local")
    assert manifest["source"]["fingerprint"].startswith("sha256:")
    assert len(load(tmp_path / "out")) == 8


def test_hub_folder_split(cli, tmp_path: Path) -> None:
    ref = _alpaca_files("hub-folder", tmp_path)
    assert prepare(cli, ref, tmp_path / "out", "--dataset-split", "test")["stats"]["rows_kept"] == 2
    result = cli("prepare", *TINY, "--dataset", ref, "--dataset-split", "nope", "--output-dir", tmp_path / "o2")
    assert_one_line_error(result, EXIT_DATA, "no split 'nope'", "--dataset-split")


def test_hub_id_served_from_the_datasets_cache_offline(cli, tmp_path: Path, monkeypatch) -> None:
    """A hub id goes through datasets.load_dataset; with HF_HUB_OFFLINE=1 it is read from the local cache."""
    import datasets

    build = datasets.load_dataset_builder("json", data_files={"train": write_jsonl(tmp_path / "t.jsonl",
                                                                                    SMALL_ALPACA_ROWS).as_posix()},
                                          cache_dir=str(tmp_path / "build"))
    build.download_and_prepare()
    cached = tmp_path / "hf-datasets" / "ftcli-test___tiny-alpaca" / "default" / "0.0.0" / "0000"
    shutil.copytree(build.cache_dir, cached)
    for f in cached.glob("json-*"):
        f.rename(f.with_name(f.name.replace("json-", "tiny-alpaca-", 1)))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    manifest = prepare(cli, "ftcli-test/tiny-alpaca", tmp_path / "out")
    assert manifest["source"]["kind"] == "hub" and manifest["source"]["fingerprint"].startswith("hub:ftcli-test/")
    assert manifest["stats"]["rows_kept"] == 8
    result = cli("prepare", *TINY, "--dataset", "ftcli-test/not-cached", "--output-dir", tmp_path / "o2")
    assert_one_line_error(result, EXIT_DATA, "ftcli-test/not-cached", "HF_HUB_OFFLINE")


def test_builtin_and_dataset_size_then_seed(cli, tmp_path: Path, tokenizer) -> None:
    """The reference recipe: first N rows, then shuffled with the seed; same tokens as before ftcli prepared data."""
    from ftcli.builtin import builtin_dataset_rows
    from ftcli.data.alpaca import format_alpaca
    from ftcli.data.pipeline import tokenize_pairs

    manifest = prepare(cli, "builtin:alpaca-sample", tmp_path / "out", "--dataset-size", "60", "--seed", "7",
                       "--seq-length", "4096")
    assert manifest["source"]["kind"] == "builtin" and manifest["stats"]["rows_selected"] == 60
    from datasets import Dataset

    rows = Dataset.from_list(builtin_dataset_rows("builtin:alpaca-sample")).select(range(60)).shuffle(seed=7)
    expected = tokenize_pairs([format_alpaca(r) for r in rows], tokenizer, 4096, False)
    ds = load(tmp_path / "out")
    assert ds["input_ids"][:] == expected["input_ids"] and ds["labels"][:] == expected["labels"]
    assert ds["length"][:] == [len(x) for x in expected["input_ids"]]


def test_two_processes_give_the_same_data(cli, tmp_path: Path) -> None:
    rows = [{"instruction": f"Echo {i}.", "input": "" if i % 3 else f"x{i}", "output": f"{i} " * (i % 7 + 1)}
            for i in range(2500)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    one = prepare(cli, data, tmp_path / "one", "--num-proc", "1", "--dataset-size", "2500")
    two = prepare(cli, data, tmp_path / "two", "--num-proc", "2", "--dataset-size", "2500")
    assert one["build"]["num_proc"] == 1 and two["build"]["num_proc"] == 2
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["input_ids"][:] == b["input_ids"][:] and a["labels"][:] == b["labels"][:]
    assert one["stats"] == two["stats"]


# --- formats and masks -----------------------------------------------------------------------------------

def test_alpaca_masks_token_by_token(cli, tmp_path: Path, tokenizer) -> None:
    from ftcli.data import explain_example

    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "input": "", "output": "hi there"}])
    prepare(cli, data, tmp_path / "out")
    ex = load(tmp_path / "out")[0]
    pairs = explain_example(ex["input_ids"], ex["labels"], tokenizer)
    trained = [t for t, keep in pairs if keep]
    assert "".join(trained) == "hi there</s>"  # the response and its EOS, nothing else
    assert pairs[0] == ("<s>", False)
    prompt = "".join(t for t, keep in pairs[1:] if not keep)
    assert prompt.endswith("### Instruction: Say hi.\n\n### Input: \n\n### Response: ")
    assert [keep for _, keep in pairs] == [False] * (len(pairs) - len(trained)) + [True] * len(trained)
    assert ex["labels"].count(tokenizer.eos_token_id) == 1

    manifest = prepare(cli, data, tmp_path / "whole", "--train-on-inputs")
    ex = load(tmp_path / "whole")[0]
    assert ex["labels"] == ex["input_ids"]
    assert manifest["options"]["train_on_inputs"] is True and manifest["stats"]["loss_token_share"] == 1.0


def test_chat_every_assistant_turn_trained(cli, tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    manifest = prepare(cli, data, tmp_path / "out", "--seed", "1", "--dataset-size", "1")
    assert manifest["format"] == "chat" and manifest["template"] == "model"
    ex = load(tmp_path / "out")[0]
    # Each assistant turn with its end-of-turn token (and what the template puts after it), then one EOS.
    assert trained_texts(tokenizer, ex["input_ids"], ex["labels"]) == [
        "Hello<|im_end|>\n", "See you<|im_end|>\n</s>"]
    text = tokenizer.decode(ex["input_ids"])
    assert text == tokenizer.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=False) + "</s>"
    assert ex["labels"].count(tokenizer.eos_token_id) == 1
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ex["input_ids"].count(im_end) == 5 and ex["labels"].count(im_end) == 2  # system, user turns masked


def test_sharegpt_with_columns_and_message_keys(cli, tmp_path: Path, tokenizer) -> None:
    rows = [{"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Hello"}]}]
    data = write_jsonl(tmp_path / "sg.jsonl", rows)
    manifest = prepare(cli, data, tmp_path / "out", "--columns", "conversations=dialog,from=speaker,value=text")
    assert manifest["format"] == "sharegpt"
    ex = load(tmp_path / "out")[0]
    assert trained_texts(tokenizer, ex["input_ids"], ex["labels"]) == ["Hello<|im_end|>\n</s>"]
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    plain = write_jsonl(tmp_path / "sg2.jsonl", [{"conversations": [{"from": "human", "value": "Q"},
                                                                     {"from": "gpt", "value": "A"}]}])
    assert prepare(cli, plain, tmp_path / "out2")["format"] == "sharegpt"


def test_prompt_completion_and_text(cli, tmp_path: Path, tokenizer) -> None:
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    assert prepare(cli, pc, tmp_path / "pc")["format"] == "prompt-completion"
    ex = load(tmp_path / "pc")[0]
    assert trained_texts(tokenizer, ex["input_ids"], ex["labels"]) == [" 4</s>"]

    txt = tmp_path / "corpus.txt"
    txt.write_text("first line of text\n\nsecond line\n")
    manifest = prepare(cli, txt, tmp_path / "txt")
    assert manifest["format"] == "text" and manifest["stats"]["rows_kept"] == 2
    texts = sorted(trained_texts(tokenizer, e["input_ids"], e["labels"])[0] for e in load(tmp_path / "txt"))
    assert texts == ["first line of text</s>", "second line</s>"]


def test_columns_map_alpaca_and_format_override(cli, tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Capital of France?", "answer": "Paris", "text": "x"}])
    manifest = prepare(cli, data, tmp_path / "out", "--columns", "instruction=question,output=answer")
    assert manifest["format"] == "alpaca"
    ex = load(tmp_path / "out")[0]
    assert trained_texts(tokenizer, ex["input_ids"], ex["labels"]) == ["Paris</s>"]
    assert "### Instruction: Capital of France?" in tokenizer.decode(ex["input_ids"])
    # Same data, forced to raw text: the text column is trained whole.
    forced = prepare(cli, data, tmp_path / "forced", "--format", "text")
    assert forced["format"] == "text"


def test_alpaca_data_with_the_model_template_and_a_jinja_file(cli, tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])
    prepare(cli, data, tmp_path / "model", "--template", "model")
    ex = load(tmp_path / "model")[0]
    assert tokenizer.decode(ex["input_ids"]) == "<|im_start|>user\nAdd.\n\n1 2<|im_end|>\n<|im_start|>assistant\n" \
                                                "3<|im_end|>\n</s>"
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    manifest = prepare(cli, data, tmp_path / "file", "--template", str(jinja))
    assert manifest["template"].startswith("file:")
    ex = load(tmp_path / "file")[0]
    assert tokenizer.decode(ex["input_ids"]) == "USER: Add.\n\n1 2\nASSISTANT: 3\n</s>"
    # " 3" is one token: the answer's first token carries the generation prompt's trailing space.
    assert trained_texts(tokenizer, ex["input_ids"], ex["labels"]) == [" 3\n</s>"]


def test_truncation_and_drop_reasons(cli, tmp_path: Path) -> None:
    rows = [{"instruction": "Short.", "input": "", "output": "ok"},
            {"instruction": "Long answer.", "input": "", "output": "word " * 200},
            {"instruction": "Empty.", "input": "", "output": "  "},
            {"instruction": "Huge prompt " * 100, "input": "", "output": "x"}]
    manifest = prepare(cli, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", "--seq-length", "64",
                       "--batch-size", "2")
    s = manifest["stats"]
    assert s["rows_read"] == 4 and s["rows_kept"] == 2
    assert s["dropped"] == {"empty": 1, "too_long": 1, "no_response": 0}
    assert s["truncated"] == 1 and s["truncated_share"] == 0.5 and s["length"]["max"] == 64
    assert s["eos_trained_once"] == 1  # the cut example keeps no EOS
    assert 0 < s["loss_token_share"] < 1 and s["padding"]["batch_size"] == 2
    assert 0 < s["padding"]["in_order"] < 1


# --- cache -----------------------------------------------------------------------------------------------

def test_cache_hit_then_miss_when_the_file_changes(cli, tmp_path: Path, ftcli_home: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", SMALL_ALPACA_ROWS)
    args = ["prepare", *TINY, "--dataset", data, "--seq-length", "96", "--seed", "3"]
    first = cli(*args)
    assert first.exit_code == 0 and "already prepared" not in first.stdout
    second = cli(*args)
    assert second.exit_code == 0 and "already prepared (cache hit)" in second.stdout
    folders = {p.name for p in (ftcli_home / "datasets").iterdir()}
    write_jsonl(data, SMALL_ALPACA_ROWS[:-1])  # same path, different content
    third = cli(*args)
    assert third.exit_code == 0 and "already prepared" not in third.stdout
    new = {p.name for p in (ftcli_home / "datasets").iterdir()} - folders
    assert len(new) == 1
    manifest = json.loads((ftcli_home / "datasets" / new.pop() / MANIFEST).read_text())
    assert manifest["stats"]["rows_kept"] == 7
    assert not [p for p in (ftcli_home / "datasets").iterdir() if p.name.startswith(".")]  # no leftovers


def test_train_reuses_the_prepared_cache(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", SMALL_ALPACA_ROWS)
    common = [*TINY, "--dataset", data, "--seq-length", "128", "--batch-size", "4"]
    assert cli("prepare", *common).exit_code == 0
    out = tmp_path / "run"
    result = cli("train", "--method", "full", *common, "--max-steps", "1", "--output-dir", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "reusing prepared data from" in " ".join(result.stdout.split())
    manifest = json.loads((out / "ftcli_run.json").read_text())
    assert manifest["data"]["reused"] is True and manifest["data"]["rows_used"] == 8
    assert manifest["data"]["fingerprint"].startswith("sha256:")


def _tiny_copy(tiny_model_dir: Path, dest: Path, chat_template: str | None) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    for jinja in dest.glob("chat_template.jinja"):
        jinja.unlink()
    if chat_template is not None:
        (dest / "chat_template.jinja").write_text(chat_template)
    cfg_path.write_text(json.dumps(cfg))
    return dest


def test_cache_miss_when_the_tokenizer_changes(cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    from ftcli.builtin.tiny_llama import CHAT_TEMPLATE

    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    model = _tiny_copy(tiny_model_dir, tmp_path / "model", CHAT_TEMPLATE)
    args = ["prepare", "--model", model, "--dataset", data]
    assert cli(*args).exit_code == 0
    assert "already prepared (cache hit)" in cli(*args).stdout  # a copy of the same tokenizer: same key
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("'\\n'", "'\\n\\n'"))  # same path, new template
    changed = cli(*args)
    assert changed.exit_code == 0 and "already prepared" not in changed.stdout


def test_incomplete_cache_folder_is_never_used(cli, tmp_path: Path, ftcli_home: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", SMALL_ALPACA_ROWS[:4])
    args = ["prepare", *TINY, "--dataset", data, "--seed", "11"]
    assert cli(*args).exit_code == 0
    folder = max((ftcli_home / "datasets").iterdir(), key=lambda p: (p / MANIFEST).stat().st_mtime
                 if (p / MANIFEST).exists() else 0)
    (folder / MANIFEST).unlink()  # what a prepare killed before its last step would look like
    again = cli(*args)
    assert again.exit_code == 0 and "already prepared" not in again.stdout
    assert json.loads((folder / MANIFEST).read_text())["complete"] is True


# --- prepared folders as --dataset ------------------------------------------------------------------------

def test_prepared_folder_used_and_mismatch_refused(cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    from ftcli.builtin.tiny_llama import CHAT_TEMPLATE

    data = write_jsonl(tmp_path / "d.jsonl", SMALL_ALPACA_ROWS)
    prepared = tmp_path / "prepared"
    prepare(cli, data, prepared, "--seq-length", "96", "--dataset-size", "6")
    out = tmp_path / "run"
    ok = cli("train", "--method", "lora", *TINY, "--dataset", prepared, "--seq-length", "96", "--max-steps", "1",
             "--output-dir", out)
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    assert json.loads((out / "ftcli_run.json").read_text())["data"]["rows_used"] == 6

    bad = cli("train", "--method", "lora", *TINY, "--dataset", prepared, "--seq-length", "128",
              "--train-on-inputs", "--output-dir", tmp_path / "run2")
    assert_one_line_error(bad, EXIT_DATA, "does not match", "seq_length: prepared 96, asked 128",
                          "train_on_inputs: prepared false, asked true")
    assert not (tmp_path / "run2").exists()
    other = _tiny_copy(tiny_model_dir, tmp_path / "other", CHAT_TEMPLATE + "{{ '' }}")
    bad = cli("train", "--method", "lora", "--model", other, "--dataset", prepared, "--seq-length", "96",
              "--output-dir", tmp_path / "run3")
    assert_one_line_error(bad, EXIT_DATA, "tokenizer: prepared sha256:")
    bad = cli("train", "--method", "lora", *TINY, "--dataset", prepared, "--seq-length", "96", "--format", "chat",
              "--dataset-size", "8", "--output-dir", tmp_path / "run4")
    assert_one_line_error(bad, EXIT_DATA, "format: prepared alpaca, asked chat", "dataset_size: prepared 6, asked 8")

    (prepared / MANIFEST).unlink()
    bad = cli("train", "--method", "lora", *TINY, "--dataset", prepared, "--output-dir", tmp_path / "run5")
    assert_one_line_error(bad, EXIT_DATA, "not a complete prepared dataset")


def test_prepare_output_dir_not_empty_refused(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = cli("prepare", *TINY, "--dataset", "builtin:alpaca-sample", "--output-dir", out)
    assert result.exit_code == 5 and "--overwrite" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# --- bad input -------------------------------------------------------------------------------------------

def _bad(cli, tmp_path: Path, dataset, *extra: str):
    return cli("prepare", *TINY, "--dataset", dataset, "--output-dir", tmp_path / "out", *extra)


def test_malformed_jsonl_names_file_and_line(cli, tmp_path: Path) -> None:
    good = json.dumps(SMALL_ALPACA_ROWS[0])
    data = tmp_path / "data.jsonl"
    data.write_text(f"{good}\n" * 16 + '{"instruction": "oops",\n' + f"{good}\n")
    assert_one_line_error(_bad(cli, tmp_path, data), EXIT_DATA, "data.jsonl:17: invalid JSON")
    assert not (tmp_path / "out").exists()


def test_malformed_csv_and_json_name_the_line(cli, tmp_path: Path) -> None:
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_text('instruction,output\n"a","b"\n"c","d","e"\n')
    assert_one_line_error(_bad(cli, tmp_path, bad_csv), EXIT_DATA, "d.csv:3:", "header has 2")
    bad_json = tmp_path / "d.json"
    bad_json.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]')
    assert_one_line_error(_bad(cli, tmp_path, bad_json), EXIT_DATA, "d.json:3: invalid JSON")


def test_unknown_columns_list_found_and_expected(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "reply": "b"}])
    err = assert_one_line_error(_bad(cli, tmp_path, data), EXIT_DATA, "fits no known format",
                                "'question', 'reply'", "alpaca ('instruction', 'output'", "chat ('messages'[, 'tools'])",
                                "--columns")
    assert "prompt-completion" in err and "sharegpt" in err
    forced = _bad(cli, tmp_path, data, "--format", "prompt-completion")
    assert_one_line_error(forced, EXIT_DATA, "no column 'prompt', 'completion'", "--format prompt-completion")
    mapped = _bad(cli, tmp_path, data, "--columns", "instruction=nope")
    assert_one_line_error(mapped, EXIT_DATA, "no column 'nope'")


def test_empty_dataset(cli, tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    assert_one_line_error(_bad(cli, tmp_path, data), EXIT_DATA, "empty.jsonl", "is empty")


def test_every_row_dropped(cli, tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": " "}])
    assert_one_line_error(_bad(cli, tmp_path, empty), EXIT_DATA, "every row", "2 empty response")
    long = write_jsonl(tmp_path / "l.jsonl", [{"instruction": "word " * 100, "output": "x"}])
    assert_one_line_error(_bad(cli, tmp_path, long, "--seq-length", "16"), EXIT_DATA, "every row",
                          "1 prompt longer than --seq-length", "raise --seq-length")
    assert not (tmp_path / "out").exists()


def test_bad_chat_row_and_missing_chat_template(cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [CHAT_ROWS[1], {"messages": "not a list"}]
    assert_one_line_error(_bad(cli, tmp_path, write_jsonl(tmp_path / "c.jsonl", rows)), EXIT_DATA,
                          "row 2", "'messages' is a str, but a list in row 1")
    rows = [CHAT_ROWS[1], CHAT_ROWS[1], {"messages": [{"content": "who am I?"}]}]
    assert_one_line_error(_bad(cli, tmp_path, write_jsonl(tmp_path / "c2.jsonl", rows)), EXIT_DATA,
                          "c2.jsonl: row 3: a message has no 'role'")
    model = _tiny_copy(tiny_model_dir, tmp_path / "no-template", None)
    result = cli("prepare", "--model", model, "--dataset", write_jsonl(tmp_path / "ok.jsonl", CHAT_ROWS),
                 "--output-dir", tmp_path / "out")
    assert_one_line_error(result, EXIT_DATA, "chat data", "has none", "--template")
    result = _bad(cli, tmp_path, write_jsonl(tmp_path / "ok2.jsonl", CHAT_ROWS), "--template", "alpaca")
    assert_one_line_error(result, EXIT_CONFIG, "--template alpaca")


def test_killed_prepare_leaves_nothing_that_looks_complete(tmp_path: Path, ftcli_home: Path) -> None:
    """SIGKILL in the middle of tokenizing: no complete folder appears, and the next prepare builds afresh."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [{"instruction": f"Echo {i} " + "w " * (i % 50), "input": "", "output": f"{i} " * 30}
            for i in range(30_000)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    home = tmp_path / "home"
    shutil.copytree(ftcli_home / "builtin", home / "builtin")  # the tiny model, already built
    env = {**os.environ, "FTCLI_HOME": str(home), "FTCLI_NUM_PROC": "1"}
    cmd = [sys.executable, "-m", "ftcli", "prepare", *TINY, "--dataset", str(data), "--dataset-size", "30000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((home / "datasets").glob(".*.ftcli-build.*")):
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from ftcli.data.cache import read_prepared_manifest

    entries = list((home / "datasets").iterdir())
    assert entries and all(p.name.startswith(".") for p in entries)  # only the build folder, hidden
    assert all(read_prepared_manifest(p) is None for p in entries)
    again = subprocess.run([*cmd, "--dataset-size", "100"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    left = list((home / "datasets").iterdir())
    assert len(left) == 1 and read_prepared_manifest(left[0]) is not None  # the killed build was cleaned up
