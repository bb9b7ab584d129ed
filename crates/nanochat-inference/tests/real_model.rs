//! The server on the real engine, loaded the way `--model <dir>` does: a tiny random-init GPT
//! next to a byte-level nanochat tokenizer (shapes, batching, cache, errors), and the trained
//! `testdata/tiny-chat` model (see its README), whose memorised answers pin down real
//! behaviour: greedy replies that end their turn, identical alone, batched and per choice.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use nanochat_inference::load::{load_model_dir, load_model_on};
use nanochat_inference::{ServedModel, Server, ServerConfig};
use nanochat_model::{CheckpointMeta, Device, Gpt, GptConfig};
use nanochat_tokenizer::Tokenizer;
use serde_json::json;

const CHAT: &str = "/v1/chat/completions";

fn write_tiny_model(dir: &Path) {
    let tokenizer = Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect()).unwrap();
    let cfg = GptConfig::from_depth(1, tokenizer.vocab_size() as usize, 256).unwrap();
    let gpt = Gpt::new(cfg, 7).unwrap();
    gpt.save_checkpoint(&dir.join("model"), &CheckpointMeta::new(0))
        .unwrap();
    tokenizer.save(&dir.join("tokenizer")).unwrap();
}

fn start_real(dir: &Path, cfg: ServerConfig) -> std::net::SocketAddr {
    let model = load_model_dir(dir).expect("model loads");
    assert_eq!(model.context_len(), 256);
    let mut cfg = cfg;
    cfg.port = 0;
    Server::bind(cfg, Arc::new(model)).unwrap().spawn().0
}

#[actix_web::test]
async fn tiny_model_serves_chat_stream_and_cache() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path());
    let addr = start_real(tmp.path(), ServerConfig::default());

    let models = request(addr, "GET", "/v1/models", "").await.json();
    assert_eq!(models["data"][0]["id"], "nanochat-d1");

    // Greedy answers of each prompt alone...
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("prompt number {i}: {}", "ab".repeat(i)))
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        let r = post_json(
            addr,
            CHAT,
            &json!({"messages": user(p), "temperature": 0, "max_tokens": 12}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let usage = &v["usage"];
        assert!(usage["completion_tokens"].as_u64().unwrap() <= 12);
        // bos + user_start + text + user_end + assistant_start
        assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), p.len() as u64 + 4);
        solo.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // ...equal their answers when streamed concurrently in one batch (cache off for the check).
    let mut cfg = ServerConfig::default();
    cfg.cache.enabled = false;
    let batched_addr = start_real(tmp.path(), cfg);
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        tasks.push(actix_web::rt::spawn(async move {
            let body =
                json!({"messages": user(&p), "temperature": 0, "max_tokens": 12, "stream": true});
            let r = post_json(batched_addr, CHAT, &body).await;
            assert_eq!(r.header("x-cache"), Some("bypass"));
            chat_stream_text(&r.text()).0.remove(0)
        }));
    }
    for (t, expected) in tasks.into_iter().zip(&solo) {
        assert_eq!(&t.await.unwrap(), expected);
    }

    // Deterministic repeat: a cache hit with the same bytes.
    let body = json!({"messages": user(&prompts[0]), "temperature": 0, "max_tokens": 12});
    let again = post_json(addr, CHAT, &body).await;
    assert_eq!(again.header("x-cache"), Some("hit"));
    assert_eq!(again.json()["choices"][0]["message"]["content"], solo[0]);

    // Raw completions and chat-format errors from the tokenizer's rules.
    let v = post_json(
        addr,
        "/v1/completions",
        &json!({"prompt": "Once upon", "max_tokens": 5, "temperature": 0.7, "seed": 3}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    let bad =
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});
    let r = post_json(addr, CHAT, &bad).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "messages");
    // Longer than the 256-token context.
    let r = post_json(addr, CHAT, &json!({"messages": user(&"x".repeat(300))})).await;
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
}

#[test]
fn loading_a_directory_without_a_model_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_model_dir(tmp.path())
        .err()
        .expect("no model")
        .to_string();
    assert!(
        err.contains("no model.safetensors") && err.contains("model/"),
        "{err}"
    );
    let tokenizer = Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect()).unwrap();
    let cfg = GptConfig::from_depth(1, 300, 64).unwrap();
    Gpt::new(cfg, 1)
        .unwrap()
        .save_checkpoint(tmp.path(), &CheckpointMeta::new(0))
        .unwrap();
    let err = load_model_dir(tmp.path())
        .err()
        .expect("no tokenizer")
        .to_string();
    assert!(err.contains("no tokenizer with the model"), "{err}");
    tokenizer.save(tmp.path()).unwrap();
    assert!(load_model_dir(tmp.path()).is_ok());
}

#[actix_web::test]
async fn the_device_is_chosen_at_load_and_reported_by_health_and_stats() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path());
    let model = load_model_on(tmp.path(), None, Device::Cpu).expect("loads on the CPU");
    assert!(model.device().starts_with("cpu"), "{}", model.device());
    let mut cfg = ServerConfig::default();
    cfg.port = 0;
    let addr = Server::bind(cfg, Arc::new(model)).unwrap().spawn().0;
    let health = request(addr, "GET", "/health", "").await.json();
    assert!(
        health["device"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cpu"),
        "{health}"
    );
    let stats = request(addr, "GET", "/stats", "").await.json();
    assert_eq!(stats["device"], health["device"]);
    let r = post_json(
        addr,
        CHAT,
        &json!({"messages": user("hi"), "temperature": 0, "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    if !cfg!(feature = "cuda") {
        let err = load_model_on(tmp.path(), None, Device::Cuda(None))
            .err()
            .expect("no CUDA backend in this build")
            .to_string();
        assert!(
            err.contains("device cuda") && err.contains("--features cuda"),
            "{err}"
        );
    }
}

/// The trained fixture.
fn trained_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-chat")
}

/// Questions of `data/sample/chat/identity.jsonl` and the answers the fixture memorised.
const IDENTITY: [(&str, &str); 3] = [
    ("What is your name?", "My name is nanochat."),
    ("hi", "Hello! I am nanochat. How can I help you today?"),
    (
        "Hello, who am I talking to?",
        "You are talking to nanochat, a small chat model trained with nanochat-rs.",
    ),
];

fn content(v: &serde_json::Value, i: usize) -> String {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

#[actix_web::test]
async fn trained_model_answers_alone_batched_and_per_choice_alike() {
    let dir = trained_dir();
    let model = load_model_dir(&dir).expect("the trained fixture loads");
    let mut cfg = ServerConfig::default();
    cfg.port = 0;
    // Every request below must really decode (a cache hit would prove nothing).
    cfg.cache.enabled = false;
    let addr = Server::bind(cfg, Arc::new(model)).unwrap().spawn().0;
    let ask = |q: &str, extra: serde_json::Value| {
        let mut body = json!({"messages": user(q), "temperature": 0, "max_tokens": 64});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };

    // Alone: the memorised answer, ended by the model itself rather than by max_tokens.
    let mut solo = Vec::new();
    for (q, a) in IDENTITY {
        let r = post_json(addr, CHAT, &ask(q, json!({}))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(content(&v, 0), a, "greedy reply to {q:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let used = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(used > 0 && used < 64, "{v}");
        solo.push(content(&v, 0));
    }

    // Ten concurrent streaming clients share decode steps and still get exactly those replies.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (q, _) = IDENTITY[i % IDENTITY.len()];
        let body = ask(q, json!({"stream": true}));
        tasks.push(actix_web::rt::spawn(async move {
            let r = post_json(addr, CHAT, &body).await;
            assert_eq!(r.status, 200);
            let (texts, finishes) = chat_stream_text(&r.text());
            (texts[0].clone(), finishes[0].clone())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (text, finish) = t.await.unwrap();
        assert_eq!(text, solo[i % solo.len()], "client {i}");
        assert_eq!(finish.as_deref(), Some("stop"), "client {i}");
    }

    // n choices share one prefill; at temperature 0 they are all the solo reply.
    let v = post_json(addr, CHAT, &ask(IDENTITY[0].0, json!({"n": 3})))
        .await
        .json();
    let choices = v["choices"].as_array().expect("choices");
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    for i in 0..3 {
        assert_eq!(content(&v, i), solo[0]);
        assert_eq!(v["choices"][i]["finish_reason"], "stop");
    }
    let one = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(one % 3, 0, "three equal completions: {v}");

    // Sampled choices with a seed differ from each other but repeat exactly.
    let sampled = ask(
        "Tell me something",
        json!({"n": 2, "temperature": 1.0, "seed": 11, "max_tokens": 24}),
    );
    let a = post_json(addr, CHAT, &sampled).await.json();
    let b = post_json(addr, CHAT, &sampled).await.json();
    assert_eq!(
        (content(&a, 0), content(&a, 1)),
        (content(&b, 0), content(&b, 1))
    );
    assert_ne!(content(&a, 0), content(&a, 1), "{a}");
}
