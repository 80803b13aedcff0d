"""Rebuild tests/assets/mini-pretrained: the mini model (config/model/mini.yaml, 1.6M parameters) pretrained on the
embedded data (version 5: columns at arithmetic levels 2-3, one operation at a time at level 4), stored in bfloat16
(3.2 MB) for the test that SFT raises held-out arithmetic accuracy (tests/test_sft_accuracy.py). Pretraining it
takes 11 to 13 minutes on 2 CPU cores, too long for the test suite, so the suite ships it instead; this is how it was
made (2026-12-04):

    python trainer/train_pretrain.py --dtype float32 --model_config mini --max_steps 1200 --batch_size 16 \\
        --max_seq_len 256 --learning_rate 3e-3 --warmup_steps 30 --eval_interval 600 --save_interval 600 \\
        --sample_prompts "" --device cpu --report_to none --out_dir out/mini-pretrained
    python tests/make_assets.py --from out/mini-pretrained/final

(the pretraining stage of the default pipeline on a CPU without native bf16, README "Results"). When the embedded
data's task text changes, rebuild it: a model pretrained on another response format is unlearned, not improved, by
100 SFT steps. A rerun gives a model of the same
quality, not the same bytes (thread scheduling changes float sums). The asset keeps minitrain.json, the run's full
config, and no resume state.
"""

import argparse
import json
import os

import torch

from minitrain.model.checkpoint import load_model, save_checkpoint

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mini-pretrained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="the pretraining run's final checkpoint")
    parser.add_argument("--out", default=ASSET, help=f"where the asset goes [default: {ASSET}]")
    args = parser.parse_args()
    model, tokenizer = load_model(args.source, dtype=torch.bfloat16)
    with open(os.path.join(args.source, "minitrain.json")) as f:
        record = json.load(f)
    save_checkpoint(model, tokenizer, args.out, extra_json={k: record[k] for k in ("method", "step", "config")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
