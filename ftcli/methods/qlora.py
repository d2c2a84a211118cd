"""QLoRA: the base model is loaded in 4-bit NF4 and frozen; LoRA adapters train on top (reference: 70B, all-linear).

    $ ftcli train --method qlora --model builtin:tiny-llama --dataset builtin:alpaca-sample --max-steps 5

    >>> from ftcli.methods import METHODS
    >>> method = METHODS["qlora"]
    >>> model = load_model(config.model, **method.load_options(config, device))   # 4-bit base (bitsandbytes)
    >>> plan = method.plan(config, model)   # plan.model is a peft.PeftModel; the run saves the adapter

The 4-bit weights are stored in the run's compute dtype (`bnb_4bit_quant_storage`), which is what
lets FSDP shard a 4-bit model alongside the other (float) parameters. TRL's SFTTrainer casts the
adapter weights of a quantized model to bfloat16 (the QLoRA paper's recipe), so the adapters train
and are saved in bfloat16 whatever --dtype is. `--compile` works (bitsandbytes' 4-bit matmul is a
graph break; the rest compiles).
"""

from __future__ import annotations

from typing import Any

from ftcli.methods import lora, variants
from ftcli.methods.base import Method


def quantization_config(torch_dtype: Any) -> Any:
    """NF4 with double quantization; compute and storage in `torch_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype,
        bnb_4bit_quant_storage=torch_dtype,
    )


def load_options(config: Any, device: str) -> dict[str, Any]:
    from ftcli.models import resolve_dtype

    variants.check_device(config, device)  # LoftQ: CUDA only, refused before the model loads
    return {"quantization_config": quantization_config(resolve_dtype(config.dtype, device))}


def plan(config: Any, model: Any) -> Any:
    import inspect

    from peft import prepare_model_for_kbit_training

    # The same checkpointing the trainer uses (train.py); non-reentrant needs no input-grad hook. peft 0.22
    # renamed the argument (the old name warns); older peft knows only the old one.
    kwargs_name = ("activation_checkpointing_kwargs"
                   if "activation_checkpointing_kwargs" in inspect.signature(prepare_model_for_kbit_training).parameters
                   else "gradient_checkpointing_kwargs")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(config.gradient_checkpointing), **{kwargs_name: {"use_reentrant": False}})
    keep_cpu_inference_in_compute_dtype(model)
    plan = lora.plan(config, model)
    if config.lora_init == "loftq":
        variants.apply_loftq(plan.model, config)
        plan.notes.append("LoftQ start: the adapter makes up for the 4-bit base's quantisation error")
    return plan


def keep_cpu_inference_in_compute_dtype(model: Any) -> int:
    """Make eval-mode forwards on CPU use the same 4-bit kernel as training; returns how many layers it changed.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first forward in eval
    mode without grad and from then on computes it in bfloat16, whatever the compute dtype; the repacking
    also asserts out_features % 32 == 0, so small models crash. The run's probe logits are such a
    forward, so they would neither reflect the trained model in its dtype nor always work.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


METHOD = Method(
    name="qlora",
    summary="LoRA adapters on a 4-bit NF4 base",
    trains_adapter=True, uses_lora=True, loads_4bit=True, shards=False, multi_process=True,
    defaults={"model": "meta-llama/Llama-3.1-70B-Instruct", "batch_size": 8, "learning_rate": 1e-4,
              "gradient_checkpointing": False, "lora_target_modules": ["all-linear"]},
    plan=plan,
    load_options=load_options,
)
