# Run: pytest tests/test_hf_compat.py   (without the model/bench.py run: -m "not slow")
# Both directions of Hugging Face compatibility on tiny random models that transformers builds (test-only peer):
# their checkpoints load into our model with the same logits, ours load in transformers with the same logits (tied
# and untied heads, linear / YaRN / Llama-3 rope scaling, sharded safetensors included), a config.json that leaves
# fields out means what transformers' defaults say, and greedy generation (with and without a repetition penalty)
# matches transformers' generate.
import json
import os

import pytest
import torch
import transformers          # the peer (requirements-dev.txt): missing, the file fails rather than skips

from minitrain.model.checkpoint import load_model, save_checkpoint
from minitrain.model.config import ModelConfig, load_model_config
from minitrain.model.generate import generate
from minitrain.model.transformer import CausalLM

COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=2, bos_token_id=1)

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=10000.0),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, rope_theta=10000.0),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**{**COMMON, "tie_word_embeddings": True}, head_dim=8,
                                                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                     norm_topk_prob=True, rope_theta=10000.0),
    "llama-yarn": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-llama3": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama-linear": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0, rope_scaling={
        "rope_type": "linear", "factor": 4.0}),
    "llama-tied": lambda: transformers.LlamaConfig(**{**COMMON, "tie_word_embeddings": True}, rope_theta=10000.0),
    "qwen2-tied": lambda: transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True}, rope_theta=10000.0),
    "qwen3-tied": lambda: transformers.Qwen3Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=16,
                                                   rope_theta=10000.0),
}

# our rope_scaling settings, each of which the 40-token test batch exercises past original_max_position_embeddings
ROPE_SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def padded_batch(vocab=101):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0     # left padding
    mask[2, :30] = 0
    return ids, mask


def hf_model(name, tmp_path):
    torch.manual_seed(0)
    config = HF_CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():   # norms start at 1: randomise them so a swapped or missing norm shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path / f"hf-{name}"
    model.save_pretrained(directory)
    return model, directory


def hf_logits(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits * mask[..., None]   # padded positions are undefined in both


def our_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits * mask[..., None]


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_checkpoint_loads_with_same_logits(name, tmp_path):
    ref, directory = hf_model(name, tmp_path)
    ours, _ = load_model(str(directory), with_tokenizer=False)
    ids, mask = padded_batch()
    expected = hf_logits(ref, ids, mask)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(our_logits(ours, ids, mask), expected, atol=2e-5, rtol=1e-4)


FAMILY_OVERRIDES = {
    "llama": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True, "head_dim": 16},
    "qwen3_moe": {"qk_norm": True, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24},
}


def our_model(model_type: str, seed: int = 1, **overrides) -> CausalLM:
    """A tiny random model of our own in the family, norms and biases randomised."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**COMMON, "rope_theta": 10000.0, **FAMILY_OVERRIDES[model_type], **overrides})
    assert config.model_type == model_type
    model = CausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("qwen3_moe", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": ROPE_SCALINGS["yarn"]}),
    ("llama", {"rope_scaling": ROPE_SCALINGS["llama3"]}),
    ("llama", {"rope_scaling": ROPE_SCALINGS["linear"]}),
    ("qwen3", {"rope_scaling": ROPE_SCALINGS["yarn"]}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v.get('rope_type', v) if isinstance(v, dict) else v}"
                                                       for k, v in v.items()) or "default")
def test_our_checkpoint_loads_in_transformers(model_type, overrides, tmp_path):
    ours = our_model(model_type, **overrides)
    save_checkpoint(ours, None, str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == model_type
    assert saved["tie_word_embeddings"] is ours.config.tie_word_embeddings   # always written, never left to a default
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(ref).__name__ == saved["architectures"][0]
    tied = ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    assert tied is ours.config.tie_word_embeddings
    ids, mask = padded_batch()
    expected = our_logits(ours, ids, mask)
    torch.testing.assert_close(hf_logits(ref, ids, mask), expected, atol=2e-5, rtol=1e-4)
    if "rope_scaling" in overrides:   # the scaling moves the logits by 10x the tolerance above: not silently dropped
        plain = our_model(model_type)
        assert (our_logits(plain, ids, mask) - expected).abs().max() > 2e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_missing_tie_word_embeddings_means_untied_as_in_transformers(model_type, tmp_path):
    # transformers reads a config.json without tie_word_embeddings as untied (False) in all four families
    ref, directory = hf_model(model_type, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is False
    (directory / "config.json").write_text(json.dumps(config))
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()
    ours, _ = load_model(str(directory), with_tokenizer=False)
    assert ours.config.tie_word_embeddings is False
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    ids, mask = padded_batch()
    torch.testing.assert_close(our_logits(ours, ids, mask), hf_logits(ref, ids, mask), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_config_defaults_are_transformers_defaults(model_type):
    # a config.json with only the required fields: every default that shapes the model equals transformers' own
    minimal = {"model_type": model_type, "vocab_size": 101, "hidden_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 32}
    ours = ModelConfig.from_hf_dict(minimal, "config.json")
    ref = transformers.AutoConfig.for_model(**minimal)
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert (ours.tie_word_embeddings, ours.num_key_value_heads, ours.resolved_head_dim, ours.max_position_embeddings,
            ours.rms_norm_eps, ours.rope_theta, ours.initializer_range) == \
        (ref.tie_word_embeddings, ref.num_key_value_heads, head_dim, ref.max_position_embeddings, ref.rms_norm_eps,
         ref.rope_parameters["rope_theta"], ref.initializer_range)
    if model_type == "qwen3_moe":
        assert (ours.num_experts, ours.num_experts_per_tok, ours.moe_intermediate_size, ours.norm_topk_prob,
                ours.router_aux_loss_coef) == (ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size,
                                               ref.norm_topk_prob, ref.router_aux_loss_coef)
    else:
        assert ours.intermediate_size == ref.intermediate_size


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3_moe"])
def test_sharded_checkpoint_both_directions(model_type, tmp_path):
    ours = our_model(model_type, seed=2)
    save_checkpoint(ours, None, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    ids, mask = padded_batch()
    reloaded, _ = load_model(str(tmp_path / "sharded"), with_tokenizer=False)
    torch.testing.assert_close(our_logits(reloaded, ids, mask), our_logits(ours, ids, mask), atol=0, rtol=0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(ref, ids, mask), our_logits(ours, ids, mask), atol=2e-5, rtol=1e-4)
    # and a sharded Hugging Face save loads into ours
    ref.save_pretrained(tmp_path / "hf-sharded", max_shard_size="20KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").exists()
    again, _ = load_model(str(tmp_path / "hf-sharded"), with_tokenizer=False)
    torch.testing.assert_close(our_logits(again, ids, mask), our_logits(ours, ids, mask), atol=2e-5, rtol=1e-4)


def hf_greedy(ref, prompt: list[int], max_new_tokens: int, repetition_penalty: float = 1.0) -> list[int]:
    """transformers' greedy generate on one unpadded prompt: the new tokens."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    ref, directory = hf_model(name, tmp_path)
    ours, _ = load_model(str(directory), with_tokenizer=False)
    prompts = [[5, 17, 33, 8, 91, 4], [12, 9]]
    out = generate(ours, prompts, max_new_tokens=12, temperature=0, eos_token_id=None)
    for prompt, completion in zip(prompts, out.completions):
        assert completion == hf_greedy(ref, prompt, 12)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_repetition_penalty_generation_matches_transformers(name, tmp_path):
    # batched and left-padded here, one prompt at a time there; the prompts hold the pad token (0) themselves
    ref, directory = hf_model(name, tmp_path)
    ours, _ = load_model(str(directory), with_tokenizer=False)
    prompts = [[5, 17, 0, 33, 8, 91, 4, 17], [12, 0, 9]]
    penalised = generate(ours, prompts, max_new_tokens=12, temperature=0, repetition_penalty=1.5, pad_token_id=0)
    for prompt, completion in zip(prompts, penalised.completions):
        assert completion == hf_greedy(ref, prompt, 12, repetition_penalty=1.5)
    plain = generate(ours, prompts, max_new_tokens=12, temperature=0, pad_token_id=0).completions
    assert plain != penalised.completions   # the penalty changed the answers, so the comparison tests it


def test_presets_match_their_family():
    assert load_model_config("tiny").model_type == "llama"
    assert load_model_config("moe").model_type == "qwen3_moe"
    assert load_model_config("0.5b").model_type == "qwen3"


@pytest.mark.slow
def test_model_bench_compares_llama_of_the_same_weights(capsys, monkeypatch):
    # model/bench.py: the peer is built from our weights (same logits), and every workload prints one row per model
    from minitrain.model import bench
    args = ["--hidden_size", "32", "--num_hidden_layers", "2", "--intermediate_size", "48", "--vocab_size", "101",
            "--num_attention_heads", "4", "--num_key_value_heads", "2", "--seq_len", "16", "--batch_size", "2",
            "--prompt_len", "4", "--new_tokens", "3", "--repeat", "1", "--warmup", "0", "--device", "cpu"]
    ours, theirs = bench.build_models(bench.parse_args(args), torch.device("cpu"))
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
    bench.main(args + ["--no-compile"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0:2] for r in rows[1:]] == [
        [f"| {w}", m] for w in ("train fp32", "decode fp32 B=1", "decode fp32 B=8", "train bf16", "decode bf16 B=1",
                                "decode bf16 B=8") for m in ("ours", "llama")]
    assert all(r.split(" | ")[3] == "1.00x" for r in rows[1:] if r.split(" | ")[1] == "llama")
    # the compiled-decoding row, its compile-time line and its token check, with generate's compiled path replaced
    # by the eager one (compiling costs half a minute; tests/test_model.py tests it)
    monkeypatch.setattr(bench, "generate", lambda *a, compiled=False, **k: generate(*a, **k))
    bench.main(args + ["--dtypes", "fp32", "--decode_batches", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0:2] for r in rows[1:]] == [["| train fp32", "ours"], ["| train fp32", "llama"]] + \
        [["| decode fp32 B=2", m] for m in ("ours", "llama", "ours compiled")]
    assert "decode fp32 B=2: compiling our decode step took" in out and "greedy tokens equal the eager step's" in out
    assert float(rows[-1].split(" | ")[2].replace(",", "")) > 0
