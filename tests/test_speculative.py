"""speculative.py: exactly the target's tokens (greedy) and distribution (sampling), consistent caches."""
import json
import warnings

import pytest
import torch

import qlinear
import speculative as S
from conftest import converted_checkpoint, plain_linears, run_commands
from checkpoint import load_model
from decode import frozen_settings, generate
from sampling import SamplingParams


@pytest.fixture(scope="module")
def target_and_draft(tmp_path_factory):
    """A tiny random target and a different tiny random draft with the same vocabulary."""
    paths = [converted_checkpoint(tmp_path_factory, family, seed)[1] for family, seed in (("gqa", 11), ("mqa", 12))]
    target, draft = (load_model(str(p)) for p in paths)
    for m in (target, draft):
        m.setup_caches(1, 160)
    return target, draft, paths


def plain(model, prompt, n):
    return list(generate(model, prompt, SamplingParams(max_tokens=n)))


def test_greedy_with_a_draft_model_equals_plain_decoding(target_and_draft):
    target, draft, _ = target_and_draft
    prompt = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = plain(target, prompt, 64)
    stats = {}
    got = list(S.speculative_generate(target, prompt, SamplingParams(max_tokens=64), k=4, draft=draft, stats=stats))
    assert got == expected
    assert stats["proposed"] > 0 and stats["accepted"] < stats["proposed"]  # rejections happened


def test_greedy_with_prompt_lookup_equals_plain_decoding(target_and_draft):
    target, _, _ = target_and_draft
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
    expected = plain(target, prompt, 64)
    stats = {}
    assert list(S.speculative_generate(target, prompt, SamplingParams(max_tokens=64), k=5, stats=stats)) == expected
    assert stats["proposed"] > 0


def test_prompt_lookup_without_a_match_falls_back_to_plain_decoding(target_and_draft):
    target, _, _ = target_and_draft
    assert S.ngram_proposal([1, 2, 3, 4], 4) == []
    assert S.ngram_proposal([1, 2, 3, 1, 2], 4) == [3, 1, 2]
    prompt = list(range(20, 30))
    expected = plain(target, prompt, 3)
    stats = {}
    got = list(S.speculative_generate(target, prompt, SamplingParams(max_tokens=3), k=4, stats=stats))
    assert got == expected
    if len(set(prompt + got)) == len(prompt + got):  # no repeat at all: every step was a plain one
        assert stats["proposed"] == 0 and stats["target_steps"] == 3


def test_rejection_rule_samples_the_target_distribution():
    """The first token of a round follows p exactly; a rule without the residual would not."""
    torch.manual_seed(0)
    V = 6
    p = torch.tensor([[0.05, 0.40, 0.05, 0.30, 0.10, 0.10], [0.2] * 5 + [0.0]])
    q = torch.tensor([[0.50, 0.05, 0.30, 0.05, 0.05, 0.05]])
    counts, naive = torch.zeros(V), torch.zeros(V)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1))
        accepted, nxt = S.accept_sampled(p, q, [d])
        counts[d if accepted else nxt] += 1
        # the broken rule: on rejection, draw from p itself instead of the residual
        naive[d if accepted else int(torch.multinomial(p[0], 1))] += 1
    tv = 0.5 * (counts / n - p[0]).abs().sum()
    tv_naive = 0.5 * (naive / n - p[0]).abs().sum()
    assert tv < 0.015, tv
    assert tv_naive > 0.05, tv_naive  # the test can tell a broken residual apart
    # prompt lookup: q one-hot; the kept token is d with probability p(d), else a draw from p without d
    counts.zero_()
    for _ in range(n):
        accepted, nxt = S.accept_sampled(p, None, [3])
        counts[3 if accepted else nxt] += 1
    assert 0.5 * (counts / n - p[0]).abs().sum() < 0.015


def test_sampled_speculation_is_reproducible_and_valid(target_and_draft):
    target, draft, _ = target_and_draft
    prompt = [3, 1, 4, 1, 5]
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        params = SamplingParams(max_tokens=24, temperature=1.0, top_k=20)
        runs.append(list(S.speculative_generate(target, prompt, params, k=3, draft=draft)))
    assert runs[0] == runs[1] and len(runs[0]) == 24 and all(0 <= t < 128 for t in runs[0])


def test_kv_caches_are_consistent_after_rejections(target_and_draft):
    target, draft, _ = target_and_draft
    prompt = [9, 8, 7, 6, 5, 4]
    out = list(S.speculative_generate(target, prompt, SamplingParams(max_tokens=20), k=4, draft=draft))
    text = prompt + out[:-1]  # everything written for good (the last token is not fed yet)
    assert_cache_holds(target, target_and_draft[2][0], text)
    # the draft may not have read the last accepted proposal yet (it reads it with the next round's token)
    assert_cache_holds(draft, target_and_draft[2][1], text[:-1])


def assert_cache_holds(model, path, text):
    fresh = load_model(str(path))
    fresh.setup_caches(1, 160)
    fresh(torch.tensor([text]), torch.arange(len(text)))
    for a, b in zip(model.layers, fresh.layers):
        for cache in ("k_cache", "v_cache"):
            torch.testing.assert_close(getattr(a.attention.kv_cache, cache)[:, :, :len(text)],
                                       getattr(b.attention.kv_cache, cache)[:, :, :len(text)], atol=1e-5, rtol=0)


def test_a_draft_that_is_always_right_catches_up_between_rounds(target_and_draft):
    """With the target as its own draft every proposal is kept; the draft then reads its last proposal
    together with the next round's first token, and still proposes the target's tokens."""
    target, _, (target_dir, _) = target_and_draft
    same = load_model(str(target_dir))
    same.setup_caches(1, 160)
    prompt = [4, 4, 2, 9, 1]
    stats = {}
    out = list(S.speculative_generate(target, prompt, SamplingParams(max_tokens=25), k=3, draft=same, stats=stats))
    assert out == plain(target, prompt, 25)
    assert stats["accepted"] == stats["proposed"] > 0
    assert_cache_holds(same, target_dir, (prompt + out)[:-2])


def test_command_line_reports_acceptance(target_and_draft):
    _, _, (target_dir, draft_dir) = target_and_draft
    base = ["generate.py", "--checkpoint", target_dir, "--prompt", "abcabcabc", "--max-new-tokens", "12", "--json"]
    plain_run, *runs, r = run_commands([base, base + ["--draft", "ngram"],
                                        base + ["--draft-checkpoint", draft_dir, "--speculate-k", "3"],
                                        base + ["--draft", "ngram", "--speculate-k", "0"]])
    for run in runs:
        assert run.returncode == 0, run.stderr
        record = json.loads(run.stdout)
        assert record["text"] == json.loads(plain_run.stdout)["text"]
        assert 0 <= record["acceptance_rate"] <= 1 and record["tokens_per_target_step"] >= 1
    assert r.returncode == 2 and r.stderr.strip() == "error: --speculate-k must be >= 1, not 0"


def test_compiled_verify_step_freezes_and_an_int4_draft_keeps_the_targets_tokens(target_and_draft, tmp_path,
                                                                                 capfd, monkeypatch):
    """Compiled on the CPU, the verify step (k + 1 rows) freezes the float target's weights where PyTorch's
    products run them (its layers plain nn.Linear here, as where qkernels.cpp cannot run them), and the
    draft's step, the target's int4 copy, runs qkernels.cpp's products (or, where they cannot be built,
    freezes and autotunes PyTorch's): each a graph of its own, and the tokens are still exactly the
    target's."""
    from quantize import quantize_checkpoint
    target, _, (target_dir, _) = target_and_draft
    plain_linears(target, monkeypatch)
    quantize_checkpoint(str(target_dir), str(tmp_path / "int4"), "int4", groupsize=32)
    draft = load_model(str(tmp_path / "int4"))
    draft.setup_caches(1, 160)
    steps = S.SpeculativeSteps(target, compile=True, draft=draft)
    assert frozen_settings(target, rows=2) == {"freezing": True} and frozen_settings(target, rows=1) is None
    draft_settings = frozen_settings(draft, rows=1)
    assert draft_settings is None if qlinear.cpu_kernels() else draft_settings["max_autotune"]
    prompt = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    stats = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(S.speculative_generate(target, prompt, SamplingParams(max_tokens=40), k=4, draft=draft,
                                          stats=stats, steps=steps))
    assert got == plain(target, prompt, 40)
    assert stats["proposed"] > stats["accepted"] > 0  # the draft both hit and missed
    # compiling and autotuning leave the user's stderr alone: no tables, no warnings that Python shows
    assert "autotune" not in capfd.readouterr().err.lower()
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    # frozen: the verify graph holds the weights it was compiled with, and no longer reads the model's
    tokens, pos = [3, 4, 5, 6, 7], len(prompt) + len(got)
    with torch.inference_mode():
        before = S.logits_at(steps.verify, target, tokens, pos)
        torch.testing.assert_close(before, S.logits_at(S.logits_of, target, tokens, pos), atol=1e-4, rtol=1e-4)
        saved = target.output.weight.clone()
        target.output.weight.zero_()
        try:
            assert torch.equal(S.logits_at(steps.verify, target, tokens, pos), before)
        finally:
            target.output.weight.copy_(saved)
