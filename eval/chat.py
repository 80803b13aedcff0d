"""Chat with a checkpoint in the terminal, streaming the answer as it is generated.

    python eval/chat.py --model out/sft/final                       # interactive, multi-turn
    python eval/chat.py --model out/sft/final --prompt "What is 2+3?"   # prints only the completion, then exits
    python eval/chat.py --model out/pretrain/final --raw --prompt "The list"   # no chat template
    python eval/chat.py --model out/sft/final --adapter out/lora/final --system "Answer briefly."
    python eval/chat.py --model out/sft/final --device cuda --temperature 0    # greedy on a GPU
    python eval/chat.py --model out/sft/final --compile     # compiled decoding: a compile first, then faster
    python eval/chat.py --model out/sft-temp/final --learned_decoding          # the heads pick T (and top-p) per token

In interactive mode an empty line or Ctrl-D ends the session and `/reset` clears the conversation; the banner gives
the model's total parameters and those active per token (fewer in a mixture of experts). An answer stops at
<|im_end|> or <|endoftext|> (whichever comes first; --raw text from a pretrained model usually ends with the latter).

Context: the prompt plus --max_new_tokens must fit the model's max_position_embeddings. With --prompt a prompt that
does not fit is an error. In interactive mode, when the conversation outgrows it, the oldest turns are dropped (the
system message is kept) with a note on stderr; a message too long to fit even alone is refused with a note, and the
session goes on. Bad flags and model directories are one `error: ...` line on stderr with exit status 2.

--learned_decoding samples each token with the temperature (and top-p) the model's decoding heads predict
(trainer/train_sft.py --train_temp / --train_top_p; a LoRA run's heads are read from --adapter); --temperature (and
--top_p, with a top-p head) are then unused, and --min_p 0 means the ratio the heads were trained for.
"""

import argparse
import sys

import torch

from minitrain.eval.cli import OneLineParser, UsageError, check_device, load_heads_for_decoding, run_cli
from minitrain.model.checkpoint import DTYPES, load_model
from minitrain.model.generate import generate


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--model", required=True, help="checkpoint directory (ours or a local Hugging Face one)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT layout) applied on top of --model")
    # conversation
    p.add_argument("--prompt", default=None, help="answer this one prompt, print only the completion, and exit")
    p.add_argument("--system", default=None, help="system message placed before the conversation")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    # sampling
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    p.add_argument("--learned_decoding", action="store_true",
                   help="sample with the temperature (and top-p) the model's decoding heads predict per token")
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled step (model/generate.py): the first answer waits 10 to 40 s of "
                        "compiling, later ones come faster")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min_p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    # runtime
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights dtype; auto = as saved in the checkpoint (bfloat16 halves the bytes a token reads)")
    args = p.parse_args(argv)
    checks = [(args.max_new_tokens > 0, "--max_new_tokens must be positive"),
              (args.temperature >= 0, "--temperature must be >= 0"),
              (args.top_k >= 0, "--top_k must be >= 0"),
              (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
              (0 <= args.min_p <= 1, "--min_p must be in [0, 1]"),
              (args.repetition_penalty > 0, "--repetition_penalty must be positive"),
              (not (args.raw and args.system), "--system needs the chat template; --raw sends plain text")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    check_device(args.device)
    return args


class TerminalStream:
    """Prints a row's tokens as they arrive, decoding the whole answer each time so multi-byte characters and
    merged spaces come out right."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], ""

    def __call__(self, row: int, token_id: int):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):   # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def load(args):
    model, tokenizer = load_model(args.model, device=args.device, dtype=DTYPES.get(args.dtype))
    if args.adapter:
        from minitrain.model.lora import load_adapter   # LoRA lives in model/lora.py
        model = load_adapter(model, args.adapter)
    load_heads_for_decoding(model, args)      # with --min_p 0, generate() uses the ratio the heads were trained for
    max_positions = model.config.max_position_embeddings
    if args.max_new_tokens >= max_positions:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: must be below the model's max_position_embeddings "
                         f"({max_positions}) to leave room for a prompt")
    return model.eval(), tokenizer


def answer(model, tokenizer, prompt_ids, args, out=None) -> str:
    out = out or sys.stdout   # looked up at call time, so a redirected sys.stdout is honoured
    stream = TerminalStream(tokenizer, out)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    generate(model, [prompt_ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
             eos_token_id=[tokenizer.eos_id, tokenizer.pad_id], pad_token_id=tokenizer.pad_id, generator=generator,
             stream=stream, learned_decoding=args.learned_decoding, compiled=args.compile)
    out.write("\n")
    out.flush()
    return tokenizer.decode(stream.ids)


def fit_history(tokenizer, history: list[dict], keep: int, budget: int) -> tuple[list[int] | None, int]:
    """The chat prompt of `history` in at most `budget` tokens, dropping its oldest turns after the first `keep`
    messages (the system message) in place: a user message with the answers that follow it.

    Returns (prompt ids, messages dropped); (None, 0) with `history` unchanged when the last message does not fit
    even alone.
    """
    if len(tokenizer.chat_prompt_ids(history[:keep] + history[-1:])) > budget:
        return None, 0
    dropped = 0
    while True:
        ids = tokenizer.chat_prompt_ids(history)
        if len(ids) <= budget:
            return ids, dropped
        del history[keep]
        dropped += 1
        while history[keep]["role"] == "assistant":   # the history ends with the new user message
            del history[keep]
            dropped += 1


def parameter_summary(model) -> str:
    total, active = model.num_parameters(), model.num_parameters(active_only=True)
    return f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token"


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load(args)
    budget = model.config.max_position_embeddings - args.max_new_tokens   # longest prompt that fits
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt) if args.raw else \
            tokenizer.chat_prompt_ids(system + [{"role": "user", "content": args.prompt}])
        if not ids:
            raise UsageError("--prompt is empty (--raw needs at least one token)")
        if len(ids) > budget:
            raise UsageError(f"--prompt: {len(ids)} tokens + --max_new_tokens {args.max_new_tokens} exceed the "
                             f"model's max_position_embeddings ({model.config.max_position_embeddings})")
        answer(model, tokenizer, ids, args)
        return
    print(f"chatting with {args.model}{' + ' + args.adapter if args.adapter else ''} ({parameter_summary(model)}); "
          f"empty line or Ctrl-D to end, /reset to clear", file=sys.stderr)
    history = list(system)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        if text.strip() == "/reset":
            history = list(system)
            continue
        if args.raw:
            ids = tokenizer.encode(text)
            if len(ids) > budget:
                print(f"[{len(ids)} tokens + --max_new_tokens {args.max_new_tokens} do not fit the model's "
                      f"{model.config.max_position_embeddings} positions; not sent]", file=sys.stderr)
                continue
            answer(model, tokenizer, ids, args)
            continue
        history.append({"role": "user", "content": text})
        ids, dropped = fit_history(tokenizer, history, len(system), budget)
        if ids is None:
            history.pop()
            print(f"[this message does not fit the model's {model.config.max_position_embeddings} positions with "
                  f"--max_new_tokens {args.max_new_tokens}; not sent]", file=sys.stderr)
            continue
        if dropped:
            print(f"[dropped the {dropped} oldest messages to fit the model's {model.config.max_position_embeddings} "
                  f"positions]", file=sys.stderr)
        reply = answer(model, tokenizer, ids, args)
        history.append({"role": "assistant", "content": reply})


def cli(argv=None) -> int:
    """main as a command: bad input is one `error: ...` line on stderr and exit status 2, never a traceback."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
