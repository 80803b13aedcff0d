"""Reward model: the transformer with a scalar head, trained on preference pairs with the Bradley-Terry loss.

A reward model scores a whole answer: r(x, y) = w . h_last, the final hidden state of the answer's last token (its
closing <|im_end|>) times a learned vector (model/heads.py RewardModel). Trained on pairs (prompt, chosen, rejected),
it learns that the chosen answer scores higher (Bradley & Terry 1952; as in InstructGPT, Ouyang et al. 2022, arXiv
2203.02155, and Llama 2's margin, Touvron et al. 2023, arXiv 2307.09288). The PPO trainer reads it with
--reward_model DIR.

Commands, from the repository root after `pip install -e .` (and an SFT run in out/sft):

    # the tiny SFT model on the embedded preference pairs, on CPU (about a minute)
    python trainer/train_reward.py --init_from out/sft/final

    # one GPU: your own pairs, a margin on each row ("margin": 2.0) or one for all (--margin 1)
    python trainer/train_reward.py --init_from out/sft-small/final --device cuda --data_path data/prefs.jsonl \\
        --batch_size 32 --learning_rate 1e-5 --max_steps 2000 --out_dir out/reward-small

    # 8 GPUs of one machine
    torchrun --standalone --nproc_per_node 8 trainer/train_reward.py --init_from out/sft-base/final \\
        --data_config config/data/dpo/default.yaml --out_dir out/reward-base

    # LoRA: adapters on the frozen trunk, the score head trained in full; OUT_DIR/merged is the reward model
    python trainer/train_reward.py --init_from out/sft/final --lora_rank 16 --learning_rate 1e-3

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it. The pieces:

  data     phase dpo (config/data/dpo/, --data_config or --data_path): {"prompt": [messages], "chosen": [answer],
           "rejected": [answer]} (dataset/formats.py accepts the usual shapes). A pair is laid out as
               chat_prompt_ids(prompt) + encode(answer) + [<|im_end|>]
           for each answer: exactly what PPO scores (the chat prompt followed by a sampled completion ending at EOS).
           Pairs whose longer sequence exceeds --max_seq_len are dropped and counted (a cut answer would be scored
           at a token it does not end with).
  loss     per pair, with m the row's "margin" field or else --margin:
               loss = -log sigmoid(r_chosen - r_rejected - m)
           + --center_rewards_coefficient * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023, arXiv 2312.09244,
           TRL's centring: keeps scores near 0, which PPO's value function and KL penalty like).
           Chosen and rejected rows go through ONE forward pass ([2B, T], right-padded).
  metrics  train: loss, accuracy (share of pairs with r_chosen > r_rejected), margin (mean r_chosen - r_rejected),
           rewards/chosen, rewards/rejected; eval on the validation pairs: eval/loss, eval/accuracy, eval/margin.
  save     OUT_DIR/step_XXXXXX/ is a Hugging Face sequence-classification directory (LlamaForSequenceClassification,
           or Qwen2/Qwen3's as the config's family; model.* + score.weight [1, H]) plus the resume state:
           AutoModelForSequenceClassification.from_pretrained loads it, and --reward_model DIR of the RL trainers.
           Under LoRA the step directories hold the adapters (the score head in the resume state), and OUT_DIR/merged
           is the full reward model.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minitrain.dataset.jsonl import DataError, read_jsonl
from minitrain.dataset.mixer import format_summary
from minitrain.dataset.preference import tokenize_pair
from minitrain.model.heads import RewardModel
from minitrain.model.lora import has_lora
from minitrain.model.transformer import unwrap
from minitrain.trainer import batches, checkpointing, distributed, modeling, optim, reporting, sharding
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0



@dataclass
class RewardConfig(TrainConfig):
    """Reward model on preference pairs (batch_size = pairs per micro-batch), Bradley-Terry loss."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/sft/final"
    out_dir: str = "out/reward"
    batch_size: int = 16                # pairs per micro-batch (32 sequences in one forward pass)
    max_steps: int = 200
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    eval_batches: int = 8
    save_interval: int = 100
    keep_checkpoints: int = 2

    margin: float = field(default=0.0, metadata={"help": "m in -log sigmoid(r_chosen - r_rejected - m) for rows "
                                                         "without a 'margin' field of their own"})
    center_rewards_coefficient: float = field(default=0.01, metadata={
        "help": "weight of (r_chosen + r_rejected)^2, which keeps scores centred on 0; 0 = off"})

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise FlagError("init_from", "is required: a reward model starts from a trained checkpoint "
                                         "(e.g. --init_from out/sft/final)")
        if self.eval_tasks:
            raise FlagError("eval_tasks", "does not apply: a reward model does not generate answers (its evaluation "
                                          "is the accuracy on the validation pairs)")
        if not math.isfinite(self.margin):
            raise FlagError("margin", f"must be a finite number, got {self.margin}")
        if not (self.center_rewards_coefficient >= 0 and math.isfinite(self.center_rewards_coefficient)):
            raise FlagError("center_rewards_coefficient", f"must be a finite number >= 0, got "
                                                          f"{self.center_rewards_coefficient}")


# =============================================================================================================
# The loss (tests/test_reward.py checks it against its formula)
# =============================================================================================================

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair loss [B] = -log sigmoid(r_chosen - r_rejected - margin).

    Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected); the loss is its negative log-likelihood.
    A margin m > 0 asks for r_chosen - r_rejected > m before the loss fades (Llama 2's margin loss).
    logsigmoid is the stable form (no overflow for large differences).
    """
    return -F.logsigmoid(chosen - rejected - margin)


# =============================================================================================================
# Pairs: tokenised, laid out as PPO scores them
# =============================================================================================================

class PairDataset:
    """Preference pairs as token ids: pairs[i] = (chosen ids, rejected ids, margin).

    Each side is the prompt and the answer up to its closing <|im_end|> (dataset/preference.py tokenize_pair, the
    ids DPO trains on), so the score is read at <|im_end|>, where PPO reads it on a sampled completion. A pair with a
    side longer than max_seq_len is dropped (counted), never cut: a cut answer would be scored without its end.
    """

    def __init__(self, path: str, tokenizer, max_seq_len: int, default_margin: float = 0.0):
        rows = read_jsonl(path, required={"prompt": list, "chosen": list, "rejected": list})
        self.pairs, self.dropped, self.own_margins = [], 0, 0
        for index, row in enumerate(rows):
            try:
                pair = tokenize_pair(tokenizer, row, max_seq_len=10**9)       # whole answers; checked below
            except DataError as e:
                raise DataError(f"{path}: line {index + 1}: {e}") from None
            if pair is None:
                self.dropped += 1
                continue
            sides = []
            for side in ("chosen", "rejected"):
                mask = pair[f"{side}_mask"]
                end = max(i for i, m in enumerate(mask) if m) + 1           # through the answer's <|im_end|>
                sides.append(pair["prompt"] + pair[side][:end])
            if max(len(ids) for ids in sides) > max_seq_len:
                self.dropped += 1
                continue
            self.own_margins += "margin" in row          # rows may carry their own (dataset/formats.py keeps it)
            self.pairs.append((sides[0], sides[1], float(row.get("margin", default_margin))))
        if not self.pairs:
            raise DataError(f"{path}: no preference pair fits --max_seq_len {max_seq_len}")
        self.lengths = [len(c) + len(r) for c, r, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> str:
        with_margin = sum(m != 0 for _, _, m in self.pairs)
        return (f"{len(self.pairs):,} pairs ({self.dropped:,} longer than max_seq_len dropped, {with_margin:,} with "
                f"a non-zero margin)")


def collate_pairs(pairs: list[tuple], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [2B, T] (the B chosen rows, then the B rejected rows; right-padded), margins [B]."""
    sequences = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, :len(s)] = torch.tensor(s)
        attention[b, :len(s)] = 1
    margins = torch.tensor([m for _, _, m in pairs], dtype=torch.float32)
    return ids.to(device), attention.to(device), margins.to(device)


def pair_scores(model, pairs: list[tuple], pad_id: int, device, amp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B], margins [B]) from one forward pass over the 2B sequences."""
    ids, attention, margins = collate_pairs(pairs, pad_id, device)
    with amp:
        scores = model(ids, attention)                                              # [2B]
    B = len(pairs)
    return scores[:B], scores[B:], margins


@torch.no_grad()
def evaluate_pairs(model, pairs: PairDataset, batch_size: int, num_batches: int, pad_id: int, dist, amp) -> dict:
    """eval/loss, eval/accuracy and eval/margin over the first num_batches * batch_size validation pairs.

    Batch b goes to rank b % world_size and the sums are all-reduced, so the numbers do not depend on the ranks."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    n = min(len(pairs), num_batches * batch_size)
    totals = torch.zeros(4, device=dist.device, dtype=torch.float64)              # loss, correct, margin, pairs
    starts = list(range(0, n, batch_size))
    with sharding.full_weights(raw):              # under FSDP: the ranks run different numbers of batches
        for b in range(dist.rank, len(starts), dist.world_size):
            batch = pairs.pairs[starts[b]:min(starts[b] + batch_size, n)]
            chosen, rejected, margins = pair_scores(raw, batch, pad_id, dist.device, amp)
            totals += torch.stack([bradley_terry_loss(chosen, rejected, margins).sum(), (chosen > rejected).sum(),
                                   (chosen - rejected).sum(),
                                   torch.tensor(float(len(batch)), device=dist.device)]).double()
    if distributed.is_distributed():
        torch.distributed.all_reduce(totals)
    raw.train(was_training)
    count = max(totals[3].item(), 1.0)
    return {"loss": totals[0].item() / count, "accuracy": totals[1].item() / count, "margin": totals[2].item() / count}


# =============================================================================================================
# Training
# =============================================================================================================

def train(cfg: RewardConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    if cfg.lora_rank and not cfg.merge:
        cfg.merge = True          # the adapters alone do not make a reward model: OUT_DIR/merged does
        print0("LoRA: --merge set, OUT_DIR/merged will be the reward model")

    # ---- model: the SFT checkpoint's trunk plus a new score head ----
    distributed.seed_everything(cfg.seed)
    lm, tokenizer = modeling.build_model(cfg, dist.device)
    model = RewardModel.from_trunk(lm)          # same modules (and LoRA adapters), lm_head dropped
    del lm
    print0(f"reward model: {model.num_parameters():,} parameters, trunk from {cfg.init_from}, new score head "
           f"[1, {model.config.hidden_size}]")

    # ---- data: preference pairs ----
    data = batches.prepare_phase_data("dpo", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    train_set = PairDataset(data.train_file, tokenizer, cfg.max_seq_len, cfg.margin)
    val_set = PairDataset(data.val_file, tokenizer, cfg.max_seq_len, cfg.margin) if data.val_file else None
    print0(f"train: {train_set.describe()}" + (f"; validation: {val_set.describe()}" if val_set else ""))
    sampler = batches.GlobalBatchSampler(len(train_set), cfg.batch_size, cfg.accumulation_steps, dist.world_size,
                                         dist.rank, cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch

    # ---- optimisation ----
    dtype = optim.resolve_dtype(cfg.dtype, dist.device)
    amp = optim.autocast_context(dist.device, dtype)
    optimizer = optim.build_optimizer(model, cfg, dist.device)
    scaler = optim.make_grad_scaler(dist.device, dtype)
    distributed.seed_everything(cfg.seed + dist.rank)
    start_step, wandb_run_id = 0, None
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        if has_lora(model):        # the adapters came from the directory; the full-weight score head from here
            with torch.no_grad():
                model.score.weight.copy_(resume.method_tensors["score.weight"])
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, cfg.max_seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} pairs ({sampler.steps_per_epoch:,} steps/epoch), "
           f"margin {cfg.margin:g} (rows with their own: {train_set.own_margins:,}), {dist.world_size} rank(s), "
           f"{str(dtype).replace('torch.', '')} on {dist.device}")

    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if val_set is not None and not just_resumed and (
                    last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                logger.log_eval(step, evaluate_pairs(train_model, val_set, cfg.batch_size, cfg.eval_batches,
                                                     tokenizer.pad_id, dist, amp))
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                checkpointing.save_training_checkpoint(cfg, dist, step, train_model, tokenizer, optimizer, scaler,
                                                       sampler, logger, "reward",
                                                       metadata={"data": data.summary, "init_from": cfg.init_from},
                                                       final=last_step,
                                                       method_tensors={"score.weight": model.score.weight}
                                                       if has_lora(model) else None)
        if last_step:
            break

        sums = torch.zeros(5, device=dist.device)           # loss, correct, margin, r_chosen, r_rejected (sums)
        pairs_seen, step_tokens = 0, 0
        for micro, indices in enumerate(sampler.next_step()):
            with optim.sync_gradients(train_model, last_micro_step=micro == cfg.accumulation_steps - 1):
                chosen, rejected, margins_b = pair_scores(train_model, [train_set.pairs[i] for i in indices],
                                                          tokenizer.pad_id, dist.device, amp)
                per_pair = bradley_terry_loss(chosen, rejected, margins_b)
                loss = per_pair.mean()
                if cfg.center_rewards_coefficient:
                    loss = loss + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
                scaler.scale(loss / cfg.accumulation_steps).backward()
            sums += torch.stack([per_pair.sum(), (chosen > rejected).sum(), (chosen - rejected).sum(), chosen.sum(),
                                 rejected.sum()]).detach().float()
            pairs_seen += len(indices)
            step_tokens += sum(train_set.lengths[i] for i in indices)
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        logger.tick(tokens=step_tokens * dist.world_size, samples=sampler.global_batch)
        if step % cfg.log_interval == 0 or step == max_steps:
            names = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")
            metrics = distributed.mean_over_ranks(dict(zip(names, (sums / pairs_seen).tolist())), dist.device)
            loss_value = metrics.pop("loss")
            logger.log_train(step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), epoch=sampler.epoch_progress,
                             show=("accuracy", "margin"), **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final" + (f" (reward model with merged adapters: {cfg.out_dir}/merged)"
                                           if has_lora(model) else ""))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RewardConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
