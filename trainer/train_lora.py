"""LoRA fine-tuning: supervised fine-tuning that trains small low-rank adapters and leaves the model's weights frozen.

Each targeted linear layer y = W x becomes y = W x + (alpha / r) * B A x with A: [r, in], B: [out, r] trainable and
W frozen (Hu et al. 2021, arXiv 2106.09685; model/lora.py). B starts at zero, so training starts from the base
model exactly; the optimizer holds moments for the adapters only, so memory is the base's weights plus a few
percent. --use_rslora scales by alpha / sqrt(r) (Kalajdzievski 2023, arXiv 2312.03732).

Commands, from the repository root after `pip install -e .` (and a pretraining run in out/pretrain):

    # the tiny model on the embedded chat data, on CPU
    python trainer/train_lora.py --init_from out/pretrain/final

    # one GPU: a local Hugging Face Qwen3 directory, adapters on the attention projections only, merged at the end
    python trainer/train_lora.py --init_from path/to/Qwen3-0.6B --device cuda --lora_rank 32 --lora_alpha 64 \
        --lora_targets q_proj,k_proj,v_proj,o_proj --merge --max_seq_len 2048 --out_dir out/lora-qwen

    # 8 GPUs of one machine
    torchrun --standalone --nproc_per_node 8 trainer/train_lora.py --init_from out/sft-base/final --out_dir out/lora

    # use the adapters: with the base model, or merged
    python eval/chat.py --model out/pretrain/final --adapter out/lora/final
    python eval/chat.py --model out/lora/merged

A bare run does what the config dataclass below shows; `--config recipe.yaml` and flags override it.
This script follows trainer/train_sft.py step for step (copy-paste-modify,
so each script reads alone); what differs:

  arguments  LoRASFTConfig: as SFT, with --lora_rank (must be > 0), --lora_alpha, --lora_dropout, --lora_targets
             (all-linear or names), --use_rslora, --merge. Every other trainer takes the same LoRA flags.
  data       as SFT: chat rows, loss on assistant tokens only (dataset/chat.py).
  model      the --init_from checkpoint, frozen; adapters (modules of their own, so torch.compile and DDP see plain
             modules) on the chosen layers. The count of trainable parameters is printed.
  loop       as SFT; AdamW sees the adapter parameters only.
  save       OUT_DIR/step_XXXXXX/ holds the adapters alone in PEFT's layout (adapter_config.json,
             adapter_model.safetensors, which `peft.PeftModel.from_pretrained` loads) with the resume state beside
             them; with --merge, OUT_DIR/merged is a full Hugging Face checkpoint with W + (alpha / r) B A.
"""

from dataclasses import dataclass, field
from functools import partial

import torch

from minitrain.dataset.chat import ChatDataset, collate_chat
from minitrain.dataset.mixer import format_summary
from minitrain.trainer import batches, checkpointing, distributed, evaluation, modeling, optim, reporting
from minitrain.trainer.configuration import USER_ERRORS, FlagError, TrainConfig, fail, parse_config
from minitrain.trainer.distributed import print0



@dataclass
class LoRASFTConfig(TrainConfig):
    """Supervised fine-tuning of LoRA adapters on a frozen --init_from model, loss on assistant tokens."""

    # ---- shared flags (TrainConfig) set to what a bare run of this script uses; --help shows their help ----
    init_from: str = "out/pretrain/final"
    out_dir: str = "out/lora"
    lora_rank: int = 16
    merge: bool = True
    batch_size: int = 16
    max_steps: int = 400
    learning_rate: float = 3.0e-3
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

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise FlagError("init_from", "is required: LoRA adapts a trained checkpoint "
                                         "(e.g. --init_from out/pretrain/final)")
        if self.lora_rank < 1:
            raise FlagError("lora_rank", f"must be at least 1 for LoRA training, got {self.lora_rank} "
                                         f"(full fine-tuning is trainer/train_sft.py)")
        if self.sample_tokens < 1:
            raise FlagError("sample_tokens", f"must be at least 1, got {self.sample_tokens}")


def train(cfg: LoRASFTConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    checkpointing.check_out_dir(cfg)

    # ---- model ----
    distributed.seed_everything(cfg.seed)
    model, tokenizer = modeling.build_model(cfg, dist.device)
    print0(f"model: {model.num_parameters():,} parameters (adapters included), from {cfg.init_from}, frozen")

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
                metrics.update(evaluation.evaluate_tasks_hook(train_model, tokenizer, cfg, dist, amp))
                logger.log_eval(step, metrics)
                if prompts:
                    evaluation.print_samples(train_model, tokenizer, prompts, cfg.sample_tokens, cfg.seed, amp,
                                             chat=True, dist=dist)
            if not just_resumed and (last_step or (cfg.save_interval and step > 0 and step % cfg.save_interval == 0)):
                checkpointing.save_training_checkpoint(cfg, dist, step, train_model, tokenizer, optimizer, scaler,
                                                       sampler, logger, "lora",
                                                       metadata={"data": data.summary, "init_from": cfg.init_from},
                                                       final=last_step)
        if last_step:
            break

        step_loss = torch.zeros((), device=dist.device)
        step_tokens = 0
        for micro, indices in enumerate(sampler.next_step()):
            batch = batches.load_batch(train_set, indices, dist.device, collate)    # input_ids, labels, ...: [B, T]
            step_tokens += sum(train_set.lengths[i] for i in indices)
            with optim.sync_gradients(train_model, last_micro_step=micro == cfg.accumulation_steps - 1):
                with amp:
                    loss = train_model(**batch).loss                      # mean over this micro-batch's targets
                scaler.scale(loss / cfg.accumulation_steps).backward()
            step_loss += loss.detach()
        lr = optim.cosine_lr(step, max_steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio)
        grad_norm = optim.optimizer_step(optimizer, scaler, lr, cfg.grad_clip)
        step += 1
        # tokens/s counts this rank's real (unpadded) tokens times the number of ranks: an estimate, without a sync
        logger.tick(tokens=step_tokens * dist.world_size, samples=sampler.global_batch)
        if step % cfg.log_interval == 0 or step == max_steps:
            logger.log_train(step, loss=distributed.all_reduce_mean(step_loss / cfg.accumulation_steps), lr=lr,
                             grad_norm=grad_norm.item(), epoch=sampler.epoch_progress)
    logger.close()
    print0(f"done: adapters in {cfg.out_dir}/final (use them with --model {cfg.init_from} --adapter "
           f"{cfg.out_dir}/final)" + (f", merged model in {cfg.out_dir}/merged" if cfg.merge else ""))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(LoRASFTConfig, argv)
    try:
        train(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
