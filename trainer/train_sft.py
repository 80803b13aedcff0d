"""Supervised fine-tuning: a pretrained model learns to answer in the chat format, with the loss on its answers only.

Commands, from the repository root after `pip install -e .` (and a pretraining run in out/pretrain):

    # the tiny model on the embedded chat data, on CPU, in a few minutes
    python trainer/train_sft.py --init_from out/pretrain/final

    # one GPU: a checkpoint of your own (or a local Hugging Face Llama/Qwen directory), packed conversations
    python trainer/train_sft.py --init_from path/to/Qwen3-0.6B --device cuda --packing --max_seq_len 2048 \\
        --batch_size 8 --learning_rate 2e-5 --data_config config/data/sft/default.yaml --out_dir out/sft-qwen

    # 8 GPUs of one machine
    torchrun --standalone --nproc_per_node 8 trainer/train_sft.py --init_from out/midtrain-base/final \\
        --packing --max_seq_len 2048 --batch_size 8 --out_dir out/sft-base

    # the same with LoRA adapters instead of full fine-tuning (see also trainer/train_lora.py)
    python trainer/train_sft.py --init_from out/pretrain/final --lora_rank 16 --learning_rate 1e-3

    # learned decoding: temperature (and top-p) heads on the frozen SFT model, trained on goldilocks tokens
    python trainer/train_sft.py --init_from out/sft/final --out_dir out/sft-temp --train_temp --train_top_p \\
        --freeze_base --goldilocks_filter --learning_rate 1e-2 --max_steps 200

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it.

  arguments  SFTConfig: the flags every trainer shares (trainer/configuration.py), --packing and the sample prompts;
             then the learned-decoding flags (extension).
  data       the sft mixture (config/data/sft/, or --data_config / --data_path): rows of {"messages"},
             {"conversations"}, {"prompt", "response"} or Anthropic-HH text, checked and rewritten to {"messages"}
             (dataset/formats.py), then rendered with the chat template. labels = the token where it belongs to an
             assistant turn (its words and closing <|im_end|>), -100 elsewhere (dataset/chat.py): the loss is the mean
             cross-entropy over assistant tokens. Conversations longer than --max_seq_len are cut; those left with no
             assistant token are dropped and counted. --packing fills each sequence with several conversations that
             cannot see each other.
  model      the --init_from checkpoint (required); --lora_rank > 0 trains adapters on the frozen model instead.
  loop       as pretraining: accumulation, clipping, AdamW on a cosine schedule; every --eval_interval steps the
             validation loss, task accuracy (--eval_tasks, e.g. arithmetic) and sample answers.
  save       OUT_DIR/step_XXXXXX/ (Hugging Face layout, or PEFT adapters under LoRA, + resume state), OUT_DIR/final,
             OUT_DIR/metrics.jsonl.
  learned    (extension, the section after train()) --train_temp / --train_top_p attach learned-decoding heads
  decoding   (model/decoding_heads.py; restored from --init_from when it has them), trained with the language model
             or alone (--freeze_base) by the analytic min-p hinge on --heads_tokens tokens per micro-batch (bucketed
             with --goldilocks_filter); eval adds the mean predicted temperature on easy and hard tokens.
"""

from dataclasses import dataclass, field
from functools import partial

import torch

from minitrain.dataset.chat import ChatDataset, collate_chat
from minitrain.dataset.mixer import format_summary
from minitrain.model.checkpoint import HEADS_PREFIX, load_decoding_heads, save_decoding_heads
from minitrain.model.decoding_heads import (HeadsObjective, attach_decoding_heads, easy_hard_temperatures, pool,
                                            summarize_stats)
from minitrain.model.lora import has_lora
from minitrain.model.transformer import unwrap
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning of --init_from on chat data, loss on assistant tokens."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/pretrain/final"
    out_dir: str = "out/sft"
    batch_size: int = 16
    max_steps: int = 400
    learning_rate: float = 1.0e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_batches: int = 8
    eval_tasks: str = "arithmetic"
    save_interval: int = 200
    keep_checkpoints: int = 2

    packing: bool = field(default=False, metadata={"help": "pack several conversations into each sequence (each "
                                                           "attends only to itself)"})
    sample_prompts: str = field(default="What is 12 + 7?|What is 3 * 4 - 5?", metadata={
        "help": "user messages, separated by |, answered at each evaluation; empty = none"})
    sample_tokens: int = field(default=48, metadata={"help": "new tokens per sample answer"})
    # ---- extension: learned decoding (model/decoding_heads.py; the section after train()) ----
    train_temp: bool = field(default=False, metadata={"help": "train a head that predicts each token's sampling "
                                                              "temperature"})
    train_top_p: bool = field(default=False, metadata={"help": "train a head that predicts each token's top-p"})
    temp_objective: str = field(default="analytic_min_p_hinge", metadata={
        "help": "the heads' objective: analytic_min_p_hinge = max(0, T* - T) with T* = (z_max - z_gt) / ln(1/r)"})
    min_p_ratio: float = field(default=0.1, metadata={"help": "min-p ratio r the heads are trained for (and "
                                                              "generation with --learned_decoding uses)"})
    temp_hinge_weight: float = field(default=1.0, metadata={"help": "weight of the hinge max(0, T* - T)"})
    temp_reg_weight: float = field(default=0.5, metadata={"help": "weight of the penalty on T (and top-p) where the "
                                                                  "ground truth is already the top token"})
    freeze_base: bool = field(default=False, metadata={"help": "train the heads alone; the model (and any LoRA "
                                                               "adapters) stays frozen"})
    heads_tokens: int = field(default=256, metadata={"help": "tokens per micro-batch that train the heads (full "
                                                             "logits are built for these only)"})
    goldilocks_filter: bool = field(default=False, metadata={"help": "pick the heads' tokens by bucket: ground truth "
                                                                     "top-1 or inside the top-k"})
    goldilocks_easy_frac: float = field(default=0.1, metadata={"help": "fraction of tokens whose ground truth is "
                                                                       "top-1"})
    goldilocks_topk_frac: float = field(default=0.9, metadata={"help": "fraction whose ground truth is in the top-k "
                                                                       "but not first"})
    goldilocks_topk: int = field(default=10, metadata={"help": "k of the top-k bucket"})

    @property
    def trains_heads(self) -> bool:
        return self.train_temp or self.train_top_p

    def validate(self) -> None:
        super().validate()
        if self.fsdp and self.trains_heads:
            raise FlagError("fsdp", "does not shard learned-decoding heads yet (--train_temp / --train_top_p): they read "
                                    "the output head outside the model's forward; train them without --fsdp")
        if not self.init_from:
            raise FlagError("init_from", "is required: fine-tuning starts from a pretrained checkpoint "
                                         "(e.g. --init_from out/pretrain/final)")
        if self.sample_tokens < 1:
            raise FlagError("sample_tokens", f"must be at least 1, got {self.sample_tokens}")
        check_heads_flags(self)


# =============================================================================================================
# Training. The objective is the model's own loss: the mean cross-entropy over the assistant tokens (labels -100
# elsewhere, dataset/chat.py), through the fused kernel (kernels.fused_linear_cross_entropy).
# =============================================================================================================

def train(cfg: SFTConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)

    # ---- model ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    print0(f"model: {model.num_parameters():,} parameters, {model.num_parameters(active_only=True):,} active per "
           f"token, from {cfg.init_from}")
    heads = LearnedDecoding(model, cfg) if cfg.trains_heads else None       # the extension below

    # ---- data: conversations -> (input_ids, labels with -100 outside assistant turns) ----
    data = batches.prepare_phase_data("sft", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    train_set = ChatDataset(data.train_file, tokenizer, cfg.max_seq_len, cfg.packing)
    val_set = ChatDataset(data.val_file, tokenizer, cfg.max_seq_len, cfg.packing) if data.val_file else None
    print0(f"train: {train_set.describe()}")
    collate = partial(collate_chat, pad_id=tokenizer.pad_id)
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
        if heads is not None:
            heads.restore(resume)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, cfg.max_seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} sequences of at most {cfg.max_seq_len} tokens "
           f"({sampler.steps_per_epoch:,} steps/epoch), {dist.world_size} rank(s), "
           f"{str(dtype).replace('torch.', '')} on {dist.device}")
    prompts = [p for p in cfg.sample_prompts.split("|") if p]

    # ---- loop: evaluate, save, stop or take one step ----
    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                metrics = {} if val_set is None else {
                    "loss": evaluation.evaluate_loss(train_model, val_set, cfg.batch_size, cfg.eval_batches, dist, amp,
                                                     collate)}
                if heads is not None and val_set is not None and dist.is_main:
                    metrics.update(heads.evaluate(train_model, val_set, cfg, dist.device, amp, collate))
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
                if prompts:
                    evaluation.print_samples(train_model, tokenizer, prompts, cfg.sample_tokens, cfg.seed, amp,
                                             chat=True, dist=dist)
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                path = checkpointing.save_training_checkpoint(
                    cfg, dist, step, train_model, tokenizer, optimizer, scaler, sampler, logger, "sft",
                    metadata={"data": data.summary, "init_from": cfg.init_from}, final=last_step,
                    method_tensors=heads.resume_tensors() if heads is not None else None)
                if heads is not None:
                    heads.save_beside(path, dist)
        if last_step:
            break

        step_loss = torch.zeros((), device=dist.device)
        step_tokens = 0
        for micro, indices in enumerate(sampler.next_step()):
            batch = batches.load_batch(train_set, indices, dist.device, collate)    # input_ids, labels, ...: [B, T]
            step_tokens += sum(train_set.lengths[i] for i in indices)
            with optim.sync_gradients(train_model, last_micro_step=micro == cfg.accumulation_steps - 1):
                with amp:
                    out = train_model(**batch)
                    loss = out.loss                                       # mean over this micro-batch's targets
                    total = loss if heads is None else heads.total_loss(out, batch, loss)
                scaler.scale(total / cfg.accumulation_steps).backward()
            step_loss += loss.detach()
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        # tokens/s counts this rank's real (unpadded) tokens times the number of ranks: an estimate, without a sync
        logger.tick(tokens=step_tokens * dist.world_size, samples=sampler.global_batch)
        if step % cfg.log_interval == 0 or step == max_steps:
            extra = heads.log_metrics(dist.device) if heads is not None else {}
            logger.log_train(step, loss=distributed.all_reduce_mean(step_loss / cfg.accumulation_steps), lr=lr,
                             grad_norm=grad_norm.item(), epoch=sampler.epoch_progress, **extra)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


# =============================================================================================================
# === Extension: learned decoding (--train_temp / --train_top_p): per-token temperature and top-p heads ===
# =============================================================================================================

def check_heads_flags(cfg: SFTConfig) -> None:
    """The learned-decoding flags, checked with the rest of the config (FlagError: a one-line error, exit 2)."""
    if cfg.temp_objective != "analytic_min_p_hinge":
        raise FlagError("temp_objective", f"must be analytic_min_p_hinge (the only objective), got "
                                          f"{cfg.temp_objective!r}")
    for name in ("freeze_base", "goldilocks_filter"):
        if getattr(cfg, name) and not cfg.trains_heads:
            raise FlagError(name, "needs --train_temp or --train_top_p (it concerns the decoding heads)")
    if not 0 < cfg.min_p_ratio < 1:
        raise FlagError("min_p_ratio", f"must be in (0, 1), got {cfg.min_p_ratio}")
    if not cfg.temp_hinge_weight > 0:
        raise FlagError("temp_hinge_weight", f"must be positive, got {cfg.temp_hinge_weight}")
    if cfg.temp_reg_weight < 0:
        raise FlagError("temp_reg_weight", f"must not be negative, got {cfg.temp_reg_weight}")
    if cfg.heads_tokens < 1:
        raise FlagError("heads_tokens", f"must be at least 1, got {cfg.heads_tokens}")
    for name in ("goldilocks_easy_frac", "goldilocks_topk_frac"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise FlagError(name, f"must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.goldilocks_easy_frac + cfg.goldilocks_topk_frac > 1 + 1e-9:
        raise FlagError("goldilocks_topk_frac", f"+ --goldilocks_easy_frac must be at most 1, got "
                                                f"{cfg.goldilocks_topk_frac} + {cfg.goldilocks_easy_frac}")
    if cfg.goldilocks_topk < 2:
        raise FlagError("goldilocks_topk", f"must be at least 2 (the bucket is ranks 2..k), got {cfg.goldilocks_topk}")


class LearnedDecoding:
    """The decoding heads of a run: attached to the model, their loss beside the language model's (the analytic
    min-p hinge on a few tokens per micro-batch, model/decoding_heads.py), their statistics, evaluation and saving."""

    def __init__(self, model, cfg: SFTConfig):
        """Attach the heads --train_temp / --train_top_p ask for, with the weights of --init_from's heads when it has
        the same ones; with --freeze_base, only they keep requires_grad."""
        self.model, self.freeze_base = model, cfg.freeze_base
        heads = attach_decoding_heads(model, cfg.train_temp, cfg.train_top_p, cfg.min_p_ratio)
        if load_decoding_heads(model, cfg.init_from):
            saved = model.decoding_heads
            if saved.describe() == heads.describe():
                heads = saved
                print0(f"decoding heads: continuing from those of {cfg.init_from}")
            else:
                model.decoding_heads = heads
                print0(f"decoding heads: {cfg.init_from} has {saved.describe()}, new heads {heads.describe()} start "
                       f"from scratch")
        if cfg.freeze_base:
            model.requires_grad_(False)
            heads.requires_grad_(True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"decoding heads: {', '.join(k for k in ('temperature', 'top_p') if heads.describe()[k])} "
               f"(min-p ratio {cfg.min_p_ratio}){', base frozen' if cfg.freeze_base else ''}; {trainable:,} "
               f"trainable parameters")
        self.objective = HeadsObjective(min_p_ratio=cfg.min_p_ratio, hinge_weight=cfg.temp_hinge_weight,
                                        reg_weight=cfg.temp_reg_weight, num_tokens=cfg.heads_tokens,
                                        goldilocks=cfg.goldilocks_filter, easy_frac=cfg.goldilocks_easy_frac,
                                        topk_frac=cfg.goldilocks_topk_frac, topk=cfg.goldilocks_topk)
        self.stats = {}      # the heads' statistics pooled over the micro-batches since the last log line

    def total_loss(self, out, batch: dict, lm_loss: torch.Tensor) -> torch.Tensor:
        """What a micro-batch backpropagates: the heads' loss, plus the language model's unless --freeze_base."""
        heads_loss, stats = self.objective(out.hidden_states, out.temperature, out.top_p, batch["labels"],
                                           self.model.lm_head.weight)
        pool(self.stats, stats)
        return heads_loss if self.freeze_base else lm_loss + heads_loss

    def log_metrics(self, device: torch.device) -> dict[str, float]:
        """The statistics since the last log line, averaged over ranks; then start afresh."""
        metrics = distributed.mean_over_ranks(summarize_stats(self.stats), device)
        self.stats = {}
        return metrics

    @torch.no_grad()
    def evaluate(self, model, dataset, cfg: SFTConfig, device, amp, collate) -> dict[str, float]:
        """Mean predicted temperature on the validation tokens whose label is / is not the top-1 token (rank 0)."""
        raw = unwrap(model)
        if raw.decoding_heads.temperature is None:
            return {}
        was_training = raw.training
        raw.eval()
        pooled = {}
        for start in range(0, min(len(dataset), cfg.eval_batches * cfg.batch_size), cfg.batch_size):
            batch = batches.load_batch(dataset, list(range(start, min(start + cfg.batch_size, len(dataset)))),
                                       device, collate)
            with amp:
                out = raw(batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch.get("position_ids"), compute_logits=False)
            pool(pooled, easy_hard_temperatures(out.hidden_states, out.temperature, batch["labels"],
                                                raw.lm_head.weight))
        raw.train(was_training)
        return {"temp_easy": pooled["temp_easy_sum"] / max(pooled["easy"], 1),
                "temp_hard": pooled["temp_hard_sum"] / max(pooled["hard"], 1)}

    def resume_tensors(self) -> dict[str, torch.Tensor] | None:
        """Adapter checkpoints hold no heads: under LoRA they travel in the resume state."""
        if not has_lora(self.model):
            return None
        return {f"{HEADS_PREFIX}{k}": v for k, v in self.model.decoding_heads.state_dict().items()}

    def restore(self, resume) -> None:
        if has_lora(self.model):
            heads_state = {k[len(HEADS_PREFIX):]: v for k, v in resume.method_tensors.items()}
            self.model.decoding_heads.load_state_dict(heads_state)

    def save_beside(self, path: str, dist) -> None:
        """Under LoRA, decoding_heads.safetensors beside the adapters (a full checkpoint holds them already)."""
        if has_lora(self.model) and dist.is_main:
            save_decoding_heads(self.model, path)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
