"""Loss masks and EOS: the response and exactly one EOS are trained, the prompt is not (by default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftcli.data.alpaca import ALPACA_PROMPT_TEMPLATE, format_alpaca
from ftcli.data.pipeline import IGNORE, DataReport, eos_loss_counts, special_prefix, tokenize_pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from ftcli.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def eos_pad_tokenizer(tiny_model_dir: Path):
    """The reference scripts' situation: a tokenizer with no pad token of its own."""
    from transformers import AutoTokenizer

    from ftcli.models import apply_pad_policy

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert apply_pad_policy(tok).startswith("pad = eos")
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def test_reference_template_is_byte_exact() -> None:
    prompt, response = format_alpaca({"instruction": "I", "input": "X", "output": "O"})
    assert prompt + response == ALPACA_PROMPT_TEMPLATE.format("I", "X", "O")
    assert prompt + response == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n### Instruction: I\n\n### Input: X\n\n"
        "### Response: O")


def test_prompt_masked_response_and_one_eos_trained(tokenizer) -> None:
    pairs = [format_alpaca({"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}!"}) for w in ("hi", "yo")]
    out = tokenize_pairs(pairs, tokenizer, seq_length=512, train_on_inputs=False)
    eos = tokenizer.eos_token_id
    for (prompt, response), ids, labels in zip(pairs, out["input_ids"], out["labels"]):
        assert ids[: len(special_prefix(tokenizer))] == special_prefix(tokenizer)
        assert ids.count(eos) == 1 and ids[-1] == eos
        trained = [t for t in labels if t != IGNORE]
        assert tokenizer.decode(trained[:-1]) == response
        assert trained[-1] == eos
        n_prompt = len(ids) - len(trained)
        assert tokenizer.decode(ids[len(special_prefix(tokenizer)):n_prompt]) == prompt
    assert eos_loss_counts(out["labels"], eos) == [1, 1]


def test_train_on_inputs_trains_everything_but_bos(tokenizer) -> None:
    out = tokenize_pairs([("Question: 2+2? ", "4")], tokenizer, 512, train_on_inputs=True)
    assert out["labels"][0] == out["input_ids"][0]
    assert eos_loss_counts(out["labels"], tokenizer.eos_token_id) == [1]


def test_eos_already_in_the_data_is_not_doubled(tokenizer) -> None:
    """Data prepared for the reference scripts ends with the EOS text; ftcli must not add a second."""
    plain = tokenize_pairs([("P: ", "answer")], tokenizer, 512, False)
    with_eos = tokenize_pairs([("P: ", "answer" + tokenizer.eos_token)], tokenizer, 512, False)
    assert with_eos == plain
    assert eos_loss_counts(with_eos["labels"], tokenizer.eos_token_id) == [1]


def test_truncated_example_loses_its_eos_and_is_counted(tokenizer) -> None:
    report = DataReport("x", "local", "f", rows_read=2, rows_selected=2)
    long = " ".join(["word"] * 200)
    out = tokenize_pairs([("P: ", "short"), ("P: ", long), ("P " * 300, "x")], tokenizer, 32, False, report)
    assert [len(x) for x in out["input_ids"]][1] == 32
    assert eos_loss_counts(out["labels"], tokenizer.eos_token_id) == [1, 0]
    assert report.truncated == 2 and report.dropped_prompt_too_long == 1
    assert report.rows_used == 2 and report.eos_trained_once == 1


def test_pad_equal_to_eos_keeps_eos_in_the_loss(eos_pad_tokenizer) -> None:
    """With pad = eos, the collated batch still trains each example's final EOS exactly once."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = eos_pad_tokenizer
    out = tokenize_pairs([("A: ", "one"), ("B: ", "a much longer answer than the first one")], tok, 512, False)
    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    batch = collator([{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"])])
    labels = batch["labels"]
    eos = tok.eos_token_id
    assert (batch["input_ids"][0] == eos).sum() > 1  # padding is made of EOS tokens...
    assert [(row == eos).sum().item() for row in labels] == [1, 1]  # ...but only the real EOS is trained
    assert batch["attention_mask"][0].sum().item() == len(out["input_ids"][0])


def test_builtin_sample_every_example_trains_eos_once(tokenizer) -> None:
    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset

    cfg = build_run_config({"dataset": "builtin:alpaca-sample", "model": "builtin:tiny-llama", "dataset_size": 400,
                            "seq_length": 4096})
    ds, report = load_training_dataset(cfg, tokenizer)
    assert report.rows_read == 400 and report.rows_used == len(ds) == 400
    assert report.truncated == 0
    assert eos_loss_counts(ds["labels"], tokenizer.eos_token_id) == [1] * 400
    assert report.eos_trained_once == 400


def test_select_then_shuffle_with_seed(tokenizer) -> None:
    """The reference recipe: the first N rows, then shuffle(seed) — same rows, order fixed by the seed."""
    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset

    def ids(seed: int) -> list[tuple[int, ...]]:
        cfg = build_run_config({"dataset": "builtin:alpaca-sample", "model": "builtin:tiny-llama",
                                "dataset_size": 50, "seed": seed})
        return [tuple(x) for x in load_training_dataset(cfg, tokenizer)[0]["input_ids"]]

    a, b, c = ids(42), ids(42), ids(7)
    assert a == b and a != c and sorted(a) == sorted(c)


# --- large files: read in chunks, hashed once -------------------------------------------------------------------

TINY = ["--model", "builtin:tiny-llama"]


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Echo {i}.", "input": "" if i % 3 else f"x{i}", "output": f"{i} " * (i % 7 + 1)}
            for i in range(start, start + n)]


def _write(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prepared(cli, data: Path, out: Path, *extra: str) -> dict:
    import json

    result = cli("prepare", *TINY, "--dataset", data, "--output-dir", out, *extra)
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads((out / "ftcli_prepared.json").read_text())


def test_rows_read_in_chunks_are_the_rows_read_whole(cli, tmp_path: Path, ftcli_home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSONL file streamed through Arrow in many chunks prepares exactly what reading it whole does: the same
    tokens, labels, statistics and fingerprint; and the chunks' scratch folder is gone afterwards."""
    from datasets import load_from_disk

    import ftcli.data.streaming as streaming

    data = _write(tmp_path / "big.jsonl", _rows(1500))
    whole = _prepared(cli, data, tmp_path / "whole")
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4096)  # ~50 rows a chunk
    streamed = _prepared(cli, data, tmp_path / "streamed")
    a, b = load_from_disk(str(tmp_path / "whole")), load_from_disk(str(tmp_path / "streamed"))
    assert a["input_ids"][:] == b["input_ids"][:] and a["labels"][:] == b["labels"][:]
    assert whole["stats"] == streamed["stats"] and whole["key"] == streamed["key"]
    assert whole["source"]["fingerprint"] == streamed["source"]["fingerprint"]
    assert not list((ftcli_home / "datasets").glob(".rows.*"))  # the scratch folder is removed


def test_chunks_that_disagree_are_read_whole(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A column whose type changes after the first chunk (or a column first seen there) gives what the whole-file
    reader gives: here its one-line error naming the row."""
    import ftcli.data.streaming as streaming

    data = _write(tmp_path / "mixed.jsonl", _rows(400) + [{"instruction": "Late.", "input": 7, "output": "seven"}])
    late = _write(tmp_path / "late.jsonl", _rows(400) + [{**_rows(1)[0], "extra": "x"}])
    whole = cli("prepare", *TINY, "--dataset", data, "--output-dir", tmp_path / "a")
    whole_late = _prepared(cli, late, tmp_path / "c")
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4096)
    streamed = cli("prepare", *TINY, "--dataset", data, "--output-dir", tmp_path / "b")
    assert whole.exit_code == streamed.exit_code != 0
    assert whole.stdout + whole.stderr == streamed.stdout + streamed.stderr
    assert _prepared(cli, late, tmp_path / "d")["stats"] == whole_late["stats"]


def test_an_edit_that_keeps_size_and_mtime_is_seen(cli, tmp_path: Path, ftcli_home: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file's hash is recorded once and reused while size, times, inode and a content sample hold; an edit
    that keeps the size and sets the mtime back (outside the sampled blocks, too) is still a new cache entry."""
    import json
    import os

    import ftcli.data.digests as digests

    monkeypatch.setattr(digests, "RACY_NS", 0)  # the file was just written: trust it at once
    data = _write(tmp_path / "d.jsonl", _rows(3000))
    size = data.stat().st_size
    assert size > digests.SAMPLE_BLOCKS * digests.SAMPLE_BLOCK  # sampled, not hashed whole
    args = ["prepare", *TINY, "--dataset", data, "--seq-length", "64"]
    assert "already prepared" not in cli(*args).stdout
    records = [json.loads(p.read_text()) for p in (ftcli_home / "file-digests").glob("*.json")]
    assert any(r["path"] == str(data.absolute()) and r["size"] == size for r in records)
    assert "already prepared (cache hit)" in cli(*args).stdout
    # A byte between two sampled blocks, same size, the old mtime put back: only the ctime tells.
    step = (size - digests.SAMPLE_BLOCK) / (digests.SAMPLE_BLOCKS - 1)
    where = int(step) + digests.SAMPLE_BLOCK + 10
    raw = bytearray(data.read_bytes())
    assert raw[where:where + 1] != b"\n"
    stat = data.stat()
    raw[where] = ord("9") if raw[where] != ord("9") else ord("8")
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == size and data.stat().st_mtime_ns == stat.st_mtime_ns
    result = cli(*args)
    assert result.exit_code == 0 and "already prepared" not in result.stdout
