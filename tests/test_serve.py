"""serve.py: the real openai client and a real browser against a running server on the default model."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT

KEY = "test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def start(checkpoint, *extra):
    """A serve.py process on a free port -> (process, its URL)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--checkpoint", checkpoint,
                             "--port", "0", "--dtype", "float32", "--served-model-name", "smol", *extra],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = None
    deadline = time.time() + 300
    while time.time() < deadline and url is None:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"serving smol on (http://\S+)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("the server did not start: " + proc.stderr.read()[-2000:])
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
    return proc, url


@pytest.fixture(scope="module")
def server(default_checkpoint):
    """The default model in float32 (greedy answers as generate() gives them), at most 2 running and 2
    waiting, so that a burst of requests meets the queue's bound."""
    proc, url = start(default_checkpoint, "--max-num-seqs", "2", "--max-waiting", "2", "--kv-cache-tokens", "4096",
                      "--api-key", KEY)
    yield url, default_checkpoint
    proc.terminate()
    proc.wait(30)


def request(url, path, body=None, key=KEY, raw=None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}


def metric(url, name):
    _, text, _ = request(url, "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def expected_greedy(checkpoint, prompt_ids, n):
    from checkpoint import load_model, load_tokenizer
    from decode import TextStream, generate
    from sampling import SamplingParams
    tok = load_tokenizer(checkpoint)
    model = load_model(checkpoint)
    model.setup_caches(1, len(prompt_ids) + n)
    stream = TextStream(tok)
    for t in generate(model, prompt_ids, SamplingParams(max_tokens=n), eos_ids=tok.eos_ids):
        if t in tok.eos_ids:
            break
        stream.add(t)
    return stream.text


def test_openai_client_chat_completions_and_models(server):
    openai = pytest.importorskip("openai")
    from checkpoint import load_tokenizer
    url, ckpt = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["smol"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    prompt_ids = load_tokenizer(ckpt).encode_chat(messages)
    assert r.choices[0].message.content == expected_greedy(ckpt, prompt_ids, 24)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens > 0
    # streamed, with usage at the end: the same text; the prompt now comes from the prefix cache
    chunks = list(client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16
    # completions, with vLLM's extensions that benchmark clients send
    c = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0,
                                  extra_body={"top_k": 5, "min_tokens": 6, "ignore_eos": True})
    assert "Paris" in c.choices[0].text and c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length"
    s = client.completions.create(model="smol", prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0, stop=[" 6"])
    assert s.choices[0].finish_reason == "stop" and " 6" not in s.choices[0].text and "5" in s.choices[0].text
    # errors surface as the client's own exception types
    strict = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    for error, kwargs in ((openai.NotFoundError, dict(model="gpt-9")), (openai.BadRequestError, dict(n=2)),
                          (openai.BadRequestError, dict(max_tokens=10 ** 6)),
                          (openai.BadRequestError, dict(temperature=-1))):
        with pytest.raises(error):
            strict.chat.completions.create(**{"model": "smol", "messages": messages, "max_tokens": 4, **kwargs})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_greedy_answers_under_concurrency_equal_one_at_a_time(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    questions = ["Name a planet.", "What is 2 + 2?", "Name a colour.", "What is the capital of Italy?"]

    def ask(q):
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=16,
                                           temperature=0)
        return r.choices[0].message.content
    alone = [ask(q) for q in questions]
    together = [None] * len(questions)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i])))
               for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    url, _ = server
    ok = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [
        (dict(raw=b"{not json"), 400, None, "invalid_json"),
        (dict(body={"model": "smol"}), 400, "messages", None),
        (dict(body={**ok, "temperature": "hot"}), 400, "temperature", "invalid_value"),
        (dict(body={**ok, "max_tokens": -1}), 400, "max_tokens", "invalid_value"),
        (dict(body={**ok, "n": 2}), 400, "n", "unsupported_parameter"),
        (dict(body={**ok, "logprobs": True}), 400, "logprobs", "unsupported_parameter"),
        (dict(body={**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, "tools", None),
        (dict(body={**ok, "frobnicate": 1}), 400, "frobnicate", "unrecognized_argument"),
        (dict(body={**ok, "max_tokens": 100000}), 400, "messages", "context_length_exceeded"),
        (dict(body={**ok, "model": "gpt-9"}), 404, "model", "model_not_found"),
        (dict(body=ok, key=None), 401, None, "invalid_api_key"),
        (dict(body=ok, key="wrong"), 401, None, "invalid_api_key"),
        (dict(raw=b"{" + b" " * (2 << 20) + b"}"), 413, None, "request_too_large"),
    ]
    for kwargs, status, param, code in cases:
        got, text, _ = request(url, "/v1/chat/completions", **kwargs)
        error = json.loads(text)["error"]
        assert got == status and set(error) == {"message", "type", "param", "code"}, (kwargs.keys(), got, text)
        assert error["param"] == param and (code is None or error["code"] == code), (got, error)
    # 10 at once against 2 running and 2 waiting: 4 served, 6 refused with 429 and Retry-After, none lost
    results = []

    def one():
        results.append(request(url, "/v1/chat/completions", {**ok, "max_tokens": 64, "ignore_eos": True}))
    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == [200] * 4 + [429] * 6
    assert all(r[2].get("retry-after") for r in results if r[0] == 429)
    assert all(json.loads(r[1])["usage"]["completion_tokens"] == 64 for r in results if r[0] == 200)
    assert request(url, "/health", key=None)[0] == 200 and request(url, "/v1/chat/completions", ok)[0] == 200


def test_a_client_that_goes_away_is_aborted_and_counted(server):
    url, _ = server
    import http.client
    before = metric(url, 'nimblelm_requests_finished_total{finish_reason="abort"}')
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "smol", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 500,
         "ignore_eos": True, "stream": True}), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    response.close()  # gone mid-stream
    conn.close()
    deadline = time.time() + 60
    while time.time() < deadline and metric(url, 'nimblelm_requests_finished_total{finish_reason="abort"}') == before:
        time.sleep(0.2)
    assert metric(url, 'nimblelm_requests_finished_total{finish_reason="abort"}') == before + 1
    assert metric(url, "nimblelm_num_requests_running") == 0 and metric(url, "nimblelm_kv_blocks_used") == 0
    _, text, _ = request(url, "/metrics")
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "request_latency_seconds"):
        assert f'nimblelm_{name}_bucket{{le="+Inf"}}' in text and f"nimblelm_{name}_count" in text
    for name in ("num_requests_waiting", "kv_blocks_total", "preemptions_total", "prompt_tokens_total",
                 "generation_tokens_total", "prefix_cache_hit_tokens_total"):
        assert re.search(rf"^nimblelm_{name} \d+$", text, re.M), name


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_chat_page_in_a_real_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(url + "/")  # it asks for the model's name, and is refused until it has the key
        page.wait_for_selector(".msg.note")
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.fill("#key", KEY)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#input", "What is the capital of France?")
        page.press("#input", "Enter")
        page.wait_for_selector(".assistant[data-state=done]", timeout=120_000)
        assert "Paris" in page.inner_text(".assistant")
        # the conversation is kept: a second turn sees the first
        page.fill("#input", "And what is the capital of Germany?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant[data-state=done]').length == 2",
                               timeout=120_000)
        assert len(page.query_selector_all(".msg.user")) == 2
        # Stop: the reply stops growing, and the server aborts the request
        before = metric(url, 'nimblelm_requests_finished_total{finish_reason="abort"}')
        page.fill("#max_tokens", "400")
        page.fill("#input", "Write a very long story about a lighthouse.")
        page.click("#send")
        page.wait_for_function("(document.querySelectorAll('.assistant')[2] || {textContent: ''}).textContent.length > 20",
                               timeout=120_000)
        page.click("#stop")
        page.wait_for_selector(".assistant[data-state=stopped]", timeout=30_000)
        deadline = time.time() + 60
        while time.time() < deadline and metric(url, 'nimblelm_requests_finished_total{finish_reason="abort"}') == before:
            time.sleep(0.2)
        assert metric(url, 'nimblelm_requests_finished_total{finish_reason="abort"}') == before + 1
        page.screenshot(path=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nimblelm-chat.png"))
        browser.close()
    assert not errors, errors


def test_sigterm_lets_a_running_stream_finish_and_exits_0(default_checkpoint):
    import http.client
    import signal
    proc, url = start(default_checkpoint)
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "smol", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 40,
         "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    proc.send_signal(signal.SIGTERM)
    rest = response.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest.replace('":"', '": "')
    assert proc.wait(60) == 0
    with pytest.raises(OSError):  # no longer accepting
        urllib.request.urlopen(url + "/health", timeout=5)
