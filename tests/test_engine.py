"""engine.py: continuous batching over the paged cache gives each request exactly what generate() gives it
alone, whatever else runs; the block allocator keeps its books under random use."""
import pytest
import torch

from block_manager import BlockManager
from checkpoint import load_model
from conftest import FAMILIES, converted_checkpoint
from decode import ExportedStep, generate
from engine import Engine
from errors import UsageError
from qlinear import cpu_kernels
from sampling import SamplingParams
from scheduler import Scheduler
from sequence import Sequence

CONTEXT = 1024


def random_prompts(lengths, seed, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, n):
    model.setup_caches(1, len(prompt) + n)
    return list(generate(model, prompt, SamplingParams(max_tokens=n)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=8, max_position_embeddings=CONTEXT)
    return str(ckpt)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_requests_equal_generate_alone_whatever_the_arrivals(tmp_path_factory, family):
    """Requests join between steps, prompts are chunked across steps and blocks, and a pool too small for
    all of them at once forces preemption; prefixes repeat, so some prompts start from the cache."""
    _, ckpt = converted_checkpoint(tmp_path_factory, family, seed=3)
    ref = load_model(str(ckpt))
    prompts = random_prompts([5, 40, 17, 33, 64, 3, 50], seed=1)
    prompts += [prompts[4][:48] + [1, 2, 3], prompts[4][:32]]  # cached prefixes, one a whole prompt
    expected = [alone(ref, p, 24) for p in prompts]
    for kv_tokens, preempting in ((2048, False), (160, True)):
        engine = Engine(load_model(str(ckpt)), max_num_seqs=4, kv_cache_tokens=kv_tokens, block_size=16,
                        max_num_batched_tokens=24)
        rids, got = {}, {}
        for i, p in enumerate(prompts):  # a new request every other step
            rids[engine.add_request(p, SamplingParams(max_tokens=24))] = i
            for _ in range(2):
                for out in engine.step():
                    got.setdefault(rids[out.request_id], []).extend(out.new_token_ids)
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(rids[out.request_id], []).extend(out.new_token_ids)
        assert [got[i] for i in range(len(prompts))] == expected, (family, kv_tokens)
        stats = engine.stats()
        assert (stats["preemptions"] > 0) == preempting
        assert stats["prefix_cache_hit_tokens"] > 0 and stats["kv_blocks_used"] == 0


def test_default_model_requests_equal_generate_alone(default_checkpoint):
    from checkpoint import load_tokenizer
    tok = load_tokenizer(default_checkpoint)
    system = {"role": "system", "content": "You are a helpful assistant who answers in one short sentence."}
    questions = ["What is the capital of France?", "Name a large river in Africa.", "What colour is the sky?"]
    prompts = [tok.encode_chat([system, {"role": "user", "content": q}]) for q in questions]
    ref = load_model(default_checkpoint)
    expected = [alone(ref, p, 16) for p in prompts]
    engine = Engine(load_model(default_checkpoint), tok, max_num_seqs=4, kv_cache_tokens=512, block_size=16,
                    max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    got = engine.generate(prompts[:1], params) + engine.generate(prompts[1:], params)  # then in one batch
    assert [c.token_ids for c in got] == expected
    assert got[0].num_cached_tokens == 0 and got[1].num_cached_tokens >= 16 and got[2].num_cached_tokens >= 16
    assert "Paris" in got[0].text


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoints_run_unchanged(tiny, tmp_path, mode):
    from quantize import quantize_checkpoint
    out = str(tmp_path / mode)
    quantize_checkpoint(tiny, out, mode, groupsize=32)
    prompts = random_prompts([9, 70, 33], seed=5)
    ref = load_model(out)
    engine = Engine(load_model(out), max_num_seqs=2, kv_cache_tokens=1024, block_size=16, max_num_batched_tokens=32)
    got = engine.generate(prompts, SamplingParams(max_tokens=20))
    assert [c.token_ids for c in got] == [alone(ref, p, 20) for p in prompts]


@pytest.mark.parametrize("exported", [True, False])
def test_compiled_engine_does_not_recompile_as_requests_come_and_go(tiny, tmp_path, monkeypatch, exported):
    """One graph per batch size, whatever the attended length: on the CPU with qkernels.cpp built, a library
    per batch size (decode.ExportedStep), which a later engine finds on disk without tracing; else (and
    under torchrun, and on CUDA) torch.compile's graphs, the length marked symbolic."""
    monkeypatch.setenv("NIMBLELM_HOME", str(tmp_path))
    if not exported:
        monkeypatch.setattr(ExportedStep, "suits", staticmethod(lambda *a: False))
    traces = []
    export = ExportedStep.export
    monkeypatch.setattr(ExportedStep, "export", staticmethod(lambda *a: traces.append(1) or export(*a)))
    engine = Engine(load_model(tiny), max_num_seqs=4, kv_cache_tokens=2048, block_size=16,
                    max_num_batched_tokens=32, compile=True)
    engine.warm_up()  # one graph per batch size
    prompts = random_prompts([7, 150, 30, 90, 12], seed=4)  # texts cross the 128-slot attended lengths
    ref = load_model(tiny)
    expected = [alone(ref, p, n) for p, n in zip(prompts, (40, 10, 25, 5, 30))]
    params = [SamplingParams(max_tokens=n) for n in (40, 10, 25, 5, 30)]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == expected
    if exported and cpu_kernels():
        assert isinstance(engine.decode_fn, ExportedStep) and len(engine.decode_fn.runners) == len(engine.buckets)
        assert len(traces) == len(engine.buckets)
        later = Engine(engine.model, max_num_seqs=4, kv_cache_tokens=3072, block_size=16,
                       max_num_batched_tokens=32, compile=True)  # a new cache, of another size
        later.warm_up()
        assert len(traces) == len(engine.buckets)
        assert [c.token_ids for c in later.generate(prompts, params)] == expected


def test_per_request_sampling_seeds_stops_and_aborts(tiny):
    engine = Engine(load_model(tiny), max_num_seqs=8, kv_cache_tokens=2048, block_size=16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_k=40, top_p=0.9, seed=123)
    solo = engine.generate([prompt], seeded)[0].token_ids
    mixed = engine.generate([prompt, prompt[:5], prompt, prompt[2:]],
                            [SamplingParams(max_tokens=20), seeded, SamplingParams(max_tokens=20, temperature=0.7),
                             SamplingParams(max_tokens=7)])
    assert engine.generate([prompt[:5]], seeded)[0].token_ids == mixed[1].token_ids  # same seed, other rows
    greedy = alone(load_model(tiny), prompt, 20)
    assert mixed[0].token_ids == greedy and mixed[0].finish_reason == "length"
    assert len(mixed[3].token_ids) == 7 and len(solo) == 20
    # an end token per request: the greedy text's 6th token ends it, unless ignore_eos
    engine.eos_ids = {greedy[5]}
    stop_at = greedy.index(greedy[5]) + 1
    ended, ignored = engine.generate([prompt, prompt], [SamplingParams(max_tokens=20),
                                                         SamplingParams(max_tokens=20, ignore_eos=True)])
    assert ended.token_ids == greedy[:stop_at] and ended.finish_reason == "stop"
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"
    engine.eos_ids = set()
    # abort: reported once, blocks given back
    rid = engine.add_request(prompt, SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(rid)
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [(rid, True, "abort")]
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished()
    # requests that could never run are refused at once
    with pytest.raises(UsageError, match="exceeds the KV cache"):
        Engine(load_model(tiny), kv_cache_tokens=64).add_request(prompt, SamplingParams(max_tokens=100))
    with pytest.raises(UsageError, match="exceeds the model's context"):
        engine.add_request(prompt, SamplingParams(max_tokens=CONTEXT))
    with pytest.raises(UsageError, match="stop strings need"):
        engine.add_request(prompt, SamplingParams(stop=("x",)))


def test_stop_strings_end_a_request(default_checkpoint):
    from checkpoint import load_tokenizer
    tok = load_tokenizer(default_checkpoint)
    engine = Engine.from_checkpoint(default_checkpoint, max_num_seqs=2, kv_cache_tokens=512)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    done = engine.generate([prompt, prompt], [SamplingParams(max_tokens=20, stop=("Paris",)),
                                              SamplingParams(max_tokens=20)])
    assert done[0].text == "The capital of France is " and done[0].finish_reason == "stop"
    assert done[1].text.startswith("The capital of France is Paris") and done[1].finish_reason == "stop"


def test_kv_slots_hold_tokens_on_a_mixed_workload(tiny):
    """The paged cache keeps more than 96% of its allocated slots filled; a static cache for the same
    requests (one row per request, each as long as the longest prompt plus the longest output) far less."""
    g = torch.Generator().manual_seed(9)
    lengths = [(int(torch.randint(64, 500, (1,), generator=g)), int(torch.randint(16, 256, (1,), generator=g)))
               for _ in range(24)]
    prompts = random_prompts([p for p, _ in lengths], seed=10)
    engine = Engine(load_model(tiny), max_num_seqs=8, kv_cache_tokens=8192, block_size=16,
                    max_num_batched_tokens=128)
    for p, (_, n) in zip(prompts, lengths):
        engine.add_request(p, SamplingParams(max_tokens=n))
    filled = allocated = 0
    while engine.has_unfinished():
        engine.step()
        s = engine.stats()
        filled += s["kv_slot_utilization"] * s["kv_blocks_used"] * 16
        allocated += s["kv_blocks_used"] * 16
    paged = filled / allocated
    static = sum(p + n for p, n in lengths) / (len(lengths) * (max(p for p, _ in lengths) + max(n for _, n in lengths)))
    assert paged > 0.96 and static < 0.6, (paged, static)


# ---------------------------------------------------------------------------------------------------------
# The block allocator under random use, without a model: the scheduler's plan is carried out by hand.

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def check_books(blocks: BlockManager, scheduler: Scheduler):
    refs = [0] * blocks.num_blocks
    for seq in scheduler.running:
        assert len(seq.block_table) * blocks.block_size >= seq.num_computed
        for b in seq.block_table:
            refs[b] += 1
    assert refs == blocks.ref_count, "a reference count disagrees with the block tables"
    assert set(blocks.free) == {b for b in range(blocks.num_blocks) if refs[b] == 0}
    for h, b in blocks.cached.items():
        assert blocks.block_hash[b] == h
    for seq in scheduler.waiting:
        assert not seq.block_table


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort"]), st.integers(0, 10 ** 6)),
                           max_size=60),
                  st.sampled_from([4, 8]), st.integers(6, 24))
def test_block_allocator_keeps_its_books(ops, block_size, num_blocks):
    blocks = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=16)
    live, n = [], 0
    capacity = num_blocks * block_size

    def step():
        plan = scheduler.schedule()
        for seq, k in plan.work:
            scheduler.computed(seq, k)
            if seq.num_uncomputed == 0:
                seq.tokens.append(seq.num_generated % 3)
                if seq.num_generated >= seq.params.max_tokens:
                    scheduler.remove(seq)
                    live.remove(seq)

    for op, r in ops:
        if op == "add":
            prompt = [(r >> i) % 3 for i in range(1 + r % 40)]  # few distinct tokens: shared prefixes
            max_tokens = 1 + (r >> 7) % 20
            if len(prompt) + max_tokens <= capacity:  # what Engine.add_request admits
                seq = Sequence(str(n), prompt, SamplingParams(max_tokens=max_tokens), torch.device("cpu"))
                n += 1
                scheduler.add(seq)
                live.append(seq)
        elif op == "step":
            step()
        elif live:
            seq = live.pop(r % len(live))
            scheduler.remove(seq)
        check_books(blocks, scheduler)
    for _ in range(2000):  # every request ends
        if not live:
            break
        step()
        check_books(blocks, scheduler)
    assert not live and blocks.num_free == num_blocks and all(c == 0 for c in blocks.ref_count)
