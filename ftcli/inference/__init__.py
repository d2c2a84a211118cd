"""Trying a model: `ftcli generate` and `ftcli chat`.

    >>> from ftcli.inference.run import GenerateOptions, run_generate
    >>> run_generate(GenerateOptions(target="runs/lora-1", prompts=["Add 2 and 3."]))

target.py (what TARGET is: run, adapter, export or model; loaded as trained, 4-bit included),
prompts.py (prompts in the run's terms, rendered by the data layer's `encode_prompt`),
generate.py (decoding settings, stops at EOS and the end-of-turn token, streaming), run.py
(`generate`), chat.py (`chat`).
"""
