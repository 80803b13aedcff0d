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

  arguments   GRPOConfig below is what a bare run does; `--config recipe.yaml` and flags override it
  data        phase rlaif prompts ({"prompt" or "messages", "answer", ...}), longer than --max_prompt_length dropped;
              batch_size * accumulation_steps of them per rank and step
  model       --init_from; the KL term's reference is a frozen copy (under LoRA the model with its adapters off)
  loop        rollout     G = --num_generations completions per prompt (roll_out_groups), sampled at the scheduled
                          temperature, scored by the reward functions (trainer/rewards.py) and/or --reward_model
              advantages  A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4) with --scale_rewards group; the std of
                          all ranks' rewards with batch; no division with none (group_advantages); the negative
                          ones times --negative_advantage_weight (weight_negative_advantages)
              update      --num_iterations optimizer steps on the batch (grpo_update); per completion token, with
                          ratio = pi / pi_old (1 with one iteration: only its gradient matters),
                  loss_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_k3(pi || pi_ref)
                          aggregated by --loss_type (aggregate_loss)
  save        OUT_DIR/step_XXXXXX/ (Hugging Face layout, or PEFT adapters under LoRA, + resume state), OUT_DIR/final
  extensions  after train(): --filter_zero_std_groups (DAPO's dynamic sampling), --mask_truncated_completions
"""

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from minitrain.dataset.prompts import PromptDataset
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting, sequences
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0
from minitrain.trainer.rewards import (RewardError, check_reward_flags, load_frozen_reward_model, parse_reward_flags,
                                       score_completions)
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
    negative_advantage_weight: float = field(default=1.0, metadata={
        "help": "multiplies the negative advantages (completions worse than their group): 1 = GRPO, 0 = only the "
                "better ones are reinforced (see weight_negative_advantages)"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps on each rollout batch (mu)"})
    filter_zero_std_groups: bool = field(default=False, metadata={
        "help": "dynamic sampling: replace groups whose rewards are all equal by fresh prompts"})
    max_resample_rounds: int = field(default=4, metadata={"help": "extra rollout rounds of dynamic sampling per step"})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "leave completions that hit --max_new_tokens without EOS out of the loss"})

    def validate(self) -> None:
        super().validate()
        sequences.check_rollout_flags(self)
        for name, low in (("num_generations", 2), ("num_iterations", 1), ("max_resample_rounds", 0)):
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        if not 0 <= self.epsilon < 1:
            raise FlagError("epsilon", f"must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise FlagError("epsilon_high", f"must not be negative, got {self.epsilon_high}")
        if self.beta < 0:
            raise FlagError("beta", f"must not be negative, got {self.beta}")
        if not 0 <= self.negative_advantage_weight <= 1:
            raise FlagError("negative_advantage_weight", f"must be in [0, 1], got {self.negative_advantage_weight}")
        check_reward_flags(self)


# === The math: functions on tensors (tests/test_grpo.py checks each against its formula) ===

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, batch_std: float | None = None,
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages of rewards [N * G] laid out group by group (G consecutive completions of one prompt).

        A_i = r_i - mean(group)                               scale "none"  (Dr. GRPO, Liu et al. 2025, 2503.20783)
        A_i = (r_i - mean(group)) / (std(group) + eps)        scale "group" (GRPO; std with Bessel's correction)
        A_i = (r_i - mean(group)) / (std(batch) + eps)        scale "batch" (the std of every rank's rewards)

    std(batch) (Bessel's correction; batch_std replaces it when given) takes two passes in float64
    (distributed.mean_var_over_ranks): advantages must not move when every reward shifts.
    """
    grouped = rewards.view(-1, group_size)                                       # [N, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        if batch_std is None:
            batch_std = distributed.mean_var_over_ranks(rewards, correction=1)[1].sqrt().item()
        centred = centred / (batch_std + eps)
    return centred.reshape(-1)


def weight_negative_advantages(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """A_i where A_i >= 0, weight * A_i where A_i < 0. Zhu et al. 2025 (arXiv 2506.01347) split the policy gradient
    into positive and negative sample reinforcement; weight 0 keeps the positive part alone (the completions that
    beat their group, like fine-tuning on the model's own right answers). The mini model needs it: pushing down its
    wrong arithmetic also pushes down the digit facts its right answers share (README "Results")."""
    return torch.where(advantages < 0, weight * advantages, advantages)


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


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                    mask: torch.Tensor, epsilon: float, epsilon_high: float, beta: float):
    """loss_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_k3(pi || pi_ref), [B, T],
    ratio = exp(logp - old_logp) (GRPO's objective, arXiv 2402.03300 eq. 3; advantages [B, 1]). Returns (loss_t,
    clipped below, clipped above, KL_k3 or None when beta is 0: no reference is held)."""
    per_token, low, high = clipped_surrogate(logp, old_logp, advantages, epsilon, epsilon_high, mask)    # [B, T]
    if beta == 0:
        return per_token, low, high, None
    kl = k3_kl(logp, ref_logp, mask)                                                                    # [B, T]
    return per_token + beta * kl, low, high, kl


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


# === The phases of a step: rollout, micro-batches, update, metrics ===

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


def roll_out_groups(model, prompts: PromptDataset, sampler, tokenizer, reward, reward_model, cfg: GRPOConfig,
                    temperature: float, amp, counts: dict) -> list[Group]:
    """G scored completions of each of the sampler's next step of prompts, one Group per prompt; adds the groups,
    zero-std groups, tokens and seconds of generation to counts (all rounds of dynamic sampling, for the metrics).

    Sampling draws from the global torch generator, whose state every checkpoint saves: a resumed run samples
    what the uninterrupted run would have."""
    G = cfg.num_generations
    indices = [i for micro in sampler.next_step() for i in micro]
    flat = [i for i in indices for _ in range(G)]                              # each prompt G times, in a row
    started = time.time()
    with amp:
        out = sequences.sample_completions(model, [prompts.ids[i] for i in flat], cfg.max_new_tokens, temperature,
                                           tokenizer.eos_id, tokenizer.pad_id, cfg.generation_batch_size,
                                           top_k=cfg.top_k, top_p=cfg.top_p)
    seconds = time.time() - started
    total, per_function = score_completions(reward, reward_model, prompts, flat, out.completions, tokenizer,
                                            cfg.reward_model_weight, cfg.generation_batch_size, amp)
    rows = [slice(g * G, (g + 1) * G) for g in range(len(indices))]
    groups = [Group(prompt=i, completions=out.completions[r], finished=out.finished[r], rewards=total[r],
                    per_function={name: scores[r] for name, scores in per_function.items()})
              for i, r in zip(indices, rows)]
    counts["groups"] += len(groups)
    counts["zero_std"] += sum(g.zero_std for g in groups)
    counts["tokens"] += sum(len(c) for c in out.completions)
    counts["seconds"] += seconds
    return groups


def make_micro_batches(batch: list[Group], advantages: torch.Tensor, prompts: PromptDataset, model, reference,
                       cfg: GRPOConfig, pad_id: int, temperature: float, amp, device) -> list[dict]:
    """batch_size groups per micro-batch, packed for one forward pass (ids, attention, mask), with their advantages
    [B, 1] and, without gradient, the log-probs of pi_old (--num_iterations > 1; else pi_old = pi, detached, in the
    update) and of the reference (beta > 0)."""
    G, micro_batches = cfg.num_generations, []
    for m in range(cfg.accumulation_steps):
        groups = batch[m * cfg.batch_size:(m + 1) * cfg.batch_size]
        ids, attention, mask, _ = sequences.pack_sequences([prompts.ids[g.prompt] for g in groups for _ in range(G)],
                                                           [c for g in groups for c in g.completions], pad_id, device)
        if cfg.mask_truncated_completions:
            mask = mask_truncated(mask, groups)
        rows = slice(m * cfg.batch_size * G, (m + 1) * cfg.batch_size * G)
        micro = {"ids": ids, "attention": attention, "mask": mask, "advantages": advantages[rows, None]}
        with torch.no_grad(), amp:
            if cfg.num_iterations > 1:
                micro["old"] = sequences.gather_logprobs(model, ids, attention, temperature).float()
            if cfg.beta > 0:
                micro["ref"] = sequences.reference_logprobs(reference, model, ids, attention, temperature).float()
        micro_batches.append(micro)
    return micro_batches


def grpo_update(model, micro_batches: list[dict], optimizer, scaler, cfg: GRPOConfig, dist, amp, temperature: float,
                step: int, max_steps: int) -> tuple[dict, float, torch.Tensor]:
    """--num_iterations optimizer steps on the rollout batch. Returns the token sums of the metrics (on the device:
    no host sync per micro-step), the last learning rate and the last gradient norm."""
    epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    tokens_in_step = sequences.step_token_count([mb["mask"] for mb in micro_batches], dist.device)   # all ranks (dapo)
    scale = dist.world_size if cfg.loss_type == "dapo" else 1.0 / cfg.accumulation_steps
    sums = {name: torch.zeros((), dtype=torch.float64, device=dist.device)
            for name in ("kl", "entropy", "clip_low", "clip_high", "tokens", "loss")}
    for iteration in range(cfg.num_iterations):
        for m, mb in enumerate(micro_batches):
            mask = mb["mask"]
            with optim.sync_gradients(model, last_micro_step=m == len(micro_batches) - 1):
                with amp:
                    logp, entropy = sequences.gather_logprobs(model, mb["ids"], mb["attention"], temperature,
                                                              with_entropy=True)
                logp = logp.float()
                old = mb["old"] if "old" in mb else logp.detach()
                per_token, low, high, kl = grpo_token_loss(logp, old, mb.get("ref"), mb["advantages"], mask,
                                                           cfg.epsilon, epsilon_high, cfg.beta)
                loss = aggregate_loss(per_token, mask, cfg.loss_type, cfg.max_new_tokens, tokens_in_step)
                scaler.scale(loss * scale).backward()
            if kl is not None:
                sums["kl"] += (kl.detach() * mask).sum()
            for name, value in (("loss", per_token), ("entropy", entropy), ("clip_low", low), ("clip_high", high)):
                sums[name] += (value.detach().float() * mask).sum()
            sums["tokens"] += mask.sum()
        lr = optim.cosine_lr(step * cfg.num_iterations + iteration, max_steps * cfg.num_iterations,
                             cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
    return sums, lr, grad_norm


def step_metrics(batch: list[Group], rewards: torch.Tensor, sums: dict, counts: dict,
                 temperature: float) -> dict[str, float]:
    """This rank's metrics of a step (TRL's names; the per-token ones are token means); the caller averages them
    over ranks. The logged loss is the token mean of the per-token loss, whatever --loss_type aggregates."""
    sums = {name: value.item() for name, value in sums.items()}
    tokens = max(sums["tokens"], 1)
    lengths = [len(c) for g in batch for c in g.completions]
    group_stds = [torch.tensor(g.rewards).std().item() for g in batch]
    metrics = {
        "reward": rewards.mean().item(), "reward_std": sum(group_stds) / len(group_stds), "kl": sums["kl"] / tokens,
        "entropy": sums["entropy"] / tokens, "clip_ratio/low_mean": sums["clip_low"] / tokens,
        "clip_ratio/high_mean": sums["clip_high"] / tokens, "completions/mean_length": sum(lengths) / len(lengths),
        "completions/clipped_ratio": 1 - sum(f for g in batch for f in g.finished) / len(lengths),
        "frac_reward_zero_std": counts["zero_std"] / counts["groups"],
        "rollout_tokens_per_sec": counts["tokens"] / max(counts["seconds"], 1e-9),
        "temperature": temperature, "loss": sums["loss"] / tokens}
    for name in batch[0].per_function:
        scores = torch.tensor([s for g in batch for s in g.per_function[name]])
        metrics[f"rewards/{name}/mean"] = scores.mean().item()
        metrics[f"rewards/{name}/std"] = scores.std().item() if len(scores) > 1 else 0.0
    return metrics


# === Training ===

def train(cfg: GRPOConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    reward = parse_reward_flags(cfg.reward_funcs, cfg.reward_weights) if cfg.reward_funcs.strip() else None
    G = cfg.num_generations

    # ---- model, and the reference the KL term pulls toward ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    reference = modeling.frozen_reference(model, cfg, dist) if cfg.beta > 0 else None
    reward_model = load_frozen_reward_model(cfg.reward_model, tokenizer, dist.device) if cfg.reward_model else None
    print0(f"model: {model.num_parameters():,} parameters, from {cfg.init_from}; reference: "
           + ("none (beta 0)" if cfg.beta == 0 else "the base with LoRA adapters off" if reference is None
              else "a frozen copy"))

    # ---- data: prompts with verifiable answers ----
    data, prompts = batches.prepare_prompts(cfg, tokenizer, dist)
    sampler = batches.GlobalBatchSampler(len(prompts), cfg.batch_size, cfg.accumulation_steps, dist.world_size,
                                         dist.rank, cfg.seed)
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
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    seq_len = cfg.max_prompt_length + cfg.max_new_tokens
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, seq_len),
                                 wandb_run_id)
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
                checkpointing.save_training_checkpoint(
                    cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger, "grpo",
                    metadata={"data": data.summary, "init_from": cfg.init_from}, final=last_step)
        if last_step:
            break

        # ---- 1. rollout: G scored completions per prompt ----
        temperature = cfg.temperature if cfg.temperature_start is None else optim.linear_schedule(
            step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_warmup_steps)
        counts = {"groups": 0, "zero_std": 0, "tokens": 0, "seconds": 0.0}
        roll_out = partial(roll_out_groups, train_model, prompts, sampler, tokenizer, reward, reward_model, cfg,
                           temperature, amp, counts)
        batch = roll_out()                                                   # batch_size * accumulation_steps groups
        if cfg.filter_zero_std_groups:                                       # dynamic sampling (extensions below)
            batch = refill_zero_std_groups(batch, roll_out, cfg, dist.device)

        # ---- 2. advantages ----
        rewards = torch.tensor([r for g in batch for r in g.rewards], device=dist.device)           # [target * G]
        advantages = weight_negative_advantages(group_advantages(rewards, G, cfg.scale_rewards),
                                                cfg.negative_advantage_weight)

        # ---- 3. micro-batches with the old and reference log-probs, then num_iterations optimizer steps ----
        micro_batches = make_micro_batches(batch, advantages, prompts, train_model, reference, cfg, tokenizer.pad_id,
                                           temperature, amp, dist.device)
        sums, lr, grad_norm = grpo_update(train_model, micro_batches, optimizer, scaler, cfg, dist, amp, temperature,
                                          step, max_steps)
        step += 1
        train_tokens = int(sum(mb["attention"].sum() for mb in micro_batches)) * cfg.num_iterations
        logger.tick(tokens=train_tokens * dist.world_size, samples=sampler.global_batch * G)

        if step % cfg.log_interval == 0 or step == max_steps:
            metrics = distributed.mean_over_ranks(step_metrics(batch, rewards, sums, counts, temperature), dist.device)
            metrics["rollout_tokens_per_sec"] *= dist.world_size      # the ranks generate side by side
            loss_value = metrics.pop("loss")
            logger.log_train(step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), epoch=sampler.epoch_progress,
                             show=("reward", "reward_std", "kl", "completions/mean_length"), **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


# === Extensions: DAPO's dynamic sampling (--filter_zero_std_groups) and truncated-completion masking ===

def refill_zero_std_groups(groups: list[Group], roll_out, cfg: GRPOConfig, device) -> list[Group]:
    """Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476): a group whose G rewards are all equal has
    advantage 0 on every completion and carries no signal. Such groups are set aside and the sampler's next prompts
    rolled out (roll_out()) while any rank has fewer than batch_size * accumulation_steps others, at most
    --max_resample_rounds more rounds; the batch is then filled up with set-aside groups (advantage 0)."""
    target = cfg.batch_size * cfg.accumulation_steps
    kept, spare = [g for g in groups if not g.zero_std], [g for g in groups if g.zero_std]
    for _ in range(cfg.max_resample_rounds):
        if not distributed.any_rank(len(kept) < target, device):
            break
        more = roll_out()
        kept, spare = kept + [g for g in more if not g.zero_std], spare + [g for g in more if g.zero_std]
    return (kept + spare)[:target]


def mask_truncated(mask: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """--mask_truncated_completions (DAPO's overlong filtering): completions cut at --max_new_tokens leave the loss."""
    return mask * torch.tensor([f for g in groups for f in g.finished], device=mask.device)[:, None]     # [B, T]


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
