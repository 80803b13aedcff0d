"""A teacher's checked answers as training data (rejection sampling): reasoning distillation's data step.

The teacher answers the rlaif prompts (config/data/rlaif/, or --data_config / --data_path; rows carrying "task" and
"answer", as the embedded rlaif.jsonl does) k times each; the task checkers keep the finished, correct, distinct
answers, written as chat rows that any chat trainer reads (train_sft.py --data_path, train_distill.py):

    teacher_answers      k answers to each prompt (sequences.rollout, batched), whether each finished, and each
                         one's score under the task checker (rewards.exact_answer: eval/tasks score_row of its row)
    write_generations    the kept answers as {"messages": [..., {"role": "assistant", ...}], "task", "id"} rows in
                         generations.jsonl, and generations_manifest.json (teacher, sampling, counts per task,
                         sha256), both written atomically
    generations_data     the PreparedData of that file: sampled on every rank (the prompts shared out), written by
                         rank 0; a resumed run reuses it

The settings are the run config's: teacher, num_teacher_samples, temperature, max_new_tokens, max_prompt_length,
max_prompts, generation_batch_size, generations_out (else out_dir), seed and resume (train_distill.py's
DistillConfig holds them, with their help).
"""

import hashlib
import json
import os
import time

import torch

from minitrain.dataset.files import write_atomic
from minitrain.dataset.jsonl import DataError
from minitrain.dataset.mixer import PreparedData, format_summary, load_prepared, prepare_mixture, resolve_mixture
from minitrain.dataset.prompts import PromptDataset
from minitrain.trainer.batches import prepare_phase_data
from minitrain.trainer.configuration import TrainConfig
from minitrain.trainer.distributed import DistInfo, all_gather_bytes, barrier, on_main_rank, print0
from minitrain.trainer.rewards import RewardError, exact_answer
from minitrain.trainer.sequences import rollout

GENERATIONS_FILE = "generations.jsonl"
GENERATIONS_MANIFEST = "generations_manifest.json"


def teacher_answers(teacher, prompts: PromptDataset, indices: list[int], tokenizer, cfg: TrainConfig, amp,
                    generator: torch.Generator) -> list[dict]:
    """One record per prompt of `indices`: its k sampled answers, whether each stopped at EOS, and each one's score
    under the task checker (rewards.exact_answer: eval.tasks.score_row of the prompt row)."""
    k = cfg.num_teacher_samples
    jobs = [i for i in indices for _ in range(k)]                       # each prompt k times, side by side
    answers, finished = [], []
    for start in range(0, len(jobs), cfg.generation_batch_size):
        chunk = jobs[start:start + cfg.generation_batch_size]
        with amp:
            out = rollout(teacher, [prompts.ids[i] for i in chunk], cfg.max_new_tokens, cfg.temperature,
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


def write_generations(records: list[dict], prompts: PromptDataset, cfg: TrainConfig, directory: str,
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


def generations_data(cfg: TrainConfig, teacher, tokenizer, dist: DistInfo, amp) -> PreparedData:
    """The PreparedData of the teacher's checked answers: generated (all ranks share the prompts, rank 0 writes) or,
    on --resume, the file the run already wrote."""
    directory = cfg.generations_out or cfg.out_dir
    path = os.path.join(directory, GENERATIONS_FILE)
    if cfg.resume and os.path.isfile(path) and os.path.isfile(os.path.join(directory, GENERATIONS_MANIFEST)):
        print0(f"teacher generations: reusing {path}")
    else:
        data = prepare_phase_data("rlaif", cfg, tokenizer, dist)
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
        gathered = all_gather_bytes(payload, dist.device)     # every rank's records as JSON bytes (nothing pickled)
        if dist.is_main:
            records = sorted((r for chunk in gathered for r in json.loads(bytes(chunk.tolist()))),
                             key=lambda r: r["i"])
            manifest = write_generations(records, prompts, cfg, directory, data.summary, time.time() - started)
            c = manifest["counts"]
            print0(f"teacher generations: kept {c['kept']:,} of {c['generated']:,} answers ({c['incorrect']:,} "
                   f"wrong, {c['unfinished']:,} unfinished, {c['duplicates']:,} repeated); per task: "
                   + ", ".join(f"{name} {t['kept']}/{t['generated']}" for name, t in manifest["per_task"].items())
                   + f"; wrote {path}")
        barrier()
    with open(path) as f:
        if not any(line.strip() for line in f):
            raise DataError(f"--from_teacher_generations: none of the teacher's answers passed the checker (see "
                            f"{os.path.join(directory, GENERATIONS_MANIFEST)}); raise --num_teacher_samples or "
                            f"--max_new_tokens, or use a stronger teacher")
    mixture = resolve_mixture("sft", None, path, cfg.seed)
    on_main_rank(lambda: prepare_mixture(mixture, cfg.prepared_dir, tokenizer), dist)
    return load_prepared(mixture, cfg.prepared_dir)
