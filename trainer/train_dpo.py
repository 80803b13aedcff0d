"""Preference training: DPO and its relatives, from pairs of a chosen and a rejected answer to the same prompt.

Commands, from the repository root after `pip install -e .` (and an SFT run in out/sft):

    # the tiny SFT model on the embedded preference pairs, on CPU, in a few minutes
    python trainer/train_dpo.py

    # one GPU: a checkpoint of your own, a mixture of your pairs, DPO mixed with an SFT term, the reference log-probs
    # computed once before training (no reference model is held while training)
    python trainer/train_dpo.py --init_from out/sft-small/final --device cuda --max_seq_len 1024 --batch_size 8 \\
        --data_config config/data/dpo/with_pairs.yaml --loss_type sigmoid,sft --loss_weights 1,0.1 \\
        --precompute_ref_logps --out_dir out/dpo-small

    # 8 GPUs of one machine (any number of ranks: each step reads the same pairs as 1 rank with 8x the accumulation)
    torchrun --standalone --nproc_per_node 8 trainer/train_dpo.py --data_config config/data/dpo/default.yaml

    # LoRA: the reference is the same model with its adapters off (no second copy)
    python trainer/train_dpo.py --lora_rank 16 --learning_rate 5e-4

    # pairs sampled and scored from your own model first (trainer/make_pairs.py), then trained on
    python trainer/make_pairs.py --init_from out/sft/final --out_dir data/pairs
    python trainer/train_dpo.py --data_path data/pairs/pairs.jsonl --out_dir out/dpo-pairs

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it.

  arguments  DPOConfig: the flags every trainer shares (trainer/configuration.py), the losses and their weights, beta,
             the reference, and the extensions' flags (the reference computed once, dynamic beta).
  data       the dpo mixture (config/data/dpo/, or --data_config / --data_path): rows of {"prompt", "chosen",
             "rejected"} (strings or message lists), chat rows whose last assistant turn differs, or Anthropic-HH
             pairs, checked and rewritten to prompt messages + one assistant answer each (dataset/formats.py).
             A pair becomes prompt ids = tokenizer.chat_prompt_ids(prompt) and, for each side, the rest of
             tokenizer.render_chat(prompt + [answer]); the loss covers the answer's tokens and its closing
             <|im_end|> (render_chat's assistant mask). A side longer than --max_seq_len is cut at the end; a pair
             left without an answer token on either side is dropped (counted and printed).
  model      --init_from (required) is the policy; the reference is a frozen copy of it (or, under --lora_rank, the
             same model with its adapters off; or nothing with --reference_free; or, with --precompute_ref_logps,
             log-probs computed once before training and cached beside the prepared data: an extension, below).
  loop       chosen and rejected answers go through the model together, one [2B, T] batch; per-token log-probs come
             from the fused kernel (sequences.gather_logprobs), never [2B, T, V] logits. Loss = sum over --loss_type
             of weight * loss at beta = --beta, averaged over the pairs (the paper's DPO with --loss_type sigmoid);
             --beta_mode adapts beta at each micro-step instead (an extension, below). Every --eval_interval steps:
             the same losses and metrics on the validation split (eval records) and --eval_tasks accuracy.
  save       OUT_DIR/step_XXXXXX/ (+ the beta tracker in the resume state), OUT_DIR/final, OUT_DIR/metrics.jsonl
             (TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
             logps/rejected, beta), OUT_DIR/margins.jsonl (every training pair of every step: step, row, margin and
             both rewards).

Shape notation: B pairs per micro-batch, T the longest prompt + answer of the batch, rows [0, B) the chosen answers
and rows [B, 2B) the rejected ones. Implicit reward of an answer y: r(y) = beta * (log pi(y|x) - log pi_ref(y|x)),
summed over the answer's tokens; reported at the configured --beta whatever --beta_mode does, so that runs compare.

The file reads: the config, the losses (each a formula of its paper), the log-probs, train(), then the extensions
(the reference log-probs computed once, dynamic beta: β-DPO and risk-aware), then main.
"""

import json
import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from minitrain.dataset.mixer import format_summary
from minitrain.dataset.preference import PreferenceDataset, collate_pairs
from minitrain.model.lora import has_lora
from minitrain.model.transformer import unwrap
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting, sequences, \
    sharding
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0
from minitrain.trainer.sharding import full_weights

LOSS_TYPES = ("sigmoid", "dpop", "ipo", "hinge", "sft", "rpo")
BETA_MODES = ("fixed", "beta_dpo", "risk")


@dataclass
class DPOConfig(TrainConfig):
    """Preference training of --init_from on chosen/rejected pairs (batch_size = pairs per micro-batch)."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/sft/final"
    out_dir: str = "out/dpo"
    max_seq_len: int = 128              # drops the longest sat pairs (256 keeps them, at about twice the time)
    batch_size: int = 16                # pairs per micro-batch (32 sequences through the model)
    max_steps: int = 120
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 40
    eval_batches: int = 8
    eval_tasks: str = "arithmetic"
    save_interval: int = 60
    keep_checkpoints: int = 2

    # ---- objective ----
    loss_type: str = field(default="sigmoid", metadata={
        "help": "comma-separated losses, summed with --loss_weights: sigmoid (DPO; cDPO with --label_smoothing), "
                "dpop (DPO-Positive: DPO that also penalises a fall of the chosen answer's log-prob, --dpop_lambda), "
                "ipo (on LENGTH-AVERAGED log-ratios, as TRL; the paper's IPO sums them over the answer's tokens), "
                "hinge (SLiC), sft (NLL of the chosen answers, one token mean over the micro-batch, as TRL's), "
                "rpo (NLL of each chosen answer as its own token mean, then the mean over pairs, as RPO)"})
    loss_weights: str = field(default="", metadata={"help": "comma-separated weights of --loss_type; empty = 1 each"})
    beta: float = field(default=0.1, metadata={"help": "beta0: strength of the pull towards the reference (the "
                                                       "implicit rewards are beta * log-ratio)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "cDPO's epsilon, the assumed probability that a pair's labels are flipped (sigmoid loss only)"})
    dpop_lambda: float = field(default=50.0, metadata={
        "help": "DPOP's lambda: weight of max(0, log pi_ref(chosen) - log pi(chosen)) inside the sigmoid (the "
                "paper's 50)"})
    # ---- reference (--precompute_ref_logps is an extension, below train()) ----
    reference_free: bool = field(default=False, metadata={"help": "no reference: its log-probs are taken as 0"})
    precompute_ref_logps: bool = field(default=False, metadata={
        "help": "compute the reference log-probs in one pass before training, cached beside the prepared data "
                "(reused while the data, --init_from and --max_seq_len are unchanged); no reference model is held"})
    # ---- dynamic beta (an extension, below train()) ----
    beta_mode: str = field(default="fixed", metadata={
        "help": "fixed; beta_dpo (β-DPO: beta grows with the batch gap over its running mean); risk (beta grows when "
                "the batch gap falls below a running quantile of past gaps)", "choices": list(BETA_MODES)})
    beta_min: float = field(default=1e-3, metadata={"help": "dynamic beta is never below this"})
    beta_max: float = field(default=1.0, metadata={"help": "dynamic beta is never above this"})
    beta_momentum: float = field(default=0.9, metadata={
        "help": "m of the running gap mean and std: M_0 <- m M_0 + (1 - m) M_batch, from 0 and before beta (as β-DPO's "
                "code)"})
    beta_dpo_alpha: float = field(default=0.5, metadata={
        "help": "β-DPO's alpha: beta = beta0 (1 + alpha (M_batch - M_0))"})
    beta_filter_keep: float = field(default=1.0, metadata={
        "help": "β-DPO's filter: keep this fraction of each batch's pairs, drawn without replacement with weight "
                "exp(-(M_i - M_0)^2 / (2 sigma^2)); 1 = no filtering (beta_dpo mode only)"})
    risk_quantile: float = field(default=0.25, metadata={"help": "tau of the tracked gap quantile (risk mode)"})
    risk_lr: float = field(default=0.05, metadata={
        "help": "step of the quantile update q <- q + lr (tau - fraction of gaps below q) (risk mode)"})
    risk_scale: float = field(default=0.1, metadata={
        "help": "kappa: beta = beta0 exp(kappa (q - M_batch)) (risk mode)"})
    # ---- logging ----
    log_margins: bool = field(default=True, metadata={"help": "append every training pair's margin and rewards to "
                                                              "OUT_DIR/margins.jsonl at every step"})

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise FlagError("init_from", "is required: preference training starts from a fine-tuned checkpoint "
                                         "(e.g. --init_from out/sft/final)")
        try:
            parse_losses(self.loss_type, self.loss_weights)
        except ValueError as e:
            raise FlagError("loss_type", str(e)) from None
        for name in ("beta", "beta_min", "beta_max", "risk_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise FlagError(name, f"must be a positive number, got {getattr(self, name)}")
        if self.beta_min > self.beta_max:
            raise FlagError("beta_min", f"must not exceed --beta_max ({self.beta_min} > {self.beta_max})")
        if not (self.dpop_lambda >= 0 and math.isfinite(self.dpop_lambda)):
            raise FlagError("dpop_lambda", f"must be a non-negative number, got {self.dpop_lambda}")
        if not 0 <= self.label_smoothing < 0.5:
            raise FlagError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and "sigmoid" not in parse_losses(self.loss_type, self.loss_weights)[0]:
            raise FlagError("label_smoothing", "applies to the sigmoid loss only: add sigmoid to --loss_type")
        if not 0 <= self.beta_momentum < 1:
            raise FlagError("beta_momentum", f"must be in [0, 1), got {self.beta_momentum}")
        if not 0 < self.beta_filter_keep <= 1:
            raise FlagError("beta_filter_keep", f"must be in (0, 1], got {self.beta_filter_keep}")
        if self.beta_filter_keep < 1 and self.beta_mode != "beta_dpo":
            raise FlagError("beta_filter_keep", "filters pairs under --beta_mode beta_dpo only")
        if not 0 < self.risk_quantile < 1:
            raise FlagError("risk_quantile", f"must be in (0, 1), got {self.risk_quantile}")
        if self.risk_scale < 0 or self.beta_dpo_alpha < 0:
            raise FlagError("risk_scale" if self.risk_scale < 0 else "beta_dpo_alpha", "must not be negative")
        if self.reference_free and self.precompute_ref_logps:
            raise FlagError("precompute_ref_logps", "and --reference_free are alternatives: give one")
        if self.precompute_ref_logps and self.fsdp and self.lora_rank:
            raise FlagError("precompute_ref_logps", "with --fsdp and --lora_rank: the adapters-off policy is the "
                                                    "reference and holds no memory of its own; drop the flag")


def parse_losses(types: str, weights: str) -> tuple[list[str], list[float]]:
    """"sigmoid,sft", "1,0.1" -> (["sigmoid", "sft"], [1.0, 0.1]); ValueError naming what is wrong."""
    names = [t.strip() for t in types.split(",") if t.strip()]
    if not names:
        raise ValueError("names no loss")
    unknown = [n for n in names if n not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss {unknown[0]!r} (expected some of {', '.join(LOSS_TYPES)})")
    if len(set(names)) != len(names):
        raise ValueError(f"lists a loss twice: {types!r}")
    try:
        values = [float(w) for w in weights.split(",")] if weights.strip() else [1.0] * len(names)
    except ValueError:
        raise ValueError(f"--loss_weights {weights!r}: expected comma-separated numbers") from None
    if len(values) != len(names):
        raise ValueError(f"has {len(names)} losses but --loss_weights has {len(values)} weights")
    if not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
        raise ValueError(f"--loss_weights must be non-negative numbers, one of them positive, got {weights!r}")
    return names, values


# =============================================================================================================
# Losses: per-pair, from summed log-probs (tests/test_dpo.py checks each against its formula)
# =============================================================================================================
# pc, pr: log pi(chosen | x), log pi(rejected | x) of the policy; rc, rr: the same under the reference. All [B].

def implicit_gap(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """h = (pc - rc) - (pr - rr): how much more the policy prefers the chosen answer than the reference does."""
    return (pc - rc) - (pr - rr)


def sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): -log σ(β h).

    With label_smoothing ε > 0, conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the
    labels are trusted with probability 1 - ε, so -(1 - ε) log σ(β h) - ε log σ(-β h).
    """
    logits = beta * implicit_gap(pc, pr, rc, rr)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpop_loss(pc, pr, rc, rr, beta, lam: float) -> torch.Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228): -log σ(β (h - λ max(0, rc - pc))).

    When the chosen and rejected answers differ in a few tokens (one digit of an arithmetic answer), plain DPO can
    raise h while the chosen answer's own probability falls; the penalty is zero while log pi(chosen) stays at or
    above the reference's, and counts λ times against the gap once it falls below."""
    return -F.logsigmoid(beta * (implicit_gap(pc, pr, rc, rr) - lam * torch.relu(rc - pc)))


def ipo_loss(pc, pr, rc, rr, beta) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036): (h - 1 / (2β))^2, a squared loss that regresses the gap to a
    finite target instead of pushing it to infinity. The trainer passes LENGTH-AVERAGED log-probs here (each sum
    divided by its answer's number of tokens), as TRL does: the target 1/(2β) is then per token, whatever the
    answers' lengths."""
    return (implicit_gap(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2


def hinge_loss(pc, pr, rc, rr, beta) -> torch.Tensor:
    """SLiC's calibration loss (Zhao et al. 2023, arXiv 2305.10425) on the reference-normalised gap, as TRL's
    "hinge": max(0, 1 - β h)."""
    return torch.relu(1 - beta * implicit_gap(pc, pr, rc, rr))


def sft_loss(pc: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """TRL's "sft" term: the NLL of the chosen answers as ONE token mean over the micro-batch, -sum(pc) / sum(n).
    Returned per pair ([B]) as -pc_i * B / sum(n), whose mean over the B pairs is that token mean (every chosen
    token weighs the same, whatever its answer's length)."""
    return -pc * pc.numel() / chosen_tokens.sum().clamp(min=1)


def rpo_loss(pc: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024, arXiv 2404.19733): each chosen answer's own token mean, -pc_i / n_i ([B]);
    the mean over pairs then weighs every answer the same (a token of a short answer weighs more)."""
    return -pc / chosen_tokens.clamp(min=1)


def pair_losses(names: list[str], weights: list[float], logps: dict[str, torch.Tensor], beta,
                label_smoothing: float, dpop_lambda: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_k w_k loss_k per pair ([B]) and each loss_k ([B], for logging).

    logps holds pc, pr, rc, rr (sums over answer tokens) and nc, nr (the answers' token counts).
    """
    pc, pr, rc, rr, nc, nr = (logps[k] for k in ("pc", "pr", "rc", "rr", "nc", "nr"))
    parts = {}
    for name in names:
        if name == "sigmoid":
            parts[name] = sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing)
        elif name == "dpop":
            parts[name] = dpop_loss(pc, pr, rc, rr, beta, dpop_lambda)
        elif name == "ipo":
            parts[name] = ipo_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta)
        elif name == "hinge":
            parts[name] = hinge_loss(pc, pr, rc, rr, beta)
        elif name == "sft":
            parts[name] = sft_loss(pc, nc)
        else:
            parts[name] = rpo_loss(pc, nc)
    total = sum(w * parts[n] for n, w in zip(names, weights))
    return total, parts


# =============================================================================================================
# Log-probabilities: the policy's (one concatenated batch) and the reference's (a frozen copy, adapters off, none, or
# precomputed), then TRL's metrics
# =============================================================================================================

def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's answer tokens and their count: ([2B], [2B]), one forward pass of [2B, T]."""
    logp = sequences.gather_logprobs(model, batch["input_ids"], batch["attention_mask"]).float()    # [2B, T - 1]
    mask = batch["loss_mask"]
    return (logp * mask).sum(-1), mask.sum(-1)


class Reference:
    """Where the reference log-probs of a batch come from: precomputed (batch["ref"]), none (reference-free: 0),
    the frozen copy, or the LoRA policy with its adapters off."""

    def __init__(self, kind: str, model=None):
        self.kind, self.model = kind, model

    def logps(self, policy, batch: dict, amp) -> torch.Tensor:
        B = batch["index"].numel()
        if self.kind == "precomputed":
            return torch.cat([batch["ref"][:, 0], batch["ref"][:, 1]])
        if self.kind == "none":
            return torch.zeros(2 * B, device=batch["input_ids"].device)
        with amp:
            return sequences.live_reference_logps(self.model, policy, batch)


def split_logps(policy_sums: torch.Tensor, tokens: torch.Tensor, ref_sums: torch.Tensor) -> dict[str, torch.Tensor]:
    B = policy_sums.numel() // 2
    return {"pc": policy_sums[:B], "pr": policy_sums[B:], "rc": ref_sums[:B].detach(), "rr": ref_sums[B:].detach(),
            "nc": tokens[:B], "nr": tokens[B:]}


def pair_metrics(logps: dict[str, torch.Tensor], beta0: float) -> dict[str, torch.Tensor]:
    """TRL's per-pair quantities ([B] each): implicit rewards at beta0, accuracy, margin, policy log-probs."""
    chosen = beta0 * (logps["pc"] - logps["rc"]).detach()
    rejected = beta0 * (logps["pr"] - logps["rr"]).detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected,
            "logps/chosen": logps["pc"].detach(), "logps/rejected": logps["pr"].detach()}


# =============================================================================================================
# Evaluation on the validation split, and the margins log
# =============================================================================================================

@torch.no_grad()
def evaluate_preferences(model, reference: Reference, dataset: PreferenceDataset, cfg: DPOConfig, names, weights,
                         collate, dist, amp) -> dict[str, float]:
    """Loss (at beta0, every pair) and TRL's metrics over the first --eval_batches batches of the validation split;
    batch b goes to rank b % W and the sums are all-reduced, so the numbers do not depend on the number of ranks."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"]
    totals = torch.zeros(len(keys) + 1, device=dist.device, dtype=torch.float64)      # sums, then the pair count
    starts = list(range(0, min(len(dataset), cfg.eval_batches * cfg.batch_size), cfg.batch_size))
    with full_weights(raw), full_weights(reference.model):     # under FSDP: the ranks run different numbers of batches
        for b in range(dist.rank, len(starts), dist.world_size):
            indices = list(range(starts[b], min(starts[b] + cfg.batch_size, len(dataset))))
            batch = batches.load_batch(dataset, indices, dist.device, collate)
            with amp:
                sums, tokens = sequence_logps(raw, batch)
            logps = split_logps(sums, tokens, reference.logps(raw, batch, amp))
            loss, _ = pair_losses(names, weights, logps, cfg.beta, cfg.label_smoothing, cfg.dpop_lambda)
            metrics = {"loss": loss, **pair_metrics(logps, cfg.beta)}
            totals[:-1] += torch.stack([metrics[k].double().sum() for k in keys])
            totals[-1] += len(indices)
    if distributed.is_distributed():
        tdist.all_reduce(totals)
    raw.train(was_training)
    count = max(totals[-1].item(), 1.0)
    return {k: totals[i].item() / count for i, k in enumerate(keys)}


def write_margins(path: str, step: int, rows: torch.Tensor, dist) -> None:
    """Append one {"step", "row", "margin", "chosen", "rejected"} line per training pair of the step (rank 0)."""
    if not dist.is_main:
        return
    with open(path, "a") as f:
        for index, margin, chosen, rejected in rows.cpu().tolist():
            f.write(json.dumps({"step": step, "row": int(index), "margin": margin, "chosen": chosen,
                                "rejected": rejected}) + "\n")


# =============================================================================================================
# Training
# =============================================================================================================

def train(cfg: DPOConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    names, weights = parse_losses(cfg.loss_type, cfg.loss_weights)

    # ---- model: the policy, and the reference taken before any training (a copy, or the adapters switched off) ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    print0(f"model: {model.num_parameters():,} parameters, from {cfg.init_from}")

    # ---- data: pairs -> prompt + answer ids, loss on the answers ----
    data = batches.prepare_phase_data("dpo", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    train_set = PreferenceDataset(data.train_file, tokenizer, cfg.max_seq_len)
    val_set = PreferenceDataset(data.val_file, tokenizer, cfg.max_seq_len) if data.val_file else None
    print0(f"train: {train_set.describe()}")
    if val_set is not None:
        print0(f"validation: {val_set.describe()}")
    collate = partial(collate_pairs, pad_id=tokenizer.pad_id)
    sampler = batches.GlobalBatchSampler(len(train_set), cfg.batch_size, cfg.accumulation_steps, dist.world_size,
                                         dist.rank, cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    dtype = optim.resolve_dtype(cfg.dtype, dist.device)
    amp = optim.autocast_context(dist.device, dtype)

    if cfg.reference_free:
        reference = Reference("none")
        print0("reference: none (--reference_free: reference log-probs are 0)")
    elif cfg.precompute_ref_logps:                  # an extension, below
        reference = precomputed_reference(cfg, model, train_set, val_set, data.directory, tokenizer.path, collate,
                                          dist, amp, dtype)
    elif has_lora(model):
        reference = Reference("adapters_off")
        print0("reference: the policy with its LoRA adapters off (no copy)")
    else:
        reference = Reference("copy", modeling.frozen_reference(model, cfg, dist))
        print0("reference: a frozen copy of the starting policy")

    # ---- optimisation ----
    optimizer = optim.build_optimizer(model, cfg, dist.device)
    scaler = optim.make_grad_scaler(dist.device, dtype)
    tracker = BetaTracker(cfg)                      # dynamic beta (an extension, below); saved in every checkpoint
    distributed.seed_everything(cfg.seed + dist.rank)
    start_step, wandb_run_id = 0, None
    margins_path = os.path.join(cfg.out_dir, "margins.jsonl")
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
        if resume.method_state:
            tracker.load_state_dict(resume.method_state)
            print0(f"beta tracker restored: {tracker.state_dict()}")
        if dist.is_main:
            checkpointing.truncate_metrics(margins_path, resume.step)
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, cfg.max_seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    losses = " + ".join(f"{w:g} x {n}" for n, w in zip(names, weights))
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} pairs of at most {cfg.max_seq_len} tokens a "
           f"side ({sampler.steps_per_epoch:,} steps/epoch), loss {losses}, beta {cfg.beta:g} ({cfg.beta_mode}), "
           f"{dist.world_size} rank(s), {str(dtype).replace('torch.', '')} on {dist.device}")
    beta0 = torch.tensor(cfg.beta, device=dist.device)      # the logged beta of a fixed-beta run, copied once

    # ---- loop: evaluate, save, stop or take one step ----
    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                metrics = {} if val_set is None else evaluate_preferences(train_model, reference, val_set, cfg, names,
                                                                          weights, collate, dist, amp)
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                checkpointing.save_training_checkpoint(
                    cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger, "dpo",
                    metadata={"data": data.summary, "init_from": cfg.init_from, "reference": reference.kind},
                    final=last_step, method_state=tracker.state_dict())
        if last_step:
            break

        sums, step_tokens, margin_rows = {}, 0, []
        for micro, indices in enumerate(sampler.next_step()):
            batch = batches.load_batch(train_set, indices, dist.device, collate)
            step_tokens += sum(train_set.lengths[i] for i in indices)    # = attention_mask.sum(), counted on the host
            with optim.sync_gradients(train_model, last_micro_step=micro == cfg.accumulation_steps - 1):
                with amp:
                    policy_sums, tokens = sequence_logps(train_model, batch)         # [2B], one forward of [2B, T]
                logps = split_logps(policy_sums, tokens, reference.logps(train_model, batch, amp))
                if cfg.beta_mode == "fixed":    # the mean over the B pairs (DDP averages the ranks: the global mean)
                    per_pair, parts = pair_losses(names, weights, logps, cfg.beta, cfg.label_smoothing,   # [B]
                                                  cfg.dpop_lambda)
                    loss, beta = per_pair.sum() / len(indices), beta0
                else:                           # an extension, below: beta (and the pairs kept) from the gaps
                    loss, parts, beta = dynamic_beta_loss(tracker, logps, names, weights, cfg, dist, step, micro)
                scaler.scale(loss / cfg.accumulation_steps).backward()
            pair = pair_metrics(logps, cfg.beta)                                           # [B] each, at beta0
            values = {"loss": loss.detach(), "beta": beta,
                      **{f"loss/{n}": p.detach().mean() for n, p in parts.items() if len(parts) > 1},
                      **{k: v.mean() for k, v in pair.items()}}
            for k, v in values.items():                  # on the device: read at log steps only
                sums[k] = sums.get(k, 0.0) + v.float() / cfg.accumulation_steps
            if cfg.log_margins:
                margin_rows.append(torch.stack([batch["index"].double(), pair["rewards/margins"].double(),
                                                pair["rewards/chosen"].double(), pair["rewards/rejected"].double()], 1))
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        logger.tick(tokens=step_tokens * dist.world_size, samples=sampler.global_batch)
        if cfg.log_margins:
            write_margins(margins_path, step, distributed.all_gather_rows(torch.cat(margin_rows)), dist)
        if step % cfg.log_interval == 0 or step == max_steps:
            metrics = distributed.mean_over_ranks({k: v.item() for k, v in sums.items()}, dist.device)
            if cfg.beta_mode != "fixed":
                metrics.update(tracker.running_stats())
            loss_value = metrics.pop("loss")
            logger.log_train(step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), epoch=sampler.epoch_progress,
                             show=("rewards/accuracies", "rewards/margins", "beta"), **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


# =============================================================================================================
# Extensions: the reference log-probs computed once (--precompute_ref_logps), dynamic beta (--beta_mode)
# =============================================================================================================

# ---- the reference log-probs computed once: the plumbing is sequences.py's, the wiring here ----

def precomputed_reference(cfg: DPOConfig, model, train_set: PreferenceDataset, val_set: PreferenceDataset | None,
                          directory: str, tokenizer_path: str, collate, dist, amp, dtype) -> Reference:
    """The reference log-prob sums of every pair, computed in one pass before training (the model, before any
    update, as the reference) and cached in `directory` (sequences.cached_reference_logps: reused while the data,
    --init_from and --max_seq_len are unchanged); the datasets carry them into each batch as batch["ref"], and no
    reference model is held while training."""
    splits = {"train": train_set, **({"val": val_set} if val_set is not None else {})}
    fingerprint = sequences.reference_fingerprint({s: d.path for s, d in splits.items()}, cfg.init_from,
                                                  tokenizer_path, cfg.max_seq_len, dtype, cfg.model_overrides)
    path = sequences.reference_cache_path(directory, fingerprint)

    def compute():
        if not sharding.is_deferred(model):
            return sequences.compute_reference_logps(model, splits, cfg.batch_size, collate, dist, amp)
        # --fsdp from --init_from: the policy has no weights until it is sharded, so a sharded copy of it makes the
        # pass, whole on each rank while it lasts (the ranks' shares of pairs differ), and is dropped after
        reference = modeling.frozen_reference(model, cfg, dist)
        with sharding.full_weights(reference):
            return sequences.compute_reference_logps(reference, splits, cfg.batch_size, collate, dist, amp)

    logps, reused = sequences.cached_reference_logps(path, fingerprint, compute, dist)
    for split, dataset in splits.items():
        dataset.set_reference(logps[split])
    print0(f"reference: log-probs {'reused from' if reused else 'computed once and saved to'} {path}; no reference "
           f"model is held")
    return Reference("precomputed")


# ---- dynamic beta: the rules as pure functions, the tracker that applies them (state saved in checkpoints) ----
# "The batch" is what goes through the model together: the B pairs of one micro-step on every rank (all-gathered, so
# every rank computes the same beta and the same running statistics). The gap of a pair is
# M_i = h_i = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), as β-DPO's code takes it. With
# gradient accumulation each micro-step adapts beta from its own pairs, so W ranks x A accumulation steps give the
# losses of 1 rank x W*A steps only with --beta_mode fixed.

def ema(old: float, new: float, momentum: float) -> float:
    """x <- m x + (1 - m) x_new."""
    return momentum * old + (1 - momentum) * new


def beta_dpo_beta(beta0: float, alpha: float, batch_gap: float, running_mean: float, beta_min: float,
                  beta_max: float) -> float:
    """β-DPO (Wu et al. 2024, arXiv 2407.08639), eq. 7: beta = beta0 (1 + alpha (M_batch - M_0)), clipped to
    [beta_min, beta_max]: a batch whose pairs are further apart than usual gets a larger beta."""
    return min(beta_max, max(beta_min, beta0 * (1 + alpha * (batch_gap - running_mean))))


def gap_weights(gaps: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """β-DPO's filter weights: exp(-(M_i - M_0)^2 / (2 sigma^2)); pairs far from the usual gap are likely noise."""
    return torch.exp(-(gaps - mean) ** 2 / (2 * max(std, 1e-6) ** 2))


def filter_pairs(gaps: torch.Tensor, mean: float, std: float, keep: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of the K = max(1, round(keep * n)) pairs drawn without replacement with probability proportional
    to gap_weights (all weights equal when every one underflows to 0)."""
    n = gaps.numel()
    count = max(1, round(keep * n))
    if count >= n:
        return torch.ones(n, dtype=torch.bool)
    weights = gap_weights(gaps.double().cpu(), mean, std)
    if not weights.sum() > 0:
        weights = torch.ones_like(weights)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.multinomial(weights, count, replacement=False, generator=generator)] = True
    return mask


def quantile_update(q: float, gaps: torch.Tensor, tau: float, lr: float) -> float:
    """Stochastic-approximation (Robbins-Monro) tau-quantile: q <- q + lr (tau - mean_i 1[M_i < q]). At the true
    quantile a fraction tau of gaps falls below q and q stays; more below moves it down, fewer moves it up."""
    return q + lr * (tau - (gaps < q).double().mean().item())


def risk_beta(beta0: float, kappa: float, quantile: float, batch_gap: float, beta_min: float,
              beta_max: float) -> float:
    """Risk-aware beta: beta0 exp(kappa (q_tau - M_batch)), clipped to [beta_min, beta_max]. A batch whose gap
    falls below the running tau-quantile of past gaps (its pairs disagree with the policy: likely noisy labels, a
    risky update) gets a larger beta, i.e. a stronger pull towards the reference; a batch above it, a smaller one."""
    return min(beta_max, max(beta_min, beta0 * math.exp(kappa * (quantile - batch_gap))))


class BetaTracker:
    """beta of each batch (fixed, beta_dpo or risk) and the running statistics of past gaps.

    State: mean (M_0) and std (sigma), exponential moving averages of the batch gap mean and std (momentum m);
    quantile (q), the running tau-quantile; count, batches seen. As in β-DPO's released code (Wu et al.,
    trainers.py), M_0 and sigma start at 0 and take each batch in BEFORE its beta and filter are computed, and std
    is the unbiased (Bessel) one; q is seeded with the first batch's exact tau-quantile (so q - M_batch is that of
    one batch). Then, for each batch of gaps M_i (every rank's, so every rank computes the same):

        beta_dpo:  M_0 <- m M_0 + (1 - m) mean(M),  sigma <- m sigma + (1 - m) std(M)     (this batch included)
                   keep = filter_pairs(M, M_0, sigma)          (all pairs when --beta_filter_keep is 1)
                   beta = clip(beta0 (1 + alpha (mean(M_keep) - M_0)), beta_min, beta_max)
        risk:      beta = clip(beta0 exp(kappa (q - mean(M))), beta_min, beta_max)
                   q <- q + lr (tau - mean(1[M_i < q]))
        fixed:     beta = beta0 (the trainer does not call step() then: nothing to track)
    """

    def __init__(self, cfg: DPOConfig):
        self.mode, self.beta0 = cfg.beta_mode, cfg.beta
        self.beta_min, self.beta_max, self.momentum = cfg.beta_min, cfg.beta_max, cfg.beta_momentum
        self.alpha, self.keep = cfg.beta_dpo_alpha, cfg.beta_filter_keep
        self.tau, self.lr, self.kappa = cfg.risk_quantile, cfg.risk_lr, cfg.risk_scale
        self.mean = self.std = self.quantile = 0.0
        self.count = 0

    def step(self, gaps: torch.Tensor, generator: torch.Generator) -> tuple[float, torch.Tensor]:
        """(beta, keep mask [n]) of one batch of gaps [n]; updates the running statistics."""
        gaps = gaps.detach().double().cpu()
        batch_mean, batch_std = gaps.mean().item(), gaps.std().item() if gaps.numel() > 1 else 0.0
        # β-DPO's code: the running statistics start at 0 and take this batch in before beta (m (M_batch - M_0) then
        # drives beta, not M_batch - M_0)
        self.mean = ema(self.mean, batch_mean, self.momentum)
        self.std = ema(self.std, batch_std, self.momentum)
        if self.count == 0:
            self.quantile = torch.quantile(gaps, self.tau).item()
        keep = torch.ones(gaps.numel(), dtype=torch.bool)
        beta = self.beta0
        if self.mode == "beta_dpo":
            if self.keep < 1:
                keep = filter_pairs(gaps, self.mean, self.std, self.keep, generator)
            beta = beta_dpo_beta(self.beta0, self.alpha, gaps[keep].mean().item(), self.mean, self.beta_min,
                                 self.beta_max)
        elif self.mode == "risk":
            beta = risk_beta(self.beta0, self.kappa, self.quantile, batch_mean, self.beta_min, self.beta_max)
        self.quantile = quantile_update(self.quantile, gaps, self.tau, self.lr)
        self.count += 1
        return beta, keep

    def state_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean, "std": self.std, "quantile": self.quantile,
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std, self.quantile, self.count = state["mean"], state["std"], state["quantile"], state["count"]

    def running_stats(self) -> dict[str, float]:
        return {"gap/running_mean": self.mean, "gap/running_std": self.std, "gap/quantile": self.quantile}


def dynamic_beta_loss(tracker: BetaTracker, logps: dict[str, torch.Tensor], names: list[str], weights: list[float],
                      cfg: DPOConfig, dist, step: int, micro: int):
    """(loss, each loss_k [B], beta as a tensor) of one micro-step under --beta_mode beta_dpo or risk: beta (and,
    with --beta_filter_keep, the pairs kept) from the gaps of this micro-step's pairs on every rank (a collective and
    a host sync each micro-step), the loss the mean over the kept pairs of all ranks."""
    B = logps["pc"].numel()
    gaps = distributed.all_gather_rows(implicit_gap(logps["pc"], logps["pr"], logps["rc"], logps["rr"]).detach())
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + micro)
    beta, keep_all = tracker.step(gaps, generator)                                         # keep_all [W B] bool
    keep = keep_all[dist.rank * B:(dist.rank + 1) * B].to(dist.device).float()             # [B], this rank's
    per_pair, parts = pair_losses(names, weights, logps, beta, cfg.label_smoothing, cfg.dpop_lambda)
    # DDP averages the ranks' gradients, hence the factor W
    loss = (per_pair * keep).sum() * dist.world_size / keep_all.sum().item()
    return loss, parts, torch.tensor(beta, device=dist.device)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DPOConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
