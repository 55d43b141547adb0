"""Round trips through every source format, and clear refusals of bad input."""
import json
import os
import struct

import numpy as np
import pytest
import torch

from conftest import ROOT, make_hf_model, run_python, run_script, save_hf_model, write_byte_tokenizer
from convert_checkpoint import ConversionError, convert, interleaved_to_half
from checkpoint import load_model
from errors import UsageError


def half_to_interleaved(w, n_heads):
    """The inverse of interleaved_to_half: Hugging Face q/k rows back to Meta's / llama.cpp's layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_weights(hf):
    return {k: v.detach().clone() for k, v in hf.state_dict().items()}


def assert_same_logits(hf, ckpt, atol=1e-4):
    ours = load_model(str(ckpt))
    tokens = torch.randint(0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ours.setup_caches(1, 32)
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(ours(tokens, torch.arange(16)), expected, atol=atol, rtol=0)


def test_interleave_permutation_round_trip():
    w = torch.randn(4 * 8, 5)
    torch.testing.assert_close(interleaved_to_half(half_to_interleaved(w, 4), 4), w)


def test_hf_sharded_bin_files(tmp_path):
    hf = make_hf_model("gqa")
    src = save_hf_model(hf, tmp_path / "hf")
    os.remove(src / "model.safetensors")
    # transformers no longer writes pickles, so shard the state dict as older versions did
    names, weight_map = sorted(hf.state_dict()), {}
    for k in range(3):
        shard = {n: hf.state_dict()[n].clone() for n in names[k::3]}
        torch.save(shard, src / f"pytorch_model-0000{k + 1}-of-00003.bin")
        weight_map.update({n: f"pytorch_model-0000{k + 1}-of-00003.bin" for n in shard})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    convert(str(src), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    assert_same_logits(hf, tmp_path / "out")


def test_hf_sharded_safetensors(tmp_path):
    hf = make_hf_model("gqa")
    src = save_hf_model(hf, tmp_path / "hf", max_shard_size="50KB")
    assert os.path.exists(src / "model.safetensors.index.json")
    convert(str(src), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    assert_same_logits(hf, tmp_path / "out")


def test_hf_old_config_layout_rope_theta_and_rope_scaling(tmp_path):
    hf = make_hf_model("llama3.1-rope-scaling")
    src = save_hf_model(hf, tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (src / "config.json").write_text(json.dumps(config))
    convert(str(src), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]["type"] == "llama3"
    assert_same_logits(hf, tmp_path / "out")


def test_meta_layout_with_two_shards(tmp_path):
    hf = make_hf_model("gqa")
    c, sd = hf.config, hf_weights(hf)
    src = tmp_path / "meta"
    src.mkdir()
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "norm_eps": c.rms_norm_eps,
              "rope_theta": 10000.0, "max_seq_len": 256}
    (src / "params.json").write_text(json.dumps(params))
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta[f"layers.{i}.attention.wq.weight"] = half_to_interleaved(sd[p + "self_attn.q_proj.weight"], 4)
        meta[f"layers.{i}.attention.wk.weight"] = half_to_interleaved(sd[p + "self_attn.k_proj.weight"], 2)
        meta[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    # Model-parallel shards: each weight split along the dimension Meta's layers split it.
    from convert_checkpoint import META_SPLIT
    shards = [{}, {}]
    for name, w in meta.items():
        dim = META_SPLIT.get(name.split(".")[-2])
        parts = [w, w] if dim is None else list(w.chunk(2, dim=dim))
        for shard, part in zip(shards, parts):
            shard[name] = part.contiguous()
    for k, shard in enumerate(shards):
        torch.save(shard, src / f"consolidated.{k:02d}.pth")
    write_byte_tokenizer(tmp_path)  # a tokenizer is required; Meta keeps tokenizer.model, we check the error
    with pytest.raises(ConversionError, match="tokenizer.model"):
        convert(str(src), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".writing")]
    sp_fixture = os.path.join(ROOT, "..", "shared", "fixtures", "llama2-tokenizer.model")
    if os.path.exists(sp_fixture):
        import shutil
        shutil.copy(sp_fixture, src / "tokenizer.model")
    else:  # any file serves the copy step; the weights are what is compared here
        (src / "tokenizer.model").write_bytes(b"")
    convert(str(src), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    assert_same_logits(hf, tmp_path / "out")


def write_llama2c(path, hf, version):
    c, sd = hf.config, hf_weights(hf)
    L = c.num_hidden_layers
    per_layer = lambda key: torch.stack([sd[f"model.layers.{i}.{key}"] for i in range(L)])
    q = torch.stack([half_to_interleaved(sd[f"model.layers.{i}.self_attn.q_proj.weight"], 4) for i in range(L)])
    k = torch.stack([half_to_interleaved(sd[f"model.layers.{i}.self_attn.k_proj.weight"], 2) for i in range(L)])
    v, o = per_layer("self_attn.v_proj.weight"), per_layer("self_attn.o_proj.weight")
    w1, w2, w3 = per_layer("mlp.gate_proj.weight"), per_layer("mlp.down_proj.weight"), per_layer("mlp.up_proj.weight")
    att_norm, ffn_norm = per_layer("input_layernorm.weight"), per_layer("post_attention_layernorm.weight")
    emb, norm, head = sd["model.embed_tokens.weight"], sd["model.norm.weight"], sd["lm_head.weight"]
    dims = (c.hidden_size, c.intermediate_size, L, c.num_attention_heads, c.num_key_value_heads)
    if version == 0:
        header = struct.pack("<7i", *dims, -c.vocab_size, 256)  # negative vocab: unshared classifier
        rope = torch.zeros(256, c.hidden_size // c.num_attention_heads)
        tensors = [emb, att_norm, q, k, v, o, ffn_norm, w1, w2, w3, norm, rope, head]
    else:
        header = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, c.vocab_size, 256, 0)
        header += b"\0" * (256 - len(header))
        tensors = [att_norm, ffn_norm, norm, emb, q, k, v, o, w1, w2, w3, head]
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors:
            f.write(t.float().numpy().tobytes())


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_file(tmp_path, version):
    hf = make_hf_model("gqa")
    for m in hf.modules():  # llama2.c files do not record the norm epsilon: it is always 1e-5
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-5
    write_llama2c(tmp_path / "model.bin", hf, version)
    (tmp_path / "tok.model").write_bytes(b"")  # copied as given; weights are what is compared
    convert(str(tmp_path / "model.bin"), str(tmp_path / "out"), dtype=torch.float32, tokenizer=str(tmp_path / "tok.model"),
            progress=False)
    assert_same_logits(hf, tmp_path / "out")


def test_llama2c_truncated(tmp_path):
    hf = make_hf_model("gqa")
    write_llama2c(tmp_path / "model.bin", hf, 0)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert(str(tmp_path / "model.bin"), str(tmp_path / "out"), progress=False)


def write_gguf(path, hf, qtype, arch="llama"):
    """Write the HF model as llama.cpp would: its names, interleaved q/k, the given tensor type for matrices."""
    import gguf
    from gguf.quants import quantize, dequantize
    c, sd = hf.config, hf_weights(hf)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    from tokenizers import pre_tokenizers
    tokens = ["<|endoftext|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())[: c.vocab_size - 4] + ["Ġ", "he", "ll"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    reference = {}

    def add(name, t, quantized=True):
        a = t.float().numpy()
        if quantized and qtype != gguf.GGMLQuantizationType.F32:
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            a = dequantize(q, qtype)
        else:
            w.add_tensor(name, a)
        reference[name] = torch.from_numpy(np.array(a))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"], quantized=False)
    add("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", half_to_interleaved(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", half_to_interleaved(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], quantized=False)
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], quantized=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def test_gguf_f32(tmp_path):
    import gguf
    hf = make_hf_model("gqa")
    write_gguf(tmp_path / "m.gguf", hf, gguf.GGMLQuantizationType.F32)
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    assert_same_logits(hf, tmp_path / "out")
    from tokenizer import get_tokenizer
    tok = get_tokenizer(str(tmp_path / "out"))
    ids = tok.encode("hello world<|endoftext|>")
    assert [tok.id_to_piece(i) for i in ids[:3]] == ["he", "ll", "o"] and ids[-1] == 0
    assert tok.decode(ids) == "hello world"  # special tokens are not printed
    assert tok.chat_template.startswith("{% for m in messages %}")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_quantized_matches_dequantized_reference(tmp_path, qtype):
    import gguf
    hf = make_hf_model("gqa")
    hf.config.intermediate_size = 96
    ref = write_gguf(tmp_path / "m.gguf", hf, getattr(gguf.GGMLQuantizationType, qtype))
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "out"), dtype=torch.float32, progress=False)
    ours = load_model(str(tmp_path / "out")).state_dict()
    for i in range(hf.config.num_hidden_layers):
        q = interleaved_to_half(ref[f"blk.{i}.attn_q.weight"], 4)
        k = interleaved_to_half(ref[f"blk.{i}.attn_k.weight"], 2)
        wqkv = torch.cat([q, k, ref[f"blk.{i}.attn_v.weight"]])
        torch.testing.assert_close(ours[f"layers.{i}.attention.wqkv.weight"], wqkv, atol=0, rtol=0)
        w13 = torch.cat([ref[f"blk.{i}.ffn_gate.weight"], ref[f"blk.{i}.ffn_up.weight"]])
        torch.testing.assert_close(ours[f"layers.{i}.feed_forward.w13.weight"], w13, atol=0, rtol=0)
    torch.testing.assert_close(ours["tok_embeddings.weight"], ref["token_embd.weight"], atol=0, rtol=0)
    # and the quantization really happened: the dequantized weights differ from the originals
    assert not torch.equal(ours["tok_embeddings.weight"], hf.state_dict()["model.embed_tokens.weight"])


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf
    hf = make_hf_model("gqa")
    write_gguf(tmp_path / "m.gguf", hf, gguf.GGMLQuantizationType.F32, arch="gpt2")
    r = run_script("convert_checkpoint.py", tmp_path / "m.gguf", "--out", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'm.gguf'}: GGUF architecture 'gpt2' is not "
                                             "supported (only 'llama')"]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def converted(tmp_path):
    hf = make_hf_model("gqa")
    src = save_hf_model(hf, tmp_path / "hf")
    convert(str(src), str(tmp_path / "ckpt"), dtype=torch.float32, progress=False)
    return tmp_path / "ckpt"


def test_truncated_safetensors_is_refused(converted):
    weights = converted / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UsageError, match=r"model.safetensors: truncated or corrupt"):
        load_model(str(converted))


@pytest.mark.parametrize("field", ["n_kv_heads", "vocab_size", "rope_base"])
def test_missing_config_field_is_refused(converted, field):
    config = json.loads((converted / "config.json").read_text())
    del config[field]
    (converted / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=rf"config.json: missing field\(s\) {field}"):
        load_model(str(converted))


def test_inconsistent_config_is_refused(converted):
    config = json.loads((converted / "config.json").read_text())
    config["intermediate_size"] = 100
    (converted / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"tensor layers.0.feed_forward.w13.weight has shape \(192, 64\), "
                                         r"config.json implies \(200, 64\)"):
        load_model(str(converted))


def test_existing_output_is_not_overwritten(converted, tmp_path):
    with pytest.raises(ConversionError, match="already exists"):
        convert(str(tmp_path / "hf"), str(converted), progress=False)


def test_bf16_output_is_half_the_size(tmp_path):
    hf = make_hf_model("gqa")
    src = save_hf_model(hf, tmp_path / "hf")
    convert(str(src), str(tmp_path / "bf16"), dtype=torch.bfloat16, progress=False)
    convert(str(src), str(tmp_path / "f32"), dtype=torch.float32, progress=False)
    ratio = os.path.getsize(tmp_path / "bf16" / "model.safetensors") / os.path.getsize(tmp_path / "f32" / "model.safetensors")
    assert 0.49 < ratio < 0.52
    assert load_model(str(tmp_path / "bf16"), dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_a_cpu_load_puts_the_weights_in_one_huge_page_mapping(tmp_path):
    """On the CPU every tensor of the checkpoint is read into checkpoint.HugePages' one mapping (a cast one
    too), with the file's values, the tied head sharing the embedding's."""
    from checkpoint import HugePages
    from safetensors.torch import load_file
    if not HugePages.available():
        pytest.skip("no MADV_HUGEPAGE here")
    hf = make_hf_model("gqa")
    hf.config.tie_word_embeddings = True
    hf.lm_head.weight = hf.model.embed_tokens.weight
    convert(str(save_hf_model(hf, tmp_path / "hf")), str(tmp_path / "ck"), dtype=torch.bfloat16, progress=False)
    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    for dtype in (torch.bfloat16, torch.float32):  # read in place; cast, then copied in
        model = load_model(str(tmp_path / "ck"), dtype=dtype)
        state = model.state_dict()
        assert len({t.untyped_storage().data_ptr() for t in state.values()}) == 1
        assert model.output.weight is model.tok_embeddings.weight
        for name, t in stored.items():
            assert torch.equal(state[name], t.to(dtype)), name


LOAD_PEAK = '''
import sys, torch
sys.path.insert(0, {root!r})
from checkpoint import load_model

def mib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

torch.empty(1).clone()
before = mib("VmRSS:")
model = load_model({ckpt!r})
weights = sum(t.numel() * t.element_size() for t in model.layers.state_dict().values()) / 2 ** 20
print(weights, mib("VmHWM:") - before)
'''


def test_a_resident_load_peaks_at_the_weights_not_twice_them(tmp_path):
    """Resident memory (anonymous plus file-backed) of a load: the weights plus a constant, where reading
    through a memory map peaked at twice the weights."""
    from bench import write_random_checkpoint
    from model import ModelArgs
    args = ModelArgs(dim=512, n_layers=12, n_heads=8, n_kv_heads=2, head_dim=64, intermediate_size=2048,
                     vocab_size=1024, norm_eps=1e-5, rope_base=10000.0, max_seq_len=256, tie_embeddings=True,
                     attention_bias=False)
    write_random_checkpoint(args, str(tmp_path), dtype=torch.float32)
    script = tmp_path / "load.py"
    script.write_text(LOAD_PEAK.format(root=ROOT, ckpt=str(tmp_path)))
    r = run_python(script)
    assert r.returncode == 0, r.stderr
    weights, peak = map(float, r.stdout.split())
    # measured: the weights plus about 70 MiB, for 120 MiB of weights and for 2.4 GB alike
    assert weights > 170 and peak < weights + 100, (weights, peak)
