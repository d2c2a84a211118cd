"""`ftcli generate` and `ftcli chat` against transformers' own `generate` on prompts rendered by hand.

Runs are trained on eight short rows until they answer them (so completions stop by themselves);
each check renders the prompt independently (the Alpaca text + the tokenizer's own special
tokens, or `apply_chat_template`), loads the model with plain transformers / peft and compares
greedy token ids one for one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SMALL_ALPACA_ROWS, write_small_alpaca

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
          "response that appropriately completes the request.\n### Instruction: {}\n\n### Input: {}\n\n### Response: ")
CHAT_ROWS = [{"messages": [{"role": "user", "content": r["instruction"] + (" " + r["input"] if r["input"] else "")},
                           {"role": "assistant", "content": r["output"]}]} for r in SMALL_ALPACA_ROWS]
NEW = 24


def train(cli, out: Path, data: Path, method: str, steps: int = 40) -> Path:
    result = cli("train", "--method", method, "--model", "builtin:tiny-llama", "--dataset", data, "--max-steps",
                 str(steps), "--batch-size", "8", "--learning-rate", "3e-3", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from ftcli.cli import app

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    root = tmp_path_factory.mktemp("generate")
    alpaca = write_small_alpaca(root / "alpaca.jsonl")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
    found = {"alpaca": alpaca, "chat_data": chat}
    found["full"] = train(cli, root / "full", alpaca, "full")
    found["lora"] = train(cli, root / "lora", alpaca, "lora")
    found["qlora"] = train(cli, root / "qlora", alpaca, "qlora", steps=30)
    found["chat"] = train(cli, root / "chat", chat, "lora")
    exported = cli("export", found["lora"], "--output", root / "export")
    assert exported.exit_code == 0, exported.stderr
    found["export"] = root / "export"
    return found


def hand_model(kind: str, runs: dict[str, Path], tiny_model_dir: Path):
    """The model, loaded without ftcli: plain transformers, peft for adapters, bitsandbytes for QLoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind in ("full", "export"):
        return AutoModelForCausalLM.from_pretrained(str(runs[kind]), dtype=torch.float32).eval()
    quant = None
    if kind == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, quantization_config=quant)
    if kind == "qlora":  # as QLoRA trains: non-quantised weights upcast for k-bit training
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, str(runs[kind])).eval()
    for name, param in model.named_parameters():
        if kind == "qlora" and "lora_" in name:
            param.data = param.data.to(torch.bfloat16)  # the adapter computes in bfloat16, as TRL trained it
    for module in model.modules():  # the CPU kernel training used (see ftcli.methods.qlora)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def hand_generate(model, ids: list[int], stop: list[int], new: int = NEW) -> list[int]:
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new,
                             do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    return out[0, len(ids):].tolist()


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("kind", ["full", "lora", "qlora", "export"])
def test_greedy_generate_equals_transformers_on_the_alpaca_prompt(cli, runs, tiny_model_dir, tmp_path, kind) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    instructions = [SMALL_ALPACA_ROWS[1], SMALL_ALPACA_ROWS[3]]
    out = tmp_path / "answers.jsonl"
    args = ["generate", runs[kind], "--max-new-tokens", str(NEW), "--output", out]
    for row in instructions[:1]:
        args += ["--prompt", row["instruction"]]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    (row,) = read_rows(out)
    text = ALPACA.format(instructions[0]["instruction"], "")
    ids = tokenizer(text)["input_ids"]  # the tokenizer's own BOS + the prompt
    assert ids[0] == tokenizer.bos_token_id
    assert row["rendered_prompt"] == tokenizer.decode(ids, skip_special_tokens=False)
    expected = hand_generate(hand_model(kind, runs, tiny_model_dir), ids, [tokenizer.eos_token_id])
    assert row["completion_ids"] == expected
    assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert row["completion"] in result.stdout
    if kind != "qlora":  # trained enough to answer its own training row and stop there
        assert row["stop_reason"] == "eos" and row["completion"].strip() == instructions[0]["output"]
    # --input reaches the Alpaca template's input field
    with_input = tmp_path / "input.jsonl"
    result = cli("generate", runs[kind], "--prompt", instructions[1]["instruction"], "--input",
                 instructions[1]["input"], "--max-new-tokens", "8", "--output", with_input)
    assert result.exit_code == 0, result.stderr
    assert read_rows(with_input)[0]["rendered_prompt"] == tokenizer.decode(
        tokenizer(ALPACA.format(instructions[1]["instruction"], instructions[1]["input"]))["input_ids"])


def test_chat_run_generate_stops_at_the_end_of_turn_token(cli, runs, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(runs["chat"]))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    question = CHAT_ROWS[2]["messages"][0]["content"]
    out = tmp_path / "chat.jsonl"
    result = cli("generate", runs["chat"], "--prompt", question, "--max-new-tokens", str(NEW), "--output", out,
                 "--show-prompt")
    assert result.exit_code == 0, result.stderr
    (row,) = read_rows(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert row["rendered_prompt"] == tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>assistant" in result.stderr  # --show-prompt shows the special tokens
    model = hand_model("chat", runs, tiny_model_dir)
    # Without the end-of-turn stop, transformers runs on past <|im_end|>: ftcli's answer ends exactly there.
    unstopped = hand_generate(model, ids, [tokenizer.eos_token_id])
    assert end_of_turn in unstopped
    assert row["completion_ids"] == unstopped[: unstopped.index(end_of_turn) + 1]
    assert row["stop_reason"] == "end_of_turn"
    assert row["completion"] == CHAT_ROWS[2]["messages"][1]["content"]


def test_chat_keeps_a_three_turn_history_rendered_as_apply_chat_template(cli, runs, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(runs["chat"]))
    model = hand_model("chat", runs, tiny_model_dir)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    turns = [CHAT_ROWS[0]["messages"][0]["content"], "/system You answer briefly.", CHAT_ROWS[6]["messages"][0]
             ["content"], "/bogus", CHAT_ROWS[4]["messages"][0]["content"]]
    out = tmp_path / "transcript.jsonl"
    result = cli("chat", runs["chat"], "--temperature", "0", "--max-new-tokens", str(NEW), "--output", out,
                 input="\n".join(turns) + "\n")
    assert result.exit_code == 0, result.stderr
    log = read_rows(out)
    assert [r["user"] for r in log] == [turns[0], turns[2], turns[4]]
    assert "unknown command /bogus" in result.stderr
    history: list[dict[str, str]] = []
    for number, row in enumerate(log):
        history.append({"role": "user", "content": row["user"]})
        messages = ([{"role": "system", "content": "You answer briefly."}] if number else []) + history
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert row["rendered_prompt"] == tokenizer.decode(ids, skip_special_tokens=False), number
        assert row["completion_ids"] == hand_generate(model, ids, stop), number
        assert row["assistant"] in result.stdout
        history.append({"role": "assistant", "content": row["assistant"]})
    # /reset forgets the conversation: the next turn is rendered alone.
    again = tmp_path / "again.jsonl"
    result = cli("chat", runs["chat"], "--temperature", "0", "--max-new-tokens", "4", "--output", again,
                 input=f"{turns[0]}\n/reset\n{turns[2]}\n/exit\nnever read\n")
    assert result.exit_code == 0, result.stderr
    rows = read_rows(again)
    assert len(rows) == 2 and rows[1]["rendered_prompt"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": turns[2]}], add_generation_prompt=True, tokenize=False)


def test_prompts_file_writes_one_row_per_prompt_and_compare_base(cli, runs, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": r["instruction"], "input": r["input"]} for r in SMALL_ALPACA_ROWS[:3]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    result = cli("generate", runs["lora"], "--prompts-file", prompts, "--compare-base", "--max-new-tokens", "10",
                 "--output", out)
    assert result.exit_code == 0, result.stderr
    written = read_rows(out)
    assert [r["prompt"] for r in written] == rows
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tuned = hand_model("lora", runs, tiny_model_dir)
    for row, source in zip(written, rows):
        ids = tokenizer(ALPACA.format(source["instruction"], source["input"]))["input_ids"]
        assert row["completion_ids"] == hand_generate(tuned, ids, [tokenizer.eos_token_id], 10)
        assert row["base_completion_ids"] == hand_generate(base, ids, [tokenizer.eos_token_id], 10)
        assert row["base_completion_ids"] != row["completion_ids"]  # training changed the answer
    assert result.stdout.count("tuned:") == 3 and result.stdout.count("base:") == 3
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("Say hello.\n\nName a color.\n", encoding="utf-8")
    again = tmp_path / "again.jsonl"
    assert cli("generate", runs["full"], "--prompts-file", text_file, "--max-new-tokens", "4", "--output",
               again).exit_code == 0
    assert [r["prompt"] for r in read_rows(again)] == ["Say hello.", "Name a color."]


def one_line(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_bad_input_is_one_line_with_an_exit_code(cli, runs, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    one_line(cli("generate", tmp_path / "empty", "--prompt", "x"), 4, "is not a model, adapter, run or exported folder")
    one_line(cli("generate", runs["lora"], "--prompt", "  "), 2, "--prompt is empty")
    one_line(cli("generate", runs["lora"]), 2, "--prompt")
    one_line(cli("generate", runs["lora"], "--prompt", "x", "--temperature", "-1"), 2, "--temperature")
    one_line(cli("generate", runs["lora"], "--prompt", "x", "--system", "be kind"), 2, "--system needs a chat template")
    one_line(cli("chat", runs["lora"]), 2, "single-turn prompts", "ftcli generate")
    no_template = tmp_path / "no-template"  # a bare model without a chat template has nothing to chat in
    import shutil

    shutil.copytree(runs["full"], no_template, ignore=shutil.ignore_patterns("ftcli_*", "chat_template.jinja"))
    settings = json.loads((no_template / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(settings))
    one_line(cli("chat", no_template), 2, "has no chat template")
    shapeless = tmp_path / "shapeless.jsonl"
    shapeless.write_text(json.dumps({"question": "?"}) + "\n")
    one_line(cli("generate", runs["lora"], "--prompts-file", shapeless), 3, "shapeless.jsonl:1", "instruction")
    taken = tmp_path / "taken.jsonl"
    taken.write_text("keep me\n")
    one_line(cli("generate", runs["lora"], "--prompt", "x", "--output", taken), 5, "already exists")
    assert taken.read_text() == "keep me\n"
    one_line(cli("generate", runs["lora"], "--prompt", "x", "--compare-base", "--base", tmp_path / "nope"), 2,
             "nope")
