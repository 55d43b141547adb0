"""Decoding: the prefill and decode steps (eager or compiled, kept on a Steps object), the decode loop
generate(), and TextStream, which turns tokens into printable text and finds stop strings.

    model.setup_caches(max_batch_size=1, max_seq_length=256)
    steps = Steps(model, compile=True)                    # once per model
    for token in generate(model, prompt_ids, SamplingParams(max_tokens=50), eos_ids=tok.eos_ids, steps=steps):
        ...

Decoding runs over the model's static KV cache, so a compiled decode step is one fixed graph (CUDA graphs
on CUDA). Sampling happens on the device; the only host transfer per step is the new token.
"""
import dataclasses
import functools
import hashlib
import operator
import os
import sys
import types
import warnings
from typing import Iterator, Optional

import torch

from errors import UsageError
from model import KVCache, PagedKVCache, Transformer
from qlinear import C_SHIMS, Int4Linear, Int8Linear, KernelTeam, cpu_features, cpu_kernels
from sampling import SamplingParams, sample

try:
    from torch.fx.experimental.sym_node import DynamicInt  # an int that torch.compile treats as a symbol
except ImportError:  # older PyTorch: a plain int, which costs one recompilation before it goes dynamic
    DynamicInt = int

# Each step attends to the filled part of the KV cache, not to the whole cache: with a long cache and a
# short text, attending to every slot costs more than reading the weights. The length is a DynamicInt, so
# torch.compile makes it a symbolic size: one compiled graph serves every length, and nothing recompiles
# as the text grows. On CUDA it is rounded up to a multiple of KV_BLOCK slots, as a CUDA graph is recorded
# for each length; on the CPU it is exact (at least 2: torch.compile would specialise sizes 0 and 1), as
# the slots past the text would only cost time (BENCHMARKS.md).
KV_BLOCK = 128


def attended_length(model: Transformer, n_filled: int) -> int:
    block = KV_BLOCK if model.dtype_device()[1].type == "cuda" else 1
    return DynamicInt(min(model.max_seq_length, max(2, -(-n_filled // block) * block)))


# ---------------------------------------------------------------------------------------------------------
# The steps, and the object that holds them compiled


def prefill(model, tokens, input_pos, left_pad, kv_len, temperature, top_k, top_p):
    """tokens [B, S] at cache positions input_pos [S] -> the next token per row [B]."""
    logits = model(tokens, input_pos, left_pad, kv_len, last_only=True)
    return sample(logits[:, -1], temperature, top_k, top_p)


def decode_step(model, token, input_pos, left_pad, kv_len, temperature, top_k, top_p):
    """One token per row [B] at cache position input_pos [1] -> the next token per row [B], attending to
    the first kv_len cache slots."""
    logits = model(token[:, None], input_pos, left_pad, kv_len)
    return sample(logits[:, -1], temperature, top_k, top_p)


def inductor_options(device: torch.device, loop_attention: bool = True) -> Optional[dict]:
    """Inductor settings for our compiled steps, passed to torch.compile so that they apply to these
    compilations only.

    On the CPU at batch 1 every linear layer is a matrix-vector product, bound by memory. oneDNN's GEMV
    streams bfloat16 weights well below the machine's bandwidth; Inductor's decompose-mm pass rewrites
    such a product as a multiply-and-sum, which it compiles into a vectorised loop that streams the
    weight faster (BENCHMARKS.md). The pass is off by default and is turned on here, per compilation. Its
    size limit (2048) would leave out the largest weight of all, the output head: PyTorch reads that
    limit from a module variable, not from the per-compilation settings, so it is raised there. That
    changes nothing for compilations that do not turn the pass on.

    The rest trims what a step spends outside its kernels, a large share at batch 1: the attention of a
    few queries becomes qkernels.cpp's or Inductor's own loops (few_query_attention_pass; with
    loop_attention False, qkernels.cpp's or PyTorch's kernel); the wrapper, the code that calls a step's
    kernels and products one after another, is C++ (cpp_wrapper), not Python, as a hundred and more calls
    a step each cost less from C++ (its first compilation takes longer, C++ to build; Inductor's cache
    keeps it for later processes, though never a frozen step, whichever the wrapper: frozen_settings);
    and the wrapper does not re-check the sizes and strides of the graph's inputs and of every kernel's
    output (size_asserts: our graphs are fixed, and Dynamo still checks the inputs that can change).
    """
    if device.type != "cpu":
        return None
    from torch._inductor.fx_passes import decompose_mem_bound_mm
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = 1 << 20
    options = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "size_asserts": False, "cpp_wrapper": True}
    if loop_attention or cpu_kernels():
        options["pre_grad_custom_pass"] = few_query_attention_pass(loop_attention)
    return options


# The most query rows per key/value head that few_query_attention_pass compiles into loops: a decode step has
# n_heads / n_kv_heads of them per row, a speculative verify step k + 1 times that.
FEW_QUERIES = 16


def few_query_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """scaled_dot_product_attention written as sums and a softmax in float32, for Inductor to compile into
    loops: query [B, H, S, D] with S small, key/value [B, H, L, D], attn_mask [B or 1, 1 or H, S, L] (bool:
    True attends; or float: added to the scores). The pass below only calls it without dropout or
    is_causal, and with as many key/value heads as query heads."""
    scores = (query.float().unsqueeze(-2) * key.float().unsqueeze(-3)).sum(-1)  # (B, H, S, L)
    scores = scores * (query.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(-1) * value.float().unsqueeze(-3)).sum(-2).to(query.dtype)  # (B, H, S, D)


def few_query_attention_pass(loops: bool = True):
    """An Inductor pass over the traced step (a CustomGraphPass) that swaps scaled_dot_product_attention
    for few_query_attention where the queries are few: a decode step's.

    PyTorch's flash-attention kernel for the CPU costs tens of microseconds a call however little it has
    to do, and a decode step calls it once per layer over a handful of query rows. Where qkernels.cpp is
    built (qlinear.cpu_kernels), its few_query_attention takes the call: its sums are vectorised by hand,
    and a step with it took up to a tenth less time than with Inductor's loops below, more the longer
    the attended part of the cache (on an AVX2 machine; not measured with AVX-512: BENCHMARKS.md); the
    serving engine's paged steps of 8 rows about an eighth less than with PyTorch's kernel. Elsewhere the
    same attention written as sums becomes Inductor's loops, fused with the RoPE and cache update before
    it, with no call out of the compiled code; or, with loops False, it keeps PyTorch's kernel. Prompts
    (many queries, or a symbolic number) keep the kernel. The pass has a uuid (this file's and
    qkernels.cpp's hash, whether that is built, and loops), so Inductor's caches tell its graphs from
    those compiled without it or with the other attention. (Made here, not at import: importing Inductor
    takes a second that eager decoding need not pay.)"""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    kernel = torch.ops.nimblelm.few_query_attention.default if cpu_kernels() else None
    # (the call as Dynamo traces it for torch.compile; the ATen op in torch.export's graphs: ExportedStep)
    SDPA = (torch._C._nn.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)

    class FewQueryAttention(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph):
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            for node in graph.nodes:
                if node.op != "call_function" or node.target not in SDPA:
                    continue
                args = dict(zip(names, node.args), **node.kwargs)
                metas = (getattr(args.get(name), "meta", {}) for name in ("query", "key", "value", "attn_mask"))
                q, k, v, mask = (meta.get("example_value", meta.get("val")) for meta in metas)
                if (q is None or k is None or not isinstance(q.shape[-2], int) or q.shape[-2] > FEW_QUERIES
                        or k.shape[1] != q.shape[1] or args.get("dropout_p") or args.get("is_causal")):
                    continue
                if (kernel is not None and v is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
                        and k.dtype == v.dtype == q.dtype and k.shape[0] == q.shape[0] and q.shape[-1] % 8 == 0
                        and k.shape[-1] == v.shape[-1] == q.shape[-1] and k.stride(-1) == v.stride(-1) == 1
                        and (args.get("attn_mask") is None
                             or (mask is not None and mask.dtype == torch.bool and mask.dim() == 4))):
                    scale = args.get("scale")
                    node.target = kernel
                    node.args = (args["query"], args["key"], args["value"], args.get("attn_mask"),
                                 q.shape[-1] ** -0.5 if scale is None else scale)
                    node.kwargs = {}
                elif loops:
                    node.target = few_query_attention

        def uuid(self):
            kernels = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qkernels.cpp")
            return get_hash_for_files((__file__, kernels), extra=f"{kernel is not None} {loops}")

    return FewQueryAttention()


class Steps:
    """A model's prefill and decode step, eager or compiled. Make one per model (with its caches set up)
    and pass it to every generate() call: the compiled graphs live on this object, and nothing global
    changes."""

    # The step functions, before compiling; a subclass for another search names its own.
    prefill_fn, decode_fn = staticmethod(prefill), staticmethod(decode_step)

    def __init__(self, model: Transformer, compile: bool = False, compile_prefill: bool = False):
        self.device = model.dtype_device()[1]
        self.prefill, self.decode = self.prefill_fn, self.decode_fn
        if compile:
            self.decode = self.compiled_for(model, self.decode_fn, frozen_settings(model, model.max_batch_size))
        if compile_prefill:
            self.prefill = self.compiled(self.prefill_fn, dynamic=True)

    def compiled_for(self, model: Optional[Transformer], fn, frozen: Optional[dict], symbolic_dims=(), **kwargs):
        """fn compiled for the calls it gets with this model (of fixed shapes, but for the attended length
        and symbolic_dims: (argument, dimension) pairs, the argument counted from the one after the model, of
        tensors whose size there varies from call to call): an ExportedStep where that suits, else
        compiled()'s."""
        if model is not None and ExportedStep.suits(model, frozen):
            return ExportedStep(fn, symbolic_dims)
        return self.compiled(fn, frozen=frozen, symbolic_dims=symbolic_dims, **kwargs)

    def compiled(self, fn, loop_attention: bool = True, frozen: Optional[dict] = None, symbolic_dims=(), **kwargs):
        """fn compiled whole (no graph breaks) with the device's settings. On CUDA, CUDA graphs replay
        the whole step as one launch, so its many small kernels cost no host time. loop_attention: see
        inductor_options (False for a paged cache: its gathered keys and values would be gathered again
        for every query row inside Inductor's loops).

        On the CPU a step is a CompiledStep, which says what it leaves unchecked.

        frozen: Inductor's settings for a step that compiles the model's weights into the graph as
        constants (freezing), from frozen_settings, which says what that buys. The graph then no
        longer reads the model's weights: changing them after compiling changes nothing.

        symbolic_dims: see compiled_for; each call marks them dynamic, so that the first trace makes them
        symbolic (one graph for every size) rather than a later call recompiling for another."""
        if self.device.type == "cuda":
            step = torch.compile(own_copy(fn), mode="reduce-overhead", fullgraph=True, **kwargs)
        else:
            options = dict(inductor_options(self.device, loop_attention) or {}, guard_filter_fn=model_unguarded)
            step = CompiledStep(fn, options, frozen, **kwargs)
        return marking(step, symbolic_dims) if symbolic_dims else step


def marking(step, symbolic_dims):
    """step(model, *args), marking each call's symbolic_dims dynamic for torch.compile first."""
    def call(model, *args):
        for i, dim in symbolic_dims:
            torch._dynamo.mark_dynamic(args[i], dim)
        return step(model, *args)
    return call


def own_copy(fn, globals_: Optional[dict] = None):
    """A copy of fn with its own code object (and globals_ for globals, when given): torch.compile keeps
    graphs per code object, so each copy's graphs serve only the calls made through it (one Steps, one
    model: never a draft beside its target)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__ if globals_ is None else globals_, fn.__name__,
                              fn.__defaults__, fn.__closure__)


class CompiledStep:
    """A step compiled for the CPU, where what a call spends before its graph runs is a share of a small
    model's step (a tenth, measured: most of a millisecond). Two things trim it:
    - Dynamo installs the model's tensors (weights, KV caches, RoPE tables) in the graph as attributes
      (install_free_tensors), so a call does not fetch hundreds of them from the model's modules, and
    - it checks nothing about the model's state (model_unguarded): its weights, their shapes (Inductor's
      own checks are off as well, inductor_options), nor its caches.
    In their place this object checks the caches itself: the graph holds the tensors it was traced with,
    so when setup_caches or setup_paged_cache replaces them (with new ones, of any size), the step is
    compiled anew. A model whose layers change after compiling needs a new Steps.

    torch.compile keeps the compiled graphs in the step's globals, and keeps those for as long as the
    objects its checks read live (all of the process, for most); as the graphs hold the model's tensors,
    each compiled copy of fn gets globals of its own, which this object empties when it drops the copy.

    fn, options, kwargs: what torch.compile gets. frozen: Inductor settings, or None (Steps.compiled)."""

    def __init__(self, fn, options: dict, frozen: Optional[dict] = None, **kwargs):
        self.fn, self.options, self.frozen, self.kwargs = fn, options, frozen, kwargs
        self.step, self.caches, self.globals = None, None, {}

    def __call__(self, *args):
        caches = [t for a in args if isinstance(a, Transformer) for t in cache_tensors(a)]
        if self.caches is None or len(caches) != len(self.caches) or any(map(operator.is_not, caches, self.caches)):
            self.release()
            self.globals = dict(self.fn.__globals__)
            self.step = torch.compile(own_copy(self.fn, self.globals), options=self.options, fullgraph=True,
                                      **self.kwargs)
            self.caches = caches
        from torch._dynamo import config as dynamo_config
        # install_free_tensors is read as Dynamo traces, which may happen in any call: it is set around each
        # one, by hand, as ConfigModule.patch costs about 20 us a call (BENCHMARKS.md)
        saved = dynamo_config.install_free_tensors
        dynamo_config.install_free_tensors = True
        try:
            if self.frozen is None:
                return self.step(*args)
            from torch._inductor import config
            # Dynamo reads freezing as it traces (weights become graph constants), Inductor as it
            # compiles; torch.compile's per-compilation options reach only the second, so the settings
            # are set around each call, which is when either may happen. (Inductor's autotuner calls a
            # deprecated storage API, whose warning would reach the user's stderr.)
            with config.patch(self.frozen), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "TypedStorage is deprecated")
                return self.step(*args)
        finally:
            dynamo_config.install_free_tensors = saved

    def release(self):
        """Drop the compiled graphs, and the tensors they hold. (The names stay: Dynamo deletes those it
        installed once it has dropped what refers to them.)"""
        self.globals.update(dict.fromkeys(self.globals))
        self.step, self.caches = None, None

    def __del__(self):
        self.release()


class ExportedStep:
    """A decode step compiled ahead of time for the CPU: torch.export traces it, AOTInductor compiles the
    graph into a shared library, and a call runs that library with no Python of PyTorch's in between (no
    Dynamo frame, guards or AOTAutograd wrapper). The model's weights are the library's constants, given to
    it once as pointers to the model's own memory, so a call passes only its few inputs, not hundreds; the
    KV caches' tensors and the RoPE tables are inputs (about 6 us a call for 60 of them), their length
    symbolic, so that one library serves a static cache of any length (generate.py's, which follows the
    prompt) and a paged pool of any size (serve.py's --kv-cache-tokens). It calls qkernels.cpp's ops
    directly (qlinear.C_SHIMS); and a step of one token runs with a qlinear.KernelTeam, whose threads read
    the next weights ahead between the products. A CompiledStep spends about half a millisecond a call
    outside its graph, a tenth of a small quantized model's step: batch-1 steps took 5-9% less time this
    way (BENCHMARKS.md). For the steps that suit it (suits()).

    fn(model, *args): a tensor argument is an input of the shape it had; a DynamicInt (attended_length) a
    symbolic size, passed as the length of a view of a buffer (AOTInductor takes tensors only); anything
    else (None, the sampling's numbers) is compiled in. symbolic_dims (Steps.compiled_for) are compiled
    symbolic too (the paged step's attended length: engine.py). Other shapes or values compile another
    graph, and once setup_caches has replaced the caches every graph is dropped (as CompiledStep does). The
    libraries are kept on disk (cache_dir()), named by a digest of the exported graph and what it was
    compiled with, so a step is compiled once per machine; and found again by trace_key(), a digest of what
    the export depends on, so that a later process neither traces nor compiles it (the trace took about
    three quarters of a warm compiled run's start, BENCHMARKS.md)."""

    def __init__(self, fn, symbolic_dims=()):
        self.fn, self.symbolic, self.runners, self.caches, self.pools = fn, dict(symbolic_dims), {}, None, []

    @staticmethod
    def suits(model: Transformer, frozen: Optional[dict]) -> bool:
        """The CPU, where qkernels.cpp is built (the graph takes its attention: few_query_attention_pass) and
        the weights are not frozen (a frozen graph's packed weights are its own); one process (tensor- and
        pipeline-parallel steps call collectives); a static cache of 2 slots or more, or a paged one."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        paged = any(isinstance(c, PagedKVCache) for c in kv_caches(model))
        return (model.dtype_device()[1].type == "cpu" and frozen is None and DynamicInt is not int
                and (model.max_seq_length >= 2 or paged) and not distributed and bool(cpu_kernels()))

    def __call__(self, model: Transformer, *args):
        caches = cache_tensors(model)
        if self.caches is None or any(map(operator.is_not, caches, self.caches)):
            self.runners, self.caches, self.pools = {}, caches, cache_inputs(model)
        key = [(a.shape, a.dtype, a.stride()) if isinstance(a, torch.Tensor) else DynamicInt if type(a) is DynamicInt
               else (type(a), a) for a in args]
        for i, dim in self.symbolic.items():  # (their varying size left out)
            key[i] = argument_meta(args[i], dim)
        key = tuple(key)
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = self.build(model, args)
        loader, out_spec, lengths, team, _ = runner  # (_: the tensors whose memory the library reads)
        inputs = step_inputs(args, lengths) + self.pools
        outputs = team.run(loader.boxed_run, inputs) if team else loader.boxed_run(inputs)
        return torch.utils._pytree.tree_unflatten(outputs, out_spec)

    def build(self, model: Transformer, args: tuple):
        lengths = torch.empty(model.max_seq_length + 1, dtype=torch.uint8)
        kinds = ["size" if type(a) is DynamicInt else "tensor" if isinstance(a, torch.Tensor) else a for a in args]
        module = _StepModule(self.fn, model, kinds)
        key = trace_key(self.fn, model, args, self.symbolic, self.pools)
        index = key and os.path.join(cache_dir(), f"trace-{key}.txt")
        found, loaded = read_index(index) if index else None, None
        if found:
            try:
                loaded = load_step(found, module, {})
            except (RuntimeError, AttributeError):  # (a file cut short, say: traced again)
                pass
        if not loaded:
            program = self.export(module, model, kinds, args, lengths, self.symbolic, self.pools)
            path = compiled_package(program)
            loaded = load_step(path, module, program.constants)
            if index and all(found_in(module, name, t) for name, t in loaded[1].items()):
                # (a constant the trace made, not one of the model's tensors, would be missing in a process
                # that loads the library without tracing: such a step is traced every time)
                def name(tmp: str):
                    with open(tmp, "w") as f:
                        f.write(os.path.basename(path))
                write_whole(index, name)
        loader, named = loaded
        out_spec = torch.utils._pytree.treespec_loads(loader.get_call_spec()[1])
        # A team for a step of one token (its first tensor argument): with several, the products are bound by
        # the CPU's arithmetic rather than the memory's reads, and Inductor's own kernels would lose their
        # threads to the team (int4's batch-8 steps 1-2% slower with one, BENCHMARKS.md)
        tokens = next(a for a in args if isinstance(a, torch.Tensor))
        return loader, out_spec, lengths, KernelTeam() if tokens.numel() == 1 else None, named

    @staticmethod
    def export(module: "_StepModule", model: Transformer, kinds: list, args: tuple, lengths: torch.Tensor,
               symbolic: dict, pools: list):
        """module's call traced by torch.export, its attention given to qkernels.cpp (few_query_attention_pass)."""
        from torch.export import Dim, export
        with torch.inference_mode(False), torch.no_grad():  # (export's example inputs: no inference tensors)
            # (the caches and tables: new tensors, as the module's own are lifted beside them; left unwritten,
            # so the memory is not touched)
            example = tuple(t.clone() for t in step_inputs(args, lengths)) + tuple(map(torch.empty_like, pools))
            # (an attended length: 2 slots at least; a symbolic dimension of a tensor: 2 at least, as sizes 0
            # and 1 would be specialised; every cache the same number of slots, both tables of positions)
            lengths_of = {"slots": Dim("slots", min=2), "positions": Dim("positions", min=2)}
            shapes = tuple({0: Dim(f"size{i}", min=3)} if k == "size"
                           else {symbolic[i]: Dim(f"dim{i}", min=2)} if i in symbolic else None
                           for i, k in enumerate(kinds) if k in ("size", "tensor"))
            shapes += tuple({dim: lengths_of[counted]} for dim, counted in map(length_dim, pools))
            program = export(module, example, dynamic_shapes=(shapes,), strict=False)
        few_query_attention_pass()(program.graph)
        program.graph_module.recompile()
        return program


def kv_caches(model: Transformer) -> list:
    """The model's layers' KV caches (KVCache or PagedKVCache modules)."""
    return [layer.attention.kv_cache for layer in model.layers
            if isinstance(getattr(layer.attention, "kv_cache", None), (KVCache, PagedKVCache))]


def cache_places(model: Transformer) -> list:
    """Where the model holds the tensors whose size follows its caches' (setup_caches, setup_paged_cache), as
    (module, attribute) pairs: each layer's keys then values, and the RoPE tables."""
    places = [(c, name) for c in kv_caches(model) for name in ("k_cache", "v_cache")]
    return places + [(model, "rope_cos"), (model, "rope_sin")]


def cache_inputs(model: Transformer) -> list:
    """The tensors at cache_places: an ExportedStep's last inputs."""
    return [getattr(m, name) for m, name in cache_places(model)]


def length_dim(t: torch.Tensor) -> tuple:
    """The dimension of a cache_inputs tensor that follows the caches' size, and what it counts: a static
    cache's [B, H_kv, slots, D], a paged one's [slots, H_kv, D], a RoPE table's [positions, D / 2]."""
    return {4: (2, "slots"), 3: (0, "slots"), 2: (0, "positions")}[t.dim()]


def step_inputs(args: tuple, lengths: torch.Tensor) -> list:
    """What an ExportedStep's library takes for a step's arguments: the tensors, and for each symbolic size n
    the view lengths[:n + 1] (sizes 0 and 1 would be specialised)."""
    return [lengths[:a + 1] if type(a) is DynamicInt else a for a in args
            if type(a) is DynamicInt or isinstance(a, torch.Tensor)]


class _StepModule(torch.nn.Module):
    """fn(model, *args) as a module for torch.export: its inputs are the tensor arguments and, for each
    symbolic size, a tensor of that length plus one; the other arguments are kinds' values; then the KV
    caches' tensors and the RoPE tables (cache_inputs), put in the model's own place for the call."""

    def __init__(self, fn, model: Transformer, kinds: list):
        super().__init__()
        self.fn, self.model, self.kinds = fn, model, kinds

    def forward(self, *inputs):
        inputs = iter(inputs)
        args = [next(inputs).shape[0] - 1 if k == "size" else next(inputs) if k == "tensor" else k
                for k in self.kinds]
        places = cache_places(self.model)
        saved = [getattr(m, name) for m, name in places]
        try:
            for (m, name), t in zip(places, inputs):
                setattr(m, name, t)
            return self.fn(self.model, *args)
        finally:
            for (m, name), t in zip(places, saved):
                setattr(m, name, t)


def load_step(path: str, module: torch.nn.Module, constants: dict) -> tuple:
    """The compiled step at path, loaded and given module's tensors (or constants', the ones an export made):
    (its loader, the tensors by name). RuntimeError where the file cannot be loaded, AttributeError where it
    names a tensor that module does not have. (PyTorch's own loader, without torch._inductor's Python,
    which takes a second to import.)"""
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    named = {name: constants[name] if name in constants else attribute(module, name)
             for name in loader.get_constant_fqns()}
    # user_managed: the library reads the model's memory, no copy. It keeps a reference to what it is given
    # and never drops it (PyTorch 2.13), so it is given views that do not own that memory (as Inductor's
    # CUDA graph trees make them), and the tensors themselves are held with the library.
    # (constants_map, use_inactive, check_full_update, user_managed, allow_h2d_copy)
    loader.load_constants({name: unowned(t) for name, t in named.items()}, False, True, True, False)
    return loader, named


def attribute(module: torch.nn.Module, name: str) -> torch.Tensor:
    """module's tensor of that dotted name (a parameter, buffer or plain attribute of a submodule)."""
    for part in name.split("."):
        module = getattr(module, part)
    if not isinstance(module, torch.Tensor):
        raise AttributeError(name)
    return module


def found_in(module: torch.nn.Module, name: str, t: torch.Tensor) -> bool:
    try:
        return attribute(module, name) is t
    except AttributeError:
        return False


def trace_key(fn, model: torch.nn.Module, args: tuple, symbolic: Optional[dict] = None,
              pools: list = ()) -> Optional[str]:
    """A digest of what torch.export's trace of fn(model, *args) depends on, so that a later
    process finds the library compiled from it without tracing: this checkout's code (every .py file beside
    this one, and qkernels.cpp), PyTorch's and Python's versions, the CPU's features, the default dtype; the
    step function; the arguments (a tensor's shape, dtype and strides, or argument_meta's for one with a
    symbolic dimension, symbolic: argument -> dimension; a symbolic size as such; other values as they are);
    and the model: every module's class and attributes (sizes, flags, its config, its hooks' names; but the
    static cache's length where an argument is the attended length), and every tensor's name, shape, dtype
    and strides (pools, cache_inputs' tensors: but for their length_dim) and which of them are one
    tensor or share memory. None for a function that closes over values (which it does not name)."""
    if not isinstance(fn, types.FunctionType) or fn.__closure__:
        return None
    first = {}  # the first name each tensor, and each tensor's memory, was seen under
    pools = set(map(id, pools))

    def plain(name: str, v):
        if isinstance(v, torch.Tensor):
            meta = argument_meta(v, length_dim(v)[0]) if id(v) in pools else tensor_meta(v)
            return (meta, first.setdefault(("tensor", id(v)), name),
                    first.setdefault(("memory", v.untyped_storage().data_ptr()), name))
        if isinstance(v, dict):
            return [(k, plain(f"{name}.{k}", x)) for k, x in v.items()]
        if isinstance(v, (tuple, list)):
            return [plain(name, x) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted(map(repr, v))
        if isinstance(v, (bool, int, float, str, type(None), torch.dtype, torch.device)) or dataclasses.is_dataclass(v):
            return v
        return getattr(v, "__qualname__", type(v).__qualname__)  # (a hook: its function's name)

    parts = [torch.__version__, sys.version_info[:2], sorted(cpu_features()), torch.get_default_dtype(),
             source_digest(), fn.__module__, fn.__qualname__]
    symbolic = symbolic or {}
    parts += [("size",) if type(a) is DynamicInt else argument_meta(a, symbolic[i]) if i in symbolic else plain("", a)
              for i, a in enumerate(args)]
    # A step given its attended length (model.forward's kv_len) reads the static cache's length nowhere but
    # in the caches' size, which its library takes as symbolic: that length is left out, so that one
    # library serves a cache of any length.
    length = "max_seq_length" if any(type(a) is DynamicInt for a in args) else None
    for name, m in model.named_modules(remove_duplicate=False):
        parts.append((name, type(m).__module__, type(m).__qualname__))
        # (_parameters and _buffers name the tensors by their module's name: theirs, with a dot)
        parts += [(k, plain(name if k in ("_parameters", "_buffers") else f"{name}.{k}", v))
                  for k, v in sorted(vars(m).items()) if k != "_modules" and not (m is model and k == length)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def tensor_meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride(), t.device.type, t.requires_grad


def argument_meta(t: torch.Tensor, symbolic_dim: int) -> tuple:
    """What an ExportedStep's graph takes as given of a tensor argument with a symbolic dimension: its shape
    but for that dimension, its dtype, and whether it is contiguous (its strides follow the size)."""
    shape = list(t.shape)
    shape[symbolic_dim] = None
    return tuple(shape), t.dtype, t.is_contiguous(), t.device.type


@functools.cache
def source_digest() -> str:
    """A digest of this checkout's code: every .py file in this folder, and qkernels.cpp. Taken as this
    module is imported (below), next to when the code that a trace runs was read: taken later, after the
    files had been edited, it would file the old code's step under the new code's key."""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") or name == "qkernels.cpp":
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


source_digest()


def read_index(index: str) -> Optional[str]:
    """The compiled step that a trace_key's index file names, where both are there."""
    try:
        with open(index) as f:
            name = f.read().strip()
    except OSError:
        return None
    path = os.path.join(cache_dir(), name)
    return path if name.startswith("step-") and os.path.isfile(path) else None


def write_whole(path: str, write):
    """The file at path written whole or not at all: write(name) writes a temporary file beside it (of the
    same extension), which is then renamed."""
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file it becomes is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def unowned(t: torch.Tensor) -> torch.Tensor:
    """A view of t's memory that does not keep it alive."""
    storage = t.untyped_storage()
    storage = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


def compiled_package(program) -> str:
    """The path of program compiled by AOTInductor with our settings (inductor_options; the weights not in
    the library), from cache_dir() where an earlier process compiled the same graph, else compiled now
    and written there whole (a temporary file renamed) or not at all."""
    from torch._inductor import aoti_compile_and_package
    options = inductor_options(torch.device("cpu"))
    # (A library's code is C++ anyway. The graph's attention was swapped as it was exported; the pass, an
    # object, would also make the settings' repr, and so the library's name, differ in every process.)
    del options["cpp_wrapper"], options["pre_grad_custom_pass"]
    options["aot_inductor.package_constants_in_so"] = False
    # qkernels.cpp's ops called through their C entry points, not PyTorch's dispatcher (qlinear.C_SHIMS).
    # (Not for torch.compile's steps: Inductor's cache cannot take ops in its settings, and would compile
    # them again in every process.)
    options["aot_inductor.custom_ops_to_c_shims"] = {
        getattr(torch.ops.nimblelm, op).default: [declaration] for op, declaration in C_SHIMS.items()}
    placeholders = [(n.name, str(n.meta.get("val")), getattr(n.meta.get("val"), "stride", lambda: None)())
                    for n in program.graph.nodes if n.op == "placeholder"]
    digest = hashlib.sha256(repr((torch.__version__, sorted(cpu_features()), repr(options), program.graph_module.code,
                                  str(program.graph_signature), str(program.range_constraints),
                                  placeholders)).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"step-{digest}.pt2")
    if not os.path.exists(path):
        def compile(tmp: str):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "TypedStorage is deprecated")
                warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)  # (PyTorch's own use, deprecated)
                aoti_compile_and_package(program, package_path=tmp, inductor_configs=options)
        write_whole(path, compile)
    return path


def cache_dir() -> str:
    """Where compiled steps are kept: under nimblelm's folder, beside the default model."""
    from checkpoint import nimblelm_cache
    return os.path.join(nimblelm_cache(), "steps")


def cache_tensors(model: Transformer) -> tuple:
    """The tensors that stand for a model's caches: its RoPE table and its first layer's keys (setup_caches
    and setup_paged_cache replace every layer's cache, and the tables, together)."""
    first = next(iter(model.layers), None)
    cache = getattr(first.attention, "kv_cache", None) if first is not None else None
    return getattr(model, "rope_cos", None), getattr(cache, "k_cache", None)


def frozen_settings(model: Transformer, rows: int) -> Optional[dict]:
    """The Inductor settings with which a compiled step of this model, whose products have `rows` rows
    (the KV cache's batch size; a speculative verify step's k + 1 tokens), freezes its weights (see
    Steps.compiled), or None where it keeps reading them. Freezing is for the CPU, for two kinds of layer
    (BENCHMARKS.md has the figures):
    - quantized ones (int8 with int8 activations, int4) that qkernels.cpp does not run at this number of
      rows (qlinear.cpu_kernels says up to how many it runs; it reads the weights as they are stored):
      with max_autotune, Inductor offers its own kernel for each product (u8 x s8 with VNNI where the CPU
      has it for int8; int4 unpacked in registers) beside PyTorch's, over a copy of the weight packed at
      compile time, and keeps the faster per shape. For int8 Inductor's won for every layer of the default
      model, at 1 and 8 rows; for int4 at one row (at 8, for some shapes; no faster step).
    - float linear layers (nn.Linear; not qlinear.FloatLinear, which reads the weight as stored), at several
      rows: a product of several rows by a weight as the model stores it is a GEMM that oneDNN first
      reorders the weight for, on every call; frozen, once, at compile time.
      A single row keeps the plain weight, which Inductor's decompose-mm loop streams faster.
    The packed copies are the graph's own: the weights' memory is held twice. oneDNN's packed weights
    (float and int8 models) cannot be saved in Inductor's cache, so every process compiles such a step
    again."""
    if model.dtype_device()[1].type != "cpu":
        return None
    quantized = (m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    quantized = [m for m in quantized if rows > m.kernel_rows]  # qkernels.cpp reads what prepare() left
    if any(getattr(m, "weight_sums", None) is not None or getattr(m, "packed", None) is not None for m in quantized):
        # (autotuning's tables and its summary of choices stay off stderr, where Inductor prints them)
        return {"freezing": True, "max_autotune": True, "autotune_num_choices_displayed": 0,
                "max_autotune_report_choices_stats": False}
    if rows > 1 and any(type(m) is torch.nn.Linear for m in model.modules()):
        return {"freezing": True}
    return None


def model_unguarded(guards) -> list:
    """torch.compile's guard filter: keep every guard but those on the model's modules and tensors
    (CompiledStep checks the caches)."""
    return [not g.orig_guard.source.is_unspecialized_nn_module() for g in guards]


def synchronize(device: torch.device):
    """Wait for the device's queued work: what a timer must do before it reads the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------------------
# The decode loop


def generate(model: Transformer, prompt_tokens, params: SamplingParams = SamplingParams(), *, eos_ids=(),
             start_pos: int = 0, steps: Optional[Steps] = None) -> Iterator:
    """Yield new tokens as they are produced.

    prompt_tokens: a list of ids (yields ints) or a list of such lists, a batch of prompts of any lengths
    (yields a list with one id per row at each step; a row that has finished yields None).
    The caches must be set up (model.setup_caches) with room for the prompts and params.max_tokens.
    start_pos continues a conversation whose first start_pos cache slots are already filled (batch 1).
    Stops after params.max_tokens, or once every row has produced one of eos_ids (that token is yielded;
    with params.ignore_eos they are ordinary tokens). Stop strings are text: TextStream finds them.
    steps: the model's Steps (eager ones when None).
    """
    single = not prompt_tokens or isinstance(prompt_tokens[0], int)
    rows = [list(prompt_tokens)] if single else [list(p) for p in prompt_tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError("empty prompt")
    max_new = params.max_tokens
    if max_new <= 0:
        return
    steps = steps or Steps(model)
    eos_ids = () if params.ignore_eos else eos_ids
    sampling = (params.temperature, params.top_k, params.top_p)
    device = model.norm.weight.device
    B, T = len(rows), max(len(r) for r in rows)
    if B > model.max_batch_size or start_pos + T + max_new - 1 > model.max_seq_length:
        raise UsageError(f"the KV cache (batch {model.max_batch_size}, {model.max_seq_length} positions) is too "
                         f"small for {B} prompt(s) of up to {T} tokens plus {max_new} new tokens")
    if start_pos and B > 1:
        raise UsageError("start_pos continues batch-1 conversations only")
    left_pad = None
    if any(len(r) != T for r in rows):
        # Left-pad to a common length; the model masks the padding and shifts each row's positions.
        left_pad = torch.tensor([T - len(r) for r in rows], device=device)
        rows = [[0] * (T - len(r)) + r for r in rows]
    tokens = torch.tensor(rows, device=device)
    finished = [False] * B
    if params.seed is not None:
        torch.manual_seed(params.seed)

    with torch.inference_mode():
        token = steps.prefill(model, tokens, torch.arange(start_pos, start_pos + T, device=device), left_pad,
                              attended_length(model, start_pos + T), *sampling)
        input_pos = torch.tensor([start_pos + T], device=device)
        cuda = device.type == "cuda"
        for step in range(max_new):
            # Queue the copy of token n to the host, then step n+1, and only then wait for the copy:
            # the device computes step n+1 while the host yields and prints token n. (When token n ends
            # the text, step n+1 was queued for nothing; it only wrote a cache slot that is never read.)
            # The clone takes the token out of the step's output buffer, which a CUDA graph reuses.
            token = token.clone()
            token_host = token.to("cpu", non_blocking=cuda)
            copied = torch.cuda.Event() if cuda else None
            if copied:
                copied.record()
            if step + 1 < max_new:
                pos = start_pos + T + step
                next_token = steps.decode(model, token, input_pos, left_pad, attended_length(model, pos + 1),
                                          *sampling)
                input_pos = input_pos + 1
            if copied:
                copied.synchronize()
            ids = token_host.tolist()  # the one host transfer per step
            yield ids[0] if single else [None if f else i for i, f in zip(ids, finished)]
            finished = [f or i in eos_ids for i, f in zip(ids, finished)]
            if all(finished) or step + 1 == max_new:
                return
            token = next_token


# ---------------------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings


class TextStream:
    """Turns a row's growing list of token ids into text deltas that are safe to print: no half of a
    multi-byte character, no start of a stop string that may yet complete, nothing past a stop string.

    Each token decodes a short window of ids, not all of them: decoding the whole list costs time in
    proportion to its length (half a millisecond at 2,000 tokens here, a large share of a small model's
    step, and the serving engine does it for every request at every step). The window starts at the
    previous token that ended a clean piece of text, so the tokenizer sees what comes before the new ids
    (a space that a piece drops at the start of a sequence, the first bytes of a character); the new text
    is what the window decodes to beyond what its older ids decode to. (Ids that write nothing but spaces,
    or nothing at all, such as a special token, do not count as what comes before: after them a piece may
    drop its space as if at the start.)"""

    def __init__(self, tokenizer, stop_strings=(), min_tokens: int = 0):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids, self.text, self.printed, self.stopped = [], "", 0, False
        self.start, self.mark = 0, 0  # the window: ids[start:]; self.text holds the text of ids[:mark]
        self.min_tokens, self.search_from = min_tokens, 0  # no stop string starts before search_from

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        window = self.tokenizer.decode(self.ids[self.start:])
        if window.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence; wait for its remaining bytes
        known = self.tokenizer.decode(self.ids[self.start:self.mark])
        if window.startswith(known):
            new = window[len(known):]
            text = self.text + new
        else:  # more ids changed how the older ones read (a tokenizer's clean-up of spaces): decode all
            new = text = self.tokenizer.decode(self.ids)
        if new.strip():  # the next window starts here only if these ids write something (see above)
            self.start = self.mark
        self.mark, self.text = len(self.ids), text
        if len(self.ids) <= self.min_tokens:  # too early for a stop string: all of it is printable
            delta, self.printed = text[self.printed:], len(text)
            self.search_from = len(text)
            return delta
        safe = len(text)
        for stop in self.stop_strings:
            at = text.find(stop, self.search_from)
            if at >= 0:
                self.stopped, safe = True, min(safe, at)
        if self.stopped:
            self.text = text[:safe]
        else:
            # a later match ends past this text: it starts less than the longest stop string before its end
            self.search_from = max(self.search_from, len(text) - max(map(len, self.stop_strings), default=0) + 1)
            for stop in self.stop_strings:  # hold back a suffix that might begin a stop string
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        safe = min(safe, len(text) - k)
                        break
        delta = text[self.printed:safe] if safe > self.printed else ""
        self.printed = max(self.printed, safe)
        return delta

    def flush(self) -> str:
        delta = self.text[self.printed:]
        self.printed = len(self.text)
        return delta
