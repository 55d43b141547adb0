"""Beam search (beam.py): against transformers' beam search, against greedy decoding, with pruning, compiled,
inside the engine (beams sharing blocks), and on the command line."""
import itertools
import json
from collections import Counter

import pytest
import torch

import decode as G
from beam import BeamParams, BeamSteps, beam_search, reorder_cache
from checkpoint import load_model
from conftest import FAMILIES, converted_checkpoint, run_script
from decode import generate
from engine import Engine
from errors import UsageError
from sampling import SamplingParams


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf, out = converted_checkpoint(tmp_path_factory, "gqa", seed=7)
    hf.generation_config.pad_token_id = 0
    return hf, load_model(str(out)), str(out)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def hf_beams(hf, prompts, K, new, eos, **kwargs):
    """transformers' beam search over left-padded prompts -> per prompt, K (generated ids, score), best first."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = eos
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=K, do_sample=False,
                      num_return_sequences=K, output_scores=True, return_dict_in_generate=True, eos_token_id=eos,
                      **kwargs)
    lengths = (out.beam_indices != -1).sum(1).tolist()
    return [[(out.sequences[i * K + j, T:T + lengths[i * K + j]].tolist(), float(out.sequences_scores[i * K + j]))
             for j in range(K)] for i in range(len(prompts))]


def assert_same(expected, got):
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert [ids for ids, _ in e] == [h.token_ids for h in g]
        for (_, score), h in zip(e, g):
            assert abs(score - h.score) < 1e-4, (score, h.score)


def emitted(hf, prompts):
    """A token the model emits early in its beams: an end token that really ends some of them."""
    beams = hf_beams(hf, prompts, 4, 12, None)
    return Counter(t for per_prompt in beams for ids, _ in per_prompt for t in ids[2:8]).most_common(1)[0][0]


@pytest.mark.parametrize("K", [2, 4])
def test_beam_search_equals_transformers(pair, K):
    hf, model, _ = pair
    short = prompts_of([5, 11, 3])                            # a batch of different lengths
    long = prompts_of([G.KV_BLOCK - 8, G.KV_BLOCK - 15], 1)   # their texts cross a 128-slot boundary
    eos = emitted(hf, short)
    ended = 0
    for lp, early, end, prompts in itertools.product([0.0, 1.0, 2.0, -0.5], [True, False, "never"], [None, eos],
                                                     [short, long]):
        expected = hf_beams(hf, prompts, K, 20, end, length_penalty=lp, early_stopping=early)
        model.setup_caches(len(prompts) * K, 2 * G.KV_BLOCK)
        got = beam_search(model, prompts, BeamParams(num_beams=K, max_tokens=20, length_penalty=lp,
                                                     early_stopping=early, num_return_sequences=K),
                          eos_ids=() if end is None else (end,))
        assert_same(expected, got)
        ended += sum(h.token_ids[-1] == eos for per_prompt in got for h in per_prompt)
    assert ended > 20  # the end token did end hypotheses


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gqa"}))
def test_beam_search_equals_transformers_on_every_family(tmp_path_factory, family):
    hf, out = converted_checkpoint(tmp_path_factory, family, seed=8)
    hf.generation_config.pad_token_id = 0
    model = load_model(str(out))
    prompts = prompts_of([7, 12], 2)
    eos = emitted(hf, prompts)
    model.setup_caches(8, 64)
    got = beam_search(model, prompts, BeamParams(num_beams=4, max_tokens=16, num_return_sequences=4), eos_ids=(eos,))
    assert_same(hf_beams(hf, prompts, 4, 16, eos), got)


def test_one_beam_is_greedy(pair, default_checkpoint):
    hf, model, _ = pair
    eos = emitted(hf, prompts_of([9]))
    for prompt in prompts_of([9, 30, 4], 3):
        model.setup_caches(1, 64)
        greedy = list(generate(model, prompt, SamplingParams(max_tokens=24), eos_ids=(eos,)))
        assert beam_search(model, prompt, BeamParams(num_beams=1, max_tokens=24), eos_ids=(eos,))[0].token_ids == greedy
    from checkpoint import load_tokenizer
    real, tok = load_model(default_checkpoint), load_tokenizer(default_checkpoint)
    prompt = tok.encode_chat([{"role": "user", "content": "Name three colours."}])
    real.setup_caches(1, 128)
    greedy = list(generate(real, prompt, SamplingParams(max_tokens=30), eos_ids=tok.eos_ids))
    assert beam_search(real, prompt, BeamParams(num_beams=1, max_tokens=30), eos_ids=tok.eos_ids)[0].token_ids == greedy


def sequence_log_prob(model, prompt, ids):
    """Teacher-forced sum of the log-probabilities of ids after prompt."""
    model.setup_caches(1, 128)
    tokens = torch.tensor([prompt + ids])
    log_probs = torch.log_softmax(model(tokens, torch.arange(tokens.shape[1]))[0].float(), -1)
    return sum(log_probs[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids))


def test_pruning(pair):
    hf, model, _ = pair
    prompts = prompts_of([6, 10], 4)
    eos = emitted(hf, prompts)
    base = BeamParams(num_beams=4, max_tokens=20, num_return_sequences=4)
    model.setup_caches(8, 64)
    plain_stats = {}
    plain = beam_search(model, prompts, base, eos_ids=(eos,), stats=plain_stats)
    # Every option on, at settings that can drop nothing: the same search.
    neutral = BeamParams(**{**base.__dict__, "rel_threshold": 1e-30, "abs_threshold": 1e4,
                            "local_threshold": 1e-30, "max_candidates": 4})
    assert neutral.prunes
    got = beam_search(model, prompts, neutral, eos_ids=(eos,))
    assert [[(h.token_ids, h.score) for h in p] for p in got] == [[(h.token_ids, h.score) for h in p] for p in plain]
    # Hard pruning: a shorter search, and what it returns is scored as the model scores it.
    for option in (dict(abs_threshold=0.5), dict(rel_threshold=0.5), dict(local_threshold=0.3),
                   dict(max_candidates=1)):
        stats = {}
        model.setup_caches(8, 64)
        got = beam_search(model, prompts, BeamParams(**{**base.__dict__, **option}), eos_ids=(eos,), stats=stats)
        assert stats["steps"] <= plain_stats["steps"]
        for prompt, hypotheses in zip(prompts, got):
            assert 1 <= len(hypotheses) <= 4
            assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
            for h in hypotheses:
                assert abs(sequence_log_prob(model, prompt, h.token_ids) / len(h.token_ids) - h.score) < 1e-4


def test_reorder_moves_changed_rows_and_filled_positions_only(pair):
    _, model, _ = pair
    model.setup_caches(4, 64)
    caches = [(layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache) for layer in model.layers]
    for k, v in caches:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    before = [(k.clone(), v.clone()) for k, v in caches]
    pointers = [(k.data_ptr(), v.data_ptr()) for k, v in caches]
    assert reorder_cache(model, [0, 1, 2, 3], 10) == 0
    moved = reorder_cache(model, [0, 0, 3, 3], 10)  # rows 1 and 2 change
    for (k, v), (k0, v0) in zip(caches, before):
        for new, old in ((k, k0), (v, v0)):
            assert torch.equal(new[[0, 3]], old[[0, 3]])
            assert torch.equal(new[1, :, :10], old[0, :, :10]) and torch.equal(new[2, :, :10], old[3, :, :10])
            assert torch.equal(new[:, :, 10:], old[:, :, 10:])
    assert [(k.data_ptr(), v.data_ptr()) for k, v in caches] == pointers
    k = caches[0][0]
    assert moved == 2 * len(model.layers) * 2 * 2 * k.shape[1] * 10 * k.shape[3] * k.element_size()


def test_compiled_beam_search_equals_eager_and_compiles_once(pair):
    _, model, _ = pair
    prompts = prompts_of([G.KV_BLOCK - 6, G.KV_BLOCK - 12], 5)  # crossing into the cache's second block
    params = BeamParams(num_beams=2, max_tokens=14, num_return_sequences=2)
    model.setup_caches(4, 2 * G.KV_BLOCK)
    eager = beam_search(model, prompts, params)
    steps = BeamSteps(model, compile=True)
    beam_search(model, prompts, BeamParams(num_beams=2, max_tokens=2), steps=steps)  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        got = beam_search(model, prompts, params, steps=steps)
    assert [[h.token_ids for h in p] for p in got] == [[h.token_ids for h in p] for p in eager]
    assert all(abs(a.score - b.score) < 1e-4 for p, q in zip(got, eager) for a, b in zip(p, q))


def test_engine_beams_share_blocks_and_choose_what_beam_search_chooses(pair):
    hf, model, ckpt = pair
    prompts = prompts_of([40, 9, 23], 6)
    eos = emitted(hf, prompts)
    params = [BeamParams(num_beams=4, max_tokens=24, num_return_sequences=4),
              BeamParams(num_beams=2, max_tokens=30, length_penalty=0.0, num_return_sequences=2),
              BeamParams(num_beams=3, max_tokens=20, early_stopping="never", num_return_sequences=3)]
    expected = []
    for prompt, p in zip(prompts, params):
        model.setup_caches(p.num_beams, 128)
        expected.append(beam_search(model, prompt, p, eos_ids=(eos,)))
    for pool in (64, 16):  # 16 blocks: requests preempt one another
        engine = Engine(load_model(ckpt), None, max_num_seqs=8, kv_cache_tokens=16 * pool, block_size=16)
        engine.eos_ids = {eos}
        ids = [engine.add_request(prompts[0], params[0])]
        engine.step()  # the prompt (2 full blocks and one holding 8 tokens), then 4 beams sharing them
        assert engine.stats()["kv_blocks_used"] == 3 and len({tuple(s.block_table) for s in engine.scheduler.running}) == 1
        for _ in range(3):  # beams copy only the partial block they write, and only when they share it
            engine.step()
            tables = [s.block_table for s in engine.scheduler.running]
            assert len(tables) == 4 and len({tuple(t[:2]) for t in tables}) == 1
            assert engine.stats()["kv_blocks_used"] == len({b for t in tables for b in t}) <= 2 + 4
        ids += [engine.add_request(prompts[1], params[1]), engine.add_request(prompts[2], params[2])]
        for prompt in prompts_of([60] * 3, 7):  # plain requests competing for blocks
            engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
        outputs = {}
        while engine.has_unfinished():
            outputs.update((o.request_id, o) for o in engine.step() if o.finished)
        for rid, e in zip(ids, expected):
            assert [h.token_ids for h in outputs[rid].hypotheses] == [h.token_ids for h in e]
            assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(outputs[rid].hypotheses, e))
            assert outputs[rid].new_token_ids == e[0].token_ids
        assert engine.stats()["kv_blocks_used"] == 0 and (pool == 64 or engine.stats()["preemptions"] > 0)
    with pytest.raises(UsageError, match="exceeds max_num_seqs"):
        engine.add_request(prompts[1], BeamParams(num_beams=9, max_tokens=4))


def test_command_line(pair):
    _, model, ckpt = pair
    r = run_script("generate.py", "--checkpoint", ckpt, "--prompt", "ab", "--prompt", "a longer one",
                   "--max-new-tokens", "8", "--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5",
                   "--json")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    from tokenizer import get_tokenizer
    tok = get_tokenizer(ckpt)
    model.setup_caches(6, 64)
    expected = beam_search(model, [tok.encode_prompt("ab"), tok.encode_prompt("a longer one")],
                           BeamParams(num_beams=3, max_tokens=8, num_return_sequences=2, length_penalty=0.5),
                           eos_ids=tok.eos_ids)
    assert [(r["prompt"], r["rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for record, h in zip(records, [h for p in expected for h in p]):
        assert record["token_ids"] == h.token_ids and abs(record["score"] - h.score) < 1e-5
    assert "cache reordering" in r.stderr
    for args, message in [(["--num-beams", "0"], "--num-beams must be >= 1"),
                          (["--num-beams", "2", "--num-return-sequences", "3"], "must not exceed"),
                          (["--num-beams", "2", "--temperature", "0.7"], "does not sample"),
                          (["--length-penalty", "2"], "--length-penalty needs --num-beams")]:
        r = run_script("generate.py", "--checkpoint", ckpt, "--prompt", "hi", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
