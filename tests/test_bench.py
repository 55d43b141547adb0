"""bench.py: the matrix runs end to end and its JSON holds what the README says it does."""
import json

from conftest import converted_checkpoint, run_commands, run_script


def test_bench_matrix_with_repeats_and_baseline(tmp_path_factory, tmp_path):
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=3)
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--checkpoint", ckpt, "--dtypes", "float32", "--compile", "off", "--batch-sizes", "1,2",
                   "--repeat", "2", "--max-new-tokens", "24", "--prefill-tokens", "48", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["repeat"] == 2 and result["read_bandwidth_gb_s"] > 0
    rows = {(row["engine"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {("nimblelm", 1), ("nimblelm", 2), ("transformers eager", 1)}
    for row in rows.values():
        low, high = row["tok_s_range"]
        assert 0 < low <= row["tok_s"] <= high
        assert row["bandwidth_gb_s"] > 0 and 0 < row["fraction_of_bandwidth"]
    # the prefill column: batch-1 rows prefill a prompt of about --prefill-tokens in a process of their own
    long = rows[("nimblelm", 1)]
    assert long["prefill_tok_s"] > 0 and 40 <= long["prompt_tokens"] <= 48
    assert rows[("nimblelm", 2)]["prefill_tok_s"] is None
    assert [(q["batch"], q["against"]) for q in result["ratios"]] == [(2, "batch 1")]
    # the ratio: the median of the two rounds' own (batch 2 against batch 1 in the same round)
    each = [b2 / b1 for b2, b1 in zip(rows[("nimblelm", 2)]["round_tok_s"], long["round_tok_s"])]
    assert len(each) == 2 and result["ratios"][0]["decode"] == sum(each) / 2
    assert result["ratios"][0]["decode_range"] == [min(each), max(each)]
    assert "round 2 of 2" in r.stdout and "% bw" in r.stdout and "vs batch 1: decode" in r.stdout


def test_bench_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    r, missing = run_commands([["bench.py", "--checkpoint", tmp_path, "--no-hf"],
                               ["bench.py", "--gguf", tmp_path / "missing.gguf"]])
    assert r.returncode == 2 and "not a converted checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert missing.returncode == 2 and "missing.gguf: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_serving_benchmark_runs_every_mode(tmp_path_factory, tmp_path):
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=6, max_position_embeddings=1024, vocab_size=257)
    out = tmp_path / "serving.json"
    r = run_script("bench_serving.py", "--checkpoint", ckpt, "--dtype", "float32", "--no-compile", "--requests", "6",
                   "--max-num-seqs", "3", "--concurrency", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"one-at-a-time", "static", "engine", "engine-c2"}
    for row in rows.values():
        assert row["output_tokens"] > 6 * 16 and row["output_tok_s"] > 0 and 0 <= row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert len({row["output_tokens"] for row in rows.values()}) == 1  # the same requests in every mode
    assert 0.5 < rows["engine"]["kv_slot_share"] <= 1


def test_beam_benchmark_runs(tmp_path_factory, tmp_path):
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=6, max_position_embeddings=1024, vocab_size=257)
    out = tmp_path / "beam.json"
    r = run_script("bench_beam.py", "--checkpoint", ckpt, "--dtype", "float32", "--no-compile", "--max-new-tokens", "8",
                   "--rounds", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    speed = result["speed"]
    assert speed["greedy_tok_s"] > 0 and speed["beam_tok_s"] > 0 and len(speed["rounds_s"]["beam"]) == 2
    assert speed["weight_bytes_per_step"] > 0 and speed["reorder_bytes_per_step"] >= 0
    assert set(result["pruning"]) == {"none", "rel 0.6", "abs 2.5", "local 0.02", "max-cand 3", "all four"}
    for name, row in result["pruning"].items():
        assert row["steps"] >= 16 and (name == "none" or row["steps"] <= result["pruning"]["none"]["steps"])
    assert "beam search" in r.stdout and "best changed" in r.stdout


def test_speculative_benchmark_runs(tmp_path_factory, tmp_path):
    # the target as its own draft: greedy, every proposal is kept and the text is plain decoding's
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=6, max_position_embeddings=1024, vocab_size=257)
    out = tmp_path / "speculative.json"
    r = run_script("bench_speculative.py", "--checkpoint", ckpt, "--draft-checkpoint", ckpt, "--dtype", "float32",
                   "--no-compile", "--k", "2,3", "--max-new-tokens", "12", "--rounds", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"plain", "2", "3"}
    for k in ("2", "3"):
        row = results[k]
        assert row["acceptance"] == 1.0 and row["same_tokens_as_plain"] == 12
        assert len(row["tok_s"]) == 2
        assert row["ratios"] == [s / p for s, p in zip(row["tok_s"], results["plain"]["tok_s"])]
    assert "k=3" in r.stdout and "x plain" in r.stdout


def test_offload_benchmark_runs(tmp_path_factory, tmp_path):
    _, ckpt = converted_checkpoint(tmp_path_factory, "gqa", seed=7, num_hidden_layers=4)
    out = tmp_path / "offload.json"
    r = run_script("bench_offload.py", "--checkpoint", ckpt, "--dtype", "float32", "--batch-sizes", "1,4",
                   "--prefetch", "0,1", "--rounds", "2", "--max-new-tokens", "6", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = {(row["mode"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {(m, b) for m in ("resident", "prefetch 0", "prefetch 1") for b in (1, 4)}
    for (mode, batch), row in rows.items():
        low, high = row["tok_s_range"]
        assert 0 < low <= row["tok_s"] <= high
        if mode != "resident":
            assert row["streamed_layers"] >= 2 and row["zero_copy"] and row["streamed_mb_per_step"] > 0
            assert row["transfer_gb_s"] > 0 and row["of_bound"] > 0
    assert result["copy_bandwidth_gb_s"] > 0 and "x resident" in r.stdout
