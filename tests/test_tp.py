"""tp.py: ranks started by torchrun give a single process's logits and tokens."""
import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tp
from bench import write_random_checkpoint
from conftest import ROOT, converted_checkpoint, run_python, run_script, torchrun
from checkpoint import load_model
from model import ModelArgs

WORKER = '''
import sys, torch
sys.path.insert(0, {root!r})
import tp
from checkpoint import load_model
model = load_model({ckpt!r})
model.setup_caches(1, 32)
tokens = torch.arange(3, 19)[None] % model.args.vocab_size
logits = model(tokens, torch.arange(16))
if tp.rank() == 0:
    torch.save(logits, {out!r})
tp.exit_process(0)  # as generate.py ends: a rank torn down by the interpreter can abort in gloo
'''


def alone_and_on_ranks(n, cli):
    """A command line run in one process and under torchrun on n ranks, both at once (much of either is
    Python starting): (the one process's CompletedProcess, torchrun's)."""
    with ThreadPoolExecutor(1) as pool:
        alone = pool.submit(run_script, *cli)
        return alone.result(), torchrun(n, *cli)


def checkpoint(tmp_path_factory, family, mode=None):
    # 128 MLP units: 64 per rank, whole int4 groups of 32
    out = converted_checkpoint(tmp_path_factory, family, seed=21, intermediate_size=128)[1]
    if mode:
        from quantize import quantize_checkpoint
        quantize_checkpoint(str(out), str(out) + "-" + mode, mode, groupsize=32)
        return out.parent / (out.name + "-" + mode)
    return out


@pytest.mark.parametrize("family,mode", [("gqa", None), ("mqa", None), ("qwen2-bias", None), ("gqa", "int8"),
                                         ("gqa", "int4")])
def test_two_ranks_give_the_logits_and_tokens_of_one_process(tmp_path_factory, tmp_path, family, mode):
    """2 key/value heads split over 2 ranks; a single one (MQA) replicated; biases; int8 and int4 shards."""
    ckpt = checkpoint(tmp_path_factory, family, mode)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, ckpt=str(ckpt), out=str(tmp_path / "logits.pt")))
    r = torchrun(2, script)
    assert r.returncode == 0, r.stderr[-3000:]
    single = load_model(str(ckpt))
    single.setup_caches(1, 32)
    tokens = torch.arange(3, 19)[None] % single.args.vocab_size
    # quantized layers round their outputs to bfloat16 (qlinear.KERNEL_DTYPE), each rank its partial sum
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), single(tokens, torch.arange(16)),
                               atol=1e-4 if mode is None else 5e-3, rtol=0)
    cli = ["generate.py", "--checkpoint", ckpt, "--prompt", "abcab", "--max-new-tokens", "16", "--json"]
    alone, r = alone_and_on_ranks(2, cli)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1  # rank 0 alone prints
    assert records[0]["text"] == json.loads(alone.stdout)["text"]


def test_impossible_split_is_refused_before_loading(tmp_path):
    args = ModelArgs(dim=72, n_layers=1, n_heads=9, n_kv_heads=3, head_dim=8, intermediate_size=64, vocab_size=257,
                     norm_eps=1e-5, rope_base=10000.0, max_seq_len=64, tie_embeddings=True, attention_bias=False)
    with pytest.raises(ValueError, match="cannot split 9 query heads over 2 ranks"):
        tp.local_args(args, 2)
    with pytest.raises(ValueError, match="cannot split or replicate 3 key/value heads over 4 ranks"):
        tp.local_args(dataclasses.replace(args, n_heads=12), 4)
    with pytest.raises(ValueError, match="cannot split the MLP's 64 hidden units over 3 ranks"):
        tp.local_args(args, 3)
    write_random_checkpoint(args, str(tmp_path))
    os.remove(tmp_path / "model.safetensors")  # the refusal must come before any weight is read
    r = torchrun(2, "generate.py", "--checkpoint", tmp_path, "--prompt", "hi")
    assert r.returncode != 0
    assert f"error: {tmp_path / 'config.json'}: cannot split 9 query heads over 2 ranks" in r.stderr


def test_default_model_on_three_ranks(default_checkpoint, default_int8_checkpoint):
    """9 query and 3 key/value heads over 3 ranks: the greedy text of one process, float32 and int8."""
    for ckpt in (default_checkpoint, default_int8_checkpoint):
        cli = ["generate.py", "--checkpoint", str(ckpt), "--chat", "--prompt", "What is the capital of France?",
               "--max-new-tokens", "24", "--json"]
        alone, r = alone_and_on_ranks(3, cli)
        assert r.returncode == 0, r.stderr[-3000:]
        text = json.loads(r.stdout.strip().splitlines()[-1])["text"]
        assert text == json.loads(alone.stdout)["text"] and "Paris" in text


ENGINE_WORKER = '''
import json, sys, torch
sys.path.insert(0, {root!r})
import tp
from checkpoint import load_model
from engine import Engine
from sampling import SamplingParams
layout = tp.init(torch.device("cpu"), pp={pp})
engine = Engine(load_model({ckpt!r}, layout=layout), max_num_seqs=2, kv_cache_tokens=80, block_size=16,
                max_num_batched_tokens=16, layout=layout)
prompts = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate((5, 40, 23))]
params = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=1.0, seed=3),
          SamplingParams(max_tokens=12)]
tokens, reasons = {{}}, {{}}
def step():
    for out in engine.step():
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finished:
            reasons[out.request_id] = out.finish_reason
ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:2], params[:2])]  # rank 0's calls count
step()
ids.append(engine.add_request(prompts[2], params[2]))
ids.append(engine.add_request([1, 2, 3], SamplingParams(max_tokens=50)))
step()
engine.abort(ids[-1])
while len(reasons) < len(ids):
    step()
if tp.rank() == 0:
    print(json.dumps({{"tokens": [tokens.get(i, []) for i in ids], "reasons": [reasons[i] for i in ids],
                      "stats": engine.stats()}}))
tp.exit_process(0)
'''


@pytest.fixture(scope="module")
def engine_alone(tmp_path_factory):
    """The engine worker's checkpoint (three layers: two stages split them unevenly; 128 MLP units, 64 per
    rank), and what the worker prints in one process."""
    ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=31, num_hidden_layers=3, intermediate_size=128)[1]
    script = tmp_path_factory.mktemp("engine") / "engine_worker.py"
    script.write_text(ENGINE_WORKER.format(root=ROOT, ckpt=str(ckpt), pp=1))
    r = run_python(script)
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads(r.stdout.strip().splitlines()[-1])
    assert one["reasons"] == ["length"] * 3 + ["abort"] and one["stats"]["preemptions"] > 0
    return ckpt, one


@pytest.mark.parametrize("world,pp", [(2, 1), (2, 2), (4, 2)])
def test_engine_on_ranks_gives_one_process_tokens(engine_alone, tmp_path, world, pp):
    """Rank 0's requests and aborts reach every rank at the next step: all ranks step the same batches, each
    over its shard of the model or its stage (and 2 x 2), and give one process's tokens: requests arriving
    between steps, chunked prompts, preemption, a seeded sampled request and an abort."""
    ckpt, one = engine_alone
    script = tmp_path / "engine_worker.py"
    script.write_text(ENGINE_WORKER.format(root=ROOT, ckpt=str(ckpt), pp=pp))
    r = torchrun(world, script)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = json.loads(r.stdout.strip().splitlines()[-1])
    assert ranks["tokens"] == one["tokens"] and ranks["reasons"] == one["reasons"]


@pytest.mark.parametrize("pp", [1, 2])
def test_server_on_two_ranks_answers_as_one_process(tmp_path_factory, pp):
    """Under torchrun rank 0 serves HTTP and every rank steps the engine: tensor-parallel, or in two
    pipeline stages (--pp 2)."""
    import re
    import signal
    import urllib.request
    from checkpoint import load_tokenizer
    from engine import Engine
    from sampling import SamplingParams
    ckpt = checkpoint(tmp_path_factory, "gqa")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "serve.py", "--checkpoint", str(ckpt), "--port", "0", "--dtype", "float32",
                             "--served-model-name", "tiny", "--kv-cache-tokens", "1024", "--pp", str(pp)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url, lines = None, []
        while url is None:
            line = proc.stderr.readline()
            if not line:
                pytest.fail("the server did not start: " + "".join(lines[-20:]))
            lines.append(line)
            m = re.search(r"serving tiny on (http://\S+)", line)
            url = m.group(1) if m else None
        prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
        answers = []
        for prompt in prompts:
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
                {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answers.append(json.loads(r.read())["choices"][0]["text"])
        alone = Engine(load_model(str(ckpt)), load_tokenizer(str(ckpt)), kv_cache_tokens=1024).generate(
            prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert answers == [c.text for c in alone] and all(len(a) >= 6 for a in answers), answers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)  # every rank ends: none is left waiting in a broadcast
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the ranks did not end after SIGTERM")
