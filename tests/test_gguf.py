"""`ftcli export --format gguf`: real LoRA runs of the built-in tiny model (Alpaca and chat data) converted by
llama.cpp's own code, read back with gguf's reader, and (when llama-cpp-python is installed) run in llama.cpp.

    $ python -m pytest -q tests/test_gguf.py

The expected values come from elsewhere: the merged weights from peft's own merge_and_unload, llama.cpp's Q/K
row order from its published formula, the prompts from ftcli.data's renderers and transformers' own
chat-template rendering.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_small_alpaca

TINY = ["--model", "builtin:tiny-llama"]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]},
    {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."}]},
    {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Is 7 odd?"}, {"role": "assistant", "content": "Yes, 7 is odd."}]},
]


def _invoke(*args: str):
    from typer.testing import CliRunner

    from ftcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _train(root: Path, data: Path) -> Path:
    out = root / "run"
    result = _invoke("train", "--method", "lora", *TINY, "--dataset", data, "--output-dir", out, "--max-steps", "3",
                     "--learning-rate", "1e-2")
    assert result.exit_code == 0, result.stdout + result.stderr
    return out


def _export(run: Path, out: Path, *extra: str) -> str:
    result = _invoke("export", run, "--output", out, "--format", "gguf", *extra)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-alpaca")
    return _train(root, write_small_alpaca(root / "small.jsonl"))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-chat")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
    return _train(root, data)


@pytest.fixture(scope="module")
def alpaca_f32(alpaca_run: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gguf-out") / "alpaca-f32"
    return out, _export(alpaca_run, out, "--gguf-type", "f32")


def merged_weights(run: Path) -> dict[str, torch.Tensor]:
    """The merged model, by peft itself: base + the run's adapter, merge_and_unload, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcli.builtin import resolve_builtin_model

    base = AutoModelForCausalLM.from_pretrained(resolve_builtin_model("builtin:tiny-llama"), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    return {k: v.detach().float() for k, v in merged.state_dict().items()}


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (its converter's LlamaModel.permute, as published)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def read_gguf(path: Path):
    from ftcli.export.gguf.convert import load_converter

    gguf, _ = load_converter()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    values = {name: gguf.quants.dequantize(t.data, t.tensor_type) for name, t in tensors.items()}
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.tokens",
                                                                          "tokenizer.ggml.merges",
                                                                          "tokenizer.ggml.token_type")}
    return meta, tensors, values


def the_gguf(out: Path) -> Path:
    files = sorted(out.glob("*.gguf"))
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    return files[0]


def test_alpaca_f32_carries_weights_prompt_and_ids(alpaca_run: Path, alpaca_f32: tuple[Path, str]):
    from transformers import AutoTokenizer

    from ftcli.data.alpaca import ALPACA_PROMPT_TEMPLATE

    out, stdout = alpaca_f32
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "alpaca-f32-f32.gguf",
                                                     "ftcli_export.json"]
    assert not list(out.parent.glob(".alpaca-f32.ftcli-*")), "a staging folder was left behind"
    meta, tensors, values = read_gguf(the_gguf(out))
    merged = merged_weights(alpaca_run)
    assert meta["general.architecture"] == "llama"
    assert len(tensors) == len(merged) == 21
    heads = 4
    for hf_name, gguf_name, permute in [("model.embed_tokens.weight", "token_embd.weight", False),
                                        ("lm_head.weight", "output.weight", False),
                                        ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", True),
                                        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", False),
                                        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", False),
                                        ("model.norm.weight", "output_norm.weight", False)]:
        want = merged[hf_name]
        want = llama_cpp_permute(want, heads) if permute else want
        assert tensors[gguf_name].tensor_type.name == "F32"
        np.testing.assert_array_equal(values[gguf_name], want.numpy(), err_msg=gguf_name)
    from safetensors.torch import load_file

    from ftcli.builtin import resolve_builtin_model

    base = load_file(str(resolve_builtin_model("builtin:tiny-llama") / "model.safetensors"))
    base_q = llama_cpp_permute(base["model.layers.1.self_attn.q_proj.weight"], heads).numpy()
    assert np.abs(values["blk.1.attn_q.weight"] - base_q).max() > 1e-4  # the adapter is merged in, not lost
    base_tokenizer = AutoTokenizer.from_pretrained(resolve_builtin_model("builtin:tiny-llama"))
    # The prompt format: transformers renders the GGUF's template into exactly the Alpaca prompt training used.
    template = meta["tokenizer.chat_template"]
    rendered = base_tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=template)
    assert rendered == "<s>" + ALPACA_PROMPT_TEMPLATE.format("Say hello.", "", "")
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is True and "tokenizer.ggml.eot_token_id" not in meta
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(reader_tokens(the_gguf(out))) == len(base_tokenizer)
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./alpaca-f32-f32.gguf" in modelfile
    assert "### Instruction: {{ .Prompt }}\n\n### Input: \n\n### Response: \"\"\"" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    record = json.loads((out / "ftcli_export.json").read_text())
    assert record["format"] == "gguf" and record["gguf"]["type"] == "f32"
    assert record["gguf"]["reader_check"]["matched"] == 21 and record["gguf"]["reader_check"]["problems"] == []
    assert record["gguf"]["reader_check"]["max_relative_value_error"] == {"F32": 0.0}
    assert "gguf reader: 21 of 21 tensors match" in stdout
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and "llama-cli -m alpaca-f32-f32.gguf --jinja" in card
    if not _has_llama_cpp():
        assert "llama.cpp was not run" in stdout
        assert record["gguf"]["llama_cpp_check"].startswith("not run")


def reader_tokens(path: Path) -> list[str]:
    from ftcli.export.gguf.convert import load_converter

    gguf, _ = load_converter()
    return gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents()


def test_alpaca_q8_0_values_within_block_rounding(alpaca_run: Path, tmp_path: Path):
    out = tmp_path / "alpaca-q8"
    _export(alpaca_run, out, "--gguf-type", "q8_0", "--no-verify")  # the reader check alone (llama.cpp's: below)
    meta, tensors, values = read_gguf(the_gguf(out))
    merged = merged_weights(alpaca_run)
    assert meta["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    for hf_name, gguf_name in [("model.embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight")]:
        want = merged[hf_name].numpy()
        got = values[gguf_name]
        # Q8_0: blocks of 32 values, each rounded to its block's absmax / 127 (scale stored in float16).
        blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - want).reshape(-1, 32) <= blocks / 127 * 0.5 + blocks * 1e-3), gguf_name
        assert np.abs(got - want).max() > 0  # really quantised
    record = json.loads((out / "ftcli_export.json").read_text())
    assert record["gguf"]["reader_check"]["max_relative_value_error"]["Q8_0"] < 1e-2


def test_chat_f16_carries_chat_template_and_end_of_turn(chat_run: Path, tmp_path: Path):
    from ftcli.builtin.tiny_llama import CHAT_TEMPLATE

    out = tmp_path / "chat-f16"
    _export(chat_run, out)  # the default type of a float32 model: f16
    meta, tensors, values = read_gguf(the_gguf(out))
    assert the_gguf(out).name == "chat-f16-f16.gguf"
    assert meta["general.file_type"] == 1  # LLAMA_FTYPE_MOSTLY_F16
    merged = merged_weights(chat_run)
    want = merged["model.embed_tokens.weight"].numpy()
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    np.testing.assert_array_equal(values["token_embd.weight"], want.astype(np.float16).astype(np.float32))
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["tokenizer.ggml.eot_token_id"] == 5  # <|im_end|>, what the chat turns were trained to end with
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the chat template renders no BOS, training added none
    modelfile = (out / "Modelfile").read_text()
    assert "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    record = json.loads((out / "ftcli_export.json").read_text())
    assert record["gguf"]["prompt"]["format"] == "chat" and record["gguf"]["prompt"]["eot_id"] == 5


def test_unknown_pre_tokenizer_is_refused_and_nothing_is_left(alpaca_run: Path, tmp_path: Path):
    run = tmp_path / "run-whitespace"
    shutil.copytree(alpaca_run, run)
    spec = json.loads((run / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}  # a split llama.cpp has no rule (nor hash) for
    (run / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "refused"
    result = _invoke("export", run, "--output", out, "--format", "gguf")
    assert result.exit_code == 4, result.stdout
    said = " ".join((result.stdout + result.stderr).split())
    assert "pre-tokenizer is Whitespace" in said and "no GGUF was written" in said, said
    assert not out.exists() and not list(tmp_path.glob(".refused.ftcli-*"))


def test_pre_tokenizer_mapping_from_config():
    from ftcli.export.gguf.pretokenizer import SPLIT_REGEXES, llama_cpp_pre_tokenizer

    def spec(pre, normalizer=None):
        return {"model": {"type": "BPE"}, "normalizer": normalizer, "decoder": {"type": "ByteLevel"},
                "pre_tokenizer": pre}

    llama3 = next(r for r, name in SPLIT_REGEXES.items() if name == "llama-bpe")
    cases = [
        (spec({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}), "gpt-2"),
        (spec({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}), None),
        (spec({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "llama-bpe"),
        (spec({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": llama3 + "|x"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), None),
        (spec({"type": "ByteLevel", "use_regex": True}, normalizer={"type": "NFC"}), None),
        ({**spec({"type": "ByteLevel"}), "model": {"type": "Unigram"}}, None),
    ]
    for i, (tokenizer, want) in enumerate(cases):
        path = Path(f"/tmp/ftcli-test-pre-{i}.json")
        path.write_text(json.dumps(tokenizer))
        name, why = llama_cpp_pre_tokenizer(path)
        path.unlink()
        assert name == want, (i, why)
        assert (why is None) == (want is not None)


def test_options_refused_before_loading(alpaca_run: Path, tmp_path: Path):
    for args, words in [(["--gguf-type", "f16"], "--gguf-type applies to --format gguf"),
                        (["--format", "gguf", "--gguf-type", "q4_k"], "--gguf-type q4_k is not"),
                        (["--format", "onnx"], "--format onnx is not an export format")]:
        result = _invoke("export", alpaca_run, "--output", tmp_path / "x", *args)
        assert result.exit_code == 2, result.stdout
        assert words in " ".join((result.stdout + result.stderr).split()), result.stdout + result.stderr
        assert not (tmp_path / "x").exists()


def _has_llama_cpp() -> bool:
    from ftcli.export.gguf.check import llama_cpp_installed

    return llama_cpp_installed()


needs_llama_cpp = pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed")


def transformers_greedy(run: Path, ids: list[int], tokens: int) -> list[int]:
    """Greedy tokens of peft's own merged model (no early stop), as transformers generates them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcli.builtin import resolve_builtin_model

    base = AutoModelForCausalLM.from_pretrained(resolve_builtin_model("builtin:tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run)).merge_and_unload().eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, len(ids):].tolist()


@needs_llama_cpp
def test_llama_cpp_greedy_equals_transformers_on_the_alpaca_prompt(alpaca_run: Path, tmp_path: Path, kind="f32"):
    from llama_cpp import GGML_TYPE_F32, Llama
    from transformers import AutoTokenizer

    from ftcli.data.alpaca import ALPACA_PROMPT_TEMPLATE

    out = tmp_path / f"alpaca-{kind}"
    stdout = _export(alpaca_run, out, "--gguf-type", kind)
    check = json.loads((out / "ftcli_export.json").read_text())["gguf"]["llama_cpp_check"]
    assert check["passed"] and check["ids_identical"] and check["greedy_identical"], check
    assert "llama.cpp: 3 prompt(s), ids identical True" in " ".join(stdout.split())
    # Independently: llama.cpp as a user runs it, on the prompt as `--jinja` renders it from the file's template.
    tokenizer = AutoTokenizer.from_pretrained(str(alpaca_run))
    meta, _, _ = read_gguf(the_gguf(out))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False,
                                         add_generation_prompt=True, chat_template=meta["tokenizer.chat_template"])
    assert text == "<s>" + ALPACA_PROMPT_TEMPLATE.format("Add 2 and 3.", "", "")
    trained_ids = tokenizer(ALPACA_PROMPT_TEMPLATE.format("Add 2 and 3.", "", ""))["input_ids"]  # BOS + prompt
    llm = Llama(model_path=str(the_gguf(out)), n_ctx=128, verbose=False, seed=0, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32)
    ids = llm.tokenize(text.removeprefix("<s>").encode(), add_bos=meta["tokenizer.ggml.add_bos_token"], special=True)
    assert ids == trained_ids
    greedy = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        greedy.append(token)
        if len(greedy) == 6:
            break
    assert greedy == transformers_greedy(alpaca_run, trained_ids, 6)


@needs_llama_cpp
def test_llama_cpp_check_of_a_chat_run(chat_run: Path, tmp_path: Path):
    out = tmp_path / "chat-f16"
    _export(chat_run, out, "--gguf-type", "f16")
    check = json.loads((out / "ftcli_export.json").read_text())["gguf"]["llama_cpp_check"]
    # ChatML's <|im_start|>/<|im_end|> are special tokens: llama.cpp must parse them into the same ids.
    assert check["ids_identical"] and check["greedy_identical"] and check["max_relative_logit_difference"] < 1e-2


@needs_llama_cpp
def test_llama_cpp_check_of_q8_0_gates_on_top1_agreement(alpaca_run: Path, tmp_path: Path):
    import re

    out = tmp_path / "alpaca-q8"
    result = _invoke("export", alpaca_run, "--output", out, "--format", "gguf", "--gguf-type", "q8_0")
    said = " ".join((result.stdout + result.stderr).split())
    top1 = float(re.search(r"top-1 agreement (\d+(?:\.\d+)?)%", said).group(1)) / 100
    if top1 >= 0.95:  # q8_0 passes on top-1 alone (its logits and greedy tokens are reported, not judged)
        assert result.exit_code == 0, said
        check = json.loads((out / "ftcli_export.json").read_text())["gguf"]["llama_cpp_check"]
        assert check["passed"] and check["tolerance"] == {"logits": None, "top1": 0.95, "greedy_identical": False}
    else:  # a quantisation that moves the top token too often: refused, nothing written
        assert result.exit_code == 1 and "less than 95%" in said and "nothing was written" in said, said
        assert not out.exists() and not list(tmp_path.glob(".alpaca-q8.ftcli-*"))


def test_a_killed_gguf_export_leaves_no_folder_and_the_next_one_cleans_up(alpaca_run: Path, tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    script = f"""
import os, signal
import ftcli.export.gguf.check
from ftcli.cli import app
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # after the GGUF is written, before its check: no cleanup can run
ftcli.export.gguf.check.read_back = die
app(["export", {str(alpaca_run)!r}, "--output", {str(out)!r}, "--format", "gguf", "--gguf-type", "f32"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    stale = [p for p in tmp_path.glob(".killed.ftcli-export.*") if p.is_dir()]
    assert len(stale) == 1 and (stale[0] / "killed-f32.gguf").exists()  # killed part-way
    _export(alpaca_run, out, "--gguf-type", "f32")
    assert (out / "killed-f32.gguf").exists() and not list(tmp_path.glob(".killed.ftcli-export.*"))


def test_the_converter_is_llama_cpps_own_fetched_once_into_the_cache(alpaca_f32: tuple[Path, str],
                                                                       ftcli_home: Path):
    import ftcli
    from ftcli.export.gguf.convert import LLAMA_CPP_COMMIT, cached_tree

    out, _ = alpaca_f32
    tree = cached_tree()
    assert tree == ftcli_home / "llama.cpp" / LLAMA_CPP_COMMIT[:12]
    assert (tree / "convert_hf_to_gguf.py").is_file() and (tree / "conversion" / "llama.py").is_file()
    assert "MIT License" in (tree / "LICENSE").read_text()
    assert not list(tree.parent.glob(".*ftcli-fetch*")), "a fetch's work folder was left behind"
    record = json.loads((out / "ftcli_export.json").read_text())
    assert record["gguf"]["converter"] == f"llama.cpp {LLAMA_CPP_COMMIT[:12]}"
    # ftcli itself carries none of llama.cpp's code.
    package = Path(ftcli.__file__).parent
    assert not [p for p in package.rglob("*") if p.suffix in (".zip", ".tar", ".gz") or p.name == "conversion"]


def test_a_folder_that_is_no_llama_cpp_checkout_is_refused(alpaca_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FTCLI_LLAMA_CPP", str(tmp_path))
    result = _invoke("export", alpaca_run, "--output", tmp_path / "x", "--format", "gguf")
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2, text
    assert f"FTCLI_LLAMA_CPP={tmp_path} is not a llama.cpp checkout" in text
    assert not (tmp_path / "x").exists()
