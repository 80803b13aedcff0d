"""Midtraining: continued pretraining of a pretrained checkpoint on a new mixture, at a longer context, with the
learning rate annealed to zero.

Commands, from the repository root after `pip install -e .` (and a pretraining run in out/pretrain):

    # the tiny model on the embedded midtrain mixture, on CPU
    python trainer/train_midtrain.py --init_from out/pretrain/final

    # one GPU: 4x the context with YaRN rotary scaling
    python trainer/train_midtrain.py --init_from out/pretrain-small/final --device cuda --compile \\
        --max_seq_len 4096 --rope_scaling '{rope_type: yarn, factor: 4, original_max_position_embeddings: 1024}' \\
        --batch_size 8 --max_steps 2000 --out_dir out/midtrain-small

    # 8 GPUs of one machine
    torchrun --standalone --nproc_per_node 8 trainer/train_midtrain.py --init_from out/pretrain-base/final \\
        --max_seq_len 4096 --batch_size 8 --max_steps 5000 --out_dir out/midtrain-base

    # continue a run that was stopped
    python trainer/train_midtrain.py --init_from out/pretrain/final --resume --out_dir out/midtrain

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it. Compared with
trainer/train_pretrain.py, which this follows step for step (copy-paste-modify, so each script reads alone):

  arguments  MidtrainConfig = the shared flags; --init_from is required.
  data       the midtrain mixture (config/data/midtrain/: pretraining-style text plus the task formats the later
             stages use), packed into --max_seq_len tokens (default 512, twice pretraining's).
  model      the --init_from checkpoint's config and weights. When --max_seq_len exceeds its
             max_position_embeddings, that field is raised to --max_seq_len (rotary embeddings have no learned
             positions, so only the recorded limit changes; add --rope_scaling to rescale the frequencies).
  loop       as pretraining; the schedule (midtrain.yaml) is a short warmup, then a cosine anneal of a lower peak
             learning rate down to 0 (min_lr_ratio 0), so the run ends in a low-loss basin the next stage starts from.
  save       OUT_DIR/step_XXXXXX/ (Hugging Face layout + resume state), OUT_DIR/final, OUT_DIR/metrics.jsonl.
"""

from dataclasses import dataclass

import torch

from minitrain.dataset.mixer import format_summary
from minitrain.model.checkpoint import check_model_dir
from minitrain.model.config import load_model_config
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0



@dataclass
class MidtrainConfig(TrainConfig):
    """Continued pretraining of --init_from on the midtrain mixture at a longer context."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    out_dir: str = "out/midtrain"
    max_seq_len: int = 512
    max_steps: int = 300
    learning_rate: float = 1.0e-3       # a third of pretraining's peak: the weights are already trained
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0           # anneal to zero
    eval_batches: int = 10
    save_interval: int = 100

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise FlagError("init_from", "is required: midtraining continues a pretrained checkpoint "
                                         "(e.g. --init_from out/pretrain/final)")


def extend_context(cfg: MidtrainConfig) -> None:
    """Raise max_position_embeddings to --max_seq_len when the checkpoint's is shorter (and no flag sets it)."""
    check_model_dir(cfg.init_from)
    config = load_model_config(cfg.init_from, cfg.model_overrides)
    if cfg.max_seq_len > config.max_position_embeddings and "max_position_embeddings" not in cfg.model_overrides:
        print0(f"context: max_position_embeddings {config.max_position_embeddings} -> {cfg.max_seq_len}")
        cfg.model_overrides["max_position_embeddings"] = cfg.max_seq_len


def train(cfg: MidtrainConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)

    # ---- model ----
    distributed.seed_everything(cfg.seed)
    extend_context(cfg)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    print0(f"model: {model.num_parameters():,} parameters, {model.num_parameters(active_only=True):,} active per "
           f"token, from {cfg.init_from} (context {model.config.max_position_embeddings})")

    # ---- data ----
    data = batches.prepare_phase_data("midtrain", cfg, tokenizer, dist)
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
    distributed.seed_everything(cfg.seed + dist.rank)
    start_step, wandb_run_id = 0, None
    if cfg.resume:
        resume = checkpointing.load_resume_state(cfg.out_dir)
        checkpointing.restore_training_state(resume, cfg, model, optimizer, scaler, sampler, dist)
        start_step, wandb_run_id = resume.step, resume.state["wandb_run_id"]
    train_model = modeling.wrap_model(model, cfg, dist, optimizer)
    logger = reporting.RunLogger(cfg, dist, max_steps, start_step, reporting.flops_per_token(model, cfg.max_seq_len),
                                 wandb_run_id)
    logger.log_data(data.summary)
    print0(f"training: {max_steps:,} steps of {sampler.global_batch} sequences x {cfg.max_seq_len} tokens, "
           f"learning rate {cfg.learning_rate:g} annealed to {cfg.learning_rate * cfg.min_lr_ratio:g}, "
           f"{dist.world_size} rank(s), {str(dtype).replace('torch.', '')} on {dist.device}")

    # ---- loop: evaluate, save, stop or take one step ----
    step = start_step
    while True:
        last_step = step == max_steps
        just_resumed = cfg.resume and step == start_step
        with logger.paused():      # evaluation and saving do not count as training time
            if not just_resumed and (last_step or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                metrics = {} if val_set is None else {
                    "loss": evaluation.evaluate_loss(train_model, val_set, cfg.batch_size, cfg.eval_batches, dist, amp)}
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                checkpointing.save_training_checkpoint(cfg, dist, step, train_model, tokenizer, optimizer, scaler,
                                                       sampler, logger, "midtrain",
                                                       metadata={"data": data.summary, "init_from": cfg.init_from},
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
    cfg = parse_config(MidtrainConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
