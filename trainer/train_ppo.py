"""PPO with a critic: RLHF as in Ziegler et al. 2019 / InstructGPT, a value function, GAE and a KL penalty per token.

The policy samples one completion per prompt. Its score comes from reward functions (--reward_funcs, verifiable
answers) and/or a reward model (--reward_model DIR, trainer/train_reward.py) read at the last token. The KL to the
reference (the starting model) is paid token by token inside the reward, a critic estimates the value of every
prefix, and GAE turns rewards and values into advantages for PPO's clipped objective (Schulman et al. 2017, arXiv
1707.06347; the RLHF recipe of Ziegler et al. 2019, arXiv 1909.08593, and Ouyang et al. 2022, arXiv 2203.02155;
metric names follow TRL's PPOTrainer).

Commands, from the repository root after `pip install -e .` (and an SFT run in out/sft; a reward model in
out/reward for the second and third):

    # the tiny SFT model on the embedded RL prompts, rewards from the answer checker, on CPU
    python trainer/train_ppo.py --init_from out/sft/final

    # one GPU: a reward model as the score, the critic initialised from it, an adaptive KL coefficient
    python trainer/train_ppo.py --init_from out/sft-small/final --device cuda --reward_model out/reward/final \\
        --reward_funcs "" --critic_from out/reward/final --target_kl 6 --batch_size 64 --out_dir out/ppo-small

    # 8 GPUs: every rank rolls out its own prompts; policy and critic gradients are all-reduced through DDP
    torchrun --standalone --nproc_per_node 8 trainer/train_ppo.py --init_from out/sft-base/final \\
        --reward_model out/reward-base/final --out_dir out/ppo-base

    # LoRA (policy and critic get adapters; the reference is the policy with its adapters off), shared trunk
    python trainer/train_ppo.py --init_from out/sft/final --lora_rank 16 --learning_rate 1e-4 --shared_critic

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it. One step
of the loop in train(), phase by phase (the functions named in brackets):

  rollout   [collect_rollouts] batch_size * accumulation_steps prompts per rank (phase rlaif), one completion each
            (KV cache, fused sampler). No gradient: log-probs of the policy (old) and the reference, the critic's
            values V_t, the score s = sum_f w_f f(completion) + --reward_model_weight * RM(prompt + completion)
                        - --missing_eos_penalty (when the completion stopped at --max_new_tokens, not at EOS).
  rewards   [per_token_rewards] per completion token t:
                r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t))    (+ s at the last completion token)
            kl_coef is --kl_coef, or adapted toward --target_kl after every step [adaptive_kl_update].
  GAE       [gae, whiten] delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1},
            R_t = A_t + V_t, over the completion tokens only (V and A are 0 past the last token; Schulman et al.
            2016, arXiv 1506.02438). The advantages are whitened over the whole batch, all ranks.
  update    [ppo_update, ppo_micro_batch] --ppo_epochs passes over the batch, each in --num_mini_batches shuffled
            minibatches, one optimizer step per minibatch (micro-batches of at most --batch_size rows accumulate
            into it):
                policy  -min(ratio A, clip(ratio, 1 - cliprange, 1 + cliprange) A) - entropy_coef * H(pi)
                critic  max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) / 2,  c = --cliprange_value
                        (times --vf_coef with --shared_critic, where both losses share one trunk and optimizer)
            each a token mean over the minibatch. After each epoch the approximate KL between the policy and the
            rollout policy, mean over the tokens of the epoch and over ranks, of (ratio - 1) - log ratio (Schulman's
            k3 estimator of KL(pi_old || pi): >= 0, unbiased, low variance), stops the remaining epochs when above
            --target_approx_kl. For the first --critic_warmup_steps steps only the critic learns.
  critic    [ActorCritic, build_critic] default: a separate model, a copy of the policy's trunk (or of the reward
            model's with --critic_from) with a ValueHead (two-layer MLP, model/heads.py), its own DDP wrapper, AdamW
            optimizer (learning rate --critic_learning_rate) and GradScaler. --shared_critic (its forward passes in
            the Extensions section at the end): the ValueHead reads the policy's own hidden states; the value loss
            then also trains the trunk, and the head's parameters are one more group of the policy's optimizer (one
            optimizer, one learning rate: that of the policy).
  save      [critic_checkpoint, restore_critic] OUT_DIR/step_XXXXXX/ is the policy (Hugging Face layout, or PEFT
            adapters under LoRA) with the resume state; the critic travels inside the resume state: its trainable
            weights as method tensors "critic.<name>" (or "value_head.<name>" when shared), its optimizer as
            "critic_optimizer.<index>.<name>" with its param groups, GradScaler and kl_coef in the method state.
            --resume restores them all.
"""

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from minitrain.dataset.mixer import format_summary
from minitrain.dataset.prompts import PromptDataset
from minitrain.kernels import fused_linear_logprobs
from minitrain.model.config import ConfigError
from minitrain.model.heads import ValueHead, ValueModel, last_token_index, load_reward_model
from minitrain.model.transformer import unwrap
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting, sequences, \
    sharding
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0
from minitrain.trainer.rewards import RewardError, check_reward_flags, load_frozen_reward_model, parse_reward_flags



@dataclass
class PPOConfig(TrainConfig):
    """PPO with a value model (batch_size = prompts per micro-batch, one completion each)."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/sft/final"
    out_dir: str = "out/ppo"
    batch_size: int = 32                # prompts per micro-batch, one completion each
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
    max_prompt_length: int = field(default=192, metadata={"help": "longer prompts are dropped (and counted)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use it too)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens only; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1 = off"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences generated together"})
    # ---- score ----
    reward_funcs: str = field(default="exact_answer,format", metadata={
        "help": "comma-separated built-ins (exact_answer, format, tiered, length_penalty) or module:function; "
                "empty = none (then --reward_model is the score)"})
    reward_weights: str = field(default="1,0.1", metadata={"help": "comma-separated weights; empty = 1 each"})
    reward_model: str = field(default="", metadata={"help": "reward model directory (trainer/train_reward.py, or a "
                                                            "Hugging Face *ForSequenceClassification one) scored at "
                                                            "the last token; empty = none"})
    reward_model_weight: float = field(default=1.0, metadata={"help": "weight of the reward model's score"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of completions "
                                                                      "that end without EOS; 0 = off"})
    # ---- KL penalty ----
    kl_coef: float = field(default=0.05, metadata={"help": "coefficient of the per-token KL penalty (initial value "
                                                           "when --target_kl is set)"})
    target_kl: float | None = field(default=None, metadata={"help": "adapt kl_coef toward this KL per completion "
                                                                    "(summed over its tokens); None = fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "horizon of the adaptive KL controller (samples)"})
    # ---- advantages ----
    gamma: float = field(default=1.0, metadata={"help": "discount factor of GAE"})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE (bias-variance trade-off)"})
    whiten_keep_mean: bool = field(default=False, metadata={"help": "whiten advantages to unit variance but keep "
                                                                    "their mean (default: zero mean)"})
    # ---- PPO ----
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    num_mini_batches: int = field(default=2, metadata={"help": "minibatches (optimizer steps) per pass; must divide "
                                                               "batch_size * accumulation_steps"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip: [1 - cliprange, 1 + cliprange]"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float | None = field(default=None, metadata={
        "help": "weight of the value loss beside the policy's, --shared_critic only (one trunk, one optimizer); "
                "None = 0.1. A separate critic refuses it: its own AdamW is invariant to the loss's scale, so a "
                "weight would only move its clip (TRL steps policy and critic with one optimizer and one clip, "
                "where vf_coef acts in both): tune --critic_learning_rate and --critic_grad_clip instead"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus"})
    target_approx_kl: float = field(default=0.05, metadata={"help": "stop the remaining PPO epochs of a step once the "
                                                                    "approximate KL to the rollout policy exceeds "
                                                                    "this; 0 = never"})
    # ---- critic ----
    shared_critic: bool = field(default=False, metadata={"help": "value head on the policy's own hidden states "
                                                                 "instead of a separate critic model"})
    critic_from: str = field(default="", metadata={"help": "reward model directory whose trunk starts the critic; "
                                                           "empty = a copy of the policy's trunk"})
    critic_learning_rate: float | None = field(default=2.0e-4, metadata={"help": "peak learning rate of the separate "
                                                                                 "critic; None = --learning_rate (not "
                                                                                 "used with --shared_critic)"})
    critic_warmup_steps: int = field(default=2, metadata={"help": "first steps in which only the critic learns"})
    critic_grad_clip: float = field(default=10.0, metadata={"help": "gradient-norm clip of the separate critic, on "
                                                                    "its unweighted value loss; 0 = none"})

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise FlagError("init_from", "is required: RL starts from a trained checkpoint "
                                         "(e.g. --init_from out/sft/final)")
        for name, low in (("max_prompt_length", 1), ("max_new_tokens", 1), ("generation_batch_size", 1),
                          ("top_k", 0), ("kl_horizon", 1), ("ppo_epochs", 1), ("num_mini_batches", 1),
                          ("critic_warmup_steps", 0)):
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise FlagError("temperature", f"must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlagError("top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise FlagError(name, f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("cliprange", "cliprange_value"):
            if not getattr(self, name) > 0:
                raise FlagError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef", "entropy_coef", "target_approx_kl", "missing_eos_penalty",
                     "critic_grad_clip"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise FlagError(name, f"must be a finite number >= 0, got {value}")
        if not math.isfinite(self.reward_model_weight):
            raise FlagError("reward_model_weight", f"must be a finite number, got {self.reward_model_weight}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise FlagError("target_kl", f"must be positive (or None for a fixed kl_coef), got {self.target_kl}")
        if self.critic_learning_rate is not None and not 0 < self.critic_learning_rate < math.inf:
            raise FlagError("critic_learning_rate",
                            f"must be a positive finite number, got {self.critic_learning_rate}")
        rows = self.batch_size * self.accumulation_steps
        if rows % self.num_mini_batches:
            raise FlagError("num_mini_batches", f"({self.num_mini_batches}) must divide batch_size * "
                                                f"accumulation_steps ({rows}), the completions of a rank per step")
        if self.vf_coef is not None and not self.shared_critic:
            raise FlagError("vf_coef", "weighs the value loss with --shared_critic only: a separate critic has its own "
                                       "AdamW, which is invariant to the loss's scale (tune --critic_learning_rate "
                                       "and --critic_grad_clip)")
        if self.shared_critic and self.fsdp:
            raise FlagError("shared_critic", "cannot be combined with --fsdp yet (the value head would need a shard "
                                             "plan of its own); the separate critic is sharded like the policy")
        if self.shared_critic and self.critic_from:
            raise FlagError("critic_from", "cannot be combined with --shared_critic (the shared critic is the "
                                           "policy's own trunk)")
        check_reward_flags(self)


# =============================================================================================================
# The math: pure functions on tensors (tests/test_ppo.py checks each against its formula)
# =============================================================================================================

def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss (Schulman et al. 2017, arXiv 1707.06347), with DAPO's separate
    upper bound (Yu et al. 2025, arXiv 2503.14476):

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)

    Returns (loss [B, T], low_clipped [B, T], high_clipped [B, T]): where the clip bound is active, i.e. the ratio
    fell below 1 - epsilon_low with A < 0, or rose above 1 + epsilon_high with A > 0 (TRL's clip_ratio metrics).
    Where mask is 0 the log-ratio is set to 0 before the exp (ratio 1, no clip, no gradient), as in k3_kl.
    """
    log_ratio = logp - old_logp if mask is None else torch.where(mask.bool(), logp - old_logp, 0.0)   # [B, T]
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, low, high


def per_token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], kl [B, T]) of completions with scores [B] and per-token log-probs [B, T] (mask: completion).

        kl_t = log pi(y_t) - log pi_ref(y_t)        ("k1": its expectation under pi is KL(pi || pi_ref))
        r_t  = -kl_coef * kl_t,  plus the score at the last completion token      (Ziegler et al. 2019, eq. 2)
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438) over the masked tokens [B, T]:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the critic's regression target: lambda-returns)
    computed backwards; past a row's last token V_{t+1} = A_{t+1} = 0 (the episode ends at EOS or at the length
    limit), and A, R are 0 where mask is 0. Returns (advantages, returns), no gradient."""
    values, rewards, mask = values.detach(), rewards.detach(), mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]          # 0 after a row's end: nothing follows the last token
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def masked_moments(x: torch.Tensor, mask: torch.Tensor, across_ranks: bool = True) -> tuple[float, float]:
    """(mean, unbiased variance) of x where mask is 1, over every rank's tokens, in two passes in float64: the mean
    (one all-reduce of sum and count), then the squared deviations from it (another). One pass of E[x^2] - mean^2
    cancels catastrophically for values far from zero."""
    keep = mask.bool()
    x = torch.where(keep, x.double(), 0.0)                                     # [B, T]; padding never enters
    stats = torch.stack([x.sum(), keep.sum().double()])
    if across_ranks and distributed.is_distributed():
        torch.distributed.all_reduce(stats)
    total, n = stats.tolist()
    mean = total / max(n, 1.0)
    squares = torch.where(keep, (x - mean) ** 2, 0.0).sum()
    if across_ranks and distributed.is_distributed():
        torch.distributed.all_reduce(squares)
    return mean, squares.item() / max(n - 1.0, 1.0)                                 # Bessel's correction


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           across_ranks: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and unbiased variance of the masked entries of every rank; with
    shift_mean False the mean is added back (unit variance, mean kept). Entries outside the mask are 0 and do not
    enter the statistics (TRL's masked_whiten)."""
    mean, variance = masked_moments(x, mask, across_ranks)
    whitened = (x - mean) / math.sqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token and where the clipped branch is the larger (val/clipfrac):

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = max((V - R)^2, (V_clip - R)^2) / 2
    The critic cannot gain by moving its value further than c from the rollout's in one batch (Schulman et al. 2017's
    implementation, as in OpenAI baselines ppo2 and TRL)."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi_old || pi) from samples of pi_old: (ratio - 1) - log ratio, ratio = pi / pi_old.
    Non-negative, unbiased ("k3", Schulman 2020, http://joschu.net/blog/kl-approx.html); the early-stopping
    statistic of --target_approx_kl and the policy/approxkl metric. Where mask is 0 the log-ratio is 0 before the
    exp (no inf * 0 = NaN from a huge gap at a padding column)."""
    log_ratio = logp - old_logp if mask is None else torch.where(mask.bool(), logp - old_logp, 0.0)
    return torch.exp(log_ratio) - 1 - log_ratio


def adaptive_kl_update(kl_coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2):

        error   = clip(current_kl / target_kl - 1, -0.2, 0.2)     (proportional, bounded)
        kl_coef = kl_coef * (1 + error * n_steps / horizon)
    current_kl: the batch's KL per completion (summed over its tokens); n_steps: completions in the batch (all
    ranks). Above target the coefficient grows, below it shrinks, by at most 20% per horizon of samples."""
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       across_ranks: bool = False) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens: 1 when the critic predicts the returns exactly, 0 when it does
    no better than a constant, negative when worse; NaN when the returns do not vary."""
    _, var_returns = masked_moments(returns, mask, across_ranks)
    _, var_error = masked_moments(returns - values, mask, across_ranks)
    return float("nan") if var_returns == 0 else 1.0 - var_error / var_returns



# =============================================================================================================
# The policy and its critic
# =============================================================================================================

@dataclass
class ActorCritic:
    """The policy and its critic as the loop trains them (DDP-wrapped on several ranks), with their optimizers."""
    policy: nn.Module
    critic: nn.Module                 # a separate ValueModel, or with --shared_critic a ValueHead on the policy's trunk
    shared: bool                      # --shared_critic: one trunk, the head's parameters in the policy's optimizer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    critic_optimizer: torch.optim.Optimizer | None       # the separate critic's own; None when shared
    critic_scaler: torch.amp.GradScaler | None
    vf_coef: float                    # the value loss's weight: beside the policy's (shared), alone (1) in its own

    def logprobs_and_values(self, ids, attention, temperature: float, with_entropy: bool = True):
        """(log-probs [B, T-1], entropy [B, T-1] or None, values [B, T-1]): the policy's forward pass and the
        critic's, whose V_t is the value of the prefix ending at token t, before y_{t+1} is sampled. The forwards go
        through the DDP wrappers, so gradients are all-reduced."""
        if self.shared:
            return shared_trunk_forward(self.policy, self.critic, ids, attention, temperature, with_entropy)
        out = sequences.gather_logprobs(self.policy, ids, attention, temperature, with_entropy=with_entropy)
        logp, entropy = out if with_entropy else (out, None)
        return logp.float(), None if entropy is None else entropy.float(), self.critic(ids, attention)[:, :-1]

    def values_alone(self, ids, attention, amp) -> torch.Tensor:
        """The critic's values [B, T-1] while only the critic learns (--critic_warmup_steps)."""
        if self.shared:
            return shared_trunk_values(self.policy, self.critic, ids, attention, amp)
        with amp:
            return self.critic(ids, attention)[:, :-1]


def build_critic(cfg: PPOConfig, model: nn.Module, tokenizer, device) -> nn.Module:
    """The separate critic: a ValueModel on a copy of the policy's trunk, or on a reward model's (--critic_from);
    under LoRA its trunk is frozen with adapters of its own (the copy keeps the policy's; --critic_from gets new)."""
    if cfg.critic_from:
        modeling.check_same_tokenizer(cfg.critic_from, tokenizer, "critic_from")
        source, _ = load_reward_model(cfg.critic_from, device, with_tokenizer=False)
        if source.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--critic_from {cfg.critic_from}: vocab_size {source.config.vocab_size} is smaller "
                              f"than the policy's tokenizer ({tokenizer.vocab_size} tokens)")
        if cfg.lora_rank:
            from minitrain.model.lora import LoRAConfig, apply_lora
            apply_lora(source, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                          targets=cfg.lora_targets, use_rslora=cfg.use_rslora))
    else:
        source = copy.deepcopy(unwrap(model))
    return ValueModel.from_trunk(source).train()


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that learn (all of them, or the adapters and the head under LoRA), by name."""
    return {name: p for name, p in unwrap(module).named_parameters() if p.requires_grad}


def critic_checkpoint(ac: ActorCritic, kl_coef: float) -> tuple[dict, dict]:
    """(method state, method tensors) of a checkpoint: the critic's trainable weights as "critic.<name>" (or
    "value_head.<name>" when shared), its optimizer as "critic_optimizer.<index>.<name>", its GradScaler, kl_coef."""
    state = {"kl_coef": kl_coef, "critic": "shared" if ac.shared else "separate"}
    tensors = {("value_head." if ac.shared else "critic.") + name: p for name, p in trainable_state(ac.critic).items()}
    if ac.critic_optimizer is not None:
        opt_tensors, groups, scalars = checkpointing.optimizer_state_tensors(ac.critic_optimizer)
        tensors.update({f"critic_{k}": v for k, v in opt_tensors.items()})
        state.update(critic_optimizer_param_groups=groups, critic_optimizer_scalars=scalars,
                     critic_scaler=ac.critic_scaler.state_dict())
    return state, tensors


def restore_critic(resume: checkpointing.ResumeState, cfg: PPOConfig, critic: nn.Module, critic_optimizer,
                   critic_scaler) -> float:
    """Load what critic_checkpoint saved into the unwrapped critic (or shared value head) and its optimizer;
    return the checkpoint's kl_coef."""
    state, tensors = resume.method_state or {}, resume.method_tensors
    if state.get("critic") != ("shared" if cfg.shared_critic else "separate"):
        raise ConfigError(f"--resume: the checkpoint's critic is {state.get('critic')!r}; this run's "
                          f"--shared_critic {cfg.shared_critic} asks for another")
    kl_coef = state["kl_coef"]
    prefix = "value_head." if cfg.shared_critic else "critic."
    saved, params = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, trainable_state(critic)
    if set(params) != set(saved):
        raise ConfigError(f"--resume: the checkpoint's critic ({len(saved)} tensors) does not fit this run's "
                          f"({len(params)}); were --shared_critic, --critic_from or --lora_rank changed?")
    for name, p in params.items():
        if p.shape != saved[name].shape:
            raise ConfigError(f"--resume: critic tensor {name} has shape {tuple(saved[name].shape)}, this run "
                              f"needs {tuple(p.shape)}")
    sharding.set_values(critic, saved)        # copied now, or under --fsdp when its shards are loaded
    if critic_optimizer is not None:
        opt = {k[len("critic_"):]: v for k, v in tensors.items() if k.startswith("critic_optimizer.")}
        sharding.load_optimizer_state(critic_optimizer, checkpointing.optimizer_state_dict(
            opt, state["critic_optimizer_param_groups"], state["critic_optimizer_scalars"]))
        critic_scaler.load_state_dict(state["critic_scaler"])
    print0(f"critic restored ({len(params):,} tensors), kl_coef {kl_coef:.4g}")
    return kl_coef


# =============================================================================================================
# One PPO step in phases: rollouts (no gradient), the PPO epochs, the logged metrics
# =============================================================================================================

@dataclass
class RolloutBatch:
    """This rank's completions of one step, scored, with what the PPO epochs need from the rollout policy."""
    ids: torch.Tensor                 # [B, T] prompt (left-padded) + completion (right-padded)
    attention: torch.Tensor           # [B, T] 1 = real token
    mask: torch.Tensor                # [B, T-1] 1 where ids[:, t + 1] is a completion token
    old_logp: torch.Tensor            # [B, T-1] log pi_old(y_t): the policy that sampled
    ref_logp: torch.Tensor            # [B, T-1] log pi_ref(y_t)
    old_values: torch.Tensor          # [B, T-1] V_old, 0 outside the mask
    scores: torch.Tensor              # [B] s, the score of each completion
    completions: list[list[int]]
    finished: list[bool]              # the completion stopped at EOS
    rm_scores: torch.Tensor | None    # [B] the reward model's part of the score
    per_function: dict[str, list[float]]
    rollout_seconds: float


def collect_rollouts(ac: ActorCritic, reference, reward, reward_model, prompts: PromptDataset, indices: list[int],
                     tokenizer, cfg: PPOConfig, amp, device) -> RolloutBatch:
    """One completion per prompt (KV cache, fused sampler) and its score; then with no gradient, in micro-batches,
    the log-probs of the policy (old) and the reference, the critic's values and the reward model's scores."""
    started, completions, finished = time.time(), [], []
    for start in range(0, len(indices), cfg.generation_batch_size):
        chunk = indices[start:start + cfg.generation_batch_size]
        with amp:
            out = sequences.rollout(ac.policy, [prompts.ids[i] for i in chunk], cfg.max_new_tokens, cfg.temperature,
                                    tokenizer.eos_id, tokenizer.pad_id, top_k=cfg.top_k, top_p=cfg.top_p)
        completions += out.completions
        finished += out.finished.tolist()
    rollout_seconds = time.time() - started
    ids, attention, mask, _ = sequences.pack_sequences([prompts.ids[i] for i in indices], completions,
                                                       tokenizer.pad_id, device)
    scores, per_function = torch.zeros(len(indices), device=device), {}
    if reward is not None:
        total, per_function = reward([prompts.text(i) for i in indices], [tokenizer.decode(c) for c in completions],
                                     prompts.columns(indices))
        scores += torch.tensor(total, device=device)

    old_logp, ref_logp, old_values, rm_scores = [], [], [], []
    with torch.no_grad(), amp:
        for start in range(0, len(indices), cfg.batch_size):
            rows = slice(start, start + cfg.batch_size)
            logp, _, values = ac.logprobs_and_values(ids[rows], attention[rows], cfg.temperature, with_entropy=False)
            old_logp.append(logp)
            old_values.append(values.float())
            ref_logp.append(sequences.reference_logprobs(reference, ac.policy, ids[rows], attention[rows],
                                                         cfg.temperature).float())
            if reward_model is not None:
                rm_scores.append(reward_model(ids[rows], attention[rows]).float())
    rm_scores = torch.cat(rm_scores) if reward_model is not None else None
    if rm_scores is not None:
        scores += cfg.reward_model_weight * rm_scores
    scores -= cfg.missing_eos_penalty * (~torch.tensor(finished, device=device)).float()
    return RolloutBatch(ids, attention, mask, torch.cat(old_logp), torch.cat(ref_logp), torch.cat(old_values) * mask,
                        scores, completions, finished, rm_scores, per_function, rollout_seconds)


STATS = ("pg", "vf", "entropy", "approxkl", "clipfrac", "vclipfrac", "tokens", "vtokens")   # summed over tokens


def ppo_micro_batch(ac: ActorCritic, batch: RolloutBatch, rows: list[int], advantages: torch.Tensor,
                    returns: torch.Tensor, mb_tokens: torch.Tensor, cfg: PPOConfig, warmup: bool, amp,
                    sums: dict[str, torch.Tensor], epoch_kl: torch.Tensor) -> None:
    """Forward and backward of some rows of a minibatch: each loss is summed over their completion tokens and divided
    by the minibatch's (gradients accumulate until its optimizer step). Statistics add up on the device."""
    ids, attention, m = batch.ids[rows], batch.attention[rows], batch.mask[rows]
    policy_part = torch.zeros((), device=m.device)
    if warmup:           # only the critic learns: the policy runs without gradient, if at all
        values = ac.values_alone(ids, attention, amp)
    else:
        with amp:
            logp, entropy, values = ac.logprobs_and_values(ids, attention, cfg.temperature)
        pg, low, high = clipped_surrogate(logp, batch.old_logp[rows], advantages[rows], cfg.cliprange, cfg.cliprange, m)
        policy_part = ((pg - cfg.entropy_coef * entropy) * m).sum() / mb_tokens
        with torch.no_grad():
            kl_tokens = approx_kl(logp, batch.old_logp[rows], m) * m
            epoch_kl += torch.stack([kl_tokens.sum(), m.sum()]).double()
            for name, per_token in (("pg", pg * m), ("entropy", entropy * m), ("approxkl", kl_tokens),
                                    ("clipfrac", (low | high).float() * m), ("tokens", m)):
                sums[name] += per_token.sum().double()
    vf, vclipped = value_loss(values.float(), batch.old_values[rows], returns[rows], cfg.cliprange_value)
    value_part = ac.vf_coef * (vf * m).sum() / mb_tokens
    if ac.shared:            # one trunk: one loss, one backward
        ac.scaler.scale(policy_part + value_part).backward()
    else:
        if not warmup:
            ac.scaler.scale(policy_part).backward()
        ac.critic_scaler.scale(value_part).backward()
    for name, per_token in (("vf", vf.detach() * m), ("vclipfrac", vclipped.float() * m), ("vtokens", m)):
        sums[name] += per_token.sum().double()


def ppo_update(ac: ActorCritic, batch: RolloutBatch, advantages: torch.Tensor, returns: torch.Tensor,
               cfg: PPOConfig, lr: float, lr_critic: float, warmup: bool, amp):
    """--ppo_epochs passes over the batch, each in --num_mini_batches shuffled minibatches of micro-batches, one
    optimizer step per minibatch; the remaining epochs are skipped once the epoch's approximate KL to the rollout
    policy (all ranks) exceeds --target_approx_kl. Returns (statistics summed on the device, epochs run, the last
    gradient norms of the policy and of the critic)."""
    rows_per_rank = cfg.batch_size * cfg.accumulation_steps
    mini_rows = rows_per_rank // cfg.num_mini_batches
    sums = {name: torch.zeros((), device=batch.mask.device, dtype=torch.float64) for name in STATS}
    epochs_run, grad_norm, critic_grad_norm = 0, torch.zeros(()), torch.zeros(())
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(rows_per_rank).tolist()
        epoch_kl = torch.zeros(2, device=batch.mask.device, dtype=torch.float64)      # sum of approx KL, tokens
        for mb in range(cfg.num_mini_batches):
            mb_rows = order[mb * mini_rows:(mb + 1) * mini_rows]
            mb_tokens = batch.mask[mb_rows].sum().clamp(min=1)
            chunks = [mb_rows[i:i + cfg.batch_size] for i in range(0, mini_rows, cfg.batch_size)]
            for c, rows in enumerate(chunks):
                last_chunk = c == len(chunks) - 1
                with optim.sync_gradients(ac.policy, last_chunk), optim.sync_gradients(ac.critic, last_chunk):
                    ppo_micro_batch(ac, batch, rows, advantages, returns, mb_tokens, cfg, warmup, amp, sums, epoch_kl)
            if ac.shared or not warmup:
                grad_norm = optim.optimizer_step(ac.optimizer, ac.scaler, lr, cfg.grad_clip)
            if not ac.shared:
                critic_grad_norm = optim.optimizer_step(ac.critic_optimizer, ac.critic_scaler, lr_critic,
                                                        cfg.critic_grad_clip)
        epochs_run += 1
        if cfg.target_approx_kl and not warmup:
            if distributed.is_distributed():
                torch.distributed.all_reduce(epoch_kl)
            if (epoch_kl[0] / epoch_kl[1].clamp(min=1)).item() > cfg.target_approx_kl:
                break
    return sums, epochs_run, grad_norm, critic_grad_norm


def step_metrics(batch: RolloutBatch, sums: dict[str, torch.Tensor], kl: torch.Tensor, returns: torch.Tensor,
                 kl_coef: float, epochs_run: int, critic_grad_norm: torch.Tensor, warmup: bool) -> dict[str, float]:
    """This rank's metrics of a step, named as in TRL's PPOTrainer (one host sync for the summed statistics)."""
    sums = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
    tokens, vtokens = max(sums["tokens"], 1.0), max(sums["vtokens"], 1.0)
    lengths = [len(c) for c in batch.completions]
    metrics = {
        "loss/value": sums["vf"] / vtokens, "val/clipfrac": sums["vclipfrac"] / vtokens,
        "val/explained_variance": explained_variance(batch.old_values, returns, batch.mask),
        "val/mean": sequences.masked_mean(batch.old_values, batch.mask).item(),
        "returns/mean": sequences.masked_mean(returns, batch.mask).item(),
        "objective/rlhf_reward": (batch.scores - kl_coef * kl.sum(-1)).mean().item(),
        "objective/non_score_reward": (-kl_coef * kl.sum(-1)).mean().item(),
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/clipped_ratio": 1 - sum(batch.finished) / len(batch.finished),
        "rollout_tokens_per_sec": sum(lengths) / max(batch.rollout_seconds, 1e-9),
        "ppo/epochs": float(epochs_run), "critic/grad_norm": critic_grad_norm.item()}
    if not warmup:
        metrics.update({"loss/policy": sums["pg"] / tokens, "policy/entropy": sums["entropy"] / tokens,
                        "policy/approxkl": sums["approxkl"] / tokens, "policy/clipfrac": sums["clipfrac"] / tokens})
    if batch.rm_scores is not None:
        metrics["rewards/reward_model/mean"] = batch.rm_scores.mean().item()
    for name, values in batch.per_function.items():
        metrics[f"rewards/{name}/mean"] = sum(values) / len(values)
    return metrics


# =============================================================================================================
# Training
# =============================================================================================================

def train(cfg: PPOConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    reward = parse_reward_flags(cfg.reward_funcs, cfg.reward_weights) if cfg.reward_funcs.strip() else None

    # ---- policy, reference, reward model, critic ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    reference = modeling.frozen_reference(model, cfg, dist)
    reward_model = None
    if cfg.reward_model:
        reward_model = load_frozen_reward_model(cfg.reward_model, tokenizer, dist.device)
    value_head = (ValueHead(model.config.hidden_size, model.config.initializer_range).to(dist.device)
                  if cfg.shared_critic else None)
    critic = None if cfg.shared_critic else build_critic(cfg, model, tokenizer, dist.device)
    print0(f"policy: {model.num_parameters():,} parameters, from {cfg.init_from}; reference: "
           + ("the policy with LoRA adapters off" if reference is None else "a frozen copy")
           + "; critic: " + ("a value head on the policy's trunk" if cfg.shared_critic else
                             f"a separate model from {cfg.critic_from or 'the policy'} "
                             f"({critic.num_parameters():,} parameters)")
           + (f"; reward model: {cfg.reward_model}" if reward_model is not None else ""))

    # ---- data: prompts ----
    data = batches.prepare_phase_data("rlaif", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    prompts = PromptDataset(data.train_file, tokenizer, cfg.max_prompt_length)
    print0(f"prompts: {prompts.describe()}")
    sampler = batches.GlobalBatchSampler(len(prompts), cfg.batch_size, cfg.accumulation_steps, dist.world_size,
                                         dist.rank, cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch

    # ---- optimisation: the policy's optimizer (+ the shared value head), the critic's own ----
    dtype = optim.resolve_dtype(cfg.dtype, dist.device)
    amp = optim.autocast_context(dist.device, dtype)
    optimizer = optim.build_optimizer(model, cfg, dist.device)
    if value_head is not None:
        for group in optim.param_groups(value_head, cfg.weight_decay):
            optimizer.add_param_group(group)
    scaler = optim.make_grad_scaler(dist.device, dtype)
    critic_optimizer = critic_scaler = None
    if critic is not None:
        critic_optimizer = optim.build_optimizer(critic, cfg, dist.device)
        critic_scaler = optim.make_grad_scaler(dist.device, dtype)
    critic_lr = cfg.critic_learning_rate or cfg.learning_rate
    kl_coef = cfg.kl_coef
    distributed.seed_everything(cfg.seed + dist.rank)          # each rank samples its own completions
    start_step, wandb_run_id = 0, None
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
        kl_coef = restore_critic(resume, cfg, value_head or critic, critic_optimizer, critic_scaler)
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    if critic is not None:
        train_critic = modeling.wrap_model(critic, cfg, dist, critic_optimizer)
    else:        # the shared value head gets a DDP wrapper of its own (its gradients do not pass the policy's)
        train_critic = (nn.parallel.DistributedDataParallel(value_head, device_ids=[dist.device.index]
                                                            if dist.device.type == "cuda" else None)
                        if dist.world_size > 1 else value_head)
    # the value loss's weight: beside the policy's in the shared trunk; alone (1) in a separate critic's optimizer
    vf_coef = (0.1 if cfg.vf_coef is None else cfg.vf_coef) if cfg.shared_critic else 1.0
    ac = ActorCritic(train_model, train_critic, cfg.shared_critic, optimizer, scaler, critic_optimizer, critic_scaler,
                     vf_coef)
    seq_len = cfg.max_prompt_length + cfg.max_new_tokens
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} prompts (one completion each), {cfg.ppo_epochs} "
           f"epoch(s) x {cfg.num_mini_batches} minibatch(es) of "
           f"{cfg.batch_size * cfg.accumulation_steps // cfg.num_mini_batches} per rank, kl_coef {kl_coef:g}"
           + (f" adapting toward {cfg.target_kl:g}" if cfg.target_kl else " fixed")
           + f", {dist.world_size} rank(s), {str(dtype).replace('torch.', '')} on {dist.device}")

    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                logger.log_eval(step, evaluation.evaluate_tasks_hook(ac.policy, tokenizer, cfg, dist, amp))
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                ranks = min(distributed.check_replicas(ac.policy, dist), distributed.check_replicas(ac.critic, dist))
                if ranks > 1:
                    print0(f"replicas: policy and critic parameters identical on {ranks} ranks")
                method_state, method_tensors = critic_checkpoint(ac, kl_coef)
                checkpointing.save_training_checkpoint(
                    cfg, dist, step, ac.policy, tokenizer, optimizer, scaler, sampler, logger, "ppo",
                    metadata={"data": data.summary, "init_from": cfg.init_from, "reward_model": cfg.reward_model},
                    final=last_step, method_state=method_state, method_tensors=method_tensors)
        if last_step:
            break
        warmup = step < cfg.critic_warmup_steps

        # ---- 1. rollout: one completion per prompt, scored; old and reference log-probs, values (no gradient) ----
        indices = [i for micro in sampler.next_step() for i in micro]
        batch = collect_rollouts(ac, reference, reward, reward_model, prompts, indices, tokenizer, cfg, amp,
                                 dist.device)

        # ---- 2. per-token rewards (KL penalty + score), GAE, whitened advantages ----
        rewards, kl = per_token_rewards(batch.scores, batch.old_logp, batch.ref_logp, batch.mask, kl_coef)
        advantages, returns = gae(rewards, batch.old_values, batch.mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, batch.mask, shift_mean=not cfg.whiten_keep_mean)

        # ---- 3. PPO epochs over shuffled minibatches: clipped policy loss, clipped value loss ----
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        lr_critic = optim.cosine_lr(step, max_steps, cfg.warmup_steps, critic_lr, cfg.min_lr_ratio)
        sums, epochs_run, grad_norm, critic_grad_norm = ppo_update(ac, batch, advantages, returns, cfg, lr,
                                                                   lr_critic, warmup, amp)

        # ---- 4. the KL coefficient for the next step ----
        objective = {"objective/kl": kl.sum(-1).mean().item(), "objective/scores": batch.scores.mean().item()}
        objective = distributed.mean_over_ranks(objective, dist.device)
        kl_coef_used = kl_coef
        if cfg.target_kl:
            kl_coef = adaptive_kl_update(kl_coef, objective["objective/kl"], cfg.target_kl, sampler.global_batch,
                                         cfg.kl_horizon)
        step += 1
        logger.tick(tokens=int(batch.attention.sum()) * epochs_run * dist.world_size, samples=sampler.global_batch)

        if step % cfg.log_interval == 0 or step == max_steps:
            metrics = step_metrics(batch, sums, kl, returns, kl_coef_used, epochs_run, critic_grad_norm, warmup)
            metrics = distributed.mean_over_ranks(metrics, dist.device)
            metrics["rollout_tokens_per_sec"] *= dist.world_size      # the ranks generate side by side
            metrics.update(objective)
            metrics["objective/kl_coef"] = kl_coef_used
            loss_value = metrics.get("loss/policy", 0.0) + vf_coef * metrics["loss/value"]
            logger.log_train(step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), epoch=sampler.epoch_progress,
                             show=("objective/scores", "objective/kl", "val/explained_variance",
                                   "completions/mean_length"), **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


# =============================================================================================================
# === Extensions: the shared critic (--shared_critic), a value head on the policy's own hidden states ===
# =============================================================================================================

def shared_trunk_forward(train_model, value_head, ids, attention, temperature: float, with_entropy: bool = True):
    """(log-probs [B, T-1], entropy [B, T-1] or None, values [B, T-1]) from one forward pass of the policy's trunk:
    the fused kernel reads the log-probs from its hidden states, the value head reads the values from the same."""
    hidden = train_model(ids, attention_mask=attention, compute_logits=False).hidden_states[:, :-1]   # [B, T-1, H]
    B, T1, H = hidden.shape
    out = fused_linear_logprobs(hidden.reshape(B * T1, H), unwrap(train_model).lm_head.weight,
                                ids[:, 1:].reshape(B * T1), temperature=temperature, return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    return (logp.view(B, T1).float(), None if entropy is None else entropy.view(B, T1).float(),
            value_head(hidden))


def shared_trunk_values(train_model, value_head, ids, attention, amp) -> torch.Tensor:
    """Values [B, T-1] while only the critic learns: the trunk runs without gradient, the head learns alone."""
    with torch.no_grad(), amp:
        hidden = train_model(ids, attention_mask=attention, compute_logits=False).hidden_states[:, :-1]
    with amp:
        return value_head(hidden.detach())


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PPOConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS + (RewardError,) as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
