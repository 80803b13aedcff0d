# Run: pytest tests/test_model.py   (without the eval/chat.py subprocesses: -m "not slow")
# The transformer's own properties: padding invariance, KV cache equivalence, gradient checkpointing, MoE routing and
# its auxiliary loss, parameter counts, generation controls, and one-line errors for bad configs.
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minitrain.eval import chat
from minitrain.model.checkpoint import load_model, load_tokenizer, save_checkpoint
from minitrain.model.config import ConfigError, ModelConfig, load_model_config
from minitrain.model.generate import apply_repetition_penalty, decode_step, generate, seen_tokens
from minitrain.model.transformer import CausalLM, KVCache, load_balancing_loss
from conftest import cli_error


def tiny(**overrides):
    torch.manual_seed(0)
    return CausalLM(load_model_config("tiny", overrides)).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_left_padding_gives_the_same_logits_as_no_padding(preset):
    torch.manual_seed(0)
    model = CausalLM(load_model_config(preset)).eval()
    a, b = torch.randint(3, 6400, (1, 12)), torch.randint(3, 6400, (1, 5))
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0], ids[1, 7:] = a, b
    mask = (torch.arange(12) >= torch.tensor([[0], [7]])).long()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(padded[0], model(a).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1, 7:], model(b).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_greedy_with_kv_cache_equals_greedy_without(preset):
    torch.manual_seed(0)
    model = CausalLM(load_model_config(preset)).eval()
    prompts = [torch.randint(3, 6400, (9,)).tolist(), torch.randint(3, 6400, (4,)).tolist()]
    out = generate(model, prompts, max_new_tokens=10, temperature=0)
    for prompt, completion in zip(prompts, out.completions):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert completion == seq[len(prompt):]


def test_attention_without_gradients_reads_the_shared_kv_heads_in_place_with_the_same_bits():
    model = tiny()
    assert model.config.num_attention_heads > model.config.num_key_value_heads          # grouped-query attention
    ids = torch.randint(3, 6400, (3, 17))
    mask = (torch.arange(17) >= torch.tensor([[0], [5], [16]])).long()                   # left padding
    for attention_mask in (None, mask):
        copied = model(ids, attention_mask=attention_mask).logits                       # gradients: K/V copied out
        with torch.no_grad():
            in_place = model(ids, attention_mask=attention_mask).logits                 # enable_gqa
        assert torch.equal(in_place, copied.detach())


def test_the_fixed_shape_decode_step_gives_the_logits_of_the_growing_cache():
    # compiled decoding's step, uncompiled: it writes at cache.write_at and attends over the whole cache with the
    # not-yet-generated positions masked out; the model's own step attends over the filled part only
    model = tiny()
    ids = torch.randint(3, 6400, (3, 7))
    mask = (torch.arange(7) >= torch.tensor([[0], [3], [6]])).long()                     # left padding
    growing, fixed = (KVCache(model.config, 3, 64, "cpu", torch.float32) for _ in range(2))
    full_mask = torch.zeros(3, 64, dtype=torch.long)
    full_mask[:, :7] = mask
    with torch.no_grad():
        model(ids, attention_mask=mask, kv_cache=growing)
        model(ids, attention_mask=mask, kv_cache=fixed)
        positions = mask.sum(-1, keepdim=True)                                           # [3, 1]
        tokens = torch.tensor([[11], [12], [13]])
        for step in range(5):
            slot = 7 + step
            full_mask[:, slot] = 1
            fixed.write_at = torch.tensor([slot])
            got = decode_step(model, tokens, positions + step, full_mask, fixed)        # [3, V]
            want = model(tokens, attention_mask=full_mask[:, :slot + 1], position_ids=positions + step,
                         kv_cache=growing).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert got.abs().max() > 0.1                                                  # real logits, not zeros
            tokens = want.argmax(-1, keepdim=True)


@pytest.mark.slow   # two Inductor compiles: about 25 s on 2 cores with a cold Inductor cache
def test_compiled_decoding_equals_eager_and_follows_changed_weights(monkeypatch):
    # frozen weights without the GEMM autotuning, which would double the compile time (model/bench.py checks the
    # shipped settings' greedy tokens against the eager step's at every run); frozen weights alone already go stale
    # when the guard is switched off (checked by hand), so the second half tests the guard
    monkeypatch.setattr("minitrain.model.generate.compile_options", lambda device: {"freezing": True})
    model = tiny(tie_word_embeddings=False)      # an untied random head: varied tokens (a tied one repeats the last)
    prompts = [[5, 6, 7, 8, 9], [100, 200], [42]]
    eager = generate(model, prompts, max_new_tokens=12, temperature=0).completions
    assert generate(model, prompts, max_new_tokens=12, temperature=0, compiled=True).completions == eager
    with torch.no_grad():                          # an in-place change, as an optimizer step makes it
        model.lm_head.weight.mul_(-1.0)
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    changed = generate(model, prompts, max_new_tokens=12, temperature=0).completions
    assert changed != eager                        # so the check below can tell stale frozen weights apart
    assert generate(model, prompts, max_new_tokens=12, temperature=0, compiled=True).completions == changed
    with pytest.raises(ValueError, match="learned decoding"):
        generate(model, prompts, 4, compiled=True, learned_decoding=True)


def test_rows_stop_at_eos_independently_and_stream_every_token():
    model = tiny()
    prompts = [[5, 6, 7], [100, 200, 300, 400]]
    free = generate(model, prompts, max_new_tokens=6, temperature=0)
    eos = free.completions[0][0]                # row 0 produces this first; row 1 never does
    assert eos not in free.completions[1] and len(free.completions[1]) == 6
    streamed = {0: [], 1: []}
    out = generate(model, prompts, max_new_tokens=6, temperature=0, eos_token_id=eos,
                   stream=lambda row, tok: streamed[row].append(tok))
    assert out.completions[0] == [eos] and out.finished == [True, False]
    assert out.completions[1] == free.completions[1]
    assert streamed == {0: out.completions[0], 1: out.completions[1]}


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats():
    model = tiny()
    prompts = [[5, 6, 7], [9, 10]]
    greedy = generate(model, prompts, max_new_tokens=8, temperature=0).completions
    assert generate(model, prompts, max_new_tokens=8, temperature=1.3, top_k=1).completions == greedy
    draw = lambda: generate(model, prompts, 8, temperature=1.0, generator=torch.Generator().manual_seed(3)).completions
    assert draw() == draw()


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_seen_tokens_ignore_padding_even_where_the_prompt_holds_the_pad_token():
    # row 0 really holds token 0 (the pad id) at position 1 and is padded after it: an order-dependent scatter of
    # mask values wrote False over it; row 1 is left-padded; row 2 has no padding
    ids = torch.tensor([[7, 0, 0, 0], [0, 0, 5, 0], [3, 4, 3, 9]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    seen = seen_tokens(ids, mask, 10)
    assert seen.nonzero().tolist() == [[0, 0], [0, 7], [1, 0], [1, 5], [2, 3], [2, 4], [2, 9]]
    assert seen_tokens(ids[:1], torch.tensor([[1, 0, 0, 0]]), 10).nonzero().tolist() == [[0, 7]]


def test_repetition_penalty_generation_is_the_same_batched_and_alone():
    # prompts that contain the pad token (0); the short one is left-padded with it in the batch
    model = tiny()
    prompts = [[5, 0, 17, 33, 8, 91, 4, 250], [12, 0, 9]]
    batched = generate(model, prompts, max_new_tokens=10, temperature=0, repetition_penalty=5.0).completions
    alone = [generate(model, [p], max_new_tokens=10, temperature=0, repetition_penalty=5.0).completions[0]
             for p in prompts]
    assert batched == alone
    assert batched != generate(model, prompts, max_new_tokens=10, temperature=0).completions   # the penalty acts


def test_generation_under_autocast_reads_a_bf16_copy_of_each_weight_made_once():
    """RL rollouts generate inside one autocast region: autocast casts each fp32 weight matrix to bf16 at its first
    use and keeps the copy (its cache) until the region ends, so every later token reads the bf16 copy (2 bytes a
    parameter while the rollout lasts, made again after each optimizer step). Counted: the same casts for 4 new
    tokens as for 16; without the cache, one per weight per forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = tiny()
    weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}

    class CountWeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                self.count += 1
            return func(*args, **(kwargs or {}))

    casts = {}
    for cache in (True, False):
        torch.set_autocast_cache_enabled(cache)
        try:
            for new in (4, 16):
                counter = CountWeightCasts()
                with counter, torch.autocast("cpu", dtype=torch.bfloat16):
                    generate(model, [[5, 17, 33], [12, 9, 4]], max_new_tokens=new, temperature=1.0, eos_token_id=[])
                casts[cache, new] = counter.count
        finally:
            torch.set_autocast_cache_enabled(True)
    assert casts[True, 4] == casts[True, 16] == len(weights)
    assert casts[False, 16] == 4 * casts[False, 4] == 16 * len(weights)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_gradient_checkpointing_gives_identical_loss_and_gradients(preset):
    ids = torch.randint(3, 6400, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                # padding: the MoE aux loss must skip it in both modes
    losses, grads = [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = CausalLM(load_model_config(preset)).train()
        model.enable_gradient_checkpointing(enabled)
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        losses.append((out.loss.detach(), out.aux_loss))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=0, rtol=0)
    if preset == "tiny-moe":
        assert losses[0][1] is not None
        torch.testing.assert_close(losses[0][1], losses[1][1], atol=0, rtol=0)
        assert any(".mlp.gate." in n for n in grads[0]) and any(".experts.3." in n for n in grads[0])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_loss_is_shifted_cross_entropy_with_ignored_labels():
    model = tiny()
    ids = torch.randint(3, 6400, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
        logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_moe_routing_parameter_counts_and_aux_loss():
    cfg = load_model_config("tiny-moe")
    model = CausalLM(cfg)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    total = model.num_parameters()
    assert total - model.num_parameters(active_only=True) == cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert
    # aux loss by hand: 2 tokens, 2 experts, top-1
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    p = F.softmax(logits, -1)
    f = torch.tensor([1.0, 0.0])               # both tokens pick expert 0
    expected = 2 * (f * p.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss([logits], top_k=1), expected)
    # uniform routing gives exactly top_k
    assert math.isclose(load_balancing_loss([torch.zeros(8, 4)], top_k=2).item(), 2.0, rel_tol=1e-6)


def test_moe_output_is_normalised_topk_mixture():
    cfg = load_model_config("tiny-moe")
    torch.manual_seed(0)
    moe = CausalLM(cfg).model.layers[0].mlp
    x = torch.randn(1, 3, cfg.hidden_size)
    probs = F.softmax(moe.gate(x[0]), -1)
    w, idx = probs.topk(cfg.num_experts_per_tok, -1)
    w = w / w.sum(-1, keepdim=True)
    expected = torch.stack([sum(w[t, j] * moe.experts[int(idx[t, j])](x[0, t]) for j in range(w.shape[1]))
                            for t in range(3)])
    torch.testing.assert_close(moe(x)[0], expected, atol=1e-6, rtol=1e-5)


def test_save_load_roundtrip_with_tokenizer_and_vocab_check(tmp_path):
    from minitrain.model.checkpoint import load_tokenizer
    tok = load_tokenizer("dataset/tokenizer")
    model = tiny()
    save_checkpoint(model, tok, str(tmp_path / "ckpt"), extra_json={"step": 3})
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "minitrain.json"} <= names
    assert "chat_template" in json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    loaded, tok2 = load_model(str(tmp_path / "ckpt"))
    ids = torch.randint(3, 6400, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok2.vocab_size == tok.vocab_size
    small = CausalLM(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))
    save_checkpoint(small, tok, str(tmp_path / "small"))
    with pytest.raises(ValueError, match="vocab_size"):
        load_model(str(tmp_path / "small"))


def test_config_errors_name_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_model_config("no-such-size")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 'wide'\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'hidden_size' must be int"):
        load_model_config(str(bad))
    bad.write_text("hidden_sizes: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field 'hidden_sizes'"):
        load_model_config(str(bad))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_model_config("tiny", {"num_key_value_heads": 3})


def run_chat(*args):
    return subprocess.run([sys.executable, "eval/chat.py", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_bad_model_dirs_exit_2_with_one_line(tmp_path, capsys):
    def chat_error(model):
        return cli_error(chat.cli, ["--model", str(model), "--prompt", "hi", "--device", "cpu"], capsys)

    assert "model directory not found" in chat_error(tmp_path / "missing")
    assert "Hub name" in chat_error("Qwen/Qwen3-0.6B")
    (tmp_path / "a-file").write_text("{}")
    assert f"{tmp_path / 'a-file'}: not a directory" in chat_error(tmp_path / "a-file")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama", "hidden_size": 8,')
    assert "config.json: line 1" in chat_error(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "gpt2"}')
    assert "field 'model_type'" in chat_error(tmp_path / "broken")
    # the script itself, as a user runs it: one line, no traceback
    r = run_chat("--model", str(tmp_path / "missing"), "--prompt", "hi", "--device", "cpu")
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'missing'}: model directory not found\n"


HF_BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "32"}, "field 'hidden_size' must be int, got '32'"),
    ({"num_attention_heads": 0}, "field 'num_attention_heads' must be positive, got 0"),
    ({"head_dim": "8"}, "field 'head_dim' must be int or null"),
    ({"vocab_size": 100.0}, "field 'vocab_size' must be int, got 100.0"),
    ({"rope_theta": "fast"}, "field 'rope_theta' must be a number, got 'fast'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}}, "field 'rope_parameters.rope_theta' must be"),
    ({"rms_norm_eps": "tiny"}, "field 'rms_norm_eps' must be float, got 'tiny'"),
    ({"initializer_range": "0.02"}, "field 'initializer_range' must be float"),
    ({"model_type": "qwen3_moe", "router_aux_loss_coef": "x", "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 8}, "field 'router_aux_loss_coef' must be float"),
    ({"rope_parameters": [10000.0]}, "field 'rope_parameters' must be a mapping"),
    ({"rope_scaling": "yarn"}, "field 'rope_scaling' must be a mapping or null"),
    ({"eos_token_id": []}, "field 'eos_token_id' is an empty list"),
    ({"eos_token_id": ["</s>"]}, "field 'eos_token_id' must be int"),
    ({"bos_token_id": "<s>"}, "field 'bos_token_id' must be int or null"),
    ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be bool"),
    ({"num_key_value_heads": "2"}, "field 'num_key_value_heads' must be int"),
])
def test_hf_config_fields_of_the_wrong_type_are_config_errors(change, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict({**HF_BASE, **change}, "ckpt/config.json")
    assert str(e.value).startswith("ckpt/config.json: ") and message in str(e.value), str(e.value)


def test_hf_config_defaults_and_eos_list():
    config = ModelConfig.from_hf_dict({**HF_BASE, "eos_token_id": [7, 2], "rope_scaling": {
        "rope_type": "yarn", "factor": 2.0, "beta_fast": None, "attention_factor": None}}, "c.json")
    assert config.eos_token_id == 7 and config.tie_word_embeddings is False and config.rope_theta == 10000.0
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 2.0}   # null = transformers' default
    moe = ModelConfig.from_hf_dict({**HF_BASE, "model_type": "qwen3_moe", "num_attention_heads": 8,
                                    "num_key_value_heads": None}, "c.json")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.norm_topk_prob,
            moe.num_key_value_heads) == (128, 8, 768, False, 8)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn", "factor": "x"}, "field 'rope_scaling.factor' must be a positive number, got 'x'"),
    ({"rope_type": "linear", "factor": 0}, "field 'rope_scaling.factor' must be a positive number, got 0"),
    ({"rope_type": "linear", "factor": True}, "field 'rope_scaling.factor' must be a positive number"),
    ({"rope_type": "yarn"}, "field 'rope_scaling.factor' is required for rope_type yarn"),
    ({"rope_type": "dynamic", "factor": 2.0}, "field 'rope_scaling.rope_type' must be default, linear, yarn or llama3"),
    ({"type": ["yarn"], "factor": 2.0}, "field 'rope_scaling.rope_type' must be"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "512"},
     "field 'rope_scaling.original_max_position_embeddings' must be a positive int, got '512'"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}, "field 'rope_scaling.beta_fast' must be a number"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_slow": None}, "field 'rope_scaling.beta_slow' must be a number"),
    ({"rope_type": "yarn", "factor": 4.0, "mscale": "1"}, "field 'rope_scaling.mscale' must be a number"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, "field 'rope_scaling.truncate' = False is not supported"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1"}, "field 'rope_scaling.low_freq_factor' must be"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "field 'rope_scaling.high_freq_factor' (4.0) must exceed low_freq_factor (4.0)"),
])
def test_rope_scaling_fields_are_checked(scaling, message):
    with pytest.raises(ConfigError) as e:
        load_model_config("tiny", {"rope_scaling": scaling})
    assert message in str(e.value), str(e.value)
    if None not in scaling.values():   # in a config.json, null means transformers' default (see below)
        with pytest.raises(ConfigError, match="c.json: field 'rope_scaling"):
            ModelConfig.from_hf_dict({**HF_BASE, "rope_scaling": scaling}, "c.json")


def test_rope_scaling_accepts_what_transformers_writes():
    for scaling in [{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1, "attention_factor": None, "truncate": True},
                    {"type": "linear", "factor": 2.0},
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 512}]:
        assert load_model_config("tiny", {"rope_scaling": scaling}).rope_scaling == scaling


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("dataset/tokenizer")


def small_model(tie: bool) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)).eval()


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_tied_and_untied_heads_load_only_when_the_weights_agree(tmp_path):
    for tie in (True, False):   # our checkpoints say which, always
        save_checkpoint(small_model(tie), None, str(tmp_path / f"tie-{tie}"))
        assert json.loads((tmp_path / f"tie-{tie}" / "config.json").read_text())["tie_word_embeddings"] is tie
    ids = torch.randint(3, 6400, (1, 6))
    # an untied checkpoint whose config claims tied: the head in the file would be dropped
    untied = tmp_path / "tie-False"
    edit_json(untied / "config.json", tie_word_embeddings=True)
    with pytest.raises(ConfigError, match=r"model.safetensors: tensor 'lm_head.weight' differs from the embedding, "
                                          r"but .*config.json field 'tie_word_embeddings' is true"):
        load_model(str(untied), with_tokenizer=False)
    # a tied checkpoint whose config says (or leaves to the default) untied: no head to load
    tied = tmp_path / "tie-True"
    for value in (False, None):
        config = json.loads((tied / "config.json").read_text())
        config["tie_word_embeddings"] = value
        if value is None:
            del config["tie_word_embeddings"]
        (tied / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=r"the weights hold no 'lm_head.weight', which an untied output head "
                                              r"needs \(.*config.json field 'tie_word_embeddings' is false or missing"):
            load_model(str(tied), with_tokenizer=False)
    # tied, with an lm_head.weight in the file equal to the embedding (older savers write both): loads
    edit_json(tied / "config.json", tie_word_embeddings=True)
    weights = load_file(str(tied / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(tied / "model.safetensors"))
    loaded, _ = load_model(str(tied), with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small_model(True)(ids).logits)


def test_damaged_weights_unknown_dtype_and_file_paths_are_config_errors(tmp_path):
    save_checkpoint(small_model(True), None, str(tmp_path / "m"))
    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    for damage in (b"garbage", good[:len(good) // 2]):
        weights.write_bytes(damage)
        with pytest.raises(ConfigError, match=r"m/model.safetensors: not a readable safetensors file \(") as e:
            load_model(str(tmp_path / "m"), with_tokenizer=False)
        assert isinstance(e.value, SafetensorError)   # callers that catch safetensors' own error still do
    weights.write_bytes(good)
    edit_json(tmp_path / "m" / "config.json", torch_dtype="float64")
    with pytest.raises(ConfigError, match=r"config.json: field 'torch_dtype' must be float32, bfloat16, float16, "
                                          r"got 'float64'"):
        load_model(str(tmp_path / "m"), with_tokenizer=False)
    model, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, with_tokenizer=False)   # an explicit dtype wins
    assert model.lm_head.weight.dtype == torch.bfloat16
    edit_json(tmp_path / "m" / "config.json", torch_dtype=None, dtype="bfloat16")           # transformers 5's name
    assert load_model(str(tmp_path / "m"), with_tokenizer=False)[0].lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"config.json: not a directory"):
        load_model(str(tmp_path / "m" / "config.json"))


@pytest.mark.slow
def test_chat_cli_prints_only_the_completion(tmp_path):
    from minitrain.model.checkpoint import load_tokenizer
    tok = load_tokenizer("dataset/tokenizer")
    model = tiny()
    save_checkpoint(model, tok, str(tmp_path / "m"))
    r = run_chat("--model", str(tmp_path / "m"), "--prompt", "What is 2+3?", "--temperature", "0",
                 "--max_new_tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ids = tok.chat_prompt_ids([{"role": "user", "content": "What is 2+3?"}])
    expected = generate(model, [ids], 5, temperature=0, eos_token_id=tok.eos_id).completions[0]
    assert r.stdout == tok.decode(expected) + "\n"
