"""The HTTP server as a client sees it: a real `weitiao serve` process on 127.0.0.1, driven by the official
openai client (and httpx for what the client cannot send)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

API_KEY = "test-key"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class Server:
    def __init__(self, process: subprocess.Popen, log: Path, url: str):
        self.process, self.log, self.url = process, log, url

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def start_server(args: list[str], log: Path, timeout: float = 120) -> Server:
    handle = log.open("w")
    process = subprocess.Popen([sys.executable, "-m", "weitiao", "serve", *args, "--port", "0"],
                               stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            return Server(process, log, found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start:\n" + log.read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, tiny_adapter):
    log = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server([str(tiny_model), "--name", "base", "--adapter", f"tuned={tiny_adapter}",
                            "--api-key", API_KEY, "--threads", "1"], log)
    yield running
    running.process.terminate()
    running.process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, model="base", seed=1, max_tokens=16, **kwargs):
    return client.chat.completions.create(model=model, messages=HELLO, temperature=1.0, seed=seed,
                                          max_tokens=max_tokens, **kwargs)


def stream_chat(client, model="base", seed=1, max_tokens=16, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, model, seed, max_tokens, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_health_and_models(server, client):
    health = httpx.get(server.url + "/health").json()  # no API key needed
    assert health["status"] == "ok" and health["models"] == ["base", "tuned"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "tuned"]


def test_chat_completion_and_its_stream_agree(client):
    reply = chat(client, seed=7)
    assert reply.object == "chat.completion" and reply.model == "base"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 16 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 16

    text, chunks = stream_chat(client, seed=7, stream_options={"include_usage": True})
    assert text == choice.message.content and len(chunks) > 4
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_n_choices_are_the_replies_of_seeds_seed_to_seed_plus_n_whole_or_streamed(client):
    reply = chat(client, seed=21, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 3 * 16
    texts = [c.message.content for c in reply.choices]
    assert texts == [chat(client, seed=21 + i).choices[0].message.content for i in range(3)]
    assert len(set(texts)) == 3
    chunks = list(chat(client, seed=21, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason == "length"]
    assert sorted(finished) == [0, 1, 2] and chunks[-1].usage.completion_tokens == 3 * 16


def test_completions_with_n_are_prompt_by_prompt(client):
    prompts = ["Once upon a time", "The capital of France"]
    reply = client.completions.create(model="base", prompt=prompts, max_tokens=6, seed=9, n=2)
    single = [client.completions.create(model="base", prompt=prompt, max_tokens=6, seed=9 + i).choices[0].text
              for prompt in prompts for i in range(2)]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3] and [c.text for c in reply.choices] == single
    chunks = list(client.completions.create(model="base", prompt=prompts, max_tokens=6, seed=9, n=2, stream=True))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)] == single


def test_model_field_picks_the_adapter(client):
    tuned, base = chat(client, "tuned", seed=3), chat(client, "base", seed=3)
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert chat(client, "tuned", seed=3).model == "tuned"


def test_stop_and_seed(client):
    full = chat(client, seed=11, max_tokens=30).choices[0].message.content
    assert chat(client, seed=11, max_tokens=30).choices[0].message.content == full
    stop = full[10:14]
    cut = chat(client, seed=11, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 30


def test_completions(client):
    reply = client.completions.create(model="tuned", prompt="Once upon a time", max_tokens=12, seed=5)
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 12
    streamed = client.completions.create(model="tuned", prompt="Once upon a time", max_tokens=12, seed=5, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param", [
    ({"model": "base"}, "messages"),
    ({"model": "base", "messages": "hello"}, "messages"),
    ({"model": "base", "messages": []}, "messages"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "base", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": "base", "messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"model": "base", "messages": HELLO, "max_tokens": 100000}, None),
    ({"messages": HELLO}, "model"),
])
def test_bad_bodies_get_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/chat/completions", body=body, cast_to=object)
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_invalid_json_gets_400(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        chat(client, model="gpt-4")
    assert raised.value.body["code"] == "model_not_found" and "base, tuned" in raised.value.body["message"]


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_api_key_is_required(server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "base", "messages": HELLO},
                          headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    if key:
        bad_client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad_client.models.list()


def test_clients_that_hang_up_cancel_their_generation(server, client):
    body = {"model": "base", "messages": HELLO, "max_tokens": 400, "seed": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    # A client that gives up on a whole (non-streamed) reply hangs up too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False},
                   timeout=httpx.Timeout(30, read=0.3), headers={"Authorization": f"Bearer {API_KEY}"})
    # The server must cancel both and keep serving everyone else.
    assert chat(client, seed=7).choices[0].message.content == chat(client, seed=7).choices[0].message.content
    deadline = time.time() + 30
    while time.time() < deadline and len([line for line in server.log_lines() if "cancelled" in line]) < 2:
        time.sleep(0.2)
    cancelled = [line for line in server.log_lines() if "cancelled" in line]
    assert len(cancelled) == 2, "\n".join(server.log_lines())
    assert all(int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 400 for line in cancelled)


def test_concurrent_burst_gets_correct_answers(server, client):
    """16 clients at once, streaming and not, base and adapter: every answer equals the one the same request
    gets alone, so nothing was interleaved or corrupted."""
    jobs = [{"model": "tuned" if i % 3 == 0 else "base", "seed": 1000 + i, "stream": i % 2 == 0} for i in range(16)]
    expected = [chat(client, job["model"], job["seed"]).choices[0].message.content for job in jobs]
    assert len(set(expected)) == len(jobs)

    def ask(job):
        started = time.perf_counter()
        burst_client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        if job["stream"]:
            text, _ = stream_chat(burst_client, job["model"], job["seed"])
        else:
            text = chat(burst_client, job["model"], job["seed"]).choices[0].message.content
        return text, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(ask, jobs))
    answers = [text for text, _ in outcomes]
    latencies = sorted(seconds for _, seconds in outcomes)
    failures = sum(answer != want for answer, want in zip(answers, expected, strict=True))
    figures = {"requests": len(jobs), "failures": failures,
               "p50_s": round(statistics.median(latencies), 3),
               "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
               "max_s": round(latencies[-1], 3)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve-burst.json").write_text(json.dumps(figures, indent=2))
    print(f"\nburst: {figures}")
    assert failures == 0, figures
    assert httpx.get(server.url + "/health").json()["queued"] == 0


def test_one_log_line_per_request(server):
    lines = [line for line in server.log_lines() if "POST /v1/chat/completions 200" in line]
    assert lines and all(re.search(r"\d+\.\d{3}s model=\w+ queued=\S+ prompt_tokens=\d+ completion_tokens=\d+ "
                                   r"\(\S+ tokens/s\)", line) for line in lines), lines[:3]
    assert any("POST /v1/chat/completions 401" in line for line in server.log_lines())


# -- hardening: what a load and fault test found ----------------------------------------------------------------


def raw_requests(url: str, requests: list[bytes], timeout: float = 30) -> list[tuple[int, bytes]]:
    """Send HTTP/1.1 requests one after another on ONE connection; (status, body) of each response. A server that
    drops the connection after an error fails the next one."""
    import socket as sockets

    host, port = url.removeprefix("http://").split(":")
    answers = []
    with sockets.create_connection((host, int(port)), timeout=timeout) as sock:
        stream = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            status = int(stream.readline().split()[1])
            headers = {}
            while (line := stream.readline().strip()):
                key, _, value = line.decode().partition(":")
                headers[key.lower()] = value.strip()
            answers.append((status, stream.read(int(headers.get("content-length", 0)))))
    return answers


def http_post(path: str, body: dict, host: str = "127.0.0.1") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def test_unknown_routes_and_wrong_methods_answer_in_openai_shape(server):
    for method, path, status, code in [("GET", "/v1/nope", 404, "unknown_url"), ("POST", "/nope", 404, "unknown_url"),
                                       ("GET", "/v1/chat/completions", 405, "method_not_allowed")]:
        response = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == status
        error = response.json()["error"]
        assert error["code"] == code and path in error["message"] and set(error) == {"message", "type", "param",
                                                                                      "code"}


@pytest.mark.parametrize("field, value", [("max_tokens", "4"), ("stream", "yes"), ("seed", 2**64), ("seed", -1),
                                          ("temperature", "0.5"), ("n", 0), ("n", 33)])
def test_wrong_types_and_ranges_are_400_and_the_connection_stays_usable(server, field, value):
    answers = raw_requests(server.url, [http_post("/v1/chat/completions", {"model": "base", "messages": HELLO,
                                                                          "max_tokens": 2, field: value}),
                                        http_post("/v1/chat/completions", {"model": "base", "messages": HELLO,
                                                                          "max_tokens": 2})])
    (status, body), (next_status, next_body) = answers
    assert status == 400 and json.loads(body)["error"]["param"] == field, body
    assert next_status == 200 and json.loads(next_body)["usage"]["completion_tokens"] == 2


def test_bodies_over_the_cap_get_413_before_they_are_read(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    huge = b'{"model": "base", "prompt": "' + b"x" * (9 * 2**20) + b'"}'
    started = time.perf_counter()
    response = httpx.post(server.url + "/v1/completions", content=huge, headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap counts what arrives
        for _ in range(10):
            yield b"x" * 2**20

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413
    assert time.perf_counter() - started < 20
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_prompt_too_long_for_the_context_is_refused_without_tokenizing(server, client):
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="base", prompt="word " * 1_200_000, max_tokens=4)  # 6 MB
    assert raised.value.body["code"] == "context_length_exceeded" and "characters" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "word " * 1_200_000}])
    assert raised.value.body["code"] == "context_length_exceeded"
    assert time.perf_counter() - started < 10  # tokenizing 12 MB would take far longer on this machine


def test_one_request_may_not_send_too_many_prompts(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="base", prompt=["hi"] * 33, max_tokens=1)
    assert raised.value.body["param"] == "prompt"
    assert "at most 32 replies per request (prompts x n), asked for 33 x 1" in raised.value.body["message"]


def test_host_header_must_name_this_machine(server):
    port = server.url.rsplit(":", 1)[1]
    for host, status in [(f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200), ("rebind.example.com", 400),
                         (f"evil.example:{port}", 400)]:
        response = httpx.get(server.url + "/health", headers={"Host": host})
        assert response.status_code == status, host
    assert response.json()["error"]["code"] == "invalid_host"


def test_internal_errors_say_nothing_internal_and_keep_the_connection(engine, monkeypatch):
    """An exception inside the app: a 500 in OpenAI's shape without its text, the traceback in the log, and the
    next request on the same connection is answered."""
    import threading

    import uvicorn

    from weitiao.serve.server import ServerLimits, create_app, guarded_protocol

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "submit", broken)
    app = create_app(engine, API_KEY, ServerLimits(allowed_hosts=None))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                           http=guarded_protocol(20, 100)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        answers = raw_requests(url, [http_post("/v1/chat/completions", {"model": "base", "messages": HELLO}),
                                     b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    (status, body), (next_status, _) = answers
    error = json.loads(body)["error"]
    assert status == 500 and error["type"] == "server_error" and "secret" not in body.decode()
    assert next_status == 200


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_model):
    """One row, four places in the queue, at most 256 open files, requests due within 2 s, key from a file."""
    import resource

    folder = tmp_path_factory.mktemp("small-server")
    (folder / "key").write_text(API_KEY + "\n")
    handle = (folder / "server.log").open("w")

    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    process = subprocess.Popen([sys.executable, "-m", "weitiao", "serve", str(tiny_model), "--name", "base",
                                "--api-key-file", str(folder / "key"), "--threads", "1", "--max-batch", "1",
                                "--max-queue", "4", "--request-timeout", "2", "--port", "0"],
                               stdout=handle, stderr=subprocess.STDOUT, preexec_fn=few_files,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = folder / "server.log"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            break
        time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError("the server did not start:\n" + log.read_text())
    yield Server(process, log, found.group(1))
    process.terminate()
    process.wait(timeout=30)


def test_queue_places_are_counted_per_prompt_and_a_refused_request_keeps_none(small_server):
    """Before: the prompts of a request were queued one by one; the fifth got the 503 and the four before it,
    cancelled, kept their places, so every later request got a 503 too."""
    headers = {"Authorization": f"Bearer {API_KEY}"}  # read from --api-key-file
    request = {"model": "base", "max_tokens": 2, "seed": 1}
    busy = httpx.post(small_server.url + "/v1/completions", headers=headers,
                      json={**request, "prompt": ["a", "b", "c", "d", "e"]})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
    assert "at most 4" in busy.json()["error"]["message"]
    assert httpx.get(small_server.url + "/health").json()["queued"] == 0
    reply = httpx.post(small_server.url + "/v1/completions", headers=headers, timeout=60,
                       json={**request, "prompt": ["a", "b", "c", "d"]})
    assert reply.status_code == 200 and [c["finish_reason"] for c in reply.json()["choices"]] == ["length"] * 4


def test_idle_sockets_cannot_lock_clients_out(small_server):
    """400 connections that never send a request, against a server allowed 256 open files: the oldest idle ones
    make room for new clients, the rest are closed after --request-timeout, and the log does not flood."""
    import socket as sockets

    host, port = small_server.url.removeprefix("http://").split(":")
    idle = [sockets.create_connection((host, int(port))) for _ in range(400)]
    try:
        started = time.perf_counter()
        assert httpx.get(small_server.url + "/health", timeout=10).status_code == 200
        assert time.perf_counter() - started < 5
        time.sleep(3)  # past --request-timeout: the server closed every idle socket
        for sock in idle[-50:]:
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert small_server.process.poll() is None
    lines = small_server.log_lines()
    assert len(lines) < 40 and not any("out of system resource" in line for line in lines), lines[-10:]
