"""offload.py: streamed layers against the same model resident, bitwise; the CPU memory budget of a model
over 1 GB, measured in a subprocess; the refusals."""
import json
import os
from dataclasses import replace

import pytest
import torch

import quantize as Q
from bench import SHAPES, write_random_checkpoint
from checkpoint import load_model
from conftest import run_commands, run_script
from decode import generate
from errors import UsageError
from generate import parse_args
from model import ModelArgs
from offload import OffloadOptions, load_offloaded, tensor_bytes, tensors_of
from sampling import SamplingParams

SMALL = replace(SHAPES["smollm2-135m"], dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32,
                intermediate_size=256, vocab_size=256, max_seq_len=256, tie_embeddings=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return small_checkpoints(tmp_path_factory.mktemp("offload"))


def small_checkpoints(directory) -> dict:
    """A small random bfloat16 checkpoint (every layer's weights different), and its int8 and int4 copies."""
    base = directory / "bf16"
    base.mkdir()
    write_random_checkpoint(SMALL, str(base))
    out = {"bf16": str(base)}
    for mode in ("int8", "int4"):
        out[mode] = str(base.parent / mode)
        Q.quantize_checkpoint(str(base), out[mode], mode, groupsize=32)
    return out


def budget_gb(resident: torch.nn.Module, prefetch: int, resident_layers: int) -> float:
    """A --max-resident-gb that leaves resident_layers resident beside the ring (offload.resident_within)."""
    layer = tensor_bytes(tensors_of(resident.layers[0]).values())
    largest = max(t.numel() * t.element_size() for t in tensors_of(resident.layers[0]).values())
    return ((prefetch + 1 + resident_layers + 0.5) * layer + largest) / 1e9


def checked_streaming(model, reference):
    """A pre-hook after offload's on every streamed block: it must hold that layer's own weights, bitwise."""
    expected = [tensors_of(block) for block in reference.layers]
    served = []

    def check(i, block, args):
        for name, t in tensors_of(block).items():
            assert torch.equal(t, expected[i][name]), f"layer {i} is served other weights for {name}"
        served.append(i)

    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda b, a, i=i: check(i, b, a))
    return served


def three_passes(model, tokens):
    """A prefill of tokens [2, 11] on a fresh cache, then two one-token steps: every layer runs three times."""
    model.setup_caches(2, 64)
    device = tokens.device
    with torch.no_grad():
        return [model(tokens, torch.arange(11, device=device)), model(tokens[:, :1], torch.tensor([11], device=device)),
                model(tokens[:, 1:2], torch.tensor([12], device=device))]


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
# float16: the bfloat16 file's layers copied into buffers, which run qlinear.FloatLinear on a CPU without float16
# products, as the resident ones do
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_layers_compute_exactly_what_resident_ones_do(checkpoints, mode, dtype):
    reference = load_model(checkpoints[mode], dtype=dtype)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = three_passes(reference, tokens)
    greedy = list(generate(reference, tokens[0].tolist(), SamplingParams(max_tokens=12)))
    for prefetch in (0, 1, 2):
        for resident_layers in (0, 2):
            options = OffloadOptions(prefetch=prefetch, max_resident_gb=budget_gb(reference, prefetch, resident_layers))
            model = load_offloaded(checkpoints[mode], "cpu", dtype, options)
            stats = model.offload.stats()
            assert (stats["resident_layers"], stats["streamed_layers"]) == (resident_layers, 6 - resident_layers)
            if mode != "int8":  # in place where the file holds what runs, else copied (int8: by its alignment)
                assert stats["zero_copy"] == (mode == "bf16" and dtype == torch.bfloat16)
            served = checked_streaming(model, reference)
            got = three_passes(model, tokens)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (prefetch, resident_layers)
            assert served == list(range(6)) * 3
            model.setup_caches(1, 64)
            assert list(generate(model, tokens[0].tolist(), SamplingParams(max_tokens=12))) == greedy
            assert model.offload.stats()["bytes_moved"] >= 15 * model.offload.stats()["bytes_per_pass"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_model_streamed_gives_the_resident_text(default_checkpoint, dtype):
    from checkpoint import load_tokenizer
    tok = load_tokenizer(default_checkpoint)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    texts, logits = [], []
    for options in (None, OffloadOptions(prefetch=1, max_resident_gb=0.05)):
        model = (load_offloaded(default_checkpoint, "cpu", dtype, options) if options
                 else load_model(default_checkpoint, dtype=dtype))
        model.setup_caches(1, 128)
        with torch.no_grad():
            logits.append(model(torch.tensor([prompt]), torch.arange(len(prompt))))
        texts.append(list(generate(model, prompt, SamplingParams(max_tokens=16), eos_ids=tok.eos_ids)))
    assert model.offload.stats()["streamed_layers"] > 20
    assert torch.equal(logits[0], logits[1]) and texts[0] == texts[1], tok.decode(texts[1])


def test_a_model_over_1_gb_runs_within_the_cpu_memory_budget(tmp_path):
    """Peak resident memory (anonymous and file-backed: /proc's VmHWM) of a
    --max-resident-gb 0.3 run stays within the budget plus the non-layer weights, the KV cache and the
    runtime (Python, PyTorch and its libraries: the peak of the same command on a tiny model) plus 64 MB;
    the resident run holds at least the weights."""
    big = ModelArgs(dim=1024, n_layers=32, n_heads=8, n_kv_heads=8, head_dim=128, intermediate_size=4096,
                    vocab_size=257, norm_eps=1e-5, rope_base=10000.0, max_seq_len=512, tie_embeddings=True,
                    attention_bias=False)
    (tmp_path / "big").mkdir()
    (tmp_path / "tiny").mkdir()
    write_random_checkpoint(big, str(tmp_path / "big"))
    write_random_checkpoint(replace(big, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32,
                                    intermediate_size=64), str(tmp_path / "tiny"))
    weights = os.path.getsize(tmp_path / "big" / "model.safetensors") / 1e9
    assert weights > 1.0

    # each process's own peak, so the three run at once
    flags = ["--device", "cpu", "--dtype", "bfloat16", "--prompt", "a short prompt", "--json", "--max-new-tokens", "4",
             "--ignore-eos"]
    runs = run_commands([["generate.py", "--checkpoint", tmp_path / "tiny", *flags],
                         ["generate.py", "--checkpoint", tmp_path / "big", *flags, "--max-resident-gb", "0.3"],
                         ["generate.py", "--checkpoint", tmp_path / "big", *flags]])
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    tiny, streamed, resident = (json.loads(r.stdout.splitlines()[0]) for r in runs)
    runtime = tiny["peak_memory_gb"]
    non_layer = 2 * 257 * 1024 * 2 / 1e9  # embedding (tied head) and norm, bfloat16
    kv_cache = 32 * 2 * 257 * 1024 * 2 / 1e9  # 32 layers of K and V, 257 slots
    assert streamed["streamed_layers"] > 20 and streamed["streamed_mb_per_step"] > 700
    assert streamed["peak_memory_gb"] <= 0.3 + non_layer + kv_cache + runtime + 0.064, (streamed, runtime)
    assert resident["peak_memory_gb"] >= weights, resident
    assert streamed["text"] == resident["text"]


def test_refusals(checkpoints):
    base = ["--prompt", "hi", "--checkpoint", checkpoints["bf16"]]
    for flags, message in [(["--offload", "--max-resident-gb", "1"], "give one"),
                           (["--prefetch", "2"], "--prefetch needs --offload"),
                           (["--max-resident-gb", "0"], "--max-resident-gb must be > 0"),
                           (["--max-resident-gb", "1", "--prefetch", "-1"], "--prefetch must be >= 0"),
                           (["--gpu-layers", "-1"], "--gpu-layers must be >= 0"),
                           (["--max-resident-gb", "1", "--compile"], "does not combine with --compile"),
                           (["--max-resident-gb", "1", "--draft", "ngram"], "does not combine with --draft")]:
        with pytest.raises(UsageError, match=message):
            parse_args(base + flags)
    with pytest.raises(UsageError, match="on the CPU give --max-resident-gb"):
        load_offloaded(checkpoints["bf16"], "cpu", torch.float32, OffloadOptions(gpu_layers=2))
    with pytest.raises(UsageError, match="less than streaming needs"):
        load_offloaded(checkpoints["bf16"], "cpu", torch.float32, OffloadOptions(max_resident_gb=1e-5))
    r = run_script("generate.py", *base, "--max-resident-gb", "0.00001")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "less than streaming needs" in lines[0], r.stderr
