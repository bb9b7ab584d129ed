//! Raw-HTTP integration tests of the server against the scripted fake model.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use nanochat_inference::ServerConfig;
use serde_json::json;

const CHAT: &str = "/v1/chat/completions";

fn assert_error(r: &Response, status: u16, param: Option<&str>, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert_eq!(e["param"].as_str(), param, "{v}");
    assert_eq!(e["code"].as_str(), Some(code), "{v}");
    assert_eq!(
        e.as_object().map(|o| o.len()),
        Some(4),
        "exactly message/type/param/code: {v}"
    );
}

#[actix_web::test]
async fn chat_completion_has_the_openai_shape() {
    let s = start(ServerConfig::default(), Duration::ZERO);
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"model": "nanochat-fake", "messages": user("héllo wörld"), "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let v = r.json();
    assert!(v["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().is_some_and(|c| c > 1_600_000_000));
    assert_eq!(v["model"], "nanochat-fake");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": "echo: héllo wörld"})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let completion_bytes = "echo: héllo wörld".len() as u64;
    assert_eq!(v["usage"]["completion_tokens"], completion_bytes);
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        prompt + completion_bytes
    );
}

#[actix_web::test]
async fn chat_stream_has_role_deltas_finish_usage_and_done() {
    let s = start(ServerConfig::default(), Duration::ZERO);
    let body = json!({"messages": user("hi"), "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 4});
    let r = post_json(s.addr, CHAT, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let data = sse_data(&r.text());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks.iter().all(|c| c["id"] == id
        && c["object"] == "chat.completion.chunk"
        && c["model"] == "nanochat-fake"));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    // "ech" ... then 'o' reaches max_tokens = 4.
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
}

#[actix_web::test]
async fn text_completions_models_health_and_stats() {
    let s = start(ServerConfig::default(), Duration::ZERO);
    let r = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "The sky", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["text"], "echo: ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 8); // BOS + 7 bytes

    let r = post_json(
        s.addr,
        "/v1/completions",
        &json!({"prompt": ["ab"], "stream": true}),
    )
    .await;
    let data = sse_data(&r.text());
    let text: String = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["object"], "text_completion");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(text.starts_with("echo: ab #"), "{text}");

    let v = request(s.addr, "GET", "/v1/models", "").await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "nanochat-fake");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(
        request(s.addr, "GET", "/v1/models/nanochat-fake", "")
            .await
            .json()["id"],
        "nanochat-fake"
    );
    assert_error(
        &request(s.addr, "GET", "/v1/models/gpt-4", "").await,
        404,
        Some("model"),
        "model_not_found",
    );

    let v = request(s.addr, "GET", "/health", "").await.json();
    assert_eq!(
        (v["status"].as_str(), v["ready"].as_bool()),
        (Some("ok"), Some(true))
    );

    let v = request(s.addr, "GET", "/stats", "").await.json();
    assert_eq!(v["requests"]["completions"], 2);
    assert_eq!(v["requests"]["streamed"], 1);
    assert!(v["tokens"]["completion"].as_u64().unwrap() >= 6);
    assert_eq!(v["scheduler"]["workers"][0]["active"], 0);
    assert_eq!(v["scheduler"]["queue_depth"], 0);
}

#[actix_web::test]
async fn every_validation_error_is_a_400_naming_the_field() {
    let s = start(ServerConfig::default(), Duration::ZERO);
    let u = user("hi");
    let many: Vec<_> = (0..501)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let long = "é".repeat(8001);
    let total: Vec<_> = (0..5)
        .map(|_| json!({"role": "user", "content": "y".repeat(7000)}))
        .collect();
    let cases = [
        (json!({}), Some("messages")),
        (json!({"messages": "hi"}), Some("messages")),
        (json!({"messages": []}), Some("messages")),
        (json!({"messages": many}), Some("messages")),
        (
            json!({"messages": [{"role": "user", "content": long}]}),
            Some("messages[0].content"),
        ),
        (json!({"messages": total}), Some("messages")),
        (
            json!({"messages": [{"role": "user", "content": ""}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            Some("messages[0].role"),
        ),
        (
            json!({"messages": [{"content": "x"}]}),
            Some("messages[0].role"),
        ),
        (json!({"messages": ["x"]}), Some("messages[0]")),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            Some("messages"),
        ),
        (
            json!({"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]}),
            Some("messages[0]"),
        ),
        (
            json!({"messages": u, "temperature": -0.1}),
            Some("temperature"),
        ),
        (
            json!({"messages": u, "temperature": 2.01}),
            Some("temperature"),
        ),
        (json!({"messages": u, "top_k": -1}), Some("top_k")),
        (json!({"messages": u, "top_k": 201}), Some("top_k")),
        (json!({"messages": u, "top_p": 1.5}), Some("top_p")),
        (json!({"messages": u, "min_p": 1.0}), Some("min_p")),
        (json!({"messages": u, "max_tokens": 0}), Some("max_tokens")),
        (
            json!({"messages": u, "max_tokens": 4097}),
            Some("max_tokens"),
        ),
        (
            json!({"messages": u, "max_completion_tokens": 0}),
            Some("max_completion_tokens"),
        ),
        (json!({"messages": u, "n": 0}), Some("n")),
        (json!({"messages": u, "n": 9}), Some("n")),
        (json!({"messages": u, "stop": 5}), Some("stop")),
        (
            json!({"messages": u, "stop": ["a", "b", "c", "d", "e"]}),
            Some("stop"),
        ),
        (json!({"messages": u, "stop": [""]}), Some("stop")),
        (
            json!({"messages": u, "presence_penalty": 1.0}),
            Some("presence_penalty"),
        ),
        (
            json!({"messages": u, "frequency_penalty": 3.0}),
            Some("frequency_penalty"),
        ),
        (json!({"messages": u, "logprobs": true}), Some("logprobs")),
        (
            json!({"messages": u, "tools": [{"type": "function", "function": {"name": "f"}}]}),
            Some("tools"),
        ),
        (
            json!({"messages": u, "response_format": {"type": "json_object"}}),
            Some("response_format"),
        ),
        (
            json!({"messages": u, "stream_options": {"include_usage": true}}),
            Some("stream_options"),
        ),
    ];
    for (body, param) in cases {
        let r = post_json(s.addr, CHAT, &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"].as_str(), param, "{body}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| m.len() > 10), "{e}");
    }
    // Types that do not parse, and non-JSON bodies.
    assert_error(
        &post_json(s.addr, CHAT, &json!({"messages": u, "temperature": "hot"})).await,
        400,
        None,
        "invalid_json",
    );
    assert_error(
        &request(s.addr, "POST", CHAT, "{not json").await,
        400,
        None,
        "invalid_json",
    );
    assert_error(
        &request(s.addr, "POST", CHAT, "").await,
        400,
        None,
        "invalid_json",
    );
    for (body, param) in [
        (json!({}), "prompt"),
        (json!({"prompt": 3}), "prompt"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": "x".repeat(32001)}), "prompt"),
        (json!({"prompt": "x", "echo": true}), "echo"),
        (json!({"prompt": "x", "best_of": 2}), "best_of"),
        (json!({"prompt": "x", "suffix": "y"}), "suffix"),
    ] {
        let r = post_json(s.addr, "/v1/completions", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"].as_str(), Some(param), "{body}");
    }
    let stats = request(s.addr, "GET", "/stats", "").await.json();
    assert_eq!(stats["requests"]["bad_request"], 44);
    assert_eq!(stats["requests"]["ok"], 0);
}

#[actix_web::test]
async fn limits_are_configurable() {
    let mut cfg = ServerConfig::default();
    cfg.limits.max_messages = 2;
    cfg.limits.max_tokens = 10;
    cfg.defaults.max_tokens = 10;
    let s = start(cfg, Duration::ZERO);
    let three = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]);
    assert_error(
        &post_json(s.addr, CHAT, &json!({"messages": three})).await,
        400,
        Some("messages"),
        "invalid_value",
    );
    assert_error(
        &post_json(
            s.addr,
            CHAT,
            &json!({"messages": user("a"), "max_tokens": 11}),
        )
        .await,
        400,
        Some("max_tokens"),
        "invalid_value",
    );
    assert_eq!(
        post_json(
            s.addr,
            CHAT,
            &json!({"messages": user("a"), "max_tokens": 10})
        )
        .await
        .status,
        200
    );
}

#[actix_web::test]
async fn not_found_too_large_and_method_errors() {
    let mut cfg = ServerConfig::default();
    cfg.max_body_bytes = 2048;
    let s = start(cfg, Duration::ZERO);
    assert_error(
        &post_json(
            s.addr,
            CHAT,
            &json!({"model": "gpt-4o", "messages": user("hi")}),
        )
        .await,
        404,
        Some("model"),
        "model_not_found",
    );
    assert_error(
        &request(s.addr, "GET", "/v1/nothing", "").await,
        404,
        None,
        "unknown_url",
    );
    assert_error(
        &request(s.addr, "POST", "/admin/cache/clear", "").await,
        404,
        None,
        "unknown_url",
    );
    assert_error(
        &request(s.addr, "GET", CHAT, "").await,
        405,
        None,
        "method_not_allowed",
    );
    let big = json!({"messages": user(&"z".repeat(4000))});
    assert_error(
        &post_json(s.addr, CHAT, &big).await,
        413,
        None,
        "request_too_large",
    );
}

#[actix_web::test]
async fn context_window_overflow_is_a_400() {
    let mut cfg = ServerConfig::default();
    cfg.model_name = Some("small".into());
    let s = {
        use std::sync::Arc;
        let model = nanochat_inference::fake::FakeModel::new(Duration::ZERO).with_context_len(16);
        let mut cfg = cfg;
        cfg.port = 0;
        let server = nanochat_inference::Server::bind(cfg, Arc::new(model)).unwrap();
        server.spawn().0
    };
    let r = post_json(
        s,
        CHAT,
        &json!({"model": "small", "messages": user("this prompt is longer than sixteen bytes")}),
    )
    .await;
    assert_error(&r, 400, Some("messages"), "context_length_exceeded");
    // A fitting prompt gets max_tokens clamped to the room left, ending with `length`.
    let v = post_json(
        s,
        CHAT,
        &json!({"messages": user("hey"), "max_tokens": 100, "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["total_tokens"], 16);
}

#[actix_web::test]
async fn full_queue_answers_429() {
    let mut cfg = ServerConfig::default();
    cfg.max_batch = 1;
    cfg.queue_capacity = 1;
    let s = start(cfg, Duration::from_millis(2));
    // Occupies the only slot until cancelled.
    let mut busy = send(
        s.addr,
        "POST",
        CHAT,
        &[],
        json!({"messages": user("repeat: x"), "stream": true, "max_tokens": 4096})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(busy.status, 200);
    assert!(busy.next_bytes().await.is_some());
    // The role chunk is written before a worker admits the job; wait until it left the queue.
    wait_for_scheduler(&s, "busy request decoding", |st| st.workers[0].active == 1).await;
    // Waits in the queue.
    let queued = send(
        s.addr,
        "POST",
        CHAT,
        &[],
        json!({"messages": user("second"), "stream": true})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(queued.status, 200);
    let r = post_json(s.addr, CHAT, &json!({"messages": user("third")})).await;
    assert_error(&r, 429, None, "queue_full");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    drop(busy);
    // Once the slot frees, the queued request completes.
    let (texts, _) = chat_stream_text(&queued.read_all().await.text());
    assert!(texts[0].starts_with("echo: second"), "{texts:?}");
    let stats = request(s.addr, "GET", "/stats", "").await.json();
    assert_eq!(stats["requests"]["overloaded"], 1);
}

#[actix_web::test]
async fn request_timeout_is_a_504_or_a_stream_error() {
    let mut cfg = ServerConfig::default();
    cfg.request_timeout_secs = 0.3;
    let s = start(cfg, Duration::from_millis(2));
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("repeat: on"), "max_tokens": 4096}),
    )
    .await;
    assert_error(&r, 504, None, "timeout");
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("repeat: on"), "max_tokens": 4096, "stream": true}),
    )
    .await;
    let data = sse_data(&r.text());
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "timeout");
    assert!(data.len() > 3, "some content streamed before the deadline");
    // Both sequences left the batch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.state.stats().scheduler.workers[0].active, 0);
}

#[actix_web::test]
async fn ten_concurrent_streams_complete_independently_in_one_batch() {
    let s = start(ServerConfig::default(), Duration::from_millis(3));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let addr = s.addr;
        tasks.push(actix_web::rt::spawn(async move {
            let prompt = format!("client {i} says {}", "hi ".repeat(i));
            let body = json!({"messages": user(&prompt), "stream": true, "temperature": 0.0});
            let r = post_json(addr, CHAT, &body).await;
            assert_eq!(r.status, 200);
            let (texts, finishes) = chat_stream_text(&r.text());
            assert_eq!(texts, vec![format!("echo: {prompt}")]);
            assert_eq!(finishes, vec![Some("stop".to_string())]);
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert!(
        s.model.peak_batch() >= 5,
        "requests shared decode steps (peak batch {})",
        s.model.peak_batch()
    );
    let st = s.state.stats();
    assert_eq!(st.scheduler.workers[0].admitted, 10);
    assert_eq!(st.requests.ok, 10);
}

#[actix_web::test]
async fn disconnect_mid_stream_frees_the_slot() {
    let mut cfg = ServerConfig::default();
    cfg.max_batch = 1;
    let s = start(cfg, Duration::from_millis(2));
    let mut stream = send(
        s.addr,
        "POST",
        CHAT,
        &[],
        json!({"messages": user("repeat: la"), "stream": true, "max_tokens": 4096})
            .to_string()
            .as_bytes(),
    )
    .await;
    for _ in 0..5 {
        assert!(stream.next_bytes().await.is_some());
    }
    assert_eq!(s.state.stats().scheduler.workers[0].active, 1);
    drop(stream);
    let t0 = Instant::now();
    loop {
        let st = s.state.stats().scheduler;
        if st.workers[0].active == 0 && st.cancelled == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "slot still held: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The single slot serves the next client straight away.
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("next"), "temperature": 0}),
    )
    .await;
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: next");
}

/// Poll the server's own view until `done` holds (the bound only keeps a broken build from
/// hanging; the assertion is on state).
async fn wait_for_scheduler(
    s: &TestServer,
    what: &str,
    done: impl Fn(&nanochat_inference::scheduler::SchedulerStats) -> bool,
) {
    let t0 = Instant::now();
    loop {
        let st = s.state.stats().scheduler;
        if done(&st) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: {st:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[actix_web::test]
async fn disconnect_of_a_non_streaming_client_frees_its_slot_and_queue_entry() {
    let mut cfg = ServerConfig::default();
    cfg.max_batch = 1;
    cfg.cache.enabled = false;
    // 4096 tokens at 20 ms a step would hold the slot for over a minute.
    let s = start(cfg, Duration::from_millis(20));
    let long =
        json!({"messages": user("repeat: la"), "max_tokens": 4096, "temperature": 0}).to_string();
    let decoding = send_only(s.addr, "POST", CHAT, long.as_bytes()).await;
    wait_for_scheduler(&s, "first request decoding", |st| st.workers[0].active == 1).await;
    let queued = send_only(s.addr, "POST", CHAT, long.as_bytes()).await;
    wait_for_scheduler(&s, "second request queued", |st| st.queue_depth == 1).await;

    // The queued client leaves first: its entry goes while the slot is still busy (dropping
    // both at once would race the worker admitting it into the freed slot).
    drop(queued);
    wait_for_scheduler(&s, "queue entry dropped", |st| {
        st.queue_depth == 0 && st.cancelled == 1 && st.workers[0].active == 1
    })
    .await;
    drop(decoding);
    wait_for_scheduler(&s, "slot freed", |st| {
        st.workers[0].active == 0 && st.cancelled == 2
    })
    .await;
    // The single slot serves the next client straight away.
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("next"), "temperature": 0, "max_tokens": 8}),
    )
    .await;
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: ne");
    let st = s.state.stats();
    assert_eq!(
        st.scheduler.workers[0].admitted, 2,
        "the queued one never ran"
    );
}

#[actix_web::test]
async fn deterministic_requests_hit_the_cache_with_the_same_body() {
    let s = start(ServerConfig::default(), Duration::from_millis(1));
    let body = json!({"messages": user("cache me"), "temperature": 0});
    let first = post_json(s.addr, CHAT, &body).await;
    assert_eq!(first.header("x-cache"), Some("miss"));
    let steps = s.model.steps();
    let second = post_json(s.addr, CHAT, &body).await;
    assert_eq!(second.header("x-cache"), Some("hit"));
    assert_eq!(first.body, second.body, "identical bytes");
    assert_eq!(s.model.steps(), steps, "a hit runs no decode step");

    // The same request streamed replays the cached generation as a stream.
    let streamed = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("cache me"), "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(streamed.header("x-cache"), Some("hit"));
    let (texts, finishes) = chat_stream_text(&streamed.text());
    assert_eq!(texts[0], "echo: cache me");
    assert_eq!(finishes[0].as_deref(), Some("stop"));
    assert!(streamed
        .text()
        .contains(first.json()["id"].as_str().unwrap()));

    // A live stream fills the cache for a later stream: identical event bytes.
    let sbody =
        json!({"messages": user("stream me"), "seed": 7, "temperature": 1.0, "stream": true});
    let a = post_json(s.addr, CHAT, &sbody).await;
    let b = post_json(s.addr, CHAT, &sbody).await;
    assert_eq!(
        (a.header("x-cache"), b.header("x-cache")),
        (Some("miss"), Some("hit"))
    );
    assert_eq!(a.body, b.body);

    // Sampling without a seed is never cached.
    let rnd = json!({"messages": user("random"), "temperature": 1.0});
    let x = post_json(s.addr, CHAT, &rnd).await;
    let y = post_json(s.addr, CHAT, &rnd).await;
    assert_eq!(y.header("x-cache"), Some("bypass"));
    assert_ne!(
        x.json()["choices"][0]["message"]["content"],
        y.json()["choices"][0]["message"]["content"]
    );

    let cache = s.state.stats().cache;
    assert_eq!((cache.hits, cache.misses, cache.entries), (3, 2, 2));
}

#[actix_web::test]
async fn admin_clear_needs_the_token() {
    let mut cfg = ServerConfig::default();
    cfg.admin_token = Some("s3cret".into());
    let s = start(cfg, Duration::ZERO);
    let body = json!({"messages": user("x"), "temperature": 0});
    post_json(s.addr, CHAT, &body).await;
    let r = send(
        s.addr,
        "POST",
        "/admin/cache/clear",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .await
    .read_all()
    .await;
    assert_error(&r, 401, None, "invalid_api_key");
    let r = send(
        s.addr,
        "POST",
        "/admin/cache/clear",
        &[("Authorization", "Bearer s3cret")],
        b"",
    )
    .await
    .read_all()
    .await;
    assert_eq!(r.json(), json!({"cleared": 1}));
    assert_eq!(
        post_json(s.addr, CHAT, &body).await.header("x-cache"),
        Some("miss")
    );
}

#[actix_web::test]
async fn n_choices_seeds_and_stop_strings() {
    let s = start(ServerConfig::default(), Duration::ZERO);
    let prefills = s.model.prefills();
    let v = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("pick"), "n": 3, "seed": 11, "temperature": 1.0}),
    )
    .await
    .json();
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(texts.iter().all(|t| t.starts_with("echo: pick #")));
    assert_ne!(texts[0], texts[1], "each choice gets its own seed");
    assert_eq!(
        s.model.prefills() - prefills,
        1,
        "the choices share one prefill"
    );
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("pick"), "n": 2, "temperature": 0, "stream": true}),
    )
    .await;
    let (texts, finishes) = chat_stream_text(&r.text());
    assert_eq!(
        texts,
        vec!["echo: pick".to_string(), "echo: pick".to_string()]
    );
    assert_eq!(finishes.len(), 2);

    let v = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("hello world"), "stop": ["wor", "zzz"], "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let r = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("hello world"), "stop": "o w", "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(chat_stream_text(&r.text()).0[0], "echo: hell");
}

#[actix_web::test]
async fn more_choices_than_a_batch_holds_run_in_batch_sized_groups() {
    let mut cfg = ServerConfig::default();
    cfg.max_batch = 2;
    cfg.limits.max_n = 5;
    let s = start(cfg, Duration::ZERO);
    let v = post_json(
        s.addr,
        CHAT,
        &json!({"messages": user("pick"), "n": 5, "seed": 3, "temperature": 1.0}),
    )
    .await
    .json();
    let choices = v["choices"].as_array().expect("choices");
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3, 4]);
    let mut texts: Vec<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 5, "no two choices sampled alike: {v}");
    assert_eq!(s.model.prefills(), 3, "groups of 2 + 2 + 1");
    assert_eq!(s.model.peak_batch(), 2);
}

#[actix_web::test]
async fn ui_page_is_self_contained_and_json_is_compressible() {
    let s = start(ServerConfig::default(), Duration::ZERO);
    let r = request(s.addr, "GET", "/", "").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let html = r.text();
    assert!(
        html.contains("/v1/chat/completions"),
        "the page talks to the OpenAI endpoint"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("src=\"//"),
        "no external resources"
    );
    let r = send(s.addr, "GET", "/stats", &[("Accept-Encoding", "gzip")], b"")
        .await
        .read_all()
        .await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
}
