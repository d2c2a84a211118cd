"""Tests for the offline built-ins: the generated Alpaca sample and the tiny Llama model.

    $ /work/venv/bin/python -m pytest tests/test_builtin.py -q
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ftcli.builtin import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    builtin_dataset_rows,
    builtin_name,
    is_builtin,
    resolve_builtin_model,
)
from ftcli.builtin import tiny_llama
from ftcli.builtin.alpaca_sample import ALPACA_SAMPLE_NAME, alpaca_sample_rows, number_to_words
from ftcli.builtin.tiny_llama import COMPLETION_MARKER, ensure_tiny_llama, tiny_llama_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- dataset


def test_rows_shape_and_types() -> None:
    rows = alpaca_sample_rows()
    assert len(rows) == 400
    for row in rows:
        assert list(row) == ["instruction", "input", "output"]
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"] and row["output"]
    empty_inputs = sum(1 for row in rows if row["input"] == "")
    assert 40 <= empty_inputs <= 360, "input should often, but not always, be empty"


def test_rows_are_deterministic_and_fresh() -> None:
    first, second = alpaca_sample_rows(), alpaca_sample_rows()
    assert first == second
    first[0]["output"] = "mutated"
    assert alpaca_sample_rows()[0]["output"] != "mutated"


def test_rows_cover_many_task_kinds() -> None:
    prefixes = {" ".join(row["instruction"].split()[:2]) for row in alpaca_sample_rows()}
    assert len(prefixes) >= 12, sorted(prefixes)


def test_output_lengths_have_a_long_tail() -> None:
    lengths = [len(row["output"]) for row in alpaca_sample_rows()]
    assert max(lengths) > 10 * statistics.median(lengths)
    assert max(len(row["output"].split()) for row in alpaca_sample_rows()) >= 200
    assert sum(1 for n in lengths if n < 80) > 0.7 * len(lengths)


def test_outputs_follow_from_instruction_and_input() -> None:
    rows = alpaca_sample_rows()
    checked = 0
    for row in rows:
        instruction, text, out = row["instruction"], row["input"], row["output"]
        if instruction.startswith("Sort the following numbers"):
            assert out == ", ".join(str(n) for n in sorted(int(x) for x in text.split(", ")))
        elif instruction.startswith("Reverse the order"):
            assert out.split() == text.split()[::-1]
        elif instruction.startswith("Convert the input sentence to uppercase"):
            assert out == text.upper()
        elif instruction.startswith("What is ") and instruction[8].isdigit():
            expression = instruction[len("What is "):-1]
            assert out == f"{expression} = {eval(expression)}."  # noqa: S307 - digits and one operator
        elif instruction.startswith("Write the number in the input in words"):
            assert out == number_to_words(int(text))
        else:
            continue
        checked += 1
    assert checked >= 80


def test_number_to_words() -> None:
    assert number_to_words(0) == "zero"
    assert number_to_words(17) == "seventeen"
    assert number_to_words(40) == "forty"
    assert number_to_words(347) == "three hundred forty-seven"
    assert number_to_words(90210) == "ninety thousand two hundred ten"


# ---------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert is_builtin("builtin:tiny-llama")
    assert not is_builtin("meta/some-model")
    assert builtin_name("builtin:tiny-llama") == "tiny-llama"
    assert BUILTIN_MODELS == ("tiny-llama",)
    assert BUILTIN_DATASETS == (ALPACA_SAMPLE_NAME,)
    assert builtin_dataset_rows("builtin:alpaca-sample") == alpaca_sample_rows()


def test_unknown_names_raise_value_error_listing_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        resolve_builtin_model("builtin:huge-llama", home=tmp_path)
    with pytest.raises(ValueError, match="builtin:alpaca-sample"):
        builtin_dataset_rows("builtin:nope")
    assert not (tmp_path / "builtin").exists()


def test_import_stays_light() -> None:
    code = (
        "import sys, ftcli.builtin, ftcli.builtin.alpaca_sample, ftcli.builtin.tiny_llama\n"
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_llama(tmp_path_factory.mktemp("home"))


def test_build_layout(built: Path) -> None:
    assert built.name == f"tiny-llama-v{tiny_llama.TINY_LLAMA_VERSION}"
    names = set(os.listdir(built))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", COMPLETION_MARKER} <= names
    assert not any(name.endswith(".bin") for name in names)
    info = json.loads((built / COMPLETION_MARKER).read_text())
    assert info["name"] == "tiny-llama"
    assert info["version"] == tiny_llama.TINY_LLAMA_VERSION
    assert 100_000 < info["parameters"] < 2_000_000
    leftovers = [p.name for p in built.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_model_loads_offline_and_runs(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert 1000 <= len(tokenizer) <= 4096
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    info = json.loads((built / COMPLETION_MARKER).read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())

    ids = tokenizer("What is 2 + 2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tokenizer_behaves_like_a_llama_tokenizer(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}) == 4
    assert tokenizer.model_max_length == 2048

    ids = tokenizer("hello")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.bos_token_id not in tokenizer("hello", add_special_tokens=False)["input_ids"]

    text = "Line one.\n\n  Two spaces,\ttab; 12 * 34 = 408. Ünïcode ✓"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_chatml(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_builds_are_byte_identical(built: Path, tmp_path: Path) -> None:
    other = ensure_tiny_llama(tmp_path)
    assert other != built
    for name in ("model.safetensors", "tokenizer.json", "config.json", COMPLETION_MARKER):
        assert (other / name).read_bytes() == (built / name).read_bytes(), name


def test_second_call_reuses_the_build(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(folder: Path) -> None:
        raise AssertionError("a finished build must not be rebuilt")

    monkeypatch.setattr(tiny_llama, "_build", fail)
    home = built.parent.parent
    assert ensure_tiny_llama(home) == built
    assert resolve_builtin_model("builtin:tiny-llama", home=home) == built


def test_folder_without_marker_is_rebuilt(built: Path, tmp_path: Path) -> None:
    target = tiny_llama_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("half-written")
    (target / "junk.txt").write_text("left by a crashed build")

    assert ensure_tiny_llama(tmp_path) == target
    assert (target / COMPLETION_MARKER).is_file()
    assert not (target / "junk.txt").exists()
    assert (target / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_llama, "_build", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_llama(tmp_path)
    assert list((tmp_path / "builtin").iterdir()) == []


def test_concurrent_builds_agree(built: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from ftcli.builtin.tiny_llama import ensure_tiny_llama\n"
        f"print(ensure_tiny_llama(Path({str(tmp_path)!r})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert folders == {str(tiny_llama_dir(tmp_path))}
    target = tiny_llama_dir(tmp_path)
    assert (target / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
