"""The files import one way, and bad input ends every command the same way (one line, exit code 2)."""
import ast
import os

import pytest

from conftest import ROOT, converted_checkpoint, run_commands
from errors import UsageError
from sampling import SamplingParams

# The reading order: each file may import only files before it (which also rules out cycles).
LAYERS = ["model", "tokenizer", "errors", "qlinear", "tp", "convert_checkpoint", "checkpoint", "offload",
          "sampling", "decode", "speculative", "beam", "pp", "sequence", "block_manager", "scheduler", "engine",
          "quantize", "eval", "bench", "bench_beam", "bench_speculative", "bench_offload", "bench_serving", "serve",
          "generate"]
COMMAND_LINE = "generate"


def local_imports(path):
    """Every top-level file that `path` imports, at module level or inside a function."""
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & ours


def test_imports_run_one_way():
    files = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    assert sorted(LAYERS) == files, "a new top-level file needs its place in LAYERS"
    for name in files:
        imported = local_imports(os.path.join(ROOT, name + ".py"))
        assert COMMAND_LINE not in imported, f"{name}.py imports the command line"
        later = {m for m in imported if LAYERS.index(m) >= LAYERS.index(name)}
        assert not later, f"{name}.py imports {sorted(later)}, which come after it (or itself)"


def test_model_imports_only_torch():
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"torch", "math", "dataclasses", "typing"}, modules


def test_sampling_params_validate_themselves():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", ""]).stop == ("a",)
    cases = [(dict(temperature=-1), "temperature", "temperature must be >= 0"),
             (dict(temperature=float("nan")), "temperature", "temperature must be >= 0, not nan"),
             (dict(top_k=0), "top_k", "top_k must be >= 1"),
             (dict(top_p=0.0), "top_p", "top_p must be in (0, 1]"),
             (dict(top_p=1.5), "top_p", "top_p must be in (0, 1]"),
             (dict(max_tokens=-1), "max_tokens", "max_tokens must be >= 0"),
             (dict(max_tokens=2.5), "max_tokens", "max_tokens must be an integer"),
             (dict(temperature="hot"), "temperature", "temperature must be a number"),
             (dict(top_k=True), "top_k", "top_k must be an integer"),
             (dict(seed=1 << 70), "seed", "seed must be in"),
             (dict(stop=[1]), "stop", "stop must be a string or a list of strings"),
             (dict(ignore_eos="yes"), "ignore_eos", "ignore_eos must be true or false")]
    for kwargs, param, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("]", r"\]")) as e:
            SamplingParams(**kwargs)
        assert e.value.param == param


def test_compiling_steps_leaves_global_inductor_settings_alone(tmp_path_factory):
    import torch._inductor.config as inductor_config
    from checkpoint import load_model
    from decode import Steps
    _, ckpt = converted_checkpoint(tmp_path_factory, "mqa", seed=2)
    model = load_model(str(ckpt))
    model.setup_caches(1, 64)
    before = dict(inductor_config.post_grad_fusion_options)
    Steps(model, compile=True)
    assert inductor_config.post_grad_fusion_options == before


def test_every_command_reports_bad_input_in_one_line_with_exit_code_2(tmp_path_factory, tmp_path):
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=4)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tokenizer / f).write_bytes((ckpt / f).read_bytes())
    text = tmp_path / "text.txt"
    text.write_text("some words to score " * 20)
    cases = [
        ("generate.py", ["--checkpoint", str(ckpt), "--prompt", "hi", "--no-such-flag"], "unrecognized arguments"),
        ("generate.py", ["--checkpoint", str(ckpt), "--prompt", "hi", "--top-k", "x"], "invalid int value"),
        ("generate.py", ["--checkpoint", str(no_tokenizer), "--prompt", "hi"], "cannot read the tokenizer"),
        ("eval.py", ["--checkpoint", str(no_tokenizer), "--text", str(text)], "cannot read the tokenizer"),
        ("eval.py", ["--checkpoint", str(ckpt), "--text", str(tmp_path / "nope.txt")], "cannot read it as UTF-8"),
        ("eval.py", ["--checkpoint", str(ckpt)], "the following arguments are required: --text"),
        ("convert_checkpoint.py", [str(tmp_path / "nope"), "--out", str(tmp_path / "out")], "no such file"),
        ("convert_checkpoint.py", [str(ckpt), "--out", str(tmp_path / "o"), "--dtype", "int3"], "unknown dtype"),
        ("quantize.py", ["--checkpoint", str(ckpt), "--mode", "int3", "--out", str(tmp_path / "q")], "unknown mode"),
        ("quantize.py", ["--checkpoint", str(ckpt), "--mode", "int4-gptq", "--out", str(tmp_path / "q"),
                         "--calibration", str(tmp_path / "nope.txt")], "cannot read it as UTF-8"),
        ("bench.py", ["--checkpoint", str(ckpt), "--repeat", "0"], "--repeat must be >= 1"),
        ("bench_beam.py", ["--checkpoint", str(ckpt), "--num-beams", "0"], "--num-beams and --rounds must be >= 1"),
        ("bench_speculative.py", ["--checkpoint", str(ckpt), "--draft", "ngram", "--k", "2,x"], "--k: numbers"),
    ]
    for (script, args, message), r in zip(cases, run_commands([script, *args] for script, args, _ in cases)):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (script, args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (script, args, r.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()
