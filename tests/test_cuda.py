"""On a CUDA GPU: the model against transformers, decoding against the CPU, the quantized layers against
float references, offloading against the resident model, the engine against generate() alone. Every test
here skips where PyTorch sees no CUDA GPU (CI has none); .ci/cuda runs them on a machine that has one."""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import decode as G
import qlinear
import quantize as Q
import test_model_parity as parity
from checkpoint import load_model
from conftest import FAMILIES, converted_checkpoint
from decode import Steps, generate
from engine import Engine
from offload import OffloadOptions, load_offloaded
from sampling import SamplingParams
from test_engine import random_prompts
from test_offload import checked_streaming, small_checkpoints, three_passes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")
CUDA = "cuda"


def greedy(model, prompt, n, steps=None):
    return list(generate(model, prompt, SamplingParams(max_tokens=n), steps=steps))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random float32 model (GQA) and its int8 and int4 copies."""
    _, out = converted_checkpoint(tmp_path_factory, "gqa", seed=5, max_position_embeddings=1024)
    paths = {"float": str(out)}
    for mode in ("int8", "int4"):
        paths[mode] = str(out.parent / mode)
        Q.quantize_checkpoint(paths["float"], paths[mode], mode, groupsize=32)
    return paths


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_on_the_gpu(tmp_path_factory, family):
    """test_model_parity's checks, with both models on the GPU: a prefill, and decoding through the KV cache."""
    hf, out = converted_checkpoint(tmp_path_factory, family)
    pair = hf.to(CUDA), load_model(str(out), device=CUDA)
    parity.test_prefill_logits_match(pair)
    parity.test_decode_through_kv_cache_matches(pair)


def test_greedy_on_the_gpu_equals_the_cpu_eager_and_compiled(tiny):
    """float32: the CPU's tokens, alone and in a batch of three lengths, through texts that cross KV blocks
    (steps attend to the filled part of the cache); compiled (CUDA graphs) without recompiling."""
    cpu = load_model(tiny["float"])
    alone = random_prompts([G.KV_BLOCK - 10], seed=1)[0]
    batch = random_prompts([3, 17, 9], seed=2)
    cpu.setup_caches(3, 3 * G.KV_BLOCK)
    expected = greedy(cpu, alone, 40), greedy(cpu, batch, 40)
    gpu = load_model(tiny["float"], device=CUDA)
    gpu.setup_caches(3, 3 * G.KV_BLOCK)
    assert (greedy(gpu, alone, 40), greedy(gpu, batch, 40)) == expected
    skips = counters["inductor"]["cudagraph_skips"]
    for prompt, tokens in zip((alone, batch), expected):
        gpu.setup_caches(len(prompt) if isinstance(prompt[0], list) else 1, 3 * G.KV_BLOCK)
        steps = Steps(gpu, compile=True)
        greedy(gpu, prompt, 2, steps)  # compiles
        with torch.compiler.set_stance("fail_on_recompile"):
            assert greedy(gpu, prompt, 40, steps) == tokens
    # Inductor falls back to launching each kernel from Python where it cannot use CUDA graphs, and says
    # why only in its logs (TORCH_LOGS=cudagraphs)
    assert counters["inductor"]["cudagraph_skips"] == skips, "a compiled step runs without CUDA graphs"


def compiled_code(fn, *args):
    """fn(*args) compiled whole, and Inductor's code."""
    from torch._inductor.utils import run_and_get_code
    compiled = torch.compile(fn, fullgraph=True)
    out, code = run_and_get_code(compiled, *args)
    return out, "\n".join(code)


@pytest.mark.parametrize("rows", [1, 8, 100])  # int4: PyTorch's CUDA kernel up to 64 rows
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_on_the_gpu_against_float64(mode, rows):
    torch.manual_seed(0)
    w, bias = torch.randn(1536, 576), torch.randn(1536)  # the default model's up projection
    if mode == "int8":
        layer = qlinear.Int8Linear(576, 1536, bias=True)
        layer.weight, layer.scales = Q.quantize_int8(w)
        deq = layer.weight.double() * layer.scales.double()[:, None]
    else:
        layer = qlinear.Int4Linear(576, 1536, bias=True, groupsize=32)
        layer.weight, layer.scales_and_zeros = Q.quantize_int4(w, 32)
        deq = qlinear.dequantize_int4(layer.weight, layer.scales_and_zeros, 32).double()
    layer = layer.to(CUDA)  # scales in float32, as load_model keeps them
    layer.bias = nn.Parameter(bias.to(CUDA, torch.bfloat16))
    qlinear.prepare(layer)
    if mode == "int4":
        assert (layer.packed is not None) == (torch.cuda.get_device_capability() >= (8, 0))
    x = torch.randn(rows, 576, device=CUDA).to(torch.bfloat16)
    expected = (x.double() @ deq.to(CUDA).t() + bias.to(CUDA, torch.bfloat16).double()).float()
    tol = 1e-2 * expected.abs().max().item()  # bfloat16 input and output
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), expected, atol=tol, rtol=0)
        got, code = compiled_code(layer, x)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)
    if mode == "int4" and layer.packed is not None:
        assert ("_weight_int4pack_mm" in code) == (rows <= qlinear.CUDA_INT4_FUSED_MAX_ROWS)


@pytest.mark.parametrize("mode", ["float", "int8", "int4"])
def test_compiled_gpu_decoding_is_greedy_by_the_eager_models_logits(tiny, mode):
    """bfloat16, a batch of three: each token the compiled step chose is the largest of the eager model's
    logits over the whole text, up to bfloat16's rounding (a near-tie may go either way)."""
    model = load_model(tiny[mode], device=CUDA, dtype=torch.bfloat16)
    prompts = random_prompts([3, 17, 9], seed=4)
    model.setup_caches(3, 256)
    out = greedy(model, prompts, 48, Steps(model, compile=True))
    model.setup_caches(1, 256)
    for i, prompt in enumerate(prompts):
        tokens = [step[i] for step in out]
        text = torch.tensor([prompt + tokens], device=CUDA)
        with torch.no_grad():
            logits = model(text, torch.arange(text.shape[1], device=CUDA))[0, len(prompt) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(tokens, device=CUDA)[:, None])[:, 0]
        best = logits.max(dim=1).values
        assert ((best - chosen) <= 0.02 * best.abs().clamp(min=1)).all(), (mode, i, (best - chosen).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return small_checkpoints(tmp_path_factory.mktemp("offload"))


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_streamed_layers_on_the_gpu_compute_exactly_what_resident_ones_do(checkpoints, mode):
    reference = load_model(checkpoints[mode], device=CUDA, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0)).to(CUDA)
    expected = three_passes(reference, tokens)
    for prefetch in (0, 1, 2):
        for gpu_layers in (0, 2):
            model = load_offloaded(checkpoints[mode], CUDA, torch.bfloat16,
                                   OffloadOptions(prefetch=prefetch, gpu_layers=gpu_layers))
            stats = model.offload.stats()
            assert (stats["resident_layers"], stats["streamed_layers"]) == (gpu_layers, 6 - gpu_layers)
            served = checked_streaming(model, reference)
            got = three_passes(model, tokens)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (prefetch, gpu_layers)
            assert served == list(range(6)) * 3
            assert model.offload.stats()["copy_seconds"] > 0


@pytest.mark.parametrize("compile", [False, True])
def test_engine_on_the_gpu_equals_generate_alone(tiny, compile):
    """float32, chunked prompts, cached prefixes, and a pool that forces preemption; compiled, one CUDA graph
    per batch size, without recompiling as requests come and go."""
    prompts = random_prompts([5, 40, 17, 33, 64, 3, 150], seed=6)
    prompts += [prompts[4][:48] + [1, 2, 3]]
    ref = load_model(tiny["float"], device=CUDA)
    expected = []
    for p in prompts:
        ref.setup_caches(1, len(p) + 24)
        expected.append(greedy(ref, p, 24))
    engine = Engine(load_model(tiny["float"], device=CUDA), max_num_seqs=4, kv_cache_tokens=320, block_size=16,
                    max_num_batched_tokens=32, compile=compile)
    if compile:
        engine.warm_up()
    with torch.compiler.set_stance("fail_on_recompile" if compile else "default"):
        got = engine.generate(prompts, SamplingParams(max_tokens=24))
    assert [c.token_ids for c in got] == expected
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
