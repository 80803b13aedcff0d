"""GRPO: reinforcement learning from verifiable rewards with group-relative advantages (no value model).

For each prompt the policy samples G completions; each completion's advantage is its reward relative to the other
completions of its group (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), and the policy follows PPO's clipped
objective on every completion token, optionally held near a reference model by a KL penalty.

Commands, from the repository root after `pip install -e .` (and an SFT run in out/sft):

    # the tiny SFT model on the embedded arithmetic prompts, on CPU
    python trainer/train_grpo.py --init_from out/sft/final

    # one GPU: DAPO's settings (clip-higher, token-level loss, dynamic sampling, no KL)
    python trainer/train_grpo.py --init_from out/sft-small/final --device cuda --num_generations 16 \\
        --epsilon 0.2 --epsilon_high 0.28 --loss_type dapo --beta 0 --filter_zero_std_groups --out_dir out/grpo

    # 8 GPUs: every rank rolls out its own prompts; gradients are all-reduced through DDP
    torchrun --standalone --nproc_per_node 8 trainer/train_grpo.py --init_from out/sft-base/final \\
        --data_config config/data/rlaif/default.yaml --out_dir out/grpo-base

    # LoRA: adapters on the frozen model; the reference is the same model with adapters off
    python trainer/train_grpo.py --init_from out/sft/final --lora_rank 16 --learning_rate 1e-4

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it. One step of the loop:

  rollout     batch_size * accumulation_steps prompts per rank (phase rlaif: {"prompt" or "messages", "answer",
              ...}), G = --num_generations completions each, sampled with the KV cache and the fused sampler at
              the scheduled temperature; each scored by the reward functions (trainer/rewards.py) and/or a reward
              model (--reward_model, trainer/train_reward.py).
              --filter_zero_std_groups (dynamic sampling, DAPO): groups whose G rewards are all equal carry no
              signal; they are dropped and fresh prompts are rolled out until the batch is full (at most
              --max_resample_rounds more rounds, then the batch is filled with dropped groups, advantage 0).
  advantages  A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4) with --scale_rewards group; the std of the whole
              batch (all ranks) with batch; no division with none (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783).
  update      --num_iterations optimizer steps on the batch. Per completion token, with ratio = pi / pi_old:
                  loss_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_k3(pi || pi_ref)
              aggregated by --loss_type (aggregate_loss below). With one iteration pi_old = pi (detached): the ratio
              is 1 and only its gradient matters.
  save        OUT_DIR/step_XXXXXX/ (Hugging Face layout, or PEFT adapters under LoRA, + resume state).
"""

import math
import time
from dataclasses import dataclass, field

import torch

from minitrain.dataset.mixer import format_summary
from minitrain.dataset.prompts import PromptDataset
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting, sequences
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0
from minitrain.trainer.rewards import RewardError, load_frozen_reward_model, parse_reward_flags, reward_model_scores
from minitrain.trainer.train_ppo import clipped_surrogate

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig(TrainConfig):
    """Group Relative Policy Optimization on prompts with verifiable rewards (batch_size = prompts per micro-batch)."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/sft/final"
    out_dir: str = "out/grpo"
    batch_size: int = 8                 # prompts per micro-batch (x 8 completions = 64 sequences)
    max_steps: int = 60
    learning_rate: float = 2.0e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    log_interval: int = 1
    eval_interval: int = 20
    eval_tasks: str = "arithmetic"
    save_interval: int = 20
    keep_checkpoints: int = 2

    # ---- rollouts ----
    num_generations: int = field(default=8, metadata={"help": "G: completions sampled per prompt"})
    max_prompt_length: int = field(default=192, metadata={"help": "longer prompts are dropped (and counted)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (unless a schedule is given)"})
    temperature_start: float | None = field(default=None, metadata={
        "help": "temperature at step 0, moving linearly to --temperature_end over --temperature_warmup_steps"})
    temperature_end: float | None = field(default=None, metadata={"help": "temperature after the warmup"})
    temperature_warmup_steps: int = field(default=0, metadata={"help": "steps of the temperature schedule"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens only; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1 = off"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences generated together"})
    # ---- rewards ----
    reward_funcs: str = field(default="exact_answer,format", metadata={
        "help": "comma-separated built-ins (exact_answer, format, tiered, length_penalty) or module:function"})
    reward_weights: str = field(default="1,0.1", metadata={"help": "comma-separated weights; empty = 1 each"})
    reward_model: str = field(default="", metadata={"help": "reward model directory (trainer/train_reward.py) whose "
                                                            "score is added to the reward functions'"})
    reward_model_weight: float = field(default=1.0, metadata={"help": "weight of the reward model's score"})
    # ---- objective ----
    scale_rewards: str = field(default="group", metadata={"help": "divide advantages by the std of the group, "
                                                                  "of the batch, or not at all",
                                                          "choices": list(SCALE_REWARDS)})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip: ratio >= 1 - epsilon"})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "upper clip: ratio <= 1 + epsilon_high "
                                                                       "(DAPO's clip-higher); None = epsilon"})
    beta: float = field(default=0.02, metadata={"help": "KL coefficient against the reference; 0 = no reference "
                                                       "model is held"})
    loss_type: str = field(default="dapo", metadata={"help": "loss aggregation (see aggregate_loss)",
                                                     "choices": list(LOSS_TYPES)})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps on each rollout batch (mu)"})
    filter_zero_std_groups: bool = field(default=False, metadata={
        "help": "dynamic sampling: replace groups whose rewards are all equal by fresh prompts"})
    max_resample_rounds: int = field(default=4, metadata={"help": "extra rollout rounds of dynamic sampling per step"})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "leave completions that hit --max_new_tokens without EOS out of the loss"})

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise FlagError("init_from", "is required: RL starts from a trained checkpoint "
                                         "(e.g. --init_from out/sft/final)")
        for name, low in (("num_generations", 2), ("max_prompt_length", 1), ("max_new_tokens", 1),
                          ("num_iterations", 1), ("generation_batch_size", 1), ("max_resample_rounds", 0),
                          ("temperature_warmup_steps", 0), ("top_k", 0)):
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        for name in ("temperature", "temperature_start", "temperature_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise FlagError(name, f"must be positive, got {value}")
        if (self.temperature_start is None) != (self.temperature_end is None):
            raise FlagError("temperature_start", "and --temperature_end go together")
        if not 0 < self.top_p <= 1:
            raise FlagError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.epsilon < 1:
            raise FlagError("epsilon", f"must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise FlagError("epsilon_high", f"must not be negative, got {self.epsilon_high}")
        if self.beta < 0:
            raise FlagError("beta", f"must not be negative, got {self.beta}")
        if not self.reward_funcs.strip() and not self.reward_model:
            raise FlagError("reward_funcs", "is empty and no --reward_model is given: nothing scores the completions")
        try:
            if self.reward_funcs.strip():
                parse_reward_flags(self.reward_funcs, self.reward_weights)
        except RewardError as e:
            raise FlagError("reward_funcs", str(e)) from None


# =============================================================================================================
# The math: pure functions on tensors (tests/test_grpo.py checks each against its formula)
# =============================================================================================================

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, batch_std: float | None = None,
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages of rewards [N * G] laid out group by group (G consecutive completions of one prompt).

        A_i = r_i - mean(group)                               scale "none"  (Dr. GRPO)
        A_i = (r_i - mean(group)) / (std(group) + eps)        scale "group" (GRPO; std with Bessel's correction)
        A_i = (r_i - mean(group)) / (batch_std + eps)         scale "batch" (batch_std: of all rewards, all ranks)
    """
    grouped = rewards.view(-1, group_size)                                       # [N, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    return centred.reshape(-1)


def batch_reward_std(rewards: torch.Tensor) -> float:
    """The std (Bessel's correction) of every rank's rewards, in two passes in float64: the mean (one all-reduce),
    then the squared deviations from it (another). One pass of E[r^2] - mean^2 cancels catastrophically for rewards
    far from zero (0 at an offset of 1000 in float32), and advantages must not move when every reward shifts."""
    r = rewards.double()                                                          # [n] this rank's rewards
    stats = torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)])
    if distributed.is_distributed():
        torch.distributed.all_reduce(stats)
    mean, n = stats[0] / stats[1], stats[1].item()
    squares = ((r - mean) ** 2).sum()
    if distributed.is_distributed():
        torch.distributed.all_reduce(squares)
    return math.sqrt(squares.item() / max(1.0, n - 1))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1 >= 0.

    Unbiased, low variance ("k3", Schulman 2020, http://joschu.net/blog/kl-approx.html); GRPO's KL term
    (Shao et al. 2024, arXiv 2402.03300). Where mask is 0 the gap is set to 0 BEFORE the exp (the term is then 0
    there, and so is its gradient): a gap above ~88 nats at a prompt or padding column would otherwise give
    exp = inf, and inf * 0 = NaN in the masked loss and its gradient.
    """
    delta = ref_logp - logp
    if mask is not None:
        delta = torch.where(mask.bool(), delta, 0.0)
    return torch.exp(delta) - delta - 1


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
                   tokens_in_step: float | None = None) -> torch.Tensor:
    """One micro-batch's loss from per-token losses [B, T] and the completion mask [B, T].

        grpo     mean over sequences of each sequence's mean over its tokens (GRPO's 1/|o_i| per sequence)
        bnpo     sum over the micro-batch's tokens / its number of tokens
        dr_grpo  sum / (B * max_new_tokens): a constant normaliser, no length bias (Dr. GRPO, arXiv 2503.20783)
        dapo     sum / tokens_in_step, the completion tokens of the whole optimizer step, all micro-batches and all
                 ranks (token-level loss of DAPO, arXiv 2503.14476); the caller multiplies by the number of ranks,
                 since DDP averages gradients over them, and does not divide by the accumulation steps
    """
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        return masked.sum() / max(tokens_in_step, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def current_temperature(cfg: GRPOConfig, step: int) -> float:
    if cfg.temperature_start is None:
        return cfg.temperature
    return optim.linear_schedule(step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_warmup_steps)


# =============================================================================================================
# Rollouts: groups of G scored completions per prompt
# =============================================================================================================

@dataclass
class Group:
    prompt: int                    # index in the PromptDataset
    completions: list[list[int]]   # G token lists
    finished: list[bool]           # stopped at EOS
    rewards: list[float]           # combined reward of each completion
    per_function: dict             # reward function name -> G scores

    @property
    def zero_std(self) -> bool:
        return max(self.rewards) - min(self.rewards) < 1e-9


def roll_out_groups(model, prompts: PromptDataset, indices: list[int], tokenizer, reward, reward_model,
                    cfg: GRPOConfig, temperature: float, amp) -> tuple[list[Group], int, float]:
    """G completions of each prompt, scored; returns (groups, completion tokens generated, seconds).

    Sampling draws from the global torch generator, whose state every checkpoint saves: a resumed run samples
    what the uninterrupted run would have."""
    G = cfg.num_generations
    flat = [i for i in indices for _ in range(G)]                              # each prompt G times, in a row
    started = time.time()
    completions, finished = [], []
    for start in range(0, len(flat), cfg.generation_batch_size):
        chunk = flat[start:start + cfg.generation_batch_size]
        with amp:
            out = sequences.rollout(model, [prompts.ids[i] for i in chunk], cfg.max_new_tokens, temperature,
                          tokenizer.eos_id, tokenizer.pad_id, top_k=cfg.top_k, top_p=cfg.top_p)
        completions += out.completions
        finished += out.finished.tolist()
    seconds = time.time() - started
    texts = [tokenizer.decode(c) for c in completions]
    total, per_function = [0.0] * len(flat), {}
    if reward is not None:
        total, per_function = reward([prompts.text(i) for i in flat], texts, prompts.columns(flat))
    if reward_model is not None:        # scored at the last token of prompt + completion
        with amp:
            scores = reward_model_scores(reward_model, [prompts.ids[i] for i in flat], completions, tokenizer.pad_id,
                                         next(reward_model.parameters()).device, cfg.generation_batch_size)
        per_function["reward_model"] = scores
        total = [t + cfg.reward_model_weight * x for t, x in zip(total, scores)]
    groups = [Group(prompt=i, completions=completions[g * G:(g + 1) * G], finished=finished[g * G:(g + 1) * G],
                    rewards=total[g * G:(g + 1) * G],
                    per_function={name: scores[g * G:(g + 1) * G] for name, scores in per_function.items()})
              for g, i in enumerate(indices)]
    return groups, sum(len(c) for c in completions), seconds


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on at least one (so that all ranks take the same branch)."""
    if not distributed.is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


# =============================================================================================================
# Training
# =============================================================================================================

def train(cfg: GRPOConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    reward = parse_reward_flags(cfg.reward_funcs, cfg.reward_weights) if cfg.reward_funcs.strip() else None
    G = cfg.num_generations
    epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    # ---- model, and the reference the KL term pulls toward ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    reference = modeling.frozen_reference(model) if cfg.beta > 0 else None
    reward_model = load_frozen_reward_model(cfg.reward_model, tokenizer, dist.device) if cfg.reward_model else None
    print0(f"model: {model.num_parameters():,} parameters, from {cfg.init_from}; reference: "
           + ("none (beta 0)" if cfg.beta == 0 else "the base with LoRA adapters off" if reference is None
              else "a frozen copy"))

    # ---- data: prompts with verifiable answers ----
    data = batches.prepare_phase_data("rlaif", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    prompts = PromptDataset(data.train_file, tokenizer, cfg.max_prompt_length)
    print0(f"prompts: {prompts.describe()}")
    sampler = batches.GlobalBatchSampler(len(prompts), cfg.batch_size, cfg.accumulation_steps, dist.world_size, dist.rank,
                                 cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch

    # ---- optimisation ----
    dtype = optim.resolve_dtype(cfg.dtype, dist.device)
    amp = optim.autocast_context(dist.device, dtype)
    optimizer = optim.build_optimizer(model, cfg, dist.device)
    scaler = optim.make_grad_scaler(dist.device, dtype)
    distributed.seed_everything(cfg.seed + dist.rank)          # each rank samples its own completions
    start_step, wandb_run_id = 0, None
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
    train_model = modeling.wrap_model(model, cfg, dist)
    seq_len = cfg.max_prompt_length + cfg.max_new_tokens
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, seq_len), wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} prompts x {G} completions, "
           f"{cfg.num_iterations} update(s) each, loss {cfg.loss_type}, beta {cfg.beta:g}, {dist.world_size} "
           f"rank(s), {str(dtype).replace('torch.', '')} on {dist.device}")

    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                logger.log_eval(step, evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                ranks = distributed.check_replicas(train_model, dist)
                if ranks > 1:
                    print0(f"replicas: parameters identical on {ranks} ranks")
                checkpointing.save_training_checkpoint(cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger,
                                         "grpo", metadata={"data": data.summary, "init_from": cfg.init_from},
                                         final=last_step)
        if last_step:
            break

        # ---- 1. rollout: G scored completions per prompt; dynamic sampling refills zero-std groups ----
        temperature = current_temperature(cfg, step)
        target = cfg.batch_size * cfg.accumulation_steps            # groups per rank
        kept, spare, generated, rollout_seconds, zero_std, seen = [], [], 0, 0.0, 0, 0
        for round_ in range(cfg.max_resample_rounds + 1):
            indices = [i for micro in sampler.next_step() for i in micro]
            groups, tokens, seconds = roll_out_groups(train_model, prompts, indices, tokenizer, reward, reward_model,
                                                      cfg, temperature, amp)
            generated, rollout_seconds = generated + tokens, rollout_seconds + seconds
            zero_std, seen = zero_std + sum(g.zero_std for g in groups), seen + len(groups)
            for g in groups:
                (spare if cfg.filter_zero_std_groups and g.zero_std else kept).append(g)
            if not cfg.filter_zero_std_groups or not any_rank(len(kept) < target, dist.device):
                break
        batch = (kept + spare)[:target]                            # filled up with zero-std groups if need be

        # ---- 2. advantages ----
        rewards = torch.tensor([r for g in batch for r in g.rewards], device=dist.device)           # [target * G]
        batch_std = batch_reward_std(rewards) if cfg.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, G, cfg.scale_rewards, batch_std)

        # ---- 3. micro-batches, with the old and reference log-probs (no gradient) ----
        micro_batches = []
        for m in range(cfg.accumulation_steps):
            groups = batch[m * cfg.batch_size:(m + 1) * cfg.batch_size]
            ids, attention, mask, _ = sequences.pack_sequences([prompts.ids[g.prompt] for g in groups for _ in range(G)],
                                                     [c for g in groups for c in g.completions], tokenizer.pad_id,
                                                     dist.device)
            if cfg.mask_truncated_completions:
                finished = torch.tensor([f for g in groups for f in g.finished], device=dist.device)
                mask = mask * finished[:, None]
            rows = slice(m * cfg.batch_size * G, (m + 1) * cfg.batch_size * G)
            micro = {"ids": ids, "attention": attention, "mask": mask, "advantages": advantages[rows, None]}
            with torch.no_grad(), amp:
                if cfg.num_iterations > 1:
                    micro["old"] = sequences.gather_logprobs(train_model, ids, attention, temperature).float()
                if cfg.beta > 0:
                    micro["ref"] = sequences.reference_logprobs(reference, train_model, ids, attention, temperature).float()
            micro_batches.append(micro)
        tokens_in_step = sequences.step_token_count([mb["mask"] for mb in micro_batches], dist.device)     # all ranks (dapo)

        # ---- 4. num_iterations optimizer steps on the batch ----
        sums = {"kl": 0.0, "entropy": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0, "loss": 0.0}
        # (the logged loss is the token mean of the per-token loss, whatever --loss_type aggregates)
        for iteration in range(cfg.num_iterations):
            for m, mb in enumerate(micro_batches):
                with optim.sync_gradients(train_model, last_micro_step=m == len(micro_batches) - 1):
                    with amp:
                        logp, entropy = sequences.gather_logprobs(train_model, mb["ids"], mb["attention"], temperature,
                                                        with_entropy=True)
                    logp = logp.float()
                    old = mb["old"] if "old" in mb else logp.detach()
                    per_token, low, high = clipped_surrogate(logp, old, mb["advantages"], cfg.epsilon, epsilon_high,
                                                             mb["mask"])
                    if cfg.beta > 0:
                        kl = k3_kl(logp, mb["ref"], mb["mask"])
                        per_token = per_token + cfg.beta * kl
                        sums["kl"] += float((kl.detach() * mb["mask"]).sum())
                    loss = aggregate_loss(per_token, mb["mask"], cfg.loss_type, cfg.max_new_tokens, tokens_in_step)
                    scale = dist.world_size if cfg.loss_type == "dapo" else 1.0 / cfg.accumulation_steps
                    scaler.scale(loss * scale).backward()
                sums["loss"] += float((per_token.detach() * mb["mask"]).sum())
                sums["entropy"] += float((entropy.detach().float() * mb["mask"]).sum())
                sums["clip_low"] += float((low.float() * mb["mask"]).sum())
                sums["clip_high"] += float((high.float() * mb["mask"]).sum())
                sums["tokens"] += float(mb["mask"].sum())
            lr = optim.cosine_lr(step * cfg.num_iterations + iteration, max_steps * cfg.num_iterations, cfg.warmup_steps,
                           cfg.learning_rate, cfg.min_lr_ratio)
            grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        train_tokens = sum(int(mb["attention"].sum()) for mb in micro_batches) * cfg.num_iterations
        logger.tick(tokens=train_tokens * dist.world_size, samples=sampler.global_batch * G)

        if step % cfg.log_interval == 0 or step == max_steps:
            lengths = [len(c) for g in batch for c in g.completions]
            group_stds = [torch.tensor(g.rewards).std().item() for g in batch]
            metrics = {
                "reward": rewards.mean().item(), "reward_std": sum(group_stds) / len(group_stds),
                "kl": sums["kl"] / max(sums["tokens"], 1), "entropy": sums["entropy"] / max(sums["tokens"], 1),
                "clip_ratio/low_mean": sums["clip_low"] / max(sums["tokens"], 1),
                "clip_ratio/high_mean": sums["clip_high"] / max(sums["tokens"], 1),
                "completions/mean_length": sum(lengths) / len(lengths),
                "completions/clipped_ratio": 1 - sum(f for g in batch for f in g.finished) / len(lengths),
                "frac_reward_zero_std": zero_std / seen,
                "rollout_tokens_per_sec": generated / max(rollout_seconds, 1e-9),
                "temperature": temperature, "loss": sums["loss"] / max(sums["tokens"], 1)}
            for name in batch[0].per_function:
                scores = torch.tensor([s for g in batch for s in g.per_function[name]])
                metrics[f"rewards/{name}/mean"] = scores.mean().item()
                metrics[f"rewards/{name}/std"] = scores.std().item() if len(scores) > 1 else 0.0
            metrics = distributed.mean_over_ranks(metrics, dist.device)
            metrics["rollout_tokens_per_sec"] *= dist.world_size      # the ranks generate side by side
            loss_value = metrics.pop("loss")
            logger.log_train(step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), epoch=sampler.epoch_progress,
                             show=("reward", "reward_std", "kl", "completions/mean_length"), **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GRPOConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS + (RewardError,) as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
