"""Mean token loss and perplexity of a checkpoint on {"text": ...} JSONL rows.

    python eval/perplexity.py --model out/pretrain/final --data_path data/embedded/pretrain.jsonl
    python eval/perplexity.py --model out/pretrain/final --data_path my.jsonl --max_rows 200 --json
    python eval/perplexity.py --model out/sft/final --adapter out/lora/final --data_path my.jsonl --device cuda

Each row is tokenized on its own and cut into windows of --max_seq_len tokens; every token after the first of a
window is predicted from the ones before it. loss = total negative log-likelihood / predicted tokens,
ppl = exp(loss). --json prints one object {"loss", "ppl", "tokens"}. --max_seq_len defaults to 512 or the model's
max_position_embeddings when that is shorter, and may not exceed it. Bad flags, model directories and data files
are one `error: ...` line on stderr with exit status 2.
"""

import argparse
import json
import math
import sys

import torch

from minitrain.dataset.jsonl import DataError, read_jsonl
from minitrain.eval.cli import OneLineParser, UsageError, check_device, run_cli
from minitrain.kernels import fused_linear_cross_entropy
from minitrain.model.checkpoint import load_model


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (ours or a local Hugging Face one)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT layout) applied on top of --model")
    p.add_argument("--data_path", required=True, help='JSONL file of {"text": ...} rows')
    p.add_argument("--max_rows", type=int, default=0, help="read only the first N rows (0 = all)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="window length in tokens (default 512, or the model's max_position_embeddings when shorter)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help='print one JSON object {"loss", "ppl", "tokens"}')
    args = p.parse_args(argv)
    for ok, message in [(args.max_seq_len is None or args.max_seq_len >= 2, "--max_seq_len must be at least 2"),
                        (args.batch_size >= 1, "--batch_size must be at least 1"),
                        (args.max_rows >= 0, "--max_rows must be >= 0")]:
        if not ok:
            raise UsageError(message)
    check_device(args.device)
    return args


def text_windows(rows: list[dict], tokenizer, max_seq_len: int) -> list[list[int]]:
    """Token windows of at most max_seq_len; windows of a single token predict nothing and are dropped."""
    windows = []
    for ids in tokenizer.encode_batch([row["text"] for row in rows]):
        windows += [ids[i:i + max_seq_len] for i in range(0, len(ids), max_seq_len) if len(ids[i:i + max_seq_len]) > 1]
    return windows


@torch.no_grad()
def perplexity(model, windows: list[list[int]], batch_size: int, pad_id: int) -> dict:
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        T = max(len(w) for w in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)     # [B, T] right-padded
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for i, w in enumerate(batch):
            ids[i, :len(w)] = labels[i, :len(w)] = torch.tensor(w)
            mask[i, :len(w)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        hidden = model(ids, attention_mask=mask).hidden_states                # [B, T, H]
        nll = fused_linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                         labels[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += int((labels[:, 1:] != -100).sum())
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": total_tokens}


def main(argv=None):
    args = parse_args(argv)
    rows = read_jsonl(args.data_path, required={"text": str}, max_rows=args.max_rows or None)
    model, tokenizer = load_model(args.model, device=args.device)
    if args.adapter:
        from minitrain.model.lora import load_adapter   # LoRA lives in model/lora.py
        model = load_adapter(model, args.adapter)
    model.eval()
    max_positions = model.config.max_position_embeddings
    max_seq_len = min(512, max_positions) if args.max_seq_len is None else args.max_seq_len
    if max_seq_len > max_positions:
        raise UsageError(f"--max_seq_len {max_seq_len}: exceeds the model's max_position_embeddings ({max_positions})")
    windows = text_windows(rows, tokenizer, max_seq_len)
    if not windows:
        raise DataError(f"{args.data_path}: no row has two or more tokens to score")
    result = perplexity(model, windows, args.batch_size, tokenizer.pad_id)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | tokens {result['tokens']:,} | rows {len(rows):,}")
    return result


def cli(argv=None) -> int:
    """main as a command: bad input is one `error: ...` line on stderr and exit status 2, never a traceback."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
