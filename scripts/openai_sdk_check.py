"""Checks nanochat-inference against the official OpenAI Python SDK (called by test-openai-sdk.sh)."""

import argparse
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI


def wait_ready(base_url: str, timeout: float = 60.0) -> None:
    health = base_url.rsplit("/v1", 1)[0] + "/health"
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit(f"server at {health} did not become ready in {timeout:.0f} s")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    # fake: the scripted echo model; trained: testdata/tiny-chat (memorised identity answers);
    # model: any other checkpoint (shapes only).
    ap.add_argument("--expect", choices=["fake", "trained", "model"], default="fake")
    args = ap.parse_args()
    wait_ready(args.base_url)
    client = OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=120)
    checks = 0

    models = client.models.list()
    assert [m.id for m in models.data] == [args.model], models
    checks += 1

    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    r = client.chat.completions.create(model=args.model, messages=messages, temperature=0, max_tokens=64)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == args.model, r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if args.expect == "fake":
        assert text == "echo: Why is the sky blue?", text
    checks += 1

    # Streaming: role first, content deltas, finish reason, usage chunk.
    stream = client.chat.completions.create(
        model=args.model, messages=messages, temperature=0, max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert roles == ["assistant"], roles
    assert "".join(parts) == text, ("".join(parts), text)
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0
    checks += 1

    # A fresh (uncached) stream with sampling, the top_k extension and a seed.
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        temperature=0.9, max_tokens=16, seed=1234, stream=True, extra_body={"top_k": 20},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    again = client.chat.completions.create(
        model=args.model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        temperature=0.9, max_tokens=16, seed=1234, extra_body={"top_k": 20},
    )
    assert again.choices[0].message.content == streamed, "same seed, same text"
    checks += 1

    # Text completions (base-model style).
    c = client.completions.create(model=args.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens >= 1
    checks += 1

    # n choices.
    r = client.chat.completions.create(model=args.model, messages=messages, n=2, max_tokens=8, seed=5)
    assert [ch.index for ch in r.choices] == [0, 1]
    checks += 1

    if args.expect == "trained":
        checks += trained_checks(client, args.model)

    # Errors map to the SDK's exception classes with OpenAI-shaped bodies.
    def expect_error(cls, status, param, **kw):
        try:
            client.chat.completions.create(**kw)
        except cls as e:
            assert e.status_code == status, (e.status_code, status)
            body = e.body if isinstance(e.body, dict) else {}
            assert body.get("param") == param, body
            assert body.get("message"), body
            return
        raise AssertionError(f"expected {cls.__name__}")

    expect_error(openai.BadRequestError, 400, "temperature", model=args.model, messages=messages, temperature=3)
    expect_error(openai.BadRequestError, 400, "max_tokens", model=args.model, messages=messages, max_tokens=0)
    expect_error(openai.BadRequestError, 400, "messages", model=args.model, messages=[])
    expect_error(openai.BadRequestError, 400, "messages[0].content", model=args.model,
                 messages=[{"role": "user", "content": "x" * 8001}])
    expect_error(openai.NotFoundError, 404, "model", model="gpt-4o", messages=messages)
    expect_error(openai.BadRequestError, 400, "temperature", model=args.model, messages=messages, temperature=-1,
                 stream=True)
    checks += 1

    print(f"openai SDK {openai.__version__}: {checks} checks passed against {args.base_url}")


# Questions of data/sample/chat/identity.jsonl and the answers the fixture memorised.
IDENTITY = {
    "What is your name?": "My name is nanochat.",
    "hi": "Hello! I am nanochat. How can I help you today?",
    "Who are you?": "I am nanochat, a small language model trained from scratch with nanochat-rs, "
    "a Rust port of Andrej Karpathy's nanochat.",
}


def trained_checks(client: OpenAI, model: str) -> int:
    """Behaviour only a trained model shows: greedy answers that end the turn by themselves and
    do not change with batching or the number of choices."""
    def ask(q, **kw):
        kw = {"temperature": 0, "max_tokens": 96, **kw}
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], **kw)

    for q, a in IDENTITY.items():
        r = ask(q)
        assert r.choices[0].message.content == a, (q, r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason

    # Ten concurrent streaming clients (max_tokens 95: a different cache key, so all decode).
    def stream(q):
        parts, finish = [], None
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=95,
                stream=True):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
        return q, "".join(parts), finish

    questions = [list(IDENTITY)[i % len(IDENTITY)] for i in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        for q, text, finish in pool.map(stream, questions):
            assert (text, finish) == (IDENTITY[q], "stop"), (q, text, finish)

    # n choices: indices 0..n, identical at temperature 0.
    r = ask("What is your name?", n=3, max_tokens=94)
    assert [c.index for c in r.choices] == [0, 1, 2], r
    assert {c.message.content for c in r.choices} == {IDENTITY["What is your name?"]}, r
    return 3


if __name__ == "__main__":
    main()
