"""What the command-line tools of eval/ share: one-line usage errors, --device checks, and the exit-status wrapper.

    def main(argv=None): ...                 # raises UsageError (or a ConfigError, ...) for bad input
    if __name__ == "__main__":
        sys.exit(run_cli(main))              # bad input: one `error: ...` line on stderr, exit status 2
"""

import argparse
import sys

import torch

from minitrain.dataset.jsonl import DataError
from minitrain.model.config import ConfigError
from minitrain.model.tokenizer import TokenizerError

INPUT_ERRORS = (ConfigError, TokenizerError, DataError)


class UsageError(Exception):
    """A bad flag or input file, reported on one line with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and exit with status 2."""

    def error(self, message):
        raise UsageError(message)


def check_device(device: str) -> None:
    """UsageError unless `device` names a device this machine has (cpu, cuda[:N], mps)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device}: only cpu, cuda[:N] and mps are supported")


def load_heads_for_decoding(model, args) -> None:
    """eval/chat.py's and eval/evaluate.py's shared step after loading: a LoRA run's decoding heads come from
    --adapter (when it trained some); --learned_decoding needs heads from one or the other."""
    from minitrain.model.checkpoint import load_decoding_heads
    if args.adapter:
        load_decoding_heads(model, args.adapter)
    if args.learned_decoding and model.decoding_heads is None:
        raise UsageError(f"--learned_decoding: {args.adapter or args.model} has no decoding heads (train them with "
                         f"trainer/train_sft.py --train_temp)")


def run_cli(main, argv=None, errors: tuple = ()) -> int:
    """main(argv) as a command: UsageError and input errors (plus `errors`) become one `error: ...` line on stderr
    and exit status 2, never a traceback; Ctrl-C exits with 130."""
    try:
        main(argv)
    except (UsageError, *INPUT_ERRORS, *errors) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
