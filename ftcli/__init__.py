"""ftcli: fine-tune causal language models from one command line.

    $ ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample

Importing this package must stay cheap: no torch, transformers or datasets here.
"""

__version__ = "0.1.0"
