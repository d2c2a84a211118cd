"""Conversations as today's models are trained on them: thinking templates that drop earlier reasoning, tool calls,
content given as parts, template switches, and an end of turn that is not the tokenizer's EOS.

    $ python -m pytest -q tests/test_conversations.py

The chat templates are written here (ChatML-like, on the built-in tiny model's tokenizer): THINK renders an
assistant turn's reasoning only after the last user message, as thinking models do, and renders tools and tool
calls. Every expectation is computed with transformers' own `apply_chat_template`, independently of ftcli: for
assistant turn i, the prompt is `apply_chat_template(messages[:i], add_generation_prompt=True)` and what is trained
is the rest of `apply_chat_template(messages[:i+1])`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_manifest

THINK = """{%- if tools -%}
<|im_start|>system
Tools you may call:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m['role'] == 'assistant' -%}
<|im_start|>assistant
{% if loop.index0 > ns.last_user %}<think>
{{ m['reasoning_content'] if m['reasoning_content'] is defined and m['reasoning_content'] else '' }}
</think>

{% endif %}{{ m['content'] }}{% if m['tool_calls'] is defined and m['tool_calls'] %}{% for call in m['tool_calls'] %}
<call>{{ call['function']['name'] }} {{ call['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}<|im_end|>
{% else -%}
<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
{%- endif -%}
"""

# A turn closed by plain text, not by a special token of the tokenizer (whose EOS is </s>).
PLAIN_END = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <end>\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"}, "b": {"type": "number"}}}}}]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def ftcli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcli", *[str(a) for a in args]], env=env(), capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def thinking_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": f"Hello {i}", "reasoning_content": f"greet {i}"},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}.", "reasoning_content": f"{i}+{i}={2 * i}"}]}
            for i in range(n)]


def tool_rows(n: int = 6) -> list[dict]:
    """The OpenAI shape: arguments as a JSON string, the tools as a JSON string too, content as parts."""
    return [{"tools": json.dumps(TOOLS), "messages": [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": [{"type": "text", "text": f"Add {i} and "}, {"type": "text", "text": "2."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": 2})}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": f"RESULT-{i + 2}"},
        {"role": "assistant", "content": f"The sum is {i + 2}."}]} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    from ftcli.models import apply_pad_policy, load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    apply_pad_policy(tok)
    return tok


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("conversations")
    (folder / "think.jinja").write_text(THINK, encoding="utf-8")
    (folder / "plain_end.jinja").write_text(PLAIN_END, encoding="utf-8")
    return {"folder": folder, "think": folder / "think.jinja", "plain_end": folder / "plain_end.jinja",
            "thinking": write_jsonl(folder / "thinking.jsonl", thinking_rows()),
            "tools": write_jsonl(folder / "tools.jsonl", tool_rows())}


def prepare(files: dict[str, Path], dataset: Path, out: str, *extra: object) -> tuple[dict, list[dict]]:
    """`ftcli prepare` into a folder; its manifest and examples (input_ids, labels)."""
    from datasets import load_from_disk

    folder = files["folder"] / out
    ok(ftcli("prepare", "--model", "builtin:tiny-llama", "--dataset", dataset, "--output-dir", folder, *extra))
    manifest = json.loads((folder / "ftcli_prepared.json").read_text()) if (folder / "ftcli_prepared.json").is_file() \
        else None
    data = load_from_disk(str(folder))
    return manifest, [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in data]


def expected_turns(tokenizer, template: str, messages: list[dict], tools=None, **kwargs) -> list[tuple[str, str]]:
    """(prompt text, trained text) of every assistant turn, from transformers' apply_chat_template alone."""
    out = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True,
                                               chat_template=template, tools=tools, **kwargs)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, chat_template=template, tools=tools,
                                             **kwargs)
        assert full.startswith(prompt)
        out.append((prompt, full[len(prompt):]))
    return out


def split(example: dict, tokenizer) -> tuple[str, str]:
    """(the masked tokens' text, the trained tokens' text) of a prepared example."""
    masked = [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert example["input_ids"] == masked + trained, "the trained tokens are not one span at the end"
    return tokenizer.decode(masked), tokenizer.decode(trained)


# ---- a thinking template: every multi-turn row, one example per assistant turn ------------------------------


def test_thinking_template_trains_every_turn_as_inference_renders_it(files, tokenizer) -> None:
    manifest, examples = prepare(files, files["thinking"], "thinking", "--template", files["think"])
    rows = thinking_rows()
    assert manifest["stats"]["rows_read"] == len(rows)  # every row prepared: none refused
    assert manifest["stats"]["per_turn"] == {"conversations": len(rows), "examples": 2 * len(rows)}
    want = []
    for row in rows:
        turns = expected_turns(tokenizer, THINK, row["messages"])
        # The earlier turn ends where its turn ends; the last one gets the one EOS a conversation ends with.
        want += [(prompt, answer + (tokenizer.eos_token if n == len(turns) - 1 else ""))
                 for n, (prompt, answer) in enumerate(turns)]
    got = [split(e, tokenizer) for e in examples]
    assert sorted(got) == sorted(want)
    # The first turn's answer keeps its reasoning, as the template renders it when that turn is the last.
    assert any(answer.startswith("<think>\ngreet 3\n</think>\n\nHello 3<|im_end|>") for _, answer in got)


def test_a_prefix_stable_template_keeps_one_sequence_per_conversation(files, tokenizer) -> None:
    from ftcli.config import build_run_config
    from ftcli.data.cache import key_fields

    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"},
                          {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"Yes {i}"}]}
            for i in range(6)]
    manifest, examples = prepare(files, write_jsonl(files["folder"] / "stable.jsonl", rows), "stable")
    assert "per_turn" not in manifest["stats"] and len(examples) == len(rows)
    full = {tokenizer.apply_chat_template(r["messages"], tokenize=False) + tokenizer.eos_token for r in rows}
    assert {tokenizer.decode(e["input_ids"]) for e in examples} == full
    # The cache key of a run without the new options has the fields it always had.
    config = build_run_config({"model": "builtin:tiny-llama", "dataset": "d.jsonl"})
    assert set(key_fields(config, "tok", "src")) == {"layout", "ftcli_version", "source", "split", "revision",
                                                     "format", "columns", "template", "train_on_inputs",
                                                     "seq_length", "dataset_size", "seed", "tokenizer"}


# ---- tools, tool calls and content parts ------------------------------------------------------------------


def test_tool_calls_are_trained_and_tool_results_are_not(files, tokenizer) -> None:
    manifest, examples = prepare(files, files["tools"], "tools", "--template", files["think"])
    assert len(examples) == len(tool_rows())
    for example in examples:
        masked, trained = split_all(example, tokenizer)
        assert '"name": "add"' in masked and "You add numbers." in masked  # the schema and system: prompt only
        assert "RESULT-" in masked and "RESULT-" not in trained  # the tool's result is never trained
        assert '<call>add {"a": ' in trained and "The sum is" in trained
        assert "Add " in masked and " and 2." in masked  # the content parts, joined
    # The prepared text is the template's own rendering of the row, read as the template expects it.
    row = tool_rows()[0]
    messages = json.loads(json.dumps(row["messages"]))
    messages[1]["content"] = "Add 0 and 2."
    messages[2] = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 0, "b": 2}}, "id": "c0"}]}
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=THINK, tools=TOOLS)
    assert text + tokenizer.eos_token in {tokenizer.decode(e["input_ids"]) for e in examples}


def split_all(example: dict, tokenizer) -> tuple[str, str]:
    """(masked text, trained text) of an example whose trained spans may be several."""
    masked = [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    return tokenizer.decode(masked), tokenizer.decode(trained)


def test_tools_for_the_whole_file(files, tokenizer, tmp_path: Path) -> None:
    """`--tools FILE.json`: the schemas of every conversation without its own, recorded in the run (so the file may
    change or go) and rendered by generate as in training."""
    schemas = tmp_path / "tools.json"
    schemas.write_text(json.dumps(TOOLS), encoding="utf-8")
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and 2."},
                          {"role": "assistant", "content": f"The sum is {i + 2}."}]} for i in range(4)]
    data = write_jsonl(tmp_path / "no-tools-column.jsonl", rows)
    run = tmp_path / "tools-run"
    ok(ftcli("train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", data, "--template",
             files["think"], "--tools", schemas, "--output-dir", run))
    manifest = read_manifest(run)
    assert manifest["config"]["template_kwargs"] == {"tools": TOOLS}
    from datasets import load_from_disk

    got = sorted(split(dict(input_ids=list(r["input_ids"]), labels=list(r["labels"])), tokenizer)
                 for r in load_from_disk(manifest["data"]["prepared"]))
    want = sorted((p, a + tokenizer.eos_token) for r in rows
                  for p, a in expected_turns(tokenizer, THINK, r["messages"], tools=TOOLS))
    assert got == want and all('"name": "add"' in prompt for prompt, _ in got)
    schemas.unlink()  # the run holds what it needs
    shown = ok(ftcli("generate", run, "--prompt", "Add 1 and 2.", "--max-new-tokens", 2, "--show-prompt"))
    assert "Tools you may call:" in shown.stderr + shown.stdout
    refused = ftcli("train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", data, "--tools",
                    tmp_path / "gone.json", "--output-dir", tmp_path / "x")
    assert refused.returncode == 2 and "--tools" in refused.stderr and "gone.json" in refused.stderr


def test_rows_with_tools_under_a_template_that_ignores_them_are_one_line(files) -> None:
    result = ftcli("prepare", "--model", "builtin:tiny-llama", "--dataset", files["tools"], "--output-dir",
                   files["folder"] / "no-tools")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "row 1:" in result.stderr and "does not render them" in result.stderr and "--template" in result.stderr
    assert not (files["folder"] / "no-tools").exists()


def test_content_parts_equal_strings_and_other_parts_are_refused(files, tokenizer) -> None:
    plain = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in ("red", "blue", "green", "gold")]
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"Say {w}"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": f"{w} "},
                                                             {"type": "text", "text": w}]}]}
             for w in ("red", "blue", "green", "gold")]
    _, a = prepare(files, write_jsonl(files["folder"] / "plain.jsonl", plain), "plain")
    _, b = prepare(files, write_jsonl(files["folder"] / "parts.jsonl", parts), "parts")
    assert a == b
    parts[2]["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    result = ftcli("prepare", "--model", "builtin:tiny-llama", "--dataset",
                   write_jsonl(files["folder"] / "image.jsonl", parts), "--output-dir", files["folder"] / "image")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "row 3: message 1 has a 'image_url' content part" in " ".join(result.stderr.split())


def test_a_dpo_prompt_given_as_one_message_object(files, tokenizer) -> None:
    from datasets import load_from_disk

    pairs = [{"prompt": {"role": "user", "content": f"Name {w}."}, "chosen": w, "rejected": "no"}
             for w in ("red", "blue", "green", "gold")]
    folder = files["folder"] / "pairs"
    ok(ftcli("prepare", "--objective", "dpo", "--model", "builtin:tiny-llama", "--dataset",
             write_jsonl(files["folder"] / "pairs.jsonl", pairs), "--output-dir", folder))
    prompts = {tokenizer.decode(list(r["prompt_ids"])) for r in load_from_disk(str(folder))}
    want = {tokenizer.apply_chat_template([p["prompt"]], tokenize=False, add_generation_prompt=True) for p in pairs}
    assert prompts == want  # rendered as the conversation it is, never as Python text of a dict


# ---- a run: trained per turn, then generate renders the same prompt; template switches reused --------------


def test_a_thinking_run_generates_from_the_prompt_it_trained_on(files, tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "think-run"
    result = ok(ftcli("train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", files["thinking"],
                      "--template", files["think"], "--output-dir", run))
    assert "12 conversations -> 24 examples: the template renders history differently" in " ".join(
        result.stdout.split())
    assert read_manifest(run)["data"]["stats"]["per_turn"]["examples"] == 24
    shown = ok(ftcli("generate", run, "--prompt", "Hi 3", "--max-new-tokens", 2, "--show-prompt"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi 3"}], tokenize=False,
                                           add_generation_prompt=True, chat_template=THINK)
    assert prompt.strip() in shown.stderr + shown.stdout
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert f"{len(ids)} prompt tokens" in shown.stderr
    # ... the very ids the first turn of that row was trained after.
    from datasets import load_from_disk

    trained_prompts = [list(r["input_ids"][:next(i for i, x in enumerate(r["labels"]) if x != -100)])
                       for r in load_from_disk(read_manifest(run)["data"]["prepared"])]
    assert ids in trained_prompts


def test_template_kwargs_are_trained_with_and_reused(files, tokenizer, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "single.jsonl", rows)
    run = tmp_path / "no-think"
    ok(ftcli("train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", data, "--template",
             files["think"], "--template-kwargs", "enable_thinking=false", "--output-dir", run))
    manifest = read_manifest(run)
    assert manifest["config"]["template_kwargs"] == {"enable_thinking": False}
    from datasets import load_from_disk

    got = sorted(split(dict(input_ids=list(r["input_ids"]), labels=list(r["labels"])), tokenizer)
                 for r in load_from_disk(manifest["data"]["prepared"]))
    want = sorted((p, a + tokenizer.eos_token) for r in rows
                  for p, a in expected_turns(tokenizer, THINK, r["messages"], enable_thinking=False))
    assert got == want and all(a.startswith("Hello") for _, a in got)  # the empty thinking block is prompt
    shown = ok(ftcli("generate", run, "--prompt", "Hi 1", "--max-new-tokens", 2, "--show-prompt"))
    assert "<think>\n\n</think>" in shown.stderr + shown.stdout

    # GGUF: the run's Jinja file (kept in the run folder) with the switch set inside it, so llama.cpp and Ollama,
    # which render the template without ftcli's kwargs, prompt as training did.
    from test_gguf import read_gguf, the_gguf

    exported = tmp_path / "no-think-gguf"
    ok(ftcli("export", run, "--output", exported, "--format", "gguf"))
    template = read_gguf(the_gguf(exported))[0]["tokenizer.chat_template"]
    assert template == "{%- set enable_thinking = false -%}\n" + THINK
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "Hi 1"}], tokenize=False,
                                          add_generation_prompt=True, chat_template=template)
    assert plain == tokenizer.apply_chat_template([{"role": "user", "content": "Hi 1"}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=THINK,
                                                  enable_thinking=False)


def test_an_end_of_turn_in_plain_text_stops_generation(files, tmp_path: Path) -> None:
    """The template closes turns with `<end>`, no special token: training puts it in the loss after every answer,
    and generation stops there (and drops it), not at the tokenizer's EOS only."""
    rows = [{"messages": [{"role": "user", "content": "color?"}, {"role": "assistant", "content": "blue sky"}]}] * 8
    data = write_jsonl(tmp_path / "colors.jsonl", rows)
    run = tmp_path / "end-run"
    ok(ftcli("train", "--method", "full", "--model", "builtin:tiny-llama", "--dataset", data, "--template",
             files["plain_end"], "--num-epochs", 40, "--learning-rate", "1e-2", "--batch-size", 8, "--output-dir", run))
    result = ok(ftcli("generate", run, "--prompt", "color?", "--max-new-tokens", 24))
    assert "stop: end_of_turn" in result.stderr, result.stdout + result.stderr
    assert result.stdout.strip() == "blue sky"


def test_reasoning_can_be_kept_out_of_the_loss(files, tokenizer) -> None:
    _, examples = prepare(files, files["thinking"], "no-reasoning", "--template", files["think"],
                          "--no-train-reasoning")
    for example in examples:
        _, trained = split_all(example, tokenizer)
        assert trained.startswith("<think></think>"), trained  # the tags stay, the reasoning between them does not
        assert "greet" not in trained and "+" not in trained and ("Hello" in trained or "It is" in trained)


def test_sharegpt_function_calls_and_observations(files, tokenizer) -> None:
    rows = [{"tools": TOOLS, "conversations": [
        {"from": "human", "value": f"Add {i} and 2."},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": i, "b": 2}})},
        {"from": "observation", "value": f"RESULT-{i + 2}"},
        {"from": "gpt", "value": f"The sum is {i + 2}."}]} for i in range(4)]
    _, examples = prepare(files, write_jsonl(files["folder"] / "sharegpt-tools.jsonl", rows), "sharegpt-tools",
                          "--template", files["think"])
    for example in examples:
        masked, trained = split_all(example, tokenizer)
        assert '<call>add {"a": ' in trained and "The sum is" in trained
        assert "RESULT-" in masked and "RESULT-" not in trained and '"name": "add"' in masked


def test_chat_keeps_reasoning_as_the_template_reads_it() -> None:
    from ftcli.inference.chat import assistant_turn

    assert assistant_turn("<think>\nadd them\n</think>\n\nIt is 4.") == {
        "role": "assistant", "content": "It is 4.", "reasoning_content": "add them"}
    # A generation prompt that opened the block itself: the reply starts inside the reasoning.
    assert assistant_turn("add them\n</think>\n\nIt is 4.")["reasoning_content"] == "add them"
    assert assistant_turn("It is 4.") == {"role": "assistant", "content": "It is 4."}
