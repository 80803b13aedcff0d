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
             --from_teacher_generations: see "reasoning distillation" below.
  objective  over the target tokens of the whole step, all micro-batches and ranks (--token_normalization
             global, as TRL's GKD; micro_batch: each micro-batch's token means, averaged) (Hinton et al. 2015,
             "Distilling the Knowledge in a Neural Network", arXiv 1503.02531):

                 loss = alpha * CE + (1 - alpha) * T^2 * D_T(teacher, student)

             CE is the student's cross-entropy on the data's tokens at temperature 1; D_T the divergence between
             P = softmax(teacher logits / T) and Q = softmax(student logits / T), mean over target tokens:
                 forward_kl   KL(P || Q)                        mode-covering (Hinton's soft targets)
                 reverse_kl   KL(Q || P)                        mode-seeking (MiniLLM, Gu et al. 2023)
                 jsd          beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q   (--jsd_beta)
             The generalised JSD's endpoints follow TRL's GKD and Liger-Kernel: beta = 0 is taken as forward KL and
             beta = 1 as reverse KL (the formula itself tends to 0 there, as beta * KL(P || Q) near 0 and as
             (1 - beta) * KL(Q || P) near 1). The T^2 factor keeps the soft targets' gradient on the scale of the
             CE's as T changes (Hinton et al. section 2); TRL's GKD has no such factor, so at T = 2 D weighs 4x
             what it weighs there. alpha = 1 is plain fine-tuning, alpha = 0 pure distillation. Both heads go
             through kernels.fused_linear_kl on the final hidden states (the models run with compute_logits=False):
             neither [N, V] logits tensor is ever held whole.
  on-policy  --lmbda: the fraction of micro-batches whose sequences the student samples itself (generalised knowledge
             distillation, Agarwal et al. 2023, arXiv 2306.13649). Micro-batch k (counted over the whole run) is
             on-policy when floor((k + 1) lmbda) > floor(k lmbda), so the fraction is exact and a resumed run makes
             the same choices. For such a batch the student completes each conversation's last user turn
             (sequences.rollout, --max_new_tokens, --temperature) and D_T is taken over its completion tokens; the CE
             term stays the CE of the data's own answers (its own forward and backward pass, skipped when alpha = 0).
  reasoning  --from_teacher_generations: before training, the teacher answers the rlaif prompts (config/data/rlaif/,
             or --data_config / --data_path; rows carrying "task" and "answer", as the embedded rlaif.jsonl does)
             --num_teacher_samples times each at --temperature; the task checkers (eval/tasks score_row, the
             exact_answer reward) keep the finished, correct, distinct answers. They are written as chat rows
             {"messages": [..., {"role": "assistant", ...}], "task", "id"} to OUT_DIR/generations.jsonl (or
             --generations_out DIR) with generations_manifest.json (teacher, sampling, counts per task, sha256), a
             file train_sft.py --data_path reads as it is. The student then trains on them as on chat data: --alpha 1
             is the SFT loss alone (DeepSeek-R1's distilled models); a smaller alpha adds the teacher's logits. A
             resumed run reuses the file.
  metrics    train: loss (the objective), loss/ce, loss/distill (D_T, without the T^2 factor), distill/agreement
             (fraction of target tokens where argmax student == argmax teacher, computed at log steps only, by a
             chunked argmax that never holds [N, V]), distill/on_policy (fraction of micro-batches), and for on-policy
             batches completions/mean_length. eval: loss (the student's CE, evaluation.evaluate_loss), distill and
             agreement on the same validation batches, task accuracy (--eval_tasks), sample answers.
  save       OUT_DIR/step_XXXXXX/ (Hugging Face layout + resume state), OUT_DIR/final, OUT_DIR/metrics.jsonl.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from minitrain.dataset.chat import IGNORE_INDEX, ChatDataset, collate_chat
from minitrain.dataset.files import write_atomic
from minitrain.dataset.jsonl import DataError
from minitrain.dataset.mixer import format_summary, load_prepared, prepare_mixture, resolve_mixture
from minitrain.dataset.prompts import PromptDataset
from minitrain.kernels import fused_linear_kl
from minitrain.kernels.backend import chunk_rows
from minitrain.model.checkpoint import check_model_dir, load_model
from minitrain.model.config import ConfigError, load_model_config
from minitrain.model.transformer import unwrap
from minitrain.trainer import (batches, checkpointing, configuration, distributed, evaluation, modeling, optim,
                               reporting, sequences)
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")
TOKEN_NORMALIZATIONS = ("global", "micro_batch")
GENERATIONS_FILE = "generations.jsonl"
GENERATIONS_MANIFEST = "generations_manifest.json"


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
    return fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                           temperature=temperature, beta=distill_beta(distill_loss, jsd_beta))


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


def objective(ce: torch.Tensor, div: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * D_T (Hinton et al. 2015)."""
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * div


@torch.no_grad()
def head_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax_v (hidden @ weight.T)[:, v] for hidden [N, H], weight [V, H]: [N] long, a chunk of rows at a time
    (the fused kernels' memory budget, KERNELS_CHUNK_MB), so the [N, V] logits are never held whole."""
    N, V = hidden.shape[0], weight.shape[0]
    out = torch.empty(N, dtype=torch.long, device=hidden.device)
    rows = chunk_rows(N, V, 4) if N else 1
    for start in range(0, N, rows):
        out[start:start + rows] = (hidden[start:start + rows].to(weight.dtype) @ weight.T).argmax(dim=-1)  # [C]
    return out


@torch.no_grad()
def token_agreement(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(target rows where the student's and the teacher's most likely tokens agree, target rows)."""
    rows = mask.bool()
    student = head_argmax(student_hidden.detach()[rows], student_weight.detach())
    teacher = head_argmax(teacher_hidden.detach()[rows], teacher_weight.detach())
    return int((student == teacher).sum()), int(rows.sum())


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


# =============================================================================================================
# Models: the student's build settings and the frozen teacher
# =============================================================================================================

def student_settings(cfg: DistillConfig, teacher_vocab_size: int) -> DistillConfig:
    """The config build_model gets: a fresh student takes the teacher's tokenizer and vocab_size unless the user gave
    --tokenizer / --vocab_size (a checkpoint student keeps its own)."""
    if cfg.init_from:
        return cfg
    teacher_tokenizer = os.path.join(cfg.teacher, "tokenizer.json")
    tokenizer = cfg.tokenizer or (cfg.teacher if os.path.isfile(teacher_tokenizer) else configuration.DEFAULT_TOKENIZER_DIR)
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
# Reasoning distillation: the teacher's checked answers as chat rows
# =============================================================================================================

def teacher_answers(teacher, prompts: PromptDataset, indices: list[int], tokenizer, cfg: DistillConfig, amp,
                    generator: torch.Generator) -> list[dict]:
    """One record per prompt of `indices`: its k sampled answers, whether each stopped at EOS, and each one's score
    under the task checker (rewards.exact_answer: eval.tasks.score_row of the prompt row)."""
    from minitrain.trainer.rewards import RewardError, exact_answer
    k = cfg.num_teacher_samples
    jobs = [i for i in indices for _ in range(k)]                       # each prompt k times, side by side
    answers, finished = [], []
    for start in range(0, len(jobs), cfg.generation_batch_size):
        chunk = jobs[start:start + cfg.generation_batch_size]
        with amp:
            out = sequences.rollout(teacher, [prompts.ids[i] for i in chunk], cfg.max_new_tokens, cfg.temperature,
                          tokenizer.eos_id, tokenizer.pad_id, generator=generator)
        answers += [tokenizer.decode(c) for c in out.completions]
        finished += out.finished.tolist()
    try:
        scores = exact_answer([prompts.text(i) for i in jobs], answers, **prompts.columns(jobs)) if jobs else []
    except (RewardError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--from_teacher_generations: the prompt rows must carry what the task checkers read "
                        f"(task, answer, meta), as the embedded rlaif.jsonl does ({e})") from None
    return [{"i": i, "answers": answers[n * k:(n + 1) * k], "finished": finished[n * k:(n + 1) * k],
             "scores": scores[n * k:(n + 1) * k]} for n, i in enumerate(indices)]


def write_generations(records: list[dict], prompts: PromptDataset, cfg: DistillConfig, directory: str,
                      prompt_summary: dict, seconds: float) -> dict:
    """Keep each prompt's finished, correct, distinct answers as chat rows; write generations.jsonl and its manifest
    (atomically); return the manifest."""
    rows, per_task = [], {}
    counts = {"prompts": len(records), "prompts_dropped_too_long": prompts.dropped, "generated": 0, "unfinished": 0,
              "incorrect": 0, "duplicates": 0, "kept": 0}
    for record in records:
        row = prompts[record["i"]]
        task = per_task.setdefault(str(row.get("task")), {"prompts": 0, "generated": 0, "kept": 0})
        task["prompts"] += 1
        seen = set()
        for answer, done, score in zip(record["answers"], record["finished"], record["scores"]):
            counts["generated"] += 1
            task["generated"] += 1
            if not done:
                counts["unfinished"] += 1
            elif score != 1.0:
                counts["incorrect"] += 1
            elif answer in seen:
                counts["duplicates"] += 1
            else:
                seen.add(answer)
                rows.append({"messages": row["messages"] + [{"role": "assistant", "content": answer}],
                             "task": row.get("task"), "id": row["id"]})
                task["kept"] += 1
    counts["kept"] = len(rows)
    os.makedirs(directory, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    write_atomic(os.path.join(directory, GENERATIONS_FILE), body)
    manifest = {
        "teacher": os.path.realpath(cfg.teacher), "prompts_from": prompt_summary.get("mixture"),
        "samples_per_prompt": cfg.num_teacher_samples,
        "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
                     "max_prompt_length": cfg.max_prompt_length, "max_prompts": cfg.max_prompts, "seed": cfg.seed},
        "filter": "finished at <|im_end|>, accepted by the task checker (eval.tasks.score_row), distinct per prompt",
        "counts": counts, "per_task": per_task, "seconds": seconds,
        "file": GENERATIONS_FILE, "sha256": hashlib.sha256(body).hexdigest(),
    }
    write_atomic(os.path.join(directory, GENERATIONS_MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def generations_data(cfg: DistillConfig, teacher, tokenizer, dist, amp):
    """The PreparedData of the teacher's checked answers: generated (all ranks share the prompts, rank 0 writes) or,
    on --resume, the file the run already wrote."""
    directory = cfg.generations_out or cfg.out_dir
    path = os.path.join(directory, GENERATIONS_FILE)
    if cfg.resume and os.path.isfile(path) and os.path.isfile(os.path.join(directory, GENERATIONS_MANIFEST)):
        print0(f"teacher generations: reusing {path}")
    else:
        data = batches.prepare_phase_data("rlaif", cfg, tokenizer, dist)
        print0(format_summary(data.summary))
        prompts = PromptDataset(data.train_file, tokenizer, cfg.max_prompt_length)
        total = min(len(prompts), cfg.max_prompts) if cfg.max_prompts else len(prompts)
        print0(f"teacher generations: {cfg.num_teacher_samples} answers to each of {total:,} prompts "
               f"({prompts.describe()})")
        started = time.time()
        generator = torch.Generator(dist.device).manual_seed(cfg.seed + dist.rank)
        records = teacher_answers(teacher, prompts, list(range(dist.rank, total, dist.world_size)), tokenizer, cfg,
                                  amp, generator)
        payload = torch.frombuffer(bytearray(json.dumps(records).encode()), dtype=torch.uint8)
        gathered = distributed.all_gather_bytes(payload, dist.device)   # every rank's records as JSON bytes (nothing pickled)
        if dist.is_main:
            records = sorted((r for chunk in gathered for r in json.loads(bytes(chunk.tolist()))),
                             key=lambda r: r["i"])
            manifest = write_generations(records, prompts, cfg, directory, data.summary, time.time() - started)
            c = manifest["counts"]
            print0(f"teacher generations: kept {c['kept']:,} of {c['generated']:,} answers ({c['incorrect']:,} "
                   f"wrong, {c['unfinished']:,} unfinished, {c['duplicates']:,} repeated); per task: "
                   + ", ".join(f"{name} {t['kept']}/{t['generated']}" for name, t in manifest["per_task"].items())
                   + f"; wrote {path}")
        distributed.barrier()
    with open(path) as f:
        if not any(line.strip() for line in f):
            raise DataError(f"--from_teacher_generations: none of the teacher's answers passed the checker (see "
                            f"{os.path.join(directory, GENERATIONS_MANIFEST)}); raise --num_teacher_samples or "
                            f"--max_new_tokens, or use a stronger teacher")
    mixture = resolve_mixture("sft", None, path, cfg.seed)
    distributed.on_main_rank(lambda: prepare_mixture(mixture, cfg.prepared_dir, tokenizer), dist)
    return load_prepared(mixture, cfg.prepared_dir)


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
    for b in range(dist.rank, len(starts), dist.world_size):
        batch = batches.load_batch(dataset, list(range(starts[b], min(starts[b] + cfg.batch_size, len(dataset)))),
                           dist.device, collate)
        with amp:
            student_hidden, teacher_hidden, mask = both_hidden(raw, teacher, batch)
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


def both_hidden(student, teacher, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's and the teacher's predicting hidden states, [N, H] and [N, Ht], and the target mask [N]
    (evaluation; training gets the student's from the same forward pass as its CE)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1)            # [B*(T-1)]
    return predicting(student(**inputs, compute_logits=False).hidden_states), teacher_states(teacher, inputs), mask


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
    model, tokenizer = modeling.build_model(student_settings(cfg, load_model_config(cfg.teacher).vocab_size), dist.device)
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
        data = generations_data(cfg, teacher, tokenizer, dist, amp)
    else:
        data = batches.prepare_phase_data(cfg.data_phase, cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    if cfg.data_phase == "sft":
        train_set = ChatDataset(data.train_file, tokenizer, cfg.max_seq_len)
        val_set = ChatDataset(data.val_file, tokenizer, cfg.max_seq_len) if data.val_file else None
        collate = partial(collate_chat, pad_id=tokenizer.pad_id)
        print0(f"train: {train_set.describe()}")
        # the prompt of each conversation's last answer, for on-policy batches
        prompt_ids = [ids[:last_answer_start(labels)] for ids, labels in train_set.conversations]
    else:
        train_set, val_set = batches.load_packed_data(data, tokenizer, cfg.max_seq_len, dist)
        collate = batches.collate_samples
        print0(f"train: {len(train_set):,} sequences of {cfg.max_seq_len} tokens")
    sampler = batches.GlobalBatchSampler(len(train_set), cfg.batch_size, cfg.accumulation_steps, dist.world_size, dist.rank,
                                 cfg.seed)
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
    train_model = modeling.wrap_model(model, cfg, dist)
    # training FLOPs of the student plus the teacher's forward pass (a third of its training FLOPs)
    flops = reporting.flops_per_token(model, cfg.max_seq_len) + reporting.flops_per_token(teacher, cfg.max_seq_len) / 3
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, flops, wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} sequences of at most {cfg.max_seq_len} tokens "
           f"({sampler.steps_per_epoch:,} steps/epoch), {dist.world_size} rank(s), "
           f"{str(dtype).replace('torch.', '')} on {dist.device}")
    prompts = [p for p in cfg.sample_prompts.split("|") if p]
    T, accum = cfg.distill_temperature, cfg.accumulation_steps
    kl = partial(divergence, distill_loss=cfg.distill_loss, jsd_beta=cfg.jsd_beta, temperature=T)
    student_head, teacher_head = model.lm_head.weight, teacher.lm_head.weight

    # ---- loop: evaluate, save, stop or take one step ----
    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                metrics = {} if val_set is None else {
                    "loss": evaluation.evaluate_loss(train_model, val_set, cfg.batch_size, cfg.eval_batches, dist, amp, collate),
                    **evaluate_distill(train_model, teacher, val_set, cfg, dist, amp, collate)}
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
                if dist.is_main and prompts:
                    evaluation.print_samples(train_model, tokenizer, prompts, cfg.sample_tokens, cfg.seed, amp,
                                  chat=cfg.data_phase == "sft")
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                ranks = distributed.check_replicas(train_model, dist)     # the head's gradient comes through the kernel, not DDP
                if ranks > 1:
                    print0(f"replicas: parameters identical on {ranks} ranks")
                checkpointing.save_training_checkpoint(cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger,
                                         "distill", final=last_step,
                                         metadata={"data": data.summary, "init_from": cfg.init_from,
                                                   "teacher": cfg.teacher})
        if last_step:
            break

        log_step = (step + 1) % cfg.log_interval == 0 or step + 1 == max_steps
        sums = {"loss": 0.0, "ce": 0.0, "distill": 0.0, "on_policy": 0.0, "agree": 0, "targets": 0,
                "completion_tokens": 0, "completions": 0}
        step_tokens = 0
        # the step's micro-batches and their on-policy completions first: the token counts of the whole step (all
        # ranks) normalise every micro-batch's loss (--token_normalization global)
        micros = []
        for micro, indices in enumerate(sampler.next_step()):
            batch = batches.load_batch(train_set, indices, dist.device, collate)  # input_ids, labels, ...: [B, T]
            ce_mask = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1)                     # [N]
            roll = None
            if is_on_policy(step * accum + micro, cfg.lmbda):
                with amp:
                    roll = sequences.rollout(train_model, [prompt_ids[i] for i in indices], cfg.max_new_tokens,
                                   cfg.temperature, tokenizer.eos_id, tokenizer.pad_id)
            div_mask = ce_mask if roll is None else roll.completion_mask.reshape(-1) > 0        # [N']
            micros.append((indices, batch, roll, ce_mask, div_mask))
        ce_total = sequences.step_token_count([m[3] for m in micros], dist.device)
        div_total = sequences.step_token_count([m[4] for m in micros], dist.device)
        for micro, (indices, batch, roll, ce_mask, mask) in enumerate(micros):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            last_micro = micro == accum - 1
            w_ce, w_div = token_weights(float(ce_mask.sum()), float(mask.sum()), cfg.token_normalization, ce_total,
                                        div_total, accum, dist.world_size)
            if roll is None:
                # off-policy: one student forward gives the CE and the hidden states the divergence reads
                with optim.sync_gradients(train_model, last_micro_step=last_micro):
                    with amp:
                        out = train_model(**batch)
                        student_hidden, teacher_hidden = predicting(out.hidden_states), teacher_states(teacher, inputs)
                        div = kl(student_hidden, student_head, teacher_hidden, teacher_head, mask)
                    ce, aux = ce_and_aux(out, model)
                    loss = objective(w_ce * ce, w_div * div, cfg.alpha, T) + aux / accum
                    scaler.scale(loss).backward()
            else:
                # on-policy: the divergence is taken over the student's completion tokens; the CE stays on the
                # data's answers, in a forward and backward pass of its own
                sums["on_policy"] += 1
                with optim.sync_gradients(train_model, last_micro_step=False), \
                        (nullcontext() if cfg.alpha > 0 else torch.no_grad()):
                    with amp:
                        out = train_model(**batch)
                    ce, aux = ce_and_aux(out, model)
                    if cfg.alpha > 0:
                        scaler.scale(cfg.alpha * w_ce * ce + aux / accum).backward()
                sampled_inputs = {"input_ids": roll.input_ids, "attention_mask": roll.attention_mask}
                with optim.sync_gradients(train_model, last_micro_step=last_micro):
                    with amp:
                        sampled = train_model(**sampled_inputs, compute_logits=False)
                        student_hidden = predicting(sampled.hidden_states)
                        teacher_hidden = teacher_states(teacher, sampled_inputs)
                        div = kl(student_hidden, student_head, teacher_hidden, teacher_head, mask)
                    loss = objective(torch.zeros_like(div), w_div * div, cfg.alpha, T)
                    if sampled.aux_loss is not None:       # an MoE student keeps balancing its experts
                        loss = loss + model.config.router_aux_loss_coef * sampled.aux_loss / accum
                    scaler.scale(loss).backward()
                loss = loss.detach() + cfg.alpha * w_ce * ce.detach() + aux.detach() / accum
                sums["completion_tokens"] += int(mask.sum())
                sums["completions"] += len(indices)
                step_tokens += int(roll.attention_mask.sum())
            # summed over the micro-steps and averaged over the ranks: the step's loss, CE and divergence
            sums["loss"] += float(loss.detach())
            sums["ce"] += w_ce * float(ce.detach())
            sums["distill"] += w_div * float(div.detach())
            if log_step:
                agree, targets = token_agreement(student_hidden, student_head, teacher_hidden, teacher_head, mask)
                sums["agree"] += agree
                sums["targets"] += targets
            step_tokens += int(batch["attention_mask"].ne(0).sum()) if "attention_mask" in batch \
                else batch["input_ids"].numel()
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        # tokens/s counts this rank's real (unpadded) tokens times the number of ranks: an estimate, without a sync
        logger.tick(tokens=step_tokens * dist.world_size, samples=sampler.global_batch)
        if log_step:
            metrics = {"loss": sums["loss"], "loss/ce": sums["ce"], "loss/distill": sums["distill"],
                       "distill/agreement": sums["agree"] / max(sums["targets"], 1),
                       "distill/on_policy": sums["on_policy"] / accum}
            if cfg.lmbda > 0:
                metrics["completions/mean_length"] = sums["completion_tokens"] / max(sums["completions"], 1)
            metrics = distributed.mean_over_ranks(metrics, dist.device)
            logger.log_train(step, loss=metrics.pop("loss"), lr=lr, grad_norm=grad_norm.item(),
                             epoch=sampler.epoch_progress, show=("loss/ce", "loss/distill", "distill/agreement"),
                             **metrics)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


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
