"""Benchmark our transformer against transformers' LlamaForCausalLM of the same shape and weights, in one run.

Two workloads, each for both models, in fp32 and under bf16 autocast:
- a training step: forward with labels, backward, AdamW step (ours computes the loss with the fused cross-entropy
  kernel, Llama with its [B, T, V] logits, each as its users run it);
- greedy decoding: a prompt of --prompt_len tokens and --new_tokens new ones, at each of --decode_batches; both
  models are made to generate every new token (no EOS stop), ours with model/generate.py, Llama with its generate().

The two models are built from one set of weights (ours saved as a Hugging Face checkpoint and loaded by
transformers, SDPA attention), so their logits agree. The timed steps are interleaved (one step of each model in
turn, --repeat rounds) and the median is reported, so that load from elsewhere on the machine slows both alike. The
table gives tokens/s, the ratio ours / theirs (above 1 = ours faster) and the peak memory of one step above what was
allocated before it (on CPU the resident-set high-water mark, as kernels/bench.py measures it). Decoding has a row
for our compiled decoding (generate(compiled=True): Inductor, frozen weights; its compile time is printed apart). On
CUDA it adds MFU (training: the trainers' FLOPs a token, 6N + attention, against --peak_tflops) and a torch.compile
row for our training step.

transformers is a test dependency (requirements-dev.txt), needed here only for the peer.

Commands (from the repository root):
  python model/bench.py                                      # the shape of the speed issue: 512 x 8 layers, 25.8M
  python model/bench.py --dtypes fp32 --repeat 3 --new_tokens 32  # quicker
  python model/bench.py --device cuda --batch_size 16 --seq_len 1024   # one GPU (adds MFU and torch.compile)
"""

import argparse
import tempfile
import time
from contextlib import nullcontext

import torch

from minitrain.kernels.bench import measure
from minitrain.model.checkpoint import save_checkpoint
from minitrain.model.config import ModelConfig
from minitrain.model.generate import generate
from minitrain.model.transformer import CausalLM
from minitrain.trainer.reporting import flops_per_token

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--num_attention_heads", type=int, default=8)
    p.add_argument("--num_key_value_heads", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=1408)
    p.add_argument("--vocab_size", type=int, default=6400)
    p.add_argument("--untied", action="store_true", help="an output head of its own (default: tied to the embedding, "
                                                         "as the speed issue's 25.8M shape and MiniMind have it)")
    p.add_argument("--batch_size", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="training tokens per sequence")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--decode_batches", default="1,8", help="comma list of decoding batch sizes")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast, fp32 weights)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows: our compiled decoding, and our compiled training step (CUDA)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU (H100/H200)")
    return p.parse_args(argv)


def build_models(args, device):
    """(ours, theirs): our CausalLM and transformers' Llama with the same weights, both fp32 on `device`."""
    from transformers import AutoModelForCausalLM          # the peer; a test dependency
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    config = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
                         num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                         max_position_embeddings=max(args.seq_len, args.prompt_len + args.new_tokens),
                         tie_word_embeddings=not args.untied)
    torch.manual_seed(0)
    ours = CausalLM(config)
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(ours, None, directory)
        theirs = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)
    return ours.to(device), theirs.to(device)


def training_step(model, optimizer, ids, autocast):
    def step():
        with autocast():
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def ours_decode(model, prompts, new_tokens, autocast, compiled=False):
    def run():
        with autocast():
            generate(model, prompts, new_tokens, temperature=0, eos_token_id=None, compiled=compiled)
    return run


def theirs_decode(model, prompts, new_tokens, autocast):
    ids = torch.tensor(prompts, device=model.device)

    def run():
        with autocast():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return run


def table_rows(workload: str, results: dict, tokens: int, flops_per_token: float | None,
               peak_flops: float = 0.0) -> list[tuple[str, ...]]:
    """Table rows of measure()'s {name: (median seconds, peak bytes) or None when out of memory}: tokens/s, speed
    against Llama's (above 1 = ours faster), peak MB and, when flops_per_token is given, MFU against peak_flops."""
    llama = results.get("llama")
    rows = []
    for name, result in results.items():
        if result is None:
            rows.append((workload, name, "out of memory", "", "", ""))
            continue
        seconds, peak = result
        ratio = f"{llama[0] / seconds:.2f}x" if llama else ""
        mfu = f"{flops_per_token * tokens / seconds / peak_flops:.1%}" if flops_per_token else ""
        rows.append((workload, name, f"{tokens / seconds:,.0f}", ratio, f"{peak / 2**20:,.0f}", mfu))
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs = build_models(args, device)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"shape: {args.hidden_size} x {args.num_hidden_layers} layers, {args.num_attention_heads} heads / "
          f"{args.num_key_value_heads} KV heads, intermediate {args.intermediate_size}, vocab {args.vocab_size}, "
          f"{n_params / 1e6:.1f}M parameters; training B={args.batch_size}, T={args.seq_len}; decoding "
          f"{args.prompt_len} + {args.new_tokens} tokens; {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}")
    g = torch.Generator().manual_seed(1)
    train_ids = torch.randint(3, args.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    with torch.no_grad():                                   # the two models agree before anything is timed
        gap = (ours(train_ids[:1]).logits - theirs(train_ids[:1]).logits).abs().max().item()
    if gap > 1e-3:
        raise SystemExit(f"the two models disagree (max logit gap {gap:.2e}): the comparison would be meaningless")

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        # training: each model with an AdamW of its own; the steps change the weights, which timing ignores
        steps = {"ours": training_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-5), train_ids, autocast),
                 "llama": training_step(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-5), train_ids,
                                        autocast)}
        if device.type == "cuda" and args.compile:
            compiled = torch.compile(ours)
            steps["ours + compile"] = training_step(compiled, torch.optim.AdamW(ours.parameters(), lr=1e-5),
                                                    train_ids, autocast)
        results = measure(steps, device, args.warmup, args.repeat, "rss")     # {name: (median s, peak bytes)}
        rows += table_rows(f"train {dtype_name}", results, args.batch_size * args.seq_len,   # the trainers' count:
                           flops_per_token(ours, args.seq_len) if device.type == "cuda" else None,  # 6N + attention
                           args.peak_tflops * 1e12)
        # greedy decoding
        for batch in [int(b) for b in args.decode_batches.split(",")]:
            prompts = torch.randint(3, args.vocab_size, (batch, args.prompt_len), generator=g).tolist()
            steps = {"ours": ours_decode(ours.eval(), prompts, args.new_tokens, autocast),
                     "llama": theirs_decode(theirs.eval(), prompts, args.new_tokens, autocast)}
            if args.compile:   # compiled decoding (model/generate.py); its compile time is printed, not timed
                steps["ours compiled"] = ours_decode(ours, prompts, args.new_tokens, autocast, compiled=True)
                start = time.perf_counter()
                with autocast():
                    compiled_tokens = generate(ours, prompts, args.new_tokens, temperature=0, compiled=True)
                seconds = time.perf_counter() - start
                with autocast():
                    same = compiled_tokens.completions == \
                        generate(ours, prompts, args.new_tokens, temperature=0).completions
                print(f"decode {dtype_name} B={batch}: compiling our decode step took {seconds:.0f} s (once per model, "
                      f"batch size and cache length); its greedy tokens {'equal' if same else 'DIFFER FROM'} "
                      f"the eager step's")
            results = measure(steps, device, args.warmup, args.repeat, "rss")
            rows += table_rows(f"decode {dtype_name} B={batch}", results, batch * args.new_tokens, None)
            ours.train()
            theirs.train()

    print("| workload | model | tokens/s | vs Llama (speed) | peak MB | MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
