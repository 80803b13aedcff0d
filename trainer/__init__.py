"""The training scripts, one per method (train_<method>.py), and the support modules they share, one job each.

A script reads top to bottom: docstring (its commands), config, the method's math, train(), its extensions, main.
The loop skeleton is repeated in every script on purpose (copy-paste-modify), so that each reads alone. What every
script needs is written once, in the module named for its job:

    configuration   TrainConfig, parse_config (defaults < --config YAML < flags), one-line errors
    distributed     ranks, process group, collectives, seeds, print0
    batches         GlobalBatchSampler (the global data position), load_batch, the phase's prepared data
    modeling        build_model (preset or checkpoint, LoRA), wrap_model (checkpointing, FSDP2 or DDP, compile),
                    references
    sharding        FSDP2 (--fsdp): shard per block, the optimizer on the shards, gathering for saves and generation
    optim           AdamW groups, cosine_lr, autocast, GradScaler, gradient accumulation, optimizer_step
    reporting       RunLogger (console line, progress bar, metrics.jsonl, wandb), FLOPs and MFU
    evaluation      validation loss, --eval_tasks accuracy, sample completions
    sequences       per-token log-probs through the fused kernel, rollouts (RL and make_pairs), reference log-probs
                    computed once (DPO)
    rewards         reward functions (--reward_funcs) and reward models (RL and make_pairs)
    generations     a teacher's sampled answers that the task checkers accept, written as chat rows (rejection
                    sampling: train_distill.py --from_teacher_generations; train_sft.py reads the file)
    checkpointing   Hugging Face checkpoints with resume state beside them, written atomically; exact resume
"""
