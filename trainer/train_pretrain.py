"""Pretraining from scratch: a causal language model learns to predict the next token of packed text.

Commands, from the repository root after `pip install -e .`:

    # the tiny model on the embedded data, on CPU, in a few minutes
    python trainer/train_pretrain.py

    # one GPU: a 26M model, bf16 autocast, compiled
    python trainer/train_pretrain.py --model_config small --device cuda --compile --batch_size 32 \\
        --max_seq_len 1024 --max_steps 5000 --learning_rate 1e-3 --out_dir out/pretrain-small

    # 8 GPUs of one machine (global batch = batch_size * accumulation_steps * 8 sequences)
    torchrun --standalone --nproc_per_node 8 trainer/train_pretrain.py --model_config base --batch_size 16 \\
        --max_seq_len 2048 --max_steps 20000 --learning_rate 6e-4 --out_dir out/pretrain-base

    # continue a run that was stopped, from its latest checkpoint (also with another number of GPUs)
    python trainer/train_pretrain.py --resume --out_dir out/pretrain

Every flag is listed by --help; a bare run does what PretrainConfig shows, `--config recipe.yaml` overrides it and
flags override both. Any ModelConfig field is a flag too (--hidden_size 128 --num_hidden_layers 4).

  arguments  PretrainConfig: the flags every trainer shares (trainer/configuration.py) plus the sample prompts below.
  data       the pretrain mixture (config/data/pretrain/, or --data_config / --data_path) is prepared into train and
             validation JSONL files, tokenized once into memory-mapped token caches, and cut into sequences of
             --max_seq_len tokens, documents packed back to back with <|endoftext|> between them. Every token of a
             sequence is a target: the loss is the mean next-token cross-entropy.
  model      --model_config with random weights (or --init_from a checkpoint); parameter counts are printed.
  loop       each step reads accumulation_steps micro-batches per rank (gradients are all-reduced only on the last),
             clips the gradient norm and takes an AdamW step on a cosine schedule with warmup. Every --eval_interval
             steps: validation loss, task accuracy (--eval_tasks) and sample generations; every --save_interval
             steps a checkpoint; both again at the last step.
  save       OUT_DIR/step_XXXXXX/ in Hugging Face layout with the resume state beside it, OUT_DIR/final pointing at
             the last one, one JSON record per log step in OUT_DIR/metrics.jsonl.
"""

from dataclasses import dataclass, field

import torch

from minitrain.dataset.mixer import format_summary
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0



@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining from scratch on packed text (flags shared by every trainer, then pretraining's own)."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    out_dir: str = "out/pretrain"
    batch_size: int = 16
    max_steps: int = 600
    learning_rate: float = 3.0e-3
    warmup_steps: int = 30
    eval_batches: int = 10
    save_interval: int = 200

    sample_prompts: str = field(default="The|def |What is 2 + 3?", metadata={
        "help": "prompts, separated by |, that the model completes at each evaluation; empty = none"})
    sample_tokens: int = field(default=32, metadata={"help": "new tokens per sample completion"})

    def validate(self) -> None:
        super().validate()
        if self.sample_tokens < 1:
            raise FlagError("sample_tokens", f"must be at least 1, got {self.sample_tokens}")


def train(cfg: PretrainConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)

    # ---- model ----
    distributed.seed_everything(cfg.seed)                  # the same initial weights on every rank
    model, tokenizer = modeling.build_model(cfg, dist.device)
    print0(f"model: {model.num_parameters():,} parameters, {model.num_parameters(active_only=True):,} active per "
           f"token ({model.config.model_type}, {model.config.num_hidden_layers} layers x {model.config.hidden_size})")

    # ---- data ----
    data = batches.prepare_phase_data("pretrain", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    train_set, val_set = batches.load_packed_data(data, tokenizer, cfg.max_seq_len, dist)
    sampler = batches.GlobalBatchSampler(len(train_set), cfg.batch_size, cfg.accumulation_steps, dist.world_size,
                                         dist.rank, cfg.seed)
    max_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    tokens_per_step = sampler.global_batch * cfg.max_seq_len

    # ---- optimisation ----
    dtype = optim.resolve_dtype(cfg.dtype, dist.device)
    amp = optim.autocast_context(dist.device, dtype)
    optimizer = optim.build_optimizer(model, cfg, dist.device)
    scaler = optim.make_grad_scaler(dist.device, dtype)
    distributed.seed_everything(cfg.seed + dist.rank)      # from here on each rank draws its own random numbers
    start_step, wandb_run_id = 0, None
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, cfg.max_seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} sequences x {cfg.max_seq_len} tokens "
           f"({tokens_per_step:,} tokens/step, {sampler.steps_per_epoch:,} steps/epoch), {dist.world_size} rank(s), "
           f"{str(dtype).replace('torch.', '')} on {dist.device}")
    prompts = [p for p in cfg.sample_prompts.split("|") if p]

    # ---- loop: evaluate, save, stop or take one step ----
    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step     # its eval and save happened before the interruption
        with logger.paused():      # evaluation and saving do not count as training time
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                metrics = {} if val_set is None else {
                    "loss": evaluation.evaluate_loss(train_model, val_set, cfg.batch_size, cfg.eval_batches, dist, amp)}
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
                if prompts:
                    evaluation.print_samples(train_model, tokenizer, prompts, cfg.sample_tokens, cfg.seed, amp,
                                             chat=False, dist=dist)
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                checkpointing.save_training_checkpoint(cfg, dist, step, train_model, tokenizer, optimizer, scaler,
                                                       sampler, logger, "pretrain", metadata={"data": data.summary},
                                                       final=last_step)
        if last_step:
            break

        step_loss = torch.zeros((), device=dist.device)
        for micro, indices in enumerate(sampler.next_step()):
            batch = batches.load_batch(train_set, indices, dist.device)           # input_ids, labels: [B, T]
            with optim.sync_gradients(train_model, last_micro_step=micro == cfg.accumulation_steps - 1):
                with amp:
                    loss = train_model(**batch).loss
                scaler.scale(loss / cfg.accumulation_steps).backward()
            step_loss += loss.detach()
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        logger.tick(tokens=tokens_per_step, samples=sampler.global_batch)
        if step % cfg.log_interval == 0 or step == max_steps:
            logger.log_train(step, loss=distributed.all_reduce_mean(step_loss / cfg.accumulation_steps), lr=lr,
                             grad_norm=grad_norm.item(), epoch=sampler.epoch_progress)
    logger.close()
    print0(f"done: {cfg.out_dir}/final")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PretrainConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
