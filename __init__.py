"""minitrain: LLM training from scratch in plain PyTorch.

`pip install -e .` maps this folder (the repository root) to the import name `minitrain`, so its folders import as
`minitrain.model`, `minitrain.kernels`, `minitrain.dataset`, `minitrain.trainer` and `minitrain.eval`, and nothing
with a generic name lands on the path beside transformers, peft and Hugging Face's `kernels`. Scripts still run by
path: `python trainer/train_sft.py`.
"""

import os

# The folder this package lives in: the repository root in a checkout (config/, dataset/tokenizer/ and the embedded
# data are read from here), the installed minitrain/ folder after a regular install.
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
