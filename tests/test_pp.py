"""pp.py: a pipeline of stages (with tensor parallelism inside them) started by torchrun gives a single
process's logits and tokens, each rank holding its share of the layers."""
import json
import os

import pytest
import torch

import pp
import tp
from bench import write_random_checkpoint
from checkpoint import load_model
from conftest import ROOT, converted_checkpoint, run_commands, run_script, torchrun
from decode import generate
from model import ModelArgs
from sampling import SamplingParams

WORKER = '''
import json, sys, torch
from contextlib import nullcontext
sys.path.insert(0, {root!r})
import pp, tp
from checkpoint import load_model
from sampling import SamplingParams

def rss_mb():  # resident now, anonymous and file-backed
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

layout = tp.init(torch.device("cpu"), pp={pp})
before = rss_mb()
model = load_model({ckpt!r}, layout=layout)
result = {{"rank": tp.rank(), "stage": layout.stage, "layers_bytes": sum(
    t.numel() * t.element_size() for t in model.layers.state_dict().values()), "rss_growth_mb": rss_mb() - before}}
prompts = {prompts!r}
model.setup_caches(len(prompts), 64)
steps = pp.PipelineSteps(model, compile={compile!r})
for M in {micro_batches!r}:
    logits = pp.forward(model, layout, prompts, micro_batches=M)
    if logits is not None and layout.tp_rank == 0:
        torch.save(logits, f"{out}/logits-{{M}}.pt")
    if {compile!r}:  # compile this M's micro-batch shapes; then nothing may recompile
        list(pp.generate(model, layout, prompts, SamplingParams(max_tokens=3), micro_batches=M, steps=steps))
    with torch.compiler.set_stance("fail_on_recompile") if {compile!r} else nullcontext():
        tokens = list(pp.generate(model, layout, prompts, SamplingParams(max_tokens=20), micro_batches=M,
                                  eos_ids={eos!r}, steps=steps))
    if layout.first:
        result[f"tokens-{{M}}"] = tokens
json.dump(result, open(f"{out}/rank-{{tp.rank()}}.json", "w"))
tp.exit_process(0)
'''


def run_worker(tmp_path, world, pp, ckpt, prompts, micro_batches=(1,), eos=(), compile=False):
    out = tmp_path / f"out-{world}-{pp}"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, pp=pp, ckpt=str(ckpt), prompts=prompts, compile=compile,
                                    micro_batches=tuple(micro_batches), eos=tuple(eos), out=str(out)))
    r = torchrun(world, script)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, [json.loads((out / f"rank-{i}.json").read_text()) for i in range(world)]


@pytest.fixture
def one_thread():
    """The thread count torchrun gives each rank here: int8 kernels round by how they split the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three layers (an uneven split over two stages), 128 MLP units: whole int4 / int8 slices over 2 ranks."""
    hf, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=31, num_hidden_layers=3, intermediate_size=128)
    from quantize import quantize_checkpoint
    quantize_checkpoint(str(ckpt), str(ckpt) + "-int8", "int8")
    return ckpt


@pytest.mark.parametrize("world,mode,compile,counts", [(2, None, True, (2,)), (4, None, False, (1, 2, 3)),
                                                       (2, "int8", False, (1, 2, 3)), (4, "int8", False, (1, 2, 3))])
def test_pipeline_gives_the_logits_and_tokens_of_one_process(tiny, tmp_path, world, mode, compile, counts,
                                                             one_thread):
    """pp 2 and pp 2 x tp 2, float32 and int8, with `counts` micro-batches. Compiled, pp 2 runs two micro-batches
    of unequal size (two shapes of step), recompiling for nothing once warm. int8 split over
    tensor-parallel ranks rounds each rank's partial sums to bfloat16 (qlinear.KERNEL_DTYPE), as tp.py's
    tests say: its logits are held to 5e-3 and its tokens, which that rounding can flip at near-ties, are
    not compared."""
    ckpt = str(tiny) + ("-" + mode if mode else "")
    prompts = [[(5 * i + 3 * j + 1) % 128 for j in range(n)] for i, n in enumerate((7, 15, 3))]
    single = load_model(ckpt)
    single.setup_caches(3, 64)
    alone = [single(torch.tensor([p]), torch.arange(len(p)))[0] for p in prompts]
    plain = list(generate(single, prompts, SamplingParams(max_tokens=20)))
    eos = plain[5][1]  # a token the second prompt emits: its row ends there, the others go on
    expected = list(generate(single, prompts, SamplingParams(max_tokens=20), eos_ids=(eos,)))
    out, ranks = run_worker(tmp_path, world, 2, ckpt, prompts, counts, (eos,), compile)
    rounded = mode is not None and world > 2
    tolerance = 5e-3 if rounded else 1e-5
    T = max(map(len, prompts))
    padded = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    for M in counts:
        logits = torch.load(out / f"logits-{M}.pt")
        # One process on the same micro-batches: quantized kernels round by batch shape, so this is the
        # reference that holds for int8 too; float32 also equals each prompt alone.
        same = torch.cat([single(padded[part], torch.arange(T), pad[part]) for part in pp.micro_batch_rows(3, M)])
        torch.testing.assert_close(logits, same, atol=tolerance, rtol=0)
        for i, p in enumerate(prompts):
            if mode is None:
                torch.testing.assert_close(logits[i, T - len(p):], alone[i], atol=1e-5, rtol=0)
        for r in ranks:
            # int8 kernels also round by the number of rows: its tokens are compared for one micro-batch
            if r["stage"] == 0 and not rounded and (mode is None or M == 1):
                assert r[f"tokens-{M}"] == [list(step) for step in expected], M
    assert expected[-1][1] is None and len(expected) > 6  # the end token ended a row, not the generation
    # each stage holds its layers only: 2 of 3 and 1 of 3
    total = sum(t.numel() * t.element_size() for t in single.layers.state_dict().values()) / (world // 2)
    for r in ranks:
        assert r["layers_bytes"] == pytest.approx(total * (2 / 3 if r["stage"] == 0 else 1 / 3), rel=0.05)


def test_each_rank_reads_and_holds_its_share(tmp_path):
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, intermediate_size=2048,
                     vocab_size=1024, norm_eps=1e-5, rope_base=10000.0, max_seq_len=256, tie_embeddings=True,
                     attention_bias=False)
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    write_random_checkpoint(args, str(ckpt), dtype=torch.float32)
    single = load_model(str(ckpt))
    layers_mb = sum(t.numel() * t.element_size() for t in single.layers.state_dict().values()) / 2 ** 20
    _, (alone,) = run_worker(tmp_path, 1, 1, ckpt, [[1, 2, 3]], micro_batches=())
    _, ranks = run_worker(tmp_path, 2, 2, ckpt, [[1, 2, 3]], micro_batches=())
    for r in ranks:
        assert r["layers_bytes"] / 2 ** 20 == pytest.approx(layers_mb / 2, rel=0.01)
        # loading grew resident memory by about half the layers less than loading them all did
        assert alone["rss_growth_mb"] - r["rss_growth_mb"] > 0.4 * layers_mb, (alone, r, layers_mb)


def test_default_model_in_two_stages(default_checkpoint, default_int8_checkpoint):
    """Three chat prompts, answers that end with the end token, in two micro-batches of unequal size (the
    tiny model's test above takes every count); int8 too, as one micro-batch (its kernels round by the
    number of rows as well as by threads)."""
    prompts = ["What is the capital of France?", "Name a fruit.", "Say hello."]
    for ckpt, counts in ((default_checkpoint, (2,)), (default_int8_checkpoint, (1,))):
        cli = ["generate.py", "--checkpoint", str(ckpt), "--chat", "--max-new-tokens", "40", "--json"]
        cli += [a for p in prompts for a in ("--prompt", p)]
        # one thread, as torchrun gives each rank: int8 kernels round by how they split the work
        alone = run_script(*cli, env=dict(os.environ, OMP_NUM_THREADS="1"))
        expected = [json.loads(line) for line in alone.stdout.splitlines()]
        assert all(e["generated_tokens"] < 40 for e in expected)  # every answer ended with the end token
        for M in counts:
            r = torchrun(2, *cli, "--pp", "2", "--micro-batches", str(M))
            assert r.returncode == 0, r.stderr[-3000:]
            got = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            assert [g["text"] for g in got] == [e["text"] for e in expected] and "Paris" in got[0]["text"]
            assert [g["generated_tokens"] for g in got] == [e["generated_tokens"] for e in expected]
            assert len(got[0]["pipeline_busy_share"]) == 2


def test_impossible_pipelines_are_refused_before_loading(tmp_path):
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                     vocab_size=257, norm_eps=1e-5, rope_base=10000.0, max_seq_len=64, tie_embeddings=True,
                     attention_bias=False)
    write_random_checkpoint(args, str(tmp_path))
    os.remove(tmp_path / "model.safetensors")  # the refusal must come before any weight is read
    r = torchrun(2, "generate.py", "--checkpoint", tmp_path, "--prompt", "hi", "--pp", "3")
    assert r.returncode != 0 and "error: 3 pipeline stages do not divide the world of 2 rank(s)" in r.stderr
    r = torchrun(4, "generate.py", "--checkpoint", tmp_path, "--prompt", "hi", "--pp", "4")
    assert r.returncode != 0
    assert f"error: {tmp_path / 'config.json'}: cannot split 3 layers into 4 pipeline stages" in r.stderr
    cases = [(["--pp", "2"], "error: --pp 2 runs under torchrun, with a multiple of 2 processes"),
             (["--micro-batches", "2"], "error: --micro-batches needs --pp 2 or more"),
             (["--pp", "2", "--num-beams", "2"], "error: --pp does not combine with --num-beams")]
    commands = [["generate.py", "--checkpoint", tmp_path, "--prompt", "hi", *args] for args, _ in cases]
    for (args, message), r in zip(cases, run_commands(commands)):
        assert r.returncode == 2 and r.stderr.strip() == message, (args, r.stderr)
    assert tp.Layout(pp=2, stage=1).stage_layers(3) == range(2, 3)
