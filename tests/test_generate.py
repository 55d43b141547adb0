"""generate.py: the decode loop against Hugging Face, batching, sampling, stopping, streaming, the CLI."""
import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F

import decode as G
import qlinear
from checkpoint import load_model
from conftest import converted_checkpoint, fixture, plain_linears, run_commands, run_python, run_script
from decode import Steps, TextStream, generate
from sampling import SamplingParams, argmax, sample
from tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf, out = converted_checkpoint(tmp_path_factory, "gqa", seed=5)
    model = load_model(str(out))
    # Longer than a few KV_BLOCKs: steps attend to the filled part of the cache, and texts cross blocks.
    model.setup_caches(max_batch_size=3, max_seq_length=3 * G.KV_BLOCK)
    return hf, model, str(out)


def run(model, prompt, n, eos_ids=(), steps=None, **sampling):
    return list(generate(model, prompt, SamplingParams(max_tokens=n, **sampling), eos_ids=eos_ids, steps=steps))


@pytest.mark.parametrize("prompt_len", [12, G.KV_BLOCK - 10])  # the second crosses a KV block
def test_greedy_equals_hugging_face_generate(tiny, prompt_len):
    hf, model, _ = tiny
    prompt = torch.randint(0, 128, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        ids = torch.tensor([prompt])  # an explicit mask: generate would mask prompt tokens equal to pad_token_id
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                               do_sample=False)[0, prompt_len:].tolist()
    assert run(model, prompt, 32) == expected


def test_batch_of_different_lengths_equals_each_alone(tiny):
    _, model, _ = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 17, 9)]
    alone = [run(model, p, 20) for p in prompts]
    steps = run(model, prompts, 20)
    assert [[step[i] for step in steps] for i in range(3)] == alone


def test_eos_ends_generation_and_is_yielded(tiny):
    _, model, _ = tiny
    prompt = [5, 6, 7, 8]
    free = run(model, prompt, 30)
    eos = free[6]
    first = free.index(eos)
    assert run(model, prompt, 30, eos_ids={eos}) == free[:first + 1]
    # in a batch, a finished row yields None while the others go on
    steps = run(model, [prompt, [9, 10, 11]], 30, eos_ids={eos})
    assert [s[0] for s in steps][:first + 1] == free[:first + 1]
    assert all(s[0] is None for s in steps[first + 1:])


def test_top_k_1_equals_greedy(tiny):
    _, model, _ = tiny
    prompt = [1, 2, 3, 4, 5]
    assert run(model, prompt, 16, temperature=1.0, top_k=1) == run(model, prompt, 16)
    # a tiny top_p keeps only the most likely token: greedy again
    assert run(model, prompt, 16, temperature=1.0, top_p=1e-6) == run(model, prompt, 16)


def test_same_seed_same_samples(tiny):
    _, model, _ = tiny
    prompt = [3, 1, 4, 1, 5]
    torch.manual_seed(42)
    a = run(model, prompt, 24, temperature=1.0, top_k=50, top_p=0.95)
    torch.manual_seed(42)
    b = run(model, prompt, 24, temperature=1.0, top_k=50, top_p=0.95)
    torch.manual_seed(43)
    c = run(model, prompt, 24, temperature=1.0, top_k=50, top_p=0.95)
    assert a == b and a != c


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    torch.manual_seed(0)
    draws = torch.stack([sample(logits, temperature=1.0) for _ in range(20000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.015, rtol=0)
    draws = torch.stack([sample(logits, temperature=1.0, top_k=2) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {1, 2}
    # top_p 0.8: 2 (0.64) alone is short of 0.8, so 1 (0.24) is kept too, and nothing else
    draws = torch.stack([sample(logits, temperature=1.0, top_p=0.8) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {1, 2}


def test_argmax_equals_torch_argmax_eager_and_compiled():
    """sampling.argmax (what greedy decoding and sampling use) against torch.argmax: the first of tied
    maxima, rows all -inf, bfloat16 and float32 rows, eager and compiled; on the CPU, its kernel's NaNs
    and rows shorter than its vectors' pass or not a multiple of it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, generator=g)
    x[1, [7, 300, 999]] = 9.0  # ties: the first wins
    x[2] = float("-inf")
    x[3, 998:] = 9.0
    x[4] = torch.randint(0, 3, (1000,), generator=g).float()  # many ties
    kernels = qlinear.cpu_kernels()  # built first, as by every compilation for the CPU: compiled, its argmax
    compiled = torch.compile(argmax, fullgraph=True, dynamic=False)
    for rows in (x, x.bfloat16(), x[:1]):
        expected = rows.argmax(dim=-1)
        for fn in (argmax, compiled):
            assert torch.equal(fn(rows), expected)
    if kernels:  # and the kernel itself: a NaN counts as the largest
        x[5, [40, 700]] = float("nan")
        for rows in (x, x[:, :31], x[:, :999]):  # (its vectors take 32 values at a time)
            assert torch.equal(torch.ops.nimblelm.argmax(rows.contiguous()), rows.argmax(dim=-1))


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    class Bytes:  # decodes ids as UTF-8 bytes, the way byte-level BPE decoders do
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "café 🙂 then STOP here"
    ids = list(text.encode())
    stream = TextStream(Bytes(), stop_strings=["STOP"])
    pieces = []
    for i in ids:
        pieces.append(stream.add(i))
        assert "\ufffd" not in pieces[-1] and "S" not in pieces[-1]
        if stream.stopped:
            break
    pieces.append(stream.flush())
    assert "".join(pieces) == "café 🙂 then " == stream.text


def test_text_stream_cuts_at_the_earliest_stop_string():
    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), stop_strings=["ab", "b"])  # both found at the b; the text ends before "ab"
    pieces = [stream.add(ord(c)) for c in "xab"]
    assert stream.stopped and "".join(pieces) + stream.flush() == stream.text == "x"
    assert stream.add(ord("y")) == "" and stream.text == "x"
    stream = TextStream(Chars(), stop_strings=["x"], min_tokens=2)  # not within the first two tokens
    pieces = [stream.add(ord(c)) for c in "xa xy"]
    assert stream.stopped and "".join(pieces) + stream.flush() == stream.text == "xa "


@pytest.mark.parametrize("name", ["default", "llama2-tokenizer.model", "mistral-tokenizer.model",
                                  "llama3-tokenizer.model"])
def test_streamed_text_equals_whole_decode(request, name):
    """TextStream decodes a window of ids per token; what it streams must be what decoding them all at once
    gives: for real text and for random ids (a model may emit any), on each kind of tokenizer."""
    import random
    if name == "default":
        tok = get_tokenizer(request.getfixturevalue("default_checkpoint"))
    else:
        path = fixture(name)
        if name.startswith("llama3"):
            pytest.importorskip("tiktoken")
        tok = get_tokenizer(path)
    text = ("Streaming: naïve café, Straße, 日本語のテキスト, emoji 🙂👍🏽, code `x ** 2`,\n\tnew lines "
            "and  double  spaces .  , don't") * 3
    rng = random.Random(0)
    vocab = max(tok.encode(text)) + 1
    low = list(range(300))  # special, control and byte tokens, which write nothing or part of a character
    cases = [[rng.choice(low) if rng.random() < 0.3 else rng.randrange(vocab) for _ in range(80)] for _ in range(30)]
    for ids in [tok.encode(text)] + cases:
        stream = TextStream(tok)
        streamed = "".join(stream.add(i) for i in ids) + stream.flush()
        # a stream holds back the bytes of a character that is not complete at the end
        whole = next(t for t in map(tok.decode, (ids[:n] for n in range(len(ids), -1, -1))) if not t.endswith("\ufffd"))
        assert streamed == whole == stream.text
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_decode_equals_eager_and_compiles_once(tiny, batch, monkeypatch):
    """Batch 1 compiles the plain step; batch 2 (prompts of two lengths), whose float layers are plain
    nn.Linear here (as where qkernels.cpp cannot run them), freezes the weights into it."""
    _, model, _ = tiny
    if batch > 1:
        plain_linears(model, monkeypatch)
    model.setup_caches(max_batch_size=batch, max_seq_length=2 * G.KV_BLOCK)
    # the texts cross into the second block, the cache's last
    prompt = list(range(1, G.KV_BLOCK - 4)) if batch == 1 else [list(range(1, G.KV_BLOCK - 4)), list(range(7, 40))]
    head = model.output.weight.detach().clone()
    try:
        eager = run(model, prompt, 12)
        assert G.frozen_settings(model, batch) == ({"freezing": True} if batch > 1 else None)
        steps = Steps(model, compile=True)
        assert steps.prefill is G.prefill and steps.decode is not G.decode_step  # a value, no global rebound
        # batch 1 ahead of time where qkernels.cpp is built; a frozen step with torch.compile
        exported = batch == 1 and bool(qlinear.cpu_kernels())
        assert isinstance(steps.decode, G.ExportedStep if exported else G.CompiledStep)
        run(model, prompt, 2, steps=steps)  # compiles
        with torch.compiler.set_stance("fail_on_recompile"):  # other attended lengths reuse the graph
            assert run(model, prompt, 12, steps=steps) == eager
            if batch > 1:  # the frozen graph holds its own copy of each weight: the model's are not read
                left_pad = torch.tensor([0, 1])  # made as generate() makes it, outside inference mode
                with torch.inference_mode():
                    args = (model, torch.tensor([5, 6]), torch.tensor([50]), left_pad, G.attended_length(model, 51),
                            0.0, None, None)
                    before = steps.decode(*args)
                    torch.nn.init.zeros_(model.output.weight)
                    assert torch.equal(steps.decode(*args), before)
                    assert not torch.equal(G.decode_step(*args), before)
        assert not exported or len(steps.decode.runners) == 1  # one graph (Dynamo's stance does not see it)
        if exported:  # a step's output that Python holds is not handed out again by the next call (KeptOutputs)
            with torch.inference_mode():
                step = [(model, torch.tensor([t]), torch.tensor([p]), None, G.attended_length(model, p + 1), 0.0,
                         None, None) for t, p in ((5, 50), (9, 51))]
                first = steps.decode(*step[0])
                value = first.clone()
                second = steps.decode(*step[1])
                assert torch.equal(first, value) and first.data_ptr() != second.data_ptr()
                assert torch.equal(first, G.decode_step(*step[0])) and torch.equal(second, G.decode_step(*step[1]))
            assert len(steps.decode.runners) == 1
    finally:
        with torch.no_grad():
            model.output.weight.copy_(head)
        model.setup_caches(max_batch_size=3, max_seq_length=3 * G.KV_BLOCK)


def test_compiled_step_follows_new_caches_and_lets_the_old_go(tiny):
    """A compiled CPU step holds the model's tensors (decode.ExportedStep, CompiledStep): once setup_caches
    replaces the caches, with ones of the same size too, it compiles anew and decodes as eager does, and
    nothing keeps the old caches."""
    _, model, _ = tiny
    model.setup_caches(max_batch_size=1, max_seq_length=2 * G.KV_BLOCK)
    try:
        prompts = [list(range(1, 30)), list(range(40, 70))]
        eager = [run(model, p, 6) for p in prompts]
        steps = Steps(model, compile=True)
        assert run(model, prompts[0], 6, steps=steps) == eager[0]
        old = weakref.ref(model.layers[0].attention.kv_cache.k_cache)
        model.setup_caches(max_batch_size=1, max_seq_length=2 * G.KV_BLOCK)
        assert run(model, prompts[1], 6, steps=steps) == eager[1]
        gc.collect()
        assert old() is None
    finally:
        model.setup_caches(max_batch_size=3, max_seq_length=3 * G.KV_BLOCK)


def test_an_exported_step_is_written_whole_once_and_found_after_without_tracing(tiny, tmp_path, monkeypatch):
    """A CPU decode step compiled ahead of time (decode.ExportedStep) goes into the step cache as one whole
    file, with an index named by its trace_key; a second Steps, as a later process would, finds it there
    without tracing or compiling, over a cache of another length too (the caches are the library's inputs,
    their length symbolic). An index that names a file that cannot be loaded costs a trace, not a wrong
    step; and what the trace depends on changes the key."""
    if not qlinear.cpu_kernels():
        pytest.skip("qkernels.cpp is not built here: no step is exported")
    import torch._inductor
    monkeypatch.setenv("NIMBLELM_HOME", str(tmp_path))
    traces = []
    export = G.ExportedStep.export
    monkeypatch.setattr(G.ExportedStep, "export", staticmethod(lambda *a: traces.append(1) or export(*a)))
    _, model, _ = tiny
    model.setup_caches(max_batch_size=1, max_seq_length=G.KV_BLOCK)
    try:
        prompt = list(range(1, 20))
        eager = run(model, prompt, 4)
        assert run(model, prompt, 4, steps=Steps(model, compile=True)) == eager and len(traces) == 1
        files = sorted(p.name for p in (tmp_path / "steps").iterdir())
        assert [name.split("-")[0] for name in files] == ["step", "trace"] and files[0].endswith(".pt2")
        index = tmp_path / "steps" / files[1]
        assert index.read_text() == files[0]
        monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: pytest.fail("compiled again"))
        assert run(model, prompt, 4, steps=Steps(model, compile=True)) == eager and len(traces) == 1
        assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == files
        model.setup_caches(max_batch_size=1, max_seq_length=2 * G.KV_BLOCK)  # another length: the same library
        long_prompt = [i % 127 + 1 for i in range(G.KV_BLOCK + 20)]  # past the first cache's length
        long_eager = run(model, long_prompt, 4)
        assert run(model, long_prompt, 4, steps=Steps(model, compile=True)) == long_eager and len(traces) == 1
        assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == files
        model.setup_caches(max_batch_size=1, max_seq_length=G.KV_BLOCK)
        # a file cut short: traced again, and the library found by the graph's digest, not compiled again
        (tmp_path / "steps" / "step-cut.pt2").write_bytes(b"PK\x03\x04")
        index.write_text("step-cut.pt2")
        assert run(model, prompt, 4, steps=Steps(model, compile=True)) == eager and len(traces) == 2
        assert index.read_text() == files[0]

        def key(model, *args, fn=G.decode_step):
            return G.trace_key(fn, model, args, pools=G.cache_inputs(model))
        args = (torch.tensor([5]), torch.tensor([50]), None, G.attended_length(model, 51), 0.0, None, None)
        assert key(model, *args) == index.name[len("trace-"):-len(".txt")]
        assert key(model, *args[:3], G.attended_length(model, 90), *args[4:]) == key(model, *args)  # symbolic
        assert key(model, *args[:4], 0.7, 5, None) != key(model, *args)  # sampling compiled in
        assert key(model, torch.tensor([[5]]), *args[1:]) != key(model, *args)  # another shape
        assert key(model, *args, fn=G.prefill) != key(model, *args)
        assert key(model, *args, fn=lambda m, *a: G.decode_step(m, *a) if traces else None) is None  # a closure
        model.setup_caches(max_batch_size=2, max_seq_length=G.KV_BLOCK)
        assert key(model, *args) != index.name[len("trace-"):-len(".txt")]  # the caches' rows
    finally:
        model.setup_caches(max_batch_size=3, max_seq_length=3 * G.KV_BLOCK)


def test_threads_that_decoded_with_exported_steps_end_and_so_does_the_process(tiny):
    """qkernels.cpp keeps the ops' outputs of an exported step for the thread's later calls, the step's own
    outputs among them, which Python then holds (KeptOutputs): a thread that decoded that way ends cleanly,
    and so does one that ends while the interpreter is finishing (a daemon thread let go as the process
    ends: it must not let those go through Python then), each with the tokens of eager decoding. In
    bfloat16, so that the products are qkernels.cpp's too where the CPU has no bfloat16 instructions.
    The daemon thread's steps are kept beyond it: PyTorch itself (2.13) ends the process with "terminate
    called without an active exception" when a daemon thread frees a tensor while the interpreter is
    finishing (THPVariable_clear waits for the GIL there, and Python ends the thread inside it), which made
    this test fail about once in 80 runs when the thread let its steps go as the process ended."""
    if not qlinear.cpu_kernels():
        pytest.skip("qkernels.cpp is not built here: no step is exported")
    script = f"""
import threading, torch
from checkpoint import load_model
from decode import KV_BLOCK, ExportedStep, Steps, generate
from sampling import SamplingParams
model = load_model({tiny[2]!r}, "cpu", torch.bfloat16)
model.setup_caches(max_batch_size=1, max_seq_length=2 * KV_BLOCK)
prompt, params = list(range(1, 20)), SamplingParams(max_tokens=8)
tokens, decoded, end = [list(generate(model, prompt, params))], threading.Event(), threading.Event()
kept = []  # the daemon thread's steps, held beyond it (the docstring says why)
def decode(wait=False):
    steps = Steps(model, compile=True)
    assert isinstance(steps.decode, ExportedStep)
    tokens.append(list(generate(model, prompt, params, steps=steps)))
    decoded.set()
    if wait:
        kept.append(steps)
        end.wait()
thread = threading.Thread(target=decode)
thread.start()
thread.join()
decoded.clear()
threading.Thread(target=decode, args=(True,), daemon=True).start()
decoded.wait(300)  # (a thread that raised sets nothing: the tokens tell)
print(tokens[1:] == tokens[:1] * 2, tokens)
end.set()
"""
    r = run_python("-c", script)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("True ")


@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_few_query_attention_equals_sdpa(dtype, D):
    """The decode step's attention as sums (what the CPU compiles) and qkernels.cpp's (where it is built)
    against PyTorch's kernel, all against float64: K/V read as a slice of a longer cache (rows wider than
    a head), a causal bool mask per row (and, for the sums, the additive form), keys not a multiple of 8.
    Heads of 16 and 64 (qkernels.cpp's 512-bit attention takes multiples of 32, where the CPU has it)."""
    g = torch.Generator().manual_seed(0)
    scale = D ** -0.5
    # (B, H, S, D): 2 rows, 3 heads, 7 query rows (the kernel takes them 3 at a time: 3, 3 and 1)
    q = torch.randn(2, 3, 7, D, generator=g).to(dtype)
    cache = torch.randn(2, 3, 64, 2 * D, generator=g).to(dtype)
    k, v = cache[:, :, :37, :D], cache[:, :, :37, D:]
    pos = torch.tensor([30, 5])[:, None] + torch.arange(7)  # each row's query positions, (B, S)
    mask = (torch.arange(37) <= pos[:, :, None]).unsqueeze(1)  # (B, 1, S, L)
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    outputs = [G.few_query_attention(q, k, v, attn_mask=m) for m in (mask, additive)]
    outputs += [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for m in (mask, additive)]
    kernels = qlinear.cpu_kernels()
    if kernels:
        outputs.append(torch.ops.nimblelm.few_query_attention(q, k, v, mask, scale))
    for ours in outputs:
        assert ours.dtype == dtype and ours.shape == q.shape
        torch.testing.assert_close(ours.double(), reference, atol=tol, rtol=0)
    # masks broadcast: one row's for both rows, given per head (zero strides); each row's first query's for all
    for m in (mask[:1].expand(2, 3, 7, 37), mask[:, :, :1]) if kernels else ():
        ours = torch.ops.nimblelm.few_query_attention(q, k, v, m, scale)
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m)
        torch.testing.assert_close(ours.double(), expected, atol=tol, rtol=0)
    if not kernels:
        return
    # a batch-1 step's three heads on two threads: the keys go in parts, combined by their softmax's sums; the
    # first query row sees only the first part's keys, so the second part has nothing to attend to there
    q, cache = q[:1, :, :3], torch.randn(1, 3, 300, 2 * D, generator=g).to(dtype)
    k, v = cache[..., :D], cache[..., D:]
    mask = (torch.arange(300) <= torch.tensor([40, 200, 299])[:, None]).expand(1, 1, 3, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ours = torch.ops.nimblelm.few_query_attention(q, k, v, mask, scale)
        # the same parts through the threads of a KernelTeam (decode.ExportedStep's)
        with_team = qlinear.KernelTeam().run(torch.ops.nimblelm.few_query_attention, q, k, v, mask, scale)
    finally:
        torch.set_num_threads(threads)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(ours.double(), expected, atol=tol, rtol=0)
    assert torch.equal(with_team, ours)


@pytest.mark.parametrize("kernel", [True, False])
def test_attention_pass_swaps_decode_steps_only(tiny, monkeypatch, kernel):
    """The CPU pass gives a decode step (few queries) qkernels.cpp's attention, or where that is not built
    few_query_attention's sums, and leaves a prompt's (many queries) to PyTorch's kernel; the swapped step
    decodes as the eager one does."""
    if kernel and not qlinear.cpu_kernels():
        pytest.skip("qkernels.cpp cannot be built here (no AVX2, or no C++ compiler)")
    if not kernel:
        monkeypatch.setattr(G, "cpu_kernels", lambda: 0)
    _, model, _ = tiny
    model.setup_caches(max_batch_size=1, max_seq_length=2 * G.KV_BLOCK)
    seen = []
    attention_pass = G.few_query_attention_pass()

    def backend(gm, example_inputs):  # the pass alone, over Dynamo's graph, without Inductor
        attention_pass(gm.graph)
        seen.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        gm.recompile()
        return gm.forward

    try:
        prompt = list(range(1, 41))
        eager = run(model, prompt, 8)
        steps = Steps(model)
        steps.prefill = torch.compile(lambda *a: G.prefill(*a), backend=backend, fullgraph=True)
        steps.decode = torch.compile(lambda *a: G.decode_step(*a), backend=backend, fullgraph=True)
        assert run(model, prompt, 8, steps=steps) == eager
        prompt_graph, step_graph = seen
        sdpa = torch._C._nn.scaled_dot_product_attention
        swapped = torch.ops.nimblelm.few_query_attention.default if kernel else G.few_query_attention
        assert sdpa in prompt_graph and swapped not in prompt_graph
        assert swapped in step_graph and sdpa not in step_graph
    finally:
        model.setup_caches(max_batch_size=3, max_seq_length=3 * G.KV_BLOCK)


def test_json_records_for_a_batch(tiny):
    _, _, ckpt = tiny
    r = run_python("-X", "importtime", "generate.py", "--checkpoint", ckpt, "--prompt", "ab", "--prompt",
                   "alongerprompt", "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    # uncompiled, nothing imports Dynamo: over a second of every run's start (BENCHMARKS.md)
    assert "import time:" in r.stderr and "torch._dynamo" not in r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 2
    keys = {"text", "checkpoint", "prompt_tokens", "generated_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s",
            "bandwidth_gb_s", "peak_memory_gb", "compile_s"}
    assert all(keys <= set(rec) for rec in records)
    assert [rec["prompt_tokens"] for rec in records] == [2, 13]
    assert all(rec["generated_tokens"] == 5 and rec["decode_tok_s"] > 0 for rec in records)
    assert "decode" in r.stderr and "GB/s" in r.stderr  # the benchmark report


def test_bad_input_gives_one_line_and_nonzero_exit(tiny, tmp_path):
    _, _, ckpt = tiny
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-500])
    config = json.loads((broken / "config.json").read_text())
    del config["n_heads"]
    (broken / "config.json").write_text(json.dumps(config))
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "no such checkpoint directory"),
        (["--checkpoint", str(truncated)], "model.safetensors: truncated or corrupt"),
        (["--checkpoint", str(broken)], "config.json: missing field(s) n_heads"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--prompt", "word " * 300], "exceeds the model's context of 256 tokens"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device cuda is not available"))
    commands = [["generate.py"] + (["--checkpoint", ckpt] if "--checkpoint" not in args else []) + (
        ["--prompt", "hi"] if "--prompt" not in args else []) + args for args, _ in cases]
    for (args, message), r in zip(cases, run_commands(commands)):
        assert r.returncode == 2, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)
        assert r.stdout == ""


def test_default_model_answers_paris(default_checkpoint):
    r = run_script("generate.py", "--checkpoint", default_checkpoint, "--chat", "--prompt",
                   "What is the capital of France?", "--max-new-tokens", "20", "--json")
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]


def test_stop_string_ends_the_text(default_checkpoint):
    r = run_script("generate.py", "--checkpoint", default_checkpoint, "--chat", "--prompt",
                   "What is the capital of France?", "--max-new-tokens", "20", "--stop", "Paris")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is \n"


def test_interactive_keeps_the_cache_between_turns(default_checkpoint):
    """The second reply, decoded with the first turn's cache kept, equals a fresh run over the whole chat."""
    r = run_script("generate.py", "--checkpoint", default_checkpoint, "--interactive", "--max-new-tokens", "30",
                   input="What is the capital of France?\nAnd of Germany?\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.replace("> ", "").strip().split("\n")[:2]
    assert "Paris" in first
    tok = get_tokenizer(default_checkpoint)
    model = load_model(default_checkpoint)
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
    prompt = tok.encode_chat(messages)
    model.setup_caches(1, len(prompt) + 30)
    ids = []
    for t in generate(model, prompt, SamplingParams(max_tokens=30), eos_ids=tok.eos_ids):
        if t in tok.eos_ids:
            break
        ids.append(t)
    assert tok.decode(ids) == second
