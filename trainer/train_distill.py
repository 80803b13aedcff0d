"""Knowledge distillation: a student learns a frozen teacher's next-token distributions, its own samples judged by
the teacher, or the teacher's checked answers.

Commands, from the repository root after `pip install -e .`. A teacher is any checkpoint that reads the student's
token ids (same tokenizer, same vocab_size); none is assumed, so --teacher is required. To make one on CPU, train the
mini preset through pretraining and SFT (the pipeline's first stages, ~13 minutes on 2 cores):

    python trainer/pipeline.py --stages pretrain,sft          # -> out/pipeline/sft/final (mini, 128 x 4 layers)

    # the pretrained tiny model (python trainer/train_pretrain.py) distilled from it on the embedded chat data, CPU
    python trainer/train_distill.py --teacher out/pipeline/sft/final --init_from out/pretrain/final

    # a fresh tiny student on the pretraining text (every token a target), reverse KL at temperature 2
    python trainer/train_distill.py --teacher out/pipeline/sft/final --data_phase pretrain --distill_loss reverse_kl \\
        --distill_temperature 2 --out_dir out/distill-text

    # on-policy (GKD): half the batches are the student's own answers, scored token by token by the teacher; the
    # divergence alone (--alpha 0), as GKD and TRL's GKDTrainer (which has no T^2: keep --distill_temperature 1)
    python trainer/train_distill.py --teacher out/pipeline/sft/final --init_from out/pretrain/final --lmbda 0.5 \\
        --distill_loss jsd --jsd_beta 0.5 --alpha 0 --out_dir out/distill-gkd

    # reasoning distillation: the teacher answers the rlaif prompts 4 times each, the checker keeps the right
    # answers (written to OUT_DIR/generations.jsonl + generations_manifest.json), the student learns them (SFT loss)
    python trainer/train_distill.py --teacher out/pipeline/sft/final --init_from out/pretrain/final \\
        --from_teacher_generations --num_teacher_samples 4 --alpha 1 --out_dir out/distill-reasoning

    # one GPU: a Qwen3-0.6B student from a Qwen3-4B teacher (local directories), bf16, sequences up to 2048
    python trainer/train_distill.py --teacher path/to/Qwen3-4B --init_from path/to/Qwen3-0.6B --device cuda \\
        --max_seq_len 2048 --batch_size 8 --learning_rate 2e-5 --alpha 0.2 --out_dir out/distill-qwen

    # 8 GPUs of one machine: every rank holds the teacher; the student is wrapped in DDP
    torchrun --standalone --nproc_per_node 8 trainer/train_distill.py --teacher out/sft-base/final \\
        --init_from out/pretrain-small/final --device cuda --lmbda 0.5 --out_dir out/distill-small

    # continue a stopped run from its latest checkpoint
    python trainer/train_distill.py --teacher out/pipeline/sft/final --resume --out_dir out/distill

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it.

  arguments  DistillConfig: the flags every trainer shares (trainer/configuration.py), the teacher, the objective, the
             on-policy and the teacher-generation settings.
  models     the student: --init_from, or a fresh --model_config preset, which then takes the teacher's tokenizer and
             vocab_size (unless --tokenizer / --vocab_size say otherwise). The teacher (--teacher): frozen, eval mode,
             any size, held in the run's compute dtype; it must share the student's tokenizer and vocab_size (a
             one-line error, exit 2, otherwise).
  data       --data_phase sft (default): chat conversations (config/data/sft/, --data_config, --data_path), targets
             are the assistant tokens (dataset/chat.py). --data_phase pretrain: packed text, every token a target.
  objective  loss = alpha * CE + (1 - alpha) * T^2 * D_T(teacher, student)   (Hinton et al. 2015, arXiv 1503.02531)
             CE is the student's cross-entropy on the data's tokens at temperature 1; D_T the divergence between
             P = softmax(teacher logits / T) and Q = softmax(student logits / T), mean over target tokens:
                 forward_kl   KL(P || Q)                        mode-covering (Hinton's soft targets)
                 reverse_kl   KL(Q || P)                        mode-seeking (MiniLLM, Gu et al. 2023)
                 jsd          beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q   (--jsd_beta)
             Each term is a token mean over the whole step, all micro-batches and ranks (--token_normalization
             global, as TRL's GKD; micro_batch: each micro-batch's token means, averaged). alpha = 1 is plain
             fine-tuning, alpha = 0 pure distillation. The math section below explains the JSD's endpoints and the
             T^2 factor (which TRL's GKD does not have). Both heads go through kernels.fused_linear_kl on the final
             hidden states (the models run with compute_logits=False): no [N, V] logits tensor is held whole.
  loop       a step loads its micro-batches first (load_micro_batches: their target masks, whose counts over the
             step normalise each term), then one forward and backward each (distill_micro_step), clipping, AdamW on
             a cosine schedule; every --eval_interval steps the validation loss, divergence and agreement
             (evaluate_distill), task accuracy (--eval_tasks) and sample answers.
  on-policy  (extension) --lmbda: the fraction of micro-batches whose sequences the student samples itself
             (generalised knowledge distillation, Agarwal et al. 2023, arXiv 2306.13649): the student completes each
             conversation's last user turn (sequences.rollout, --max_new_tokens, --temperature) and D_T is taken over
             its completion tokens; the CE stays on the data's answers. Which micro-batches: is_on_policy below.
  reasoning  (extension) --from_teacher_generations: before training, the teacher answers the rlaif prompts
             --num_teacher_samples times each and the task checkers keep the finished, correct, distinct answers,
             written to OUT_DIR/generations.jsonl (or --generations_out DIR) with generations_manifest.json
             (trainer/generations.py; train_sft.py --data_path reads the file as it is). The student trains on them
             as on chat data: --alpha 1 is the SFT loss alone (DeepSeek-R1's distilled models); a smaller alpha adds
             the teacher's logits. A resumed run reuses the file.
  metrics    train: loss (the objective), loss/ce, loss/distill (D_T, without the T^2 factor), distill/agreement
             (fraction of target tokens where argmax student == argmax teacher, at log steps only, by
             kernels.fused_linear_argmax, which never holds [N, V]), distill/on_policy (fraction of micro-batches),
             and with --lmbda completions/mean_length. eval: loss (the student's CE, evaluation.evaluate_loss),
             distill and agreement on the same validation batches, task accuracy (--eval_tasks), sample answers.
  save       OUT_DIR/step_XXXXXX/ (Hugging Face layout + resume state), OUT_DIR/final, OUT_DIR/metrics.jsonl.
"""

import dataclasses
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch

from minitrain.dataset.chat import IGNORE_INDEX, ChatDataset, collate_chat
from minitrain.dataset.mixer import format_summary
from minitrain.kernels import fused_linear_argmax, fused_linear_kl
from minitrain.model.checkpoint import check_model_dir, load_model
from minitrain.model.config import ConfigError, load_model_config
from minitrain.model.transformer import unwrap
from minitrain.trainer import (batches, checkpointing, configuration, distributed, evaluation, generations, modeling,
                               optim, reporting, sequences, sharding)
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")
TOKEN_NORMALIZATIONS = ("global", "micro_batch")


@dataclass
class DistillConfig(TrainConfig):
    """Distillation of a frozen --teacher into the student (--init_from, or a fresh --model_config preset)."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    out_dir: str = "out/distill"
    batch_size: int = 16
    max_steps: int = 400
    learning_rate: float = 1.0e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_batches: int = 8
    eval_tasks: str = "arithmetic"
    save_interval: int = 200
    keep_checkpoints: int = 2

    # ---- teacher ----
    teacher: str = field(default="", metadata={"help": "the frozen teacher's checkpoint directory (ours or a local "
                                                       "Hugging Face one); required. It must share the student's "
                                                       "tokenizer and vocab_size"})
    # ---- objective: loss = alpha * CE + (1 - alpha) * T^2 * D_T ----
    distill_loss: str = field(default="forward_kl", metadata={
        "help": "D: forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), jsd = generalised "
                "Jensen-Shannon with --jsd_beta", "choices": list(DISTILL_LOSSES)})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalised JSD, in [0, 1] (0 = forward KL, "
                                                           "1 = reverse KL)"})
    distill_temperature: float = field(default=1.0, metadata={"help": "T: both heads' logits are divided by it "
                                                                      "inside D; D is weighted by T^2 (Hinton), "
                                                                      "so at T = 2 it is 4x TRL's GKD term, which "
                                                                      "has no T^2"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the cross-entropy on the data's tokens; the "
                                                        "divergence gets 1 - alpha (1 = plain fine-tuning, 0 = the "
                                                        "divergence alone, as TRL's GKD)"})
    token_normalization: str = field(default="global", metadata={
        "help": "global: CE and divergence are each summed over their tokens and divided by their token count over "
                "the whole step, all micro-batches and ranks (every token weighs the same, as TRL's GKD); "
                "micro_batch: each micro-batch's token means, averaged over micro-batches and ranks",
        "choices": list(TOKEN_NORMALIZATIONS)})
    # ---- data (and --data_config / --data_path, shared) ----
    data_phase: str = field(default="sft", metadata={
        "help": "sft: chat data, targets = assistant tokens; pretrain: packed text, every token a target",
        "choices": ["sft", "pretrain"]})
    # ---- on-policy (GKD) ----
    lmbda: float = field(default=0.0, metadata={"help": "fraction of micro-batches whose completions the student "
                                                        "samples (0 = off-policy only, 1 = on-policy only); needs "
                                                        "--data_phase sft"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest sampled completion (on-policy batches and "
                                                              "teacher generations)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of those completions (0 = "
                                                              "greedy)"})
    # ---- reasoning distillation: SFT on the teacher's checked answers ----
    from_teacher_generations: bool = field(default=False, metadata={
        "help": "train on the teacher's answers to the rlaif prompts (--data_config/--data_path then name the "
                "prompts) that the task checkers accept"})
    num_teacher_samples: int = field(default=4, metadata={"help": "answers the teacher samples per prompt"})
    max_prompts: int = field(default=0, metadata={"help": "answer only the first N prompts; 0 = all"})
    max_prompt_length: int = field(default=192, metadata={"help": "longer prompts are dropped (and counted)"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences the teacher generates together"})
    generations_out: str = field(default="", metadata={"help": "directory for generations.jsonl and "
                                                               "generations_manifest.json; empty = --out_dir"})
    # ---- samples ----
    sample_prompts: str = field(default="What is 12 + 7?|What is 3 * 4 - 5?", metadata={
        "help": "prompts, separated by |, answered at each evaluation (user turns with --data_phase sft); empty = "
                "none"})
    sample_tokens: int = field(default=48, metadata={"help": "new tokens per sample answer"})

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise FlagError("teacher", "is required: the frozen checkpoint to distill from (e.g. --teacher "
                                       "out/pipeline/sft/final, made by `python trainer/pipeline.py --stages "
                                       "pretrain,sft`)")
        for name in ("alpha", "jsd_beta", "lmbda"):
            if not 0 <= getattr(self, name) <= 1:
                raise FlagError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise FlagError("distill_temperature", f"must be positive, got {self.distill_temperature}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise FlagError("temperature", f"must not be negative, got {self.temperature}")
        for name, low in (("max_new_tokens", 1), ("num_teacher_samples", 1), ("max_prompts", 0),
                          ("max_prompt_length", 1), ("generation_batch_size", 1), ("sample_tokens", 1)):
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        if self.lmbda > 0 and self.data_phase != "sft":
            raise FlagError("lmbda", "needs --data_phase sft: on-policy batches complete the conversations' prompts")
        if self.from_teacher_generations and self.data_phase != "sft":
            raise FlagError("from_teacher_generations", "needs --data_phase sft: the teacher's answers are chat rows")
        if self.from_teacher_generations and self.num_teacher_samples > 1 and self.temperature == 0:
            raise FlagError("num_teacher_samples", f"{self.num_teacher_samples} needs --temperature > 0 (greedy "
                                                   f"decoding gives every sample the same answer)")


# =============================================================================================================
# The math: pure functions on tensors (tests/test_distill.py checks each against its formula)
# =============================================================================================================

def distill_beta(distill_loss: str, jsd_beta: float) -> float:
    """The kernel's beta for a --distill_loss: forward KL is beta 0, reverse KL beta 1 (kernels/kl.py)."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": jsd_beta}[distill_loss]


def divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_weight: torch.Tensor, mask: torch.Tensor, distill_loss: str, jsd_beta: float,
               temperature: float) -> torch.Tensor:
    """D_T: the mean over rows where mask is true of the divergence between softmax(teacher_hidden @ teacher_weight.T
    / T) and softmax(student_hidden @ student_weight.T / T). hidden [N, H] / [N, Ht], weights [V, H] / [V, Ht],
    mask [N]. Chunked through kernels.fused_linear_kl: no [N, V] tensor; gradients reach the student only."""
    # The generalised JSD (Agarwal et al. 2023) tends to 0 at its endpoints, as beta * KL(P || Q) near beta = 0 and
    # as (1 - beta) * KL(Q || P) near 1; as TRL's GKD and Liger-Kernel, beta = 0 is taken as forward KL and 1 as
    # reverse KL.
    return fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                           temperature=temperature, beta=distill_beta(distill_loss, jsd_beta))


def objective(ce: torch.Tensor, div: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * D_T (Hinton et al. 2015)."""
    # The soft targets' gradient shrinks as 1 / T^2; T^2 keeps it on the CE's scale as T changes (Hinton et al.
    # section 2). TRL's GKD has no such factor: at T = 2 the divergence weighs 4x what it weighs there.
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * div


def token_weights(ce_tokens: float, div_tokens: float, normalization: str, ce_total: float, div_total: float,
                  accumulation_steps: int, world_size: int) -> tuple[float, float]:
    """(w_ce, w_div): what a micro-batch's CE and divergence token means are multiplied by before the backward, so
    that the gradient summed over the A micro-steps and averaged over the W ranks (DDP) is that of

        global       each term's token mean over the whole step: mean * its tokens * W / its tokens in all ranks
        micro_batch  the mean over micro-batches and ranks of each micro-batch's token means: 1 / A
    (a token mean times its count is the micro-batch's sum, so the kernels' means serve both)."""
    if normalization == "global":
        return ce_tokens * world_size / max(ce_total, 1.0), div_tokens * world_size / max(div_total, 1.0)
    if normalization == "micro_batch":
        return 1.0 / accumulation_steps, 1.0 / accumulation_steps
    raise ValueError(f"unknown token normalization {normalization!r}")


@torch.no_grad()
def token_agreement(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(target rows where the student's and the teacher's most likely tokens agree, target rows)."""
    rows = mask.bool()
    student = fused_linear_argmax(student_hidden.detach()[rows], student_weight.detach())     # [n]
    teacher = fused_linear_argmax(teacher_hidden.detach()[rows], teacher_weight.detach())     # [n]
    return int((student == teacher).sum()), int(rows.sum())


# =============================================================================================================
# Models: the student's build settings and the frozen teacher
# =============================================================================================================

def student_settings(cfg: DistillConfig, teacher_vocab_size: int) -> DistillConfig:
    """The config build_model gets: a fresh student takes the teacher's tokenizer and vocab_size unless the user gave
    --tokenizer / --vocab_size (a checkpoint student keeps its own)."""
    if cfg.init_from:
        return cfg
    teacher_tokenizer = os.path.join(cfg.teacher, "tokenizer.json")
    tokenizer = cfg.tokenizer or (cfg.teacher if os.path.isfile(teacher_tokenizer)
                                  else configuration.DEFAULT_TOKENIZER_DIR)
    return dataclasses.replace(cfg, tokenizer=tokenizer,
                               model_overrides={"vocab_size": teacher_vocab_size, **cfg.model_overrides})


def load_teacher(cfg: DistillConfig, student, tokenizer, device: torch.device, dtype: torch.dtype):
    """The frozen teacher in eval mode, held in the run's compute dtype; ConfigError when it cannot read the student's
    token ids (another tokenizer or vocab_size) or sequences of the run's length."""
    modeling.check_same_tokenizer(cfg.teacher, tokenizer, "teacher")
    config = load_model_config(cfg.teacher)
    if config.vocab_size != student.config.vocab_size:
        raise ConfigError(f"--teacher {cfg.teacher}: vocab_size {config.vocab_size} differs from the student's "
                          f"{student.config.vocab_size}; both heads must score the same tokens")
    student_longest = cfg.max_seq_len + (cfg.max_new_tokens if cfg.lmbda > 0 else 0)   # + on-policy completions
    teacher_longest = max(student_longest, cfg.max_prompt_length + cfg.max_new_tokens if
                          cfg.from_teacher_generations else 0)                          # + its own generations
    for name, limit, longest in (("--teacher", config.max_position_embeddings, teacher_longest),
                                 ("the student", student.config.max_position_embeddings, student_longest)):
        if longest > limit:
            raise ConfigError(f"{name}: max_position_embeddings {limit} is shorter than the run's longest sequence "
                              f"({longest} tokens: --max_seq_len or --max_prompt_length, plus --max_new_tokens "
                              f"when sampling)")
    teacher, _ = load_model(cfg.teacher, device, dtype=dtype, with_tokenizer=False)
    teacher.requires_grad_(False)
    return teacher.eval()


# =============================================================================================================
# The phases of a step: its micro-batches, then one forward and backward each
# =============================================================================================================

class MicroBatch(NamedTuple):
    indices: list[int]
    batch: dict                                # input_ids, labels, attention_mask (chat data): [B, T]
    ce_mask: torch.Tensor                      # [N]: the data's target tokens, the CE's (N = B * (T - 1))
    div_mask: torch.Tensor                     # the tokens D_T is taken over: ce_mask, or on-policy [N'] completions
    roll: sequences.Rollout | None = None      # the student's completions (on-policy extension)


class MicroResult(NamedTuple):
    loss: torch.Tensor                         # the micro-batch's weighted objective, detached
    ce: torch.Tensor                           # its CE token mean, detached
    div: torch.Tensor                          # its D_T token mean, detached
    student_hidden: torch.Tensor               # [N, H] ([N', H] on-policy): the predicting states D_T read
    teacher_hidden: torch.Tensor               # [N, Ht] ([N', Ht]); the agreement reads both at log steps


def load_micro_batches(step: int, sampler, train_set, collate, cfg: DistillConfig, device: torch.device,
                       on_policy=None) -> list[MicroBatch]:
    """The step's micro-batches and their target masks, all loaded before the first forward pass: their token counts
    over the whole step (all ranks) normalise every micro-batch's terms (--token_normalization global). on_policy
    (the extension below) gives the student's completions for the micro-batches it picks."""
    micros = []
    for micro, indices in enumerate(sampler.next_step()):
        batch = batches.load_batch(train_set, indices, device, collate)                  # input_ids, labels: [B, T]
        ce_mask = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1)                   # [N]
        roll = on_policy(step * cfg.accumulation_steps + micro, indices) if on_policy else None
        div_mask = ce_mask if roll is None else roll.completion_mask.reshape(-1) > 0      # [N] or [N']
        micros.append(MicroBatch(indices, batch, ce_mask, div_mask, roll))
    return micros


def predicting(hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H] final hidden states -> [B*(T-1), H]: the positions that predict a next token (t predicts t + 1)."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


@torch.no_grad()
def teacher_states(teacher, inputs: dict) -> torch.Tensor:
    """The frozen teacher's predicting hidden states [B*(T-1), Ht] of the same inputs (no logits, no graph)."""
    return predicting(teacher(**inputs, compute_logits=False).hidden_states)


def ce_and_aux(out, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, weighted MoE load-balancing term) of a forward pass with labels, whose loss is their sum (with
    gradient: the CE is normalised by tokens, the balancing term per micro-batch)."""
    if out.aux_loss is None:
        return out.loss, torch.zeros_like(out.loss)
    aux = model.config.router_aux_loss_coef * out.aux_loss
    return out.loss - aux, aux


def distill_micro_step(m: MicroBatch, w_ce: float, w_div: float, train_model, model, teacher, scaler, amp,
                       cfg: DistillConfig, last_micro: bool) -> MicroResult:
    """One micro-batch of the data: one student forward gives the CE and the hidden states D_T reads; backward of
    alpha w_ce CE + (1 - alpha) T^2 w_div D_T (+ an MoE student's balancing term)."""
    inputs = {k: v for k, v in m.batch.items() if k != "labels"}
    with optim.sync_gradients(train_model, last_micro_step=last_micro):
        with amp:
            out = train_model(**m.batch)
            student_hidden, teacher_hidden = predicting(out.hidden_states), teacher_states(teacher, inputs)
            div = divergence(student_hidden, model.lm_head.weight, teacher_hidden, teacher.lm_head.weight, m.div_mask,
                             cfg.distill_loss, cfg.jsd_beta, cfg.distill_temperature)
        ce, aux = ce_and_aux(out, model)
        loss = objective(w_ce * ce, w_div * div, cfg.alpha, cfg.distill_temperature) + aux / cfg.accumulation_steps
        scaler.scale(loss).backward()
    return MicroResult(loss.detach(), ce.detach(), div.detach(), student_hidden, teacher_hidden)


def tokens_read(m: MicroBatch, train_set) -> int:
    """The real (unpadded) tokens of a micro-batch's sequences, counted on the host (plus its on-policy ones)."""
    data = sum(train_set.lengths[i] for i in m.indices) if isinstance(train_set, ChatDataset) \
        else m.batch["input_ids"].numel()
    return data + (0 if m.roll is None else int(m.roll.attention_mask.sum()))


# =============================================================================================================
# Evaluation: the divergence and agreement on the validation batches evaluate_loss reads
# =============================================================================================================

@torch.no_grad()
def evaluate_distill(student, teacher, dataset, cfg: DistillConfig, dist, amp, collate) -> dict[str, float]:
    """{"distill": mean over batches of D_T, "agreement": over all target tokens} on the first --eval_batches
    validation batches (batch b on rank b % world_size, sums all-reduced), as evaluation.evaluate_loss reads them."""
    raw = unwrap(student)
    was_training = raw.training
    raw.eval()
    starts = list(range(0, min(len(dataset), cfg.eval_batches * cfg.batch_size), cfg.batch_size))
    totals = torch.zeros(4, device=dist.device, dtype=torch.float64)   # [sum of D_T, batches, agreeing, targets]
    with sharding.full_weights(raw):                    # under FSDP: the ranks run different numbers of batches
        for b in range(dist.rank, len(starts), dist.world_size):
            indices = list(range(starts[b], min(starts[b] + cfg.batch_size, len(dataset))))
            batch = batches.load_batch(dataset, indices, dist.device, collate)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1)                      # [B*(T-1)]
            with amp:
                student_hidden = predicting(raw(**inputs, compute_logits=False).hidden_states)
                teacher_hidden = teacher_states(teacher, inputs)
                div = divergence(student_hidden, raw.lm_head.weight, teacher_hidden, teacher.lm_head.weight, mask,
                                 cfg.distill_loss, cfg.jsd_beta, cfg.distill_temperature)
                agree, targets = token_agreement(student_hidden, raw.lm_head.weight, teacher_hidden,
                                                 teacher.lm_head.weight, mask)
            totals += torch.tensor([div.item(), 1.0, agree, targets], device=dist.device, dtype=torch.float64)
    if distributed.is_distributed():
        torch.distributed.all_reduce(totals)
    raw.train(was_training)
    return {"distill": (totals[0] / totals[1].clamp(min=1)).item(),
            "agreement": (totals[2] / totals[3].clamp(min=1)).item()}


# =============================================================================================================
# Training
# =============================================================================================================

def train(cfg: DistillConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)
    try:
        check_model_dir(cfg.teacher)
    except ConfigError as e:
        raise ConfigError(f"--teacher {e}") from None

    # ---- models: the student, then the frozen teacher that must read its token ids ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(student_settings(cfg, load_model_config(cfg.teacher).vocab_size),
                                            dist.device)
    dtype = optim.resolve_dtype(cfg.dtype, dist.device)
    amp = optim.autocast_context(dist.device, dtype)
    teacher = load_teacher(cfg, model, tokenizer, dist.device, dtype)
    print0(f"student: {model.num_parameters():,} parameters, "
           + (f"from {cfg.init_from}" if cfg.init_from else f"fresh {cfg.model_config}")
           + f"; teacher: {teacher.num_parameters():,} parameters, from {cfg.teacher} (frozen)")
    print0(f"objective: {cfg.alpha:g} * CE + {1 - cfg.alpha:g} * {cfg.distill_temperature:g}^2 * "
           f"{cfg.distill_loss}{f'(beta {cfg.jsd_beta:g})' if cfg.distill_loss == 'jsd' else ''} at temperature "
           f"{cfg.distill_temperature:g}; on-policy fraction {cfg.lmbda:g}")

    # ---- data: chat conversations (labels -100 outside assistant turns) or packed text ----
    if cfg.from_teacher_generations:
        data = generations.generations_data(cfg, teacher, tokenizer, dist, amp)    # the teacher's checked answers
    else:
        data = batches.prepare_phase_data(cfg.data_phase, cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    if cfg.data_phase == "sft":
        train_set = ChatDataset(data.train_file, tokenizer, cfg.max_seq_len)
        val_set = ChatDataset(data.val_file, tokenizer, cfg.max_seq_len) if data.val_file else None
        collate = partial(collate_chat, pad_id=tokenizer.pad_id)
        print0(f"train: {train_set.describe()}")
    else:
        train_set, val_set = batches.load_packed_data(data, tokenizer, cfg.max_seq_len, dist)
        collate = batches.collate_samples
        print0(f"train: {len(train_set):,} sequences of {cfg.max_seq_len} tokens")
    sampler = batches.GlobalBatchSampler(len(train_set), cfg.batch_size, cfg.accumulation_steps, dist.world_size,
                                         dist.rank, cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch

    # ---- optimisation ----
    optimizer = optim.build_optimizer(model, cfg, dist.device)
    scaler = optim.make_grad_scaler(dist.device, dtype)
    distributed.seed_everything(cfg.seed + dist.rank)          # each rank samples its own on-policy completions
    start_step, wandb_run_id = 0, None
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    # training FLOPs of the student plus the teacher's forward pass (a third of its training FLOPs)
    flops = reporting.flops_per_token(model, cfg.max_seq_len) + reporting.flops_per_token(teacher, cfg.max_seq_len) / 3
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, flops, wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} sequences of at most {cfg.max_seq_len} tokens "
           f"({sampler.steps_per_epoch:,} steps/epoch), {dist.world_size} rank(s), "
           f"{str(dtype).replace('torch.', '')} on {dist.device}")
    prompts = [p for p in cfg.sample_prompts.split("|") if p]
    accum, teacher_head = cfg.accumulation_steps, teacher.lm_head.weight
    on_policy = on_policy_sampler(train_model, train_set, tokenizer, cfg, amp) if cfg.lmbda > 0 else None

    # ---- loop: evaluate, save, stop or take one step ----
    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                metrics = {} if val_set is None else {
                    "loss": evaluation.evaluate_loss(train_model, val_set, cfg.batch_size, cfg.eval_batches, dist, amp,
                                                     collate),
                    **evaluate_distill(train_model, teacher, val_set, cfg, dist, amp, collate)}
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
                if prompts:
                    evaluation.print_samples(train_model, tokenizer, prompts, cfg.sample_tokens, cfg.seed, amp,
                                             chat=cfg.data_phase == "sft", dist=dist)
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                ranks = distributed.check_replicas(train_model, dist)  # the head's gradient comes through the kernel
                if ranks > 1:
                    print0(f"replicas: parameters identical on {ranks} ranks")
                checkpointing.save_training_checkpoint(
                    cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger, "distill",
                    final=last_step, metadata={"data": data.summary, "init_from": cfg.init_from,
                                               "teacher": cfg.teacher})
        if last_step:
            break

        log_step = (step + 1) % cfg.log_interval == 0 or step + 1 == max_steps
        micros = load_micro_batches(step, sampler, train_set, collate, cfg, dist.device, on_policy)
        ce_total = sequences.step_token_count([m.ce_mask for m in micros], dist.device)
        div_total = sequences.step_token_count([m.div_mask for m in micros], dist.device)
        counts = torch.stack([torch.stack([m.ce_mask.sum(), m.div_mask.sum()]) for m in micros]).tolist()  # one sync
        sums = torch.zeros(3, dtype=torch.float64, device=dist.device)     # the step's loss, CE and D_T, summed
        agreement = [0, 0]                                                  # agreeing target tokens, target tokens
        # the student's head for the agreement, read after a backward, when FSDP has cut it into shards again:
        # gathered whole at log steps (under DDP it is the weight itself)
        student_head = sharding.full_tensor(model.lm_head.weight.detach()) if log_step else None
        for micro, (m, (ce_tokens, div_tokens)) in enumerate(zip(micros, counts)):
            w_ce, w_div = token_weights(ce_tokens, div_tokens, cfg.token_normalization, ce_total, div_total, accum,
                                        dist.world_size)
            micro_step = distill_micro_step if m.roll is None else on_policy_micro_step
            r = micro_step(m, w_ce, w_div, train_model, model, teacher, scaler, amp, cfg, last_micro=micro == accum - 1)
            sums += torch.stack([r.loss.double(), w_ce * r.ce.double(), w_div * r.div.double()])
            if log_step:
                agree, targets = token_agreement(r.student_hidden, student_head, r.teacher_hidden, teacher_head,
                                                 m.div_mask)
                agreement = [agreement[0] + agree, agreement[1] + targets]
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        # tokens/s counts this rank's real (unpadded) tokens times the number of ranks: an estimate, without a sync
        logger.tick(tokens=sum(tokens_read(m, train_set) for m in micros) * dist.world_size,
                    samples=sampler.global_batch)
        if log_step:
            loss, ce, div = sums.tolist()
            metrics = {"loss": loss, "loss/ce": ce, "loss/distill": div,
                       "distill/agreement": agreement[0] / max(agreement[1], 1),
                       "distill/on_policy": sum(m.roll is not None for m in micros) / accum}
            if cfg.lmbda > 0:
                metrics["completions/mean_length"] = completion_mean_length(micros, counts)
            metrics = distributed.mean_over_ranks(metrics, dist.device)
            logger.log_train(step, loss=metrics.pop("loss"), lr=lr, grad_norm=grad_norm.item(),
                             epoch=sampler.epoch_progress, show=("loss/ce", "loss/distill", "distill/agreement"),
                             **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


# =============================================================================================================
# === Extension: on-policy micro-batches (GKD, --lmbda > 0) ===
# =============================================================================================================

def is_on_policy(k: int, lmbda: float) -> bool:
    """Whether micro-batch k (0, 1, 2, ... over the whole run) is sampled by the student: the first n micro-batches
    hold exactly floor(n * lmbda) on-policy ones, whatever n, and the choice depends on k alone (resume, ranks)."""
    return math.floor((k + 1) * lmbda + 1e-9) > math.floor(k * lmbda + 1e-9)


def last_answer_start(labels: list[int]) -> int:
    """Position of the first token of the last assistant turn (the last run of targets) of a conversation's labels:
    the ids before it are the prompt the student completes on an on-policy batch."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def on_policy_sampler(train_model, train_set: ChatDataset, tokenizer, cfg: DistillConfig, amp):
    """sample(k, indices): the student's completions (sequences.rollout) of the conversations' last prompts when
    micro-batch k is on-policy, else None."""
    prompt_ids = [ids[:last_answer_start(labels)] for ids, labels in train_set.conversations]

    def sample(k: int, indices: list[int]) -> sequences.Rollout | None:
        if not is_on_policy(k, cfg.lmbda):
            return None
        with amp:
            return sequences.rollout(train_model, [prompt_ids[i] for i in indices], cfg.max_new_tokens,
                                     cfg.temperature, tokenizer.eos_id, tokenizer.pad_id)
    return sample


def on_policy_micro_step(m: MicroBatch, w_ce: float, w_div: float, train_model, model, teacher, scaler, amp,
                         cfg: DistillConfig, last_micro: bool) -> MicroResult:
    """D_T over the student's own completion tokens; the CE stays on the data's answers, in a forward and backward
    pass of its own (no backward when alpha = 0)."""
    accum = cfg.accumulation_steps
    with optim.sync_gradients(train_model, last_micro_step=False), \
            (nullcontext() if cfg.alpha > 0 else torch.no_grad()):
        with amp:
            out = train_model(**m.batch)
        ce, aux = ce_and_aux(out, model)
        if cfg.alpha > 0:
            scaler.scale(cfg.alpha * w_ce * ce + aux / accum).backward()
    sampled_inputs = {"input_ids": m.roll.input_ids, "attention_mask": m.roll.attention_mask}
    with optim.sync_gradients(train_model, last_micro_step=last_micro):
        with amp:
            sampled = train_model(**sampled_inputs, compute_logits=False)
            student_hidden = predicting(sampled.hidden_states)
            teacher_hidden = teacher_states(teacher, sampled_inputs)
            div = divergence(student_hidden, model.lm_head.weight, teacher_hidden, teacher.lm_head.weight, m.div_mask,
                             cfg.distill_loss, cfg.jsd_beta, cfg.distill_temperature)
        loss = objective(torch.zeros_like(div), w_div * div, cfg.alpha, cfg.distill_temperature)
        if sampled.aux_loss is not None:       # an MoE student keeps balancing its experts
            loss = loss + model.config.router_aux_loss_coef * sampled.aux_loss / accum
        scaler.scale(loss).backward()
    loss = loss.detach() + cfg.alpha * w_ce * ce.detach() + aux.detach() / accum
    return MicroResult(loss, ce.detach(), div.detach(), student_hidden, teacher_hidden)


def completion_mean_length(micros: list[MicroBatch], counts: list[list[int]]) -> float:
    """The mean length of the step's on-policy completions (their D_T target counts over their sequences)."""
    on_policy = [(m, div_tokens) for m, (_, div_tokens) in zip(micros, counts) if m.roll is not None]
    return sum(n for _, n in on_policy) / max(sum(len(m.indices) for m, _ in on_policy), 1)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DistillConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
