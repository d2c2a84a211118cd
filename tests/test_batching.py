"""Batching: effective-batch length grouping, padding-free rows, packing and compile buckets, on the real tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import losses, read_manifest

from ftcli.training import batching, recipe

TINY = ["--model", "builtin:tiny-llama", "--dataset", "builtin:alpaca-sample"]


# ---- shared pieces --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny_model_dir: Path):
    """The built-in sample, tokenized by ftcli's own data layer, and its tokenizer."""
    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset
    from ftcli.models import load_tokenizer

    config = build_run_config({"method": "full", "model": "builtin:tiny-llama", "dataset": "builtin:alpaca-sample",
                               "dataset_size": 120, "seq_length": 256, "group_by_length": True})
    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_training_dataset(config, tokenizer)
    return config, tokenizer, dataset


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def make_trainer(data, model, tmp_path: Path, batch: int, accum: int, **overrides):
    from trl import SFTConfig, SFTTrainer

    config, tokenizer, dataset = data
    config = config.model_copy(update=overrides)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                     seed=config.seed, use_cpu=True, bf16=False, report_to="none", max_length=config.seq_length,
                     dataset_kwargs={"skip_prepare_dataset": True}, optim=recipe.resolved_optim(config, "cpu"),
                     **batching.training_args(config, "cpu"))
    cls = batching.trainer_class(SFTTrainer)
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
               data_collator=batching.data_collator(config, tokenizer))


def rows_of(batch: dict) -> list[tuple[int, ...]]:
    """The real (unpadded) token rows of a padded batch."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def steps_of(trainer, epoch: int = 0) -> list[list[tuple[int, ...]]]:
    """The examples of each optimizer step, as the trainer's dataloader delivers them."""
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    batches = list(loader)
    # Padded to multiples of 8 tokens: a bounded set of shapes.
    assert all(b["input_ids"].shape[1] % batching.PAD_MULTIPLE == 0 for b in batches)
    micro = [rows_of(b) for b in batches]
    accum = trainer.args.gradient_accumulation_steps
    return [[r for b in micro[i:i + accum] for r in b] for i in range(0, len(micro), accum)]


# ---- compile buckets ------------------------------------------------------------------------------


def test_bucket_length_is_a_small_bounded_set() -> None:
    assert [batching.bucket_length(n, 2048) for n in (1, 32, 33, 48, 49, 64, 65, 300, 1500, 2048)] == \
        [32, 32, 48, 48, 64, 64, 96, 384, 1536, 2048]
    assert batching.bucket_length(700, 512) == 700  # longer than the cap: its own length
    assert batching.bucket_length(500, 512) == 512  # the cap is a bucket
    seen = {batching.bucket_length(n, 2048) for n in range(1, 2049)}
    assert seen == set(batching.bucket_lengths(2048))
    assert len(seen) <= 2 * 7 + 1  # about two shapes per doubling
    for n in range(33, 2049):
        assert n <= batching.bucket_length(n, 2048) < n * 1.5 + 1
    with pytest.raises(ValueError):
        batching.bucket_length(0, 2048)


def test_compile_pads_to_buckets(data) -> None:
    config, tokenizer, dataset = data
    collator = batching.data_collator(config.model_copy(update={"compile": True}), tokenizer)
    for start in range(0, 64, 8):
        batch = collator([dataset[i] for i in range(start, start + 8)])
        longest = max(len(dataset[i]["input_ids"]) for i in range(start, start + 8))
        assert batch["input_ids"].shape[1] == batching.bucket_length(longest, config.seq_length)
        assert int(batch["attention_mask"].sum()) == sum(len(dataset[i]["input_ids"]) for i in range(start, start + 8))
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


# ---- length grouping ------------------------------------------------------------------------------


def test_defaults_group_by_length_for_adapters_without_a_custom_collator(data) -> None:
    from ftcli.config import build_run_config

    _, tokenizer, _ = data
    strategy = {}
    for method in ("full", "lora", "qlora", "fsdp"):
        config = build_run_config({"method": method, "model": "builtin:tiny-llama", "dataset": "builtin:alpaca-sample"})
        assert config.group_by_length is None and config.packing is False and config.padding_free is None
        strategy[method] = batching.training_args(config, "cpu")["train_sampling_strategy"]
        for asked in (True, False):
            assert batching.training_args(config.model_copy(update={"group_by_length": asked}), "cpu")[
                "train_sampling_strategy"] == ("group_by_length" if asked else "random")
    # Unset: grouped where an adapter trains, random order for full fine-tuning (bench/grouping.py decides).
    assert strategy == {"full": "random", "lora": "group_by_length", "qlora": "group_by_length",
                        "fsdp": "group_by_length"}
    # SDPA on CPU: padded, length-grouped batches (the trainer's own collator).
    assert batching.data_collator(config, tokenizer) is None
    # The same AdamW as the reference, as one fused kernel; FSDP's sharded parameters keep the per-tensor one.
    assert recipe.resolved_optim(config.model_copy(update={"method": "full"}), "cpu") == "adamw_torch_fused"
    assert recipe.resolved_optim(config.model_copy(update={"method": "fsdp"}), "cpu") == "adamw_torch"
    assert recipe.resolved_optim(config.model_copy(update={"method": "full", "compile": True}), "cpu") == "adamw_torch"


def test_grouping_follows_the_effective_batch(data, model, tmp_path: Path) -> None:
    trainer = make_trainer(data, model, tmp_path / "a", batch=8, accum=1)
    assert trainer.create_optimizer().defaults["fused"] is True
    one = steps_of(trainer)
    four = steps_of(make_trainer(data, model, tmp_path / "b", batch=2, accum=4))
    assert len(one) == len(four) == 15
    assert [sorted(s) for s in one] == [sorted(s) for s in four]
    # Another seed or epoch: another order, same examples.
    other = steps_of(make_trainer(data, model, tmp_path / "c", batch=8, accum=1), epoch=1)
    assert [sorted(s) for s in other] != [sorted(s) for s in one]
    assert sorted(r for s in other for r in s) == sorted(r for s in one for r in s)


def test_grouping_is_deterministic_and_cuts_padding(data) -> None:
    _, _, dataset = data
    lengths = batching.example_lengths(dataset)
    assert lengths == [len(x) for x in dataset["input_ids"]]
    order = batching.grouped_order(lengths, 8, seed=42, epoch=0)
    assert order == batching.grouped_order(lengths, 8, seed=42, epoch=0)
    assert sorted(order) == list(range(len(lengths)))
    # The first step holds the longest example (an out-of-memory shows at once).
    assert max(lengths) in [lengths[i] for i in order[:8]]
    # On 1,000 long-tailed lengths, the padded tokens drop to near the real ones.
    many = torch.distributions.LogNormal(4.0, 1.0).sample((1000,), ).clamp(2, 2000).long().tolist()
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()

    def padded(o: list[int]) -> int:
        return sum(max(many[i] for i in o[k:k + 8]) * len(o[k:k + 8]) for k in range(0, len(o), 8))

    grouped = padded(batching.grouped_order(many, 8, seed=42, epoch=0))
    assert grouped < 1.2 * sum(many) < 0.6 * padded(random_order), (grouped, sum(many), padded(random_order))
    # A leftover that does not fill a step comes last, so step boundaries stay where the trainer puts them.
    odd = batching.grouped_order(lengths[:21], 8, seed=1, epoch=0)
    assert sorted(odd[16:]) == sorted(torch.randperm(21, generator=torch.Generator().manual_seed(1 * 1_000_003))
                                      .tolist()[16:])


# ---- padding-free and packing ---------------------------------------------------------------------


def separate_logits(model, rows: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_rows_match_separate_examples(data, tiny_model_dir: Path, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    _, tokenizer, dataset = data
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    examples = [dataset[i] for i in range(5)]
    collator = batching.Collator(pad_token_id=tokenizer.pad_token_id, seq_length=256, padding_free=True, bucket=True)
    batch = collator(examples)
    assert batch["input_ids"].shape[0] == 1
    assert int(batch.pop(batching.REAL_TOKENS)) == sum(len(e["input_ids"]) for e in examples)
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    expected = torch.cat(separate_logits(model, [e["input_ids"] for e in examples]))
    assert torch.allclose(flat[:len(expected)], expected, atol=1e-4), (flat[:len(expected)] - expected).abs().max()
    # Each example's first label is masked: it would be predicted from the previous example's last token.
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert (batch["labels"][0, starts] == -100).all()


def test_packed_sequences_give_the_same_logits_as_separate_ones(data, model) -> None:
    _, tokenizer, dataset = data
    small = dataset.select(range(24))
    packed = batching.pack_examples(small, seq_length=256)
    assert len(packed) < len(small)
    assert sum(sum(r) for r in packed["seq_lengths"]) == sum(len(x) for x in small["input_ids"])
    rows = [packed[i] for i in range(min(3, len(packed)))]
    assert any(len(r["seq_lengths"]) > 1 for r in rows)
    collator = batching.Collator(pad_token_id=tokenizer.pad_token_id, seq_length=256, packing=True)
    batch = collator(rows)
    batch.pop(batching.REAL_TOKENS)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for b, row in enumerate(rows):
        pieces, start = [], 0
        for n in row["seq_lengths"]:
            pieces.append(row["input_ids"][start:start + n])
            start += n
        expected = torch.cat(separate_logits(model, pieces))
        got = logits[b, :len(expected)]
        assert torch.allclose(got, expected, atol=1e-4), (b, (got - expected).abs().max())


def test_cli_padding_free_trains_like_padded_batches(cli, tmp_path: Path) -> None:
    """Same examples per step, same math: the per-step losses agree, and real tokens are counted the same."""
    runs = {}
    for name, flags in (("padded", []), ("free", ["--padding-free"])):
        out = tmp_path / name
        result = cli("train", "--method", "full", *TINY, "--max-steps", "4", "--batch-size", "4",
                     "--seq-length", "256", "--learning-rate", "1e-3", "--output-dir", out, *flags)
        assert result.exit_code == 0, result.stdout
        runs[name] = out
    assert losses(runs["free"]) == pytest.approx(losses(runs["padded"]), rel=1e-4)
    padded, free = read_manifest(runs["padded"]), read_manifest(runs["free"])
    assert free["metrics"]["real_tokens"] == padded["metrics"]["real_tokens"] > 0
    assert free["config"]["padding_free"] is True


def test_cli_packing_trains_on_fewer_fuller_rows(cli, tmp_path: Path) -> None:
    out = tmp_path / "packed"
    result = cli("train", "--method", "full", *TINY, "--num-epochs", "1", "--dataset-size", "64", "--batch-size", "2",
                 "--seq-length", "256", "--packing", "--output-dir", out)
    assert result.exit_code == 0, result.stdout
    manifest = read_manifest(out)
    tokens = manifest["data"]["tokens"]
    # One epoch over packed rows: every real token once, in fewer steps than 64 / 2 unpacked ones.
    assert manifest["metrics"]["real_tokens"] == tokens
    assert manifest["metrics"]["steps"] < 64 // 2
    assert all(loss == loss and loss > 0 for loss in losses(out))
