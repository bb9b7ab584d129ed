"""Checks nanochat-inference against the official OpenAI Python SDK (called by test-openai-sdk.sh)."""

import argparse
import sys
import time
import urllib.request

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
    ap.add_argument("--expect", choices=["fake", "model"], default="fake")
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


if __name__ == "__main__":
    main()
