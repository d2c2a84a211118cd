"""GGUF export (`ftcli export --format gguf`): llama.cpp's own converter, the run's prompt format, checks.

    $ ftcli export runs/lora-1 --output models/lora-1-gguf --format gguf --gguf-type q8_0

step.py (the step inside the export's staging folder), convert.py (where llama.cpp's conversion code
comes from, and driving it), pretokenizer.py (tokenizers llama.cpp does not know by hash),
prompt.py (chat template, special ids, Ollama Modelfile), check.py (gguf's reader; llama.cpp itself
when llama-cpp-python is installed).
"""
