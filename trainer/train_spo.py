"""SPO: Single-stream Policy Optimization, one completion per prompt and a persistent per-prompt value tracker.

GRPO needs G completions of a prompt to form a baseline, and a group whose rewards are all equal teaches nothing.
SPO (Xu & Ding 2025, arXiv 2509.13232) samples ONE completion per prompt and takes its baseline from a tracker that
remembers, for every prompt, a Beta(alpha, beta) belief over the policy's chance of success on it.

Commands, from the repository root after `pip install -e .` (and an SFT run in out/sft):

    python trainer/train_spo.py --init_from out/sft/final                          # tiny model, CPU
    python trainer/train_spo.py --init_from out/sft-small/final --device cuda --batch_size 64 --out_dir out/spo
    torchrun --standalone --nproc_per_node 8 trainer/train_spo.py --init_from out/sft-base/final --out_dir out/spo

  arguments  SPOConfig below is what a bare run does; `--config recipe.yaml` and flags override it
  data       phase rlaif prompts ({"prompt" or "messages", "answer", ...}), longer than --max_prompt_length dropped
  model      --init_from; the tracker (BetaTracker) first sees n0 = --init_samples responses per prompt, s successes:
             alpha = N (s + 1/2) / (n0 + 1), beta = N (n0 - s + 1/2) / (n0 + 1), N = 1 / (1 - rho_min) (authors' code)
  loop       prompts    each micro-batch keeps batch_size of --candidate_factor times as many candidates, drawn with
                        weight sqrt(p_hat (1 - p_hat)) + epsilon; one completion each, scored by the reward functions
                        and/or --reward_model, made binary by --success_threshold (--binary_reward false: clamped): r
             tracker    p_hat = alpha / (alpha + beta) before this response; rho = clip(2^(-D / D_half), rho_min,
                        rho_max), D = mean |log pi_now - log pi_then| over the prompt's last stored response;
                        alpha <- rho alpha + r, beta <- rho beta + (1 - r)
             advantage  r - p_hat, normalised over the whole batch (all ranks): (A - mean) / (std + 1e-6)
             update     PPO's clipped objective on every completion token, the per-token losses summed and divided by
                        the completion tokens of the whole step, all ranks (--token_normalization global)
  save       OUT_DIR/step_XXXXXX/, OUT_DIR/final; the resume state holds the tracker (restored by --resume)
"""

import time
from dataclasses import dataclass, field

import torch

from minitrain.dataset.prompts import PromptDataset
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting, sequences
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0
from minitrain.trainer.rewards import (RewardError, check_reward_flags, load_frozen_reward_model, parse_reward_flags,
                                       score_completions)
from minitrain.trainer.train_ppo import clipped_surrogate

TOKEN_NORMALIZATIONS = ("global", "micro_batch")


@dataclass
class SPOConfig(TrainConfig):
    """Single-stream Policy Optimization (batch_size = prompts, one completion each, per micro-batch)."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/sft/final"
    out_dir: str = "out/spo"
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
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (unless a schedule is given)"})
    temperature_start: float | None = field(default=None, metadata={"help": "temperature at step 0"})
    temperature_end: float | None = field(default=None, metadata={"help": "temperature after the warmup"})
    temperature_warmup_steps: int = field(default=0, metadata={"help": "steps of the temperature schedule"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens only; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1 = off"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences generated together"})
    # ---- rewards ----
    reward_funcs: str = field(default="exact_answer", metadata={
        "help": "comma-separated built-ins (exact_answer, format, tiered, length_penalty) or module:function"})
    reward_weights: str = field(default="", metadata={"help": "comma-separated weights; empty = 1 each"})
    reward_model: str = field(default="", metadata={"help": "reward model directory (trainer/train_reward.py) whose "
                                                            "score is added to the reward functions'"})
    reward_model_weight: float = field(default=1.0, metadata={"help": "weight of the reward model's score"})
    success_threshold: float = field(default=0.5, metadata={"help": "r = 1 when the reward is at least this"})
    binary_reward: bool = field(default=True, metadata={"help": "r = 1[reward >= success_threshold]; false: r = "
                                                                "the reward clamped to [0, 1]"})
    # ---- tracker ----
    init_samples: int = field(default=2, metadata={"help": "n0: responses per prompt that initialise the tracker"})
    rho_min: float = field(default=0.875, metadata={"help": "fastest forgetting (also sets N = 1 / (1 - rho_min))"})
    rho_max: float = field(default=0.96, metadata={"help": "slowest forgetting"})
    d_half: float = field(default=0.06, metadata={"help": "policy change D at which rho = 1/2 before clipping"})
    constant_rho: float | None = field(default=None, metadata={"help": "use this fixed rho instead of 2^(-D/D_half)"})
    candidate_factor: int = field(default=4, metadata={"help": "candidates per selected prompt (prioritised "
                                                               "sampling); 1 = no prioritisation"})
    sampling_epsilon: float = field(default=0.05, metadata={"help": "epsilon of the weight sqrt(p(1-p)) + epsilon"})
    # ---- objective ----
    epsilon: float = field(default=0.2, metadata={"help": "lower clip: ratio >= 1 - epsilon"})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "upper clip; None = epsilon"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps on each rollout batch"})
    token_normalization: str = field(default="global", metadata={
        "help": "global: the summed per-token loss / the completion tokens of the whole step, all micro-batches and "
                "ranks (every token weighs the same; DAPO's token-level loss, GRPO's --loss_type dapo); "
                "micro_batch: each micro-batch's token mean, averaged over micro-batches and ranks",
        "choices": list(TOKEN_NORMALIZATIONS)})

    def validate(self) -> None:
        super().validate()
        sequences.check_rollout_flags(self)
        for name, low in (("init_samples", 0), ("candidate_factor", 1), ("num_iterations", 1)):
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        if not 0 < self.rho_min <= self.rho_max < 1:
            raise FlagError("rho_min", f"and --rho_max need 0 < rho_min <= rho_max < 1, got {self.rho_min}, "
                                       f"{self.rho_max}")
        if self.constant_rho is not None and not 0 < self.constant_rho < 1:
            raise FlagError("constant_rho", f"must be in (0, 1), got {self.constant_rho}")
        if not self.d_half > 0:
            raise FlagError("d_half", f"must be positive, got {self.d_half}")
        check_reward_flags(self)


# === The tracker: a Beta belief per prompt, and the loss (tests/test_spo.py checks each rule) ===

def forgetting_factor(D: float, d_half: float, rho_min: float, rho_max: float) -> float:
    """rho = clip(2^(-D / D_half), rho_min, rho_max): the more the policy moved, the more the past is forgotten."""
    return min(rho_max, max(rho_min, 2.0 ** (-D / d_half)))


def policy_change(logp_now: torch.Tensor, logp_then: torch.Tensor) -> float:
    """D = mean over the response's tokens of |log pi_now(token) - log pi_then(token)|."""
    return (logp_now - logp_then).abs().mean().item() if logp_now.numel() else 0.0


def sampling_weights(p_hat: torch.Tensor, epsilon: float) -> torch.Tensor:
    """sqrt(p (1 - p)) + epsilon: the Bernoulli std of each prompt's success, floored."""
    return torch.sqrt(p_hat * (1 - p_hat)) + epsilon


def normalise_advantages(raw: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(A - mean) / (std + eps) over the whole batch of every rank (std without Bessel's correction; two passes in
    float64, distributed.mean_var_over_ranks: the advantages must not move when they all shift)."""
    mean, variance = distributed.mean_var_over_ranks(raw)
    return ((raw.double() - mean) / (variance.sqrt() + eps)).to(raw.dtype)


def policy_loss(per_token: torch.Tensor, mask: torch.Tensor, normalization: str, tokens_in_step: float,
                accumulation_steps: int, world_size: int) -> torch.Tensor:
    """What one micro-batch back-propagates, from per-token losses [B, T] and the completion mask [B, T], such that
    the gradient summed over the A micro-steps and averaged over the W ranks (DDP) is that of

        global       sum over the step's tokens / tokens_in_step      (tokens_in_step: all micro-batches, all ranks)
        micro_batch  mean over micro-batches and ranks of each micro-batch's token mean
    """
    total = (per_token * mask).sum()
    if normalization == "global":
        return total * world_size / max(tokens_in_step, 1.0)
    if normalization == "micro_batch":
        return total / mask.sum().clamp(min=1) / accumulation_steps
    raise ValueError(f"unknown token normalization {normalization!r}")


class BetaTracker:
    """Beta(alpha, beta) over each prompt's success, plus each prompt's last response and its log-probs."""

    def __init__(self, num_prompts: int, rho_min: float, rho_max: float, d_half: float,
                 constant_rho: float | None = None):
        self.alpha = torch.ones(num_prompts, dtype=torch.float64)      # Beta(1, 1) until initialised
        self.beta = torch.ones(num_prompts, dtype=torch.float64)
        self.rho_min, self.rho_max, self.d_half, self.constant_rho = rho_min, rho_max, d_half, constant_rho
        self.last: dict[int, tuple[list[int], list[float]]] = {}        # prompt -> (response tokens, their logps)

    @property
    def effective_count(self) -> float:
        """N = 1 / (1 - rho_min): the weight of the past at the fastest forgetting, sum_k rho_min^k."""
        return 1.0 / (1.0 - self.rho_min)

    def p_hat(self, indices) -> torch.Tensor:
        a, b = self.alpha[indices], self.beta[indices]
        return a / (a + b)

    def initialise(self, index: int, successes: list[float]) -> None:
        """alpha = N (s + 1/2) / (n + 1), beta = N (n - s + 1/2) / (n + 1): s successes of the n initial samples,
        smoothed as in the authors' released code, so that 0/n or n/n does not start p_hat at exactly 0 or 1 (which
        would give the prompt the floor weight epsilon and starve it under prioritised sampling)."""
        n, s = len(successes), sum(successes)
        self.alpha[index] = self.effective_count * (s + 0.5) / (n + 1)
        self.beta[index] = self.effective_count * (n - s + 0.5) / (n + 1)

    def rho(self, D: float | None) -> float:
        if self.constant_rho is not None:
            return self.constant_rho
        if D is None:                  # nothing stored yet: the policy change is unknown, forget the least
            return self.rho_max
        return forgetting_factor(D, self.d_half, self.rho_min, self.rho_max)

    def update(self, index: int, r: float, rho: float) -> None:
        """alpha <- rho alpha + r, beta <- rho beta + (1 - r)."""
        self.alpha[index] = rho * self.alpha[index] + r
        self.beta[index] = rho * self.beta[index] + (1 - r)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        prompts = sorted(self.last)
        tokens = [t for p in prompts for t in self.last[p][0]]
        logps = [x for p in prompts for x in self.last[p][1]]
        return {"spo.alpha": self.alpha.clone(), "spo.beta": self.beta.clone(),
                "spo.last_prompts": torch.tensor(prompts, dtype=torch.long),
                "spo.last_lengths": torch.tensor([len(self.last[p][0]) for p in prompts], dtype=torch.long),
                "spo.last_tokens": torch.tensor(tokens, dtype=torch.long),
                "spo.last_logps": torch.tensor(logps, dtype=torch.float32)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors["spo.alpha"].numel() != self.alpha.numel():
            raise ValueError(f"the checkpoint's tracker covers {tensors['spo.alpha'].numel()} prompts, this run's "
                             f"{self.alpha.numel()}")
        self.alpha, self.beta = tensors["spo.alpha"].clone(), tensors["spo.beta"].clone()
        self.last, offset = {}, 0
        for p, n in zip(tensors["spo.last_prompts"].tolist(), tensors["spo.last_lengths"].tolist()):
            self.last[p] = (tensors["spo.last_tokens"][offset:offset + n].tolist(),
                            tensors["spo.last_logps"][offset:offset + n].tolist())
            offset += n


# === The phases of a step: prompts and completions, the tracker's update, the PPO-clip update, metrics ===

def success(reward: float, cfg: SPOConfig) -> float:
    """The bounded reward r the tracker counts."""
    return float(reward >= cfg.success_threshold) if cfg.binary_reward else min(1.0, max(0.0, reward))


def sample_and_score(model, prompts: PromptDataset, indices: list[int], tokenizer, reward, reward_model,
                     cfg: SPOConfig, temperature: float, amp) -> tuple[list, list[float], list[float], float]:
    """One completion of each prompt: (completions, rewards, r, seconds)."""
    started = time.time()
    with amp:
        out = sequences.sample_completions(model, [prompts.ids[i] for i in indices], cfg.max_new_tokens, temperature,
                                           tokenizer.eos_id, tokenizer.pad_id, cfg.generation_batch_size,
                                           top_k=cfg.top_k, top_p=cfg.top_p)
    seconds = time.time() - started
    total, _ = score_completions(reward, reward_model, prompts, indices, out.completions, tokenizer,
                                 cfg.reward_model_weight, cfg.generation_batch_size, amp)
    return out.completions, total, [success(x, cfg) for x in total], seconds


def initialise_tracker(tracker: BetaTracker, model, prompts: PromptDataset, tokenizer, reward, reward_model,
                       cfg: SPOConfig, dist, amp) -> None:
    """--init_samples responses per prompt (the prompts split over ranks), then every rank gets every estimate."""
    if cfg.init_samples == 0:
        return
    mine = list(range(dist.rank, len(prompts), dist.world_size))
    flat = [i for i in mine for _ in range(cfg.init_samples)]
    completions, _, r, _ = sample_and_score(model, prompts, flat, tokenizer, reward, reward_model, cfg,
                                            cfg.temperature, amp)
    n = cfg.init_samples
    last = [completions[k * n + n - 1] for k in range(len(mine))]          # each prompt's last response is stored
    with amp:
        logps = sequences.completion_logprobs(model, [prompts.ids[i] for i in mine], last, tokenizer.pad_id,
                                              cfg.temperature)
    records = [{"i": i, "s": r[k * n:(k + 1) * n], "t": last[k], "l": logps[k]} for k, i in enumerate(mine)]
    for rec in (rec for part in distributed.all_gather_json(records, dist.device) for rec in part):   # rank order
        tracker.initialise(rec["i"], rec["s"])
        tracker.last[rec["i"]] = (rec["t"], rec["l"])


def choose_prompts(tracker: BetaTracker, candidates: list[int], count: int, epsilon: float) -> list[int]:
    """`count` of the candidates, drawn without replacement with weight sqrt(p_hat (1 - p_hat)) + epsilon."""
    if len(candidates) == count:
        return candidates
    weights = sampling_weights(tracker.p_hat(candidates), epsilon)
    picks = torch.multinomial(weights.float(), count, replacement=False).tolist()
    return [candidates[k] for k in picks]


def update_tracker(tracker: BetaTracker, model, prompts: PromptDataset, indices: list[int],
                   completions: list[list[int]], r: list[float], old_logps: list[list[float]], pad_id: int,
                   temperature: float, amp, dist) -> tuple[torch.Tensor, dict[int, float], list[float]]:
    """The policy change D since each prompt's stored response, then rho and the update of every rank's prompts, in
    rank order (every rank applies them all). Returns p_hat of this rank's prompts before the update, D and rho."""
    stored = [i for i in indices if i in tracker.last]
    with amp:
        now = sequences.completion_logprobs(model, [prompts.ids[i] for i in stored],
                                            [tracker.last[i][0] for i in stored], pad_id, temperature)
    D = {i: policy_change(torch.tensor(lp), torch.tensor(tracker.last[i][1])) for i, lp in zip(stored, now)}
    p_before = tracker.p_hat(indices).float()                                 # [B]
    records = [{"i": i, "r": r[k], "D": D.get(i), "t": completions[k], "l": old_logps[k]}
               for k, i in enumerate(indices)]
    rhos = []
    for rec in (rec for part in distributed.all_gather_json(records, dist.device) for rec in part):
        rho = tracker.rho(rec["D"])
        tracker.update(rec["i"], rec["r"], rho)
        tracker.last[rec["i"]] = (rec["t"], rec["l"])
        rhos.append(rho)
    return p_before, D, rhos


def spo_update(model, prompts: PromptDataset, indices: list[int], completions: list[list[int]],
               old_logps: list[list[float]], advantages: torch.Tensor, optimizer, scaler, cfg: SPOConfig, pad_id: int,
               dist, amp, temperature: float, step: int, max_steps: int) -> tuple[dict, float, torch.Tensor, int]:
    """--num_iterations optimizer steps of PPO-clip, batch_size completions per micro-batch. Returns the token sums
    of the metrics (on the device: no host sync per micro-step), the last lr and grad norm, this rank's tokens."""
    epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    micro = [slice(m * cfg.batch_size, (m + 1) * cfg.batch_size) for m in range(cfg.accumulation_steps)]
    packed = [sequences.pack_sequences([prompts.ids[i] for i in indices[s]], completions[s], pad_id, dist.device)
              for s in micro]
    old = [torch.zeros_like(mask) for _, _, mask, _ in packed]   # log pi_old laid out like gather_logprobs' [B, T]
    for o, (_, _, mask, _), s in zip(old, packed, micro):
        for b, lp in enumerate(old_logps[s]):
            o[b][mask[b].bool()] = torch.tensor(lp, device=dist.device)
    tokens_in_step = sequences.step_token_count([p[2] for p in packed], dist.device)          # all ranks
    sums = {name: torch.zeros((), dtype=torch.float64, device=dist.device)
            for name in ("loss", "tokens", "clip_low", "clip_high", "entropy")}
    for iteration in range(cfg.num_iterations):
        for m, ((ids, attention, mask, _), s) in enumerate(zip(packed, micro)):
            with optim.sync_gradients(model, last_micro_step=m == len(micro) - 1):
                with amp:
                    logp, entropy = sequences.gather_logprobs(model, ids, attention, temperature, with_entropy=True)
                per_token, low, high = clipped_surrogate(logp.float(), old[m], advantages[s, None], cfg.epsilon,
                                                         epsilon_high, mask)
                loss = policy_loss(per_token, mask, cfg.token_normalization, tokens_in_step,
                                   cfg.accumulation_steps, dist.world_size)
                scaler.scale(loss).backward()
            for name, value in (("loss", per_token), ("clip_low", low), ("clip_high", high), ("entropy", entropy)):
                sums[name] += (value.detach().float() * mask).sum()
            sums["tokens"] += mask.sum()
        lr = optim.cosine_lr(step * cfg.num_iterations + iteration, max_steps * cfg.num_iterations,
                             cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
    return sums, lr, grad_norm, int(sum(p[1].sum() for p in packed)) * cfg.num_iterations


def step_metrics(tracker: BetaTracker, indices: list[int], completions: list[list[int]], rewards: list[float],
                 r: list[float], p_before: torch.Tensor, D: dict, rhos: list[float], advantages: torch.Tensor,
                 sums: dict, rollout_seconds: float) -> dict[str, float]:
    """This rank's metrics of a step; the caller averages them over ranks."""
    sums = {name: value.item() for name, value in sums.items()}
    tokens = max(sums["tokens"], 1)
    quantiles = torch.quantile(advantages.float().cpu(), torch.tensor([0.1, 0.5, 0.9])).tolist()
    lengths = [len(c) for c in completions]
    return {"reward": sum(rewards) / len(rewards), "success": sum(r) / len(r), "spo/rho": sum(rhos) / len(rhos),
            "spo/D": sum(D.values()) / len(D) if D else 0.0, "spo/p_hat": p_before.mean().item(),
            "spo/effective_count": (tracker.alpha[indices] + tracker.beta[indices]).mean().item(),
            "advantage/q10": quantiles[0], "advantage/q50": quantiles[1], "advantage/q90": quantiles[2],
            "entropy": sums["entropy"] / tokens, "clip_ratio/low_mean": sums["clip_low"] / tokens,
            "clip_ratio/high_mean": sums["clip_high"] / tokens, "completions/mean_length": sum(lengths) / len(lengths),
            "rollout_tokens_per_sec": sum(lengths) / max(rollout_seconds, 1e-9), "loss": sums["loss"] / tokens}


# === Training ===

def train(cfg: SPOConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    reward = parse_reward_flags(cfg.reward_funcs, cfg.reward_weights) if cfg.reward_funcs.strip() else None

    # ---- model, prompts, tracker ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    reward_model = load_frozen_reward_model(cfg.reward_model, tokenizer, dist.device) if cfg.reward_model else None
    print0(f"model: {model.num_parameters():,} parameters, from {cfg.init_from}")
    data, prompts = batches.prepare_prompts(cfg, tokenizer, dist)
    # each micro-step reads candidate_factor * batch_size candidates and keeps batch_size of them
    sampler = batches.GlobalBatchSampler(len(prompts), cfg.batch_size * cfg.candidate_factor, cfg.accumulation_steps,
                                         dist.world_size, dist.rank, cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    tracker = BetaTracker(len(prompts), cfg.rho_min, cfg.rho_max, cfg.d_half, cfg.constant_rho)

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
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
        tracker.load_state_tensors(resume.method_tensors)
        print0(f"tracker restored: {len(tracker.last):,} prompts with a stored response")
    else:
        started = time.time()
        initialise_tracker(tracker, model, prompts, tokenizer, reward, reward_model, cfg, dist, amp)
        print0(f"tracker: {cfg.init_samples} samples per prompt, mean p_hat {tracker.p_hat(slice(None)).mean():.3f}, "
               f"N = {tracker.effective_count:.1f} ({time.time() - started:.0f}s)")
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    seq_len = cfg.max_prompt_length + cfg.max_new_tokens
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {cfg.batch_size * cfg.accumulation_steps * dist.world_size} prompts "
           f"(one completion each, chosen from {cfg.candidate_factor}x as many), {dist.world_size} rank(s), "
           f"{str(dtype).replace('torch.', '')} on {dist.device}")

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
                    cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger, "spo", final=last_step,
                    metadata={"data": data.summary, "init_from": cfg.init_from}, method_tensors=tracker.state_tensors())
        if last_step:
            break

        # ---- 1. prompts (prioritised), one completion each, rewards ----
        temperature = cfg.temperature if cfg.temperature_start is None else optim.linear_schedule(
            step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_warmup_steps)
        indices = [i for candidates in sampler.next_step()
                   for i in choose_prompts(tracker, candidates, cfg.batch_size, cfg.sampling_epsilon)]
        completions, rewards, r, rollout_seconds = sample_and_score(train_model, prompts, indices, tokenizer, reward,
                                                                    reward_model, cfg, temperature, amp)
        with amp:                                       # log pi_old of each completion token, kept by the tracker
            old_logps = sequences.completion_logprobs(train_model, [prompts.ids[i] for i in indices], completions,
                                                      tokenizer.pad_id, temperature)

        # ---- 2. tracker: baseline p_hat before the update, then rho and the update; advantages ----
        p_before, D, rhos = update_tracker(tracker, train_model, prompts, indices, completions, r, old_logps,
                                           tokenizer.pad_id, temperature, amp, dist)
        advantages = normalise_advantages((torch.tensor(r) - p_before).to(dist.device))    # [B] r - p_hat, global

        # ---- 3. PPO-clip updates ----
        sums, lr, grad_norm, train_tokens = spo_update(train_model, prompts, indices, completions, old_logps,
                                                       advantages, optimizer, scaler, cfg, tokenizer.pad_id, dist,
                                                       amp, temperature, step, max_steps)
        step += 1
        logger.tick(tokens=train_tokens * dist.world_size, samples=len(indices) * dist.world_size)

        if step % cfg.log_interval == 0 or step == max_steps:
            metrics = distributed.mean_over_ranks(step_metrics(tracker, indices, completions, rewards, r, p_before, D,
                                                               rhos, advantages, sums, rollout_seconds), dist.device)
            metrics["rollout_tokens_per_sec"] *= dist.world_size
            loss_value = metrics.pop("loss")
            logger.log_train(step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), epoch=sampler.epoch_progress,
                             show=("reward", "spo/rho", "spo/p_hat", "completions/mean_length"), **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SPOConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS + (RewardError,) as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
