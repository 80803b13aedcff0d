"""Which samples each rank reads, from a global data position any number of ranks can continue from.

GlobalBatchSampler turns (epoch, samples consumed) into each rank's micro-batches; load_batch collates and moves them.
prepare_phase_data makes the phase's mixture (dataset/mixer.py) on rank 0; prepare_prompts opens the rlaif phase's
prompts (RL, make_pairs); load_packed_data opens the token caches of the packed pretraining/midtraining datasets.
"""


import torch

from minitrain.dataset.jsonl import DataError
from minitrain.dataset.mixer import format_summary, load_prepared, prepare_mixture, resolve_mixture
from minitrain.dataset.pretokenize import PackedTokenDataset, build_token_cache
from minitrain.dataset.prompts import PromptDataset
from minitrain.model.config import ConfigError
from minitrain.trainer.configuration import TrainConfig
from minitrain.trainer.distributed import DistInfo, on_main_rank, print0


class GlobalBatchSampler:
    """Which samples each rank reads at each micro-step, derived from a global position in the data.

    Epoch e reads a fixed permutation of the dataset (seeded by `seed` and e). An optimizer step consumes the next
    global batch of G = batch_size * accumulation_steps * world_size samples of that permutation; micro-step m of
    rank r reads positions [(m * world_size + r) * batch_size, ... + batch_size) of it. So W ranks with A
    accumulation steps form every step from exactly the samples 1 rank with W * A accumulation steps would. A
    global batch that does not fit in what remains of an epoch is skipped (drop last).

    The position is (epoch, samples of that epoch consumed by all ranks together): a checkpoint written with one
    world size resumes with another at the same sample.
    """

    def __init__(self, num_samples: int, batch_size: int, accumulation_steps: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True):
        self.num_samples, self.batch_size, self.accumulation_steps = num_samples, batch_size, accumulation_steps
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch = batch_size * accumulation_steps * world_size
        if num_samples < self.global_batch:
            raise DataError(f"the training data holds {num_samples} samples, fewer than one global batch of "
                            f"{self.global_batch} (batch_size {batch_size} x accumulation_steps {accumulation_steps} "
                            f"x {world_size} ranks)")
        self.epoch = 0
        self.epoch_samples = 0     # samples of the current epoch consumed by all ranks together
        self.samples_seen = 0      # samples consumed since the start of training, all epochs
        self._order = (None, None)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional (for the train/epoch metric)."""
        return self.epoch + self.epoch_samples / self.num_samples

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # one stream per (seed, epoch)
                self._order = (epoch, torch.randperm(self.num_samples, generator=generator).tolist())
            else:
                self._order = (epoch, list(range(self.num_samples)))
        return self._order[1]

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for the next optimizer step; advances the position."""
        if self.epoch_samples + self.global_batch > self.num_samples:
            self.epoch, self.epoch_samples = self.epoch + 1, 0
        order, start, B, W = self.order(self.epoch), self.epoch_samples, self.batch_size, self.world_size
        micro_batches = [order[start + (m * W + self.rank) * B: start + (m * W + self.rank + 1) * B]
                         for m in range(self.accumulation_steps)]
        self.epoch_samples += self.global_batch
        self.samples_seen += self.global_batch
        return micro_batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_samples": self.epoch_samples, "samples_seen": self.samples_seen,
                "num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ConfigError(f"--resume: the checkpoint's data ({state['num_samples']} samples, seed {state['seed']}) "
                              f"differs from this run's ({self.num_samples} samples, seed {self.seed}); resume with "
                              f"the same data and --seed")
        self.epoch, self.epoch_samples = state["epoch"], state["epoch_samples"]
        self.samples_seen = state["samples_seen"]


def collate_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equally shaped samples: [{"input_ids": [T], ...}] -> {"input_ids": [B, T], ...}."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def load_batch(dataset, indices: list[int], device: torch.device, collate=collate_samples) -> dict[str, torch.Tensor]:
    """Read `indices` from a map-style dataset, collate them and move the batch to `device`."""
    batch = collate([dataset[i] for i in indices])
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def prepare_phase_data(phase: str, cfg: TrainConfig, tokenizer, dist: DistInfo):
    """The PreparedData (train/validation JSONL files) of a run: --data_path, --data_config or the phase's default
    mixture, prepared by rank 0 (or read back with --use_prepared) and then opened by every rank."""
    mixture = resolve_mixture(phase, cfg.data_config or None, cfg.data_path or None, cfg.seed)
    if not cfg.use_prepared:
        on_main_rank(lambda: prepare_mixture(mixture, cfg.prepared_dir, tokenizer), dist)
    return load_prepared(mixture, cfg.prepared_dir)


def prepare_prompts(cfg, tokenizer, dist: DistInfo):
    """(PreparedData, PromptDataset) of the rlaif phase, for the RL trainers and make_pairs: prepare_phase_data, then
    the prompts of its training split, those longer than cfg.max_prompt_length dropped; both summaries printed."""
    data = prepare_phase_data("rlaif", cfg, tokenizer, dist)
    print0(format_summary(data.summary))
    prompts = PromptDataset(data.train_file, tokenizer, cfg.max_prompt_length)
    print0(f"prompts: {prompts.describe()}")
    return data, prompts


def load_packed_data(prepared, tokenizer, seq_len: int, dist: DistInfo):
    """Packed next-token datasets (train, validation) of a PreparedData's JSONL files.

    Rank 0 tokenizes each file into its memory-mapped token cache first; the other ranks then open the same cache.
    """
    datasets = []
    for path in (prepared.train_file, prepared.val_file):
        if not path:
            datasets.append(None)
            continue
        on_main_rank(lambda: build_token_cache(path, tokenizer), dist)
        datasets.append(PackedTokenDataset(build_token_cache(path, tokenizer), seq_len))
    train_set, val_set = datasets
    if len(train_set) == 0:
        raise DataError(f"{prepared.train_file}: too few tokens for one sequence of {seq_len}")
    if val_set is not None and len(val_set) == 0:
        print0(f"validation: {prepared.val_file} holds fewer than {seq_len} tokens; no validation loss")
        val_set = None
    return train_set, val_set
