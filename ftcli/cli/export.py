"""`ftcli export`: registered in ftcli/cli/__init__.py.

    $ ftcli export runs/lora-1 --output models/lora-1 --dtype bfloat16 --max-shard-size 2GB
    $ ftcli export runs/lora-1 --output models/lora-1-gguf --format gguf --gguf-type q8_0

The work happens in ftcli/export/ (imported inside the command, so `ftcli --help` stays light).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ftcli.cli.common import run_guarded, with_default

SOURCE = "Source"
OUT = "Output"


def export(
    source: Annotated[str, typer.Argument(
        help="A run folder from `ftcli train` or an adapter folder (adapter_config.json).", show_default=False)],
    output: Annotated[str, typer.Option(
        "--output", "-o", metavar="<path>", help="Folder for the standalone model; written next to it, renamed into place when complete.",
        show_default=False, rich_help_panel=OUT)],
    base: Annotated[Optional[str], typer.Option(
        help=with_default("Base model (hub id, folder, builtin:...).", default="the one the run or adapter records"),
        rich_help_panel=SOURCE)] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of --base.", rich_help_panel=SOURCE)] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option(
        "--trust-remote-code", help="Run code shipped with the base model (off unless the run used it).",
        rich_help_panel=SOURCE)] = None,
    merge_into: Annotated[str, typer.Option(
        help="auto | dequantized | original. auto: QLoRA adapters merge into the dequantised 4-bit weights they "
        "were trained against, LoRA adapters into the original weights.", rich_help_panel=SOURCE)] = "auto",
    dtype: Annotated[str, typer.Option(
        help="auto | float32 | float16 | bfloat16. auto: the base model's own dtype.", rich_help_panel=OUT)] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB or 500MB.",
                                                rich_help_panel=OUT)] = "5GB",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N: where the merge and the check run.",
                                        rich_help_panel=OUT)] = "cpu",
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Compare the merged model's logits with base + adapter on two short inputs (the run's probe input and a fixed prompt; --format gguf: and the "
        "GGUF's, in llama.cpp, with the merged model's when llama-cpp-python is installed).",
        rich_help_panel=OUT)] = True,
    format: Annotated[str, typer.Option(
        "--format", help="hf | gguf. hf: a transformers model folder (safetensors). gguf: one GGUF file for "
        "llama.cpp / Ollama / LM Studio (converted by llama.cpp's own code, with the run's chat template) and an "
        "Ollama Modelfile.", rich_help_panel=OUT)] = "hf",
    gguf_type: Annotated[Optional[str], typer.Option(
        "--gguf-type", help=with_default("f32 | f16 | bf16 | q8_0: the GGUF's weight type.",
                                         default="bf16 for a bfloat16 model, else f16"),
        show_default=False, rich_help_panel=OUT)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier ftcli export in --output (only once the new export is complete).",
        rich_help_panel=OUT)] = False,
) -> None:
    """Merge a LoRA/QLoRA adapter into its base (or re-save a full fine-tune) as one verified model folder,
    or as a GGUF file checked against it (--format gguf)."""

    def go() -> None:
        from ftcli.preflight import refuse_missing_path

        refuse_missing_path(source, "export source", always_path=True)  # before the imports
        refuse_missing_path(base, "--base")
        from ftcli.export.run import ExportOptions, export_model

        export_model(ExportOptions(source=source, output=output, base=base, revision=revision,
                                   trust_remote_code=trust_remote_code, dtype=dtype, merge_into=merge_into,
                                   max_shard_size=max_shard_size, device=device, verify=verify, overwrite=overwrite,
                                   format=format, gguf_type=gguf_type))

    run_guarded(go)


command = export
