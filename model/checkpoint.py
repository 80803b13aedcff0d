"""Checkpoints in Hugging Face layout, written atomically, and loading of local Hugging Face directories.

A checkpoint directory holds:
    config.json                  the Hugging Face config of the matching family (llama, qwen2, qwen3, qwen3_moe)
    model.safetensors            weights under Hugging Face names (past `max_shard_bytes`: model-0000i-of-0000n
                                 .safetensors shards plus model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json
    minitrain.json               optional: what the trainer wants to remember (its config, step, ...)

A model with learned-decoding heads (model/decoding_heads.py) adds their tensors to model.safetensors
(decoding_heads.temperature.weight, ...) and the field "minitrain_decoding_heads" to config.json; load_model
rebuilds them from that field, and transformers ignores both. A LoRA run keeps its heads beside the adapters in
decoding_heads.safetensors (save_decoding_heads / load_decoding_heads). Models without heads are saved as before.

Atomic: everything is written into a temporary sibling directory which is then renamed into place, so a crash
leaves either the old checkpoint or the new one, never half of one. Nothing is pickled; safetensors and JSON only.
"""

import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minitrain.model.config import ConfigError, ModelConfig, read_json
from minitrain.model.decoding_heads import CONFIG_FIELD as HEADS_FIELD
from minitrain.model.decoding_heads import heads_from_description
from minitrain.model.tokenizer import Tokenizer, TokenizerError
from minitrain.model.transformer import CausalLM, RotaryEmbedding, unwrap

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADS_PREFIX = "decoding_heads."
HEADS_FILE = "decoding_heads.safetensors"   # a LoRA checkpoint's heads, beside adapter_model.safetensors


class WeightsFileError(ConfigError, SafetensorError):
    """A weights file safetensors cannot read. A ConfigError naming the file, like every other bad checkpoint; also a
    SafetensorError, so callers that catch safetensors' own error still do."""


def save_checkpoint(model: CausalLM, tokenizer: Tokenizer | None, out_dir: str, extra_json: dict | None = None,
                    write_extra=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    state: dict[str, torch.Tensor] | None = None) -> str:
    """Write `model` (and `tokenizer`) to `out_dir` atomically; an existing `out_dir` is replaced.

    extra_json: saved as minitrain.json. write_extra(tmp_dir): called before the rename, so that files a trainer
    adds (resume state) become visible together with the weights. state: the weights to write instead of
    model.state_dict() (a sharded model's, gathered whole: trainer/sharding.py).
    """
    model = unwrap(model)
    if any(".lora_A." in name for name in model.state_dict()):
        raise ValueError("save_checkpoint: the model still holds LoRA adapters; save them with model.lora.save_adapter "
                         "or merge them first with model.lora.merge_lora")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    config = model.config
    with open(os.path.join(tmp, "config.json"), "w") as f:
        hf = config.to_hf_dict()
        hf["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        if getattr(model, "decoding_heads", None) is not None:
            hf[HEADS_FIELD] = model.decoding_heads.describe()
        json.dump(hf, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.7, "top_p": 0.9}, f,
                  indent=2)
    save_weights(model, tmp, max_shard_bytes, state)
    if tokenizer is not None:
        tokenizer.save(tmp, model_max_length=config.max_position_embeddings)
    if extra_json is not None:
        with open(os.path.join(tmp, "minitrain.json"), "w") as f:
            json.dump(extra_json, f, indent=2)
    if write_extra is not None:
        write_extra(tmp)
    fsync_dir(tmp)

    # swap into place: the old directory stays intact until the new one is complete
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)
    return out_dir


def fsync_dir(path: str) -> None:
    """Flush every file in `path` and the directory entry itself to disk."""
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hf_state_dict(model: CausalLM, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights (model.state_dict(), or `state`) under Hugging Face names; a tied lm_head is left out (Hugging
    Face re-ties it on load)."""
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_weights(model: CausalLM, directory: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    state = hf_state_dict(model, state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    metadata = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(state, os.path.join(directory, "model.safetensors"), metadata=metadata)
        return
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, filename), metadata=metadata)
        weight_map.update({name: filename for name in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def check_model_dir(path: str) -> None:
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ConfigError(f"{path}: not a directory (a model is a checkpoint directory with config.json and weights)")
    if "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
        raise ConfigError(f"{path}: no such local directory; it looks like a Hugging Face Hub name, and nothing is "
                          f"downloaded at run time: download it first and pass the local directory")
    raise ConfigError(f"{path}: model directory not found")


def weight_files(path: str) -> list[str]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: field 'weight_map' is missing")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise ConfigError(f"{index}: field 'weight_map' names {name}, which is missing")
        return [os.path.join(path, name) for name in files]
    raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")


def weight_index(model: CausalLM, path: str) -> dict[str, str]:
    """{tensor name: its safetensors file} of a checkpoint directory, checked against `model` from the files'
    headers alone (no tensor is read): every name belongs to the model, every shape fits, none is missing.

    Decoding-head tensors (decoding_heads.*) belong to a model that has heads and are skipped for one that has none
    (a run that does not train them starts from the language model alone). A tied model (tie_word_embeddings) takes
    its head from the embedding: a file may still hold an lm_head.weight (load_weights checks that it equals the
    embedding, since anything else would be silently dropped). An untied model needs one.
    """
    expected = {name: tuple(t.shape) for name, t in hf_state_dict(model).items()}
    tied = model.config.tie_word_embeddings
    index = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and tied:
                        index[name] = file
                        continue
                    if name not in expected and name.startswith(HEADS_PREFIX) and \
                            getattr(model, "decoding_heads", None) is None:
                        continue
                    if name not in expected:
                        raise ConfigError(f"{file}: tensor '{name}' does not belong to a {model.config.model_type} "
                                          f"model of this config")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise ConfigError(f"{file}: tensor '{name}' has shape {shape}, the config needs "
                                          f"{expected[name]}")
                    index[name] = file
        except ConfigError:
            raise
        except Exception as e:   # safetensors raises its own error types (and OSError) on a damaged file
            raise WeightsFileError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    config_path = os.path.join(path, "config.json")
    if "lm_head.weight" in expected and "lm_head.weight" not in index:
        raise ConfigError(f"{path}: the weights hold no 'lm_head.weight', which an untied output head needs "
                          f"({config_path} field 'tie_word_embeddings' is false or missing, and transformers reads a "
                          f"missing one as false)")
    missing = sorted(set(expected) - set(index))
    if missing:
        raise ConfigError(f"{path}: weights missing from the safetensors files: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")
    return index


def check_tied_head(head: torch.Tensor, embedding: torch.Tensor, file: str, path: str) -> None:
    """A tied model's file may hold an lm_head.weight only equal to the embedding (rows of both, when sharded)."""
    if head.shape != embedding.shape or not torch.equal(head.to(embedding.device, embedding.dtype), embedding):
        raise ConfigError(f"{file}: tensor 'lm_head.weight' differs from the embedding, but "
                          f"{os.path.join(path, 'config.json')} field 'tie_word_embeddings' is true (the head would "
                          f"be dropped): set it to false")


def load_weights(model: CausalLM, path: str) -> None:
    """Copy safetensors weights with Hugging Face names into `model`, checked first by weight_index."""
    index = weight_index(model, path)
    params = dict(model.state_dict())
    tied = model.config.tie_word_embeddings
    by_file = {}
    for name, file in index.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if name == "lm_head.weight" and tied:      # compared with the embedding once that is loaded
                        tied_head = (file, tensor)
                        continue
                    with torch.no_grad():
                        params[name].copy_(tensor)
        except Exception as e:
            raise WeightsFileError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if tied and "lm_head.weight" in index:
        check_tied_head(tied_head[1], params["model.embed_tokens.weight"], tied_head[0], path)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer.json of a directory (or a tokenizer.json file)."""
    return Tokenizer.from_file(path if path.endswith(".json") else os.path.join(path, "tokenizer.json"))


def load_model(path: str, device="cpu", dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """Load our checkpoint or a local Hugging Face llama/qwen2/qwen3/qwen3_moe directory.

    Returns (model, tokenizer); tokenizer is None when with_tokenizer=False. The weights keep the dtype config.json
    names (field torch_dtype, or dtype as transformers 5 writes it; float32 when neither is there) unless `dtype`
    is given; a dtype other than float32, bfloat16 or float16 there is a ConfigError unless `dtype` is given.
    """
    check_model_dir(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: not found (a model directory needs a config.json)")
    hf = read_json(config_path)
    config = ModelConfig.from_hf_dict(hf, config_path)
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > config.vocab_size:
            raise TokenizerError(f"{os.path.join(path, 'tokenizer.json')}: vocabulary of {tokenizer.vocab_size} tokens "
                                 f"does not fit the model (config.json field 'vocab_size' = {config.vocab_size})")
    if dtype is None:
        field = "torch_dtype" if hf.get("torch_dtype") is not None else "dtype"
        saved = hf.get(field) or "float32"
        if not isinstance(saved, str) or saved not in DTYPES:
            raise ConfigError(f"{config_path}: field '{field}' must be {', '.join(DTYPES)}, got {saved!r}")
        dtype = DTYPES[saved]
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.model.rotary_emb = RotaryEmbedding(config)   # its fp32 frequencies were not materialised on "meta"
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if hf.get(HEADS_FIELD) is not None:       # learned-decoding heads: float32, whatever the model's dtype
        model.decoding_heads = read_heads_description(hf[HEADS_FIELD], config, config_path).to(device)
    load_weights(model, path)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Learned-decoding heads on their own (LoRA runs, and a base model that gets the heads of a checkpoint)
# ---------------------------------------------------------------------------------------------------------------

def read_heads_description(description, config: ModelConfig, source: str):
    try:
        return heads_from_description(description, config.hidden_size, source)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def save_decoding_heads(model, directory: str) -> str:
    """Write model.decoding_heads to DIRECTORY/decoding_heads.safetensors (tensor names as in model.safetensors, the
    config.json entry as metadata), through a temporary file renamed into place."""
    heads = model.decoding_heads
    tensors = {f"{HEADS_PREFIX}{k}": v.detach().contiguous() for k, v in heads.state_dict().items()}
    path = os.path.join(directory, HEADS_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"format": "pt", HEADS_FIELD: json.dumps(heads.describe())})
    os.replace(tmp, path)
    return path


def load_decoding_heads(model: CausalLM, directory: str) -> bool:
    """Attach the decoding heads a directory holds to `model` (replacing any it has), with their weights.

    Reads DIRECTORY/decoding_heads.safetensors, else a checkpoint's config.json field and model.safetensors.
    Returns False (model unchanged) when the directory has no heads; ConfigError when they do not fit.
    """
    heads_file = os.path.join(directory, HEADS_FILE)
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(heads_file):
        try:
            with safe_open(heads_file, framework="pt") as f:
                description = json.loads((f.metadata() or {}).get(HEADS_FIELD, "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:        # damaged file or metadata that is not JSON
            raise WeightsFileError(f"{heads_file}: not a readable heads file ({str(e).splitlines()[0]})") from None
        source = heads_file
    elif os.path.isfile(config_path) and read_json(config_path).get(HEADS_FIELD) is not None:
        description, source = read_json(config_path)[HEADS_FIELD], config_path
        tensors = {}
        for file in weight_files(directory):
            with safe_open(file, framework="pt") as f:
                tensors.update({name: f.get_tensor(name) for name in f.keys() if name.startswith(HEADS_PREFIX)})
    else:
        return False
    heads = read_heads_description(description, model.config, source)
    expected = {f"{HEADS_PREFIX}{k}": v for k, v in heads.state_dict().items()}
    if set(tensors) != set(expected):
        raise ConfigError(f"{source}: decoding-head tensors {sorted(tensors)} do not match the heads it describes "
                          f"({sorted(expected)})")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ConfigError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the model needs "
                              f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensors[name])
    model.decoding_heads = heads.to(next(model.parameters()).device)
    return True
