//! Engine behaviour against the scripted fake model (no weights needed).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use nanochat_engine::sampling::argmax;
use nanochat_engine::testing::{ByteCodec, FakeModel};
use nanochat_engine::{
    Completion, Engine, EngineError, FinishReason, SamplingParams, StepModel, TokenEvent,
};

const VOCAB: usize = ByteCodec::VOCAB;

fn sp(name: &str) -> u32 {
    ByteCodec::special(name)
}

fn engine(model: FakeModel) -> Engine<FakeModel> {
    Engine::new(Arc::new(model), Arc::new(ByteCodec))
}

fn collect(
    e: &Engine<FakeModel>,
    prompt: &[u32],
    p: &SamplingParams,
) -> (Vec<TokenEvent>, FinishReason) {
    let mut g = e.generate(prompt, p).unwrap();
    let evs: Vec<TokenEvent> = g.by_ref().map(|r| r.unwrap()).collect();
    (evs, g.finish_reason().unwrap())
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens: 20,
        ..Default::default()
    }
}

/// Scripted text after a prompt that ends with `marker`, then `<|assistant_end|>`.
fn say_after(prompt_len: usize, reply: Vec<u32>) -> impl Fn(&[u32]) -> Option<u32> + Send + Sync {
    move |h: &[u32]| {
        let k = h.len().checked_sub(prompt_len)?;
        Some(*reply.get(k).unwrap_or(&sp("<|assistant_end|>")))
    }
}

#[test]
fn cached_greedy_equals_uncached_argmax() {
    let m = FakeModel::new(VOCAB, 64);
    let prompt = vec![sp("<|bos|>"), 72, 105];
    let mut hist = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..10 {
        let t = argmax(&m.logits_for(&hist));
        want.push(t);
        hist.push(t);
        if t == sp("<|assistant_end|>") || t == sp("<|bos|>") {
            break;
        }
    }
    let e = engine(m);
    let (evs, _) = collect(&e, &prompt, &SamplingParams::greedy(10));
    let got: Vec<u32> = evs.iter().map(|e| e.token).collect();
    assert_eq!(got, want);
}

#[test]
fn top_k_one_equals_greedy_and_seeds_reproduce() {
    let e = engine(FakeModel::new(VOCAB, 64));
    let prompt = vec![sp("<|bos|>"), 1, 2, 3];
    let toks = |p: &SamplingParams| -> Vec<u32> {
        collect(&e, &prompt, p).0.iter().map(|e| e.token).collect()
    };
    let greedy = toks(&SamplingParams::greedy(16));
    let k1 = SamplingParams {
        temperature: 1.5,
        top_k: 1,
        seed: Some(9),
        max_tokens: 16,
        ..Default::default()
    };
    assert_eq!(toks(&k1), greedy);
    assert_eq!(toks(&sampled(1)), toks(&sampled(1)));
    assert_ne!(toks(&sampled(1)), toks(&sampled(2)));
    assert_ne!(toks(&sampled(1)), greedy);
}

#[test]
fn batch_of_prompts_equals_each_alone() {
    let e = engine(FakeModel::new(VOCAB, 64));
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            std::iter::once(sp("<|bos|>"))
                .chain(0..(3 + i * 2))
                .collect()
        })
        .collect();
    let p = sampled(42);
    let batch = e.generate_batch(&prompts, &p, 1, 3).unwrap();
    assert!(e.model().max_rows_per_forward.load(Ordering::Relaxed) >= 2);
    for (prompt, got) in prompts.iter().zip(&batch) {
        let alone = e
            .generate_batch(std::slice::from_ref(prompt), &p, 1, 1)
            .unwrap();
        assert_eq!(&alone[0], got);
    }
}

#[test]
fn samples_share_one_prefill_and_differ() {
    let e = engine(FakeModel::new(VOCAB, 64));
    let prompt = vec![sp("<|bos|>"), 10, 11, 12];
    let before = e.model().prefills.load(Ordering::Relaxed);
    let out = e
        .generate_batch(std::slice::from_ref(&prompt), &sampled(5), 4, 4)
        .unwrap();
    assert_eq!(e.model().prefills.load(Ordering::Relaxed) - before, 1);
    assert_eq!(out.len(), 4);
    assert_ne!(out[0].tokens, out[1].tokens);
    // Sample 0 is what a single run with the same seed produces.
    let alone = e.generate_batch(&[prompt], &sampled(5), 1, 1).unwrap();
    assert_eq!(alone[0], out[0]);
}

#[test]
fn stops_on_assistant_end_and_hides_it() {
    let prompt = vec![sp("<|bos|>"), sp("<|assistant_start|>")];
    let m = FakeModel::new(VOCAB, 64)
        .with_script(say_after(2, b"hi!".iter().map(|&b| b.into()).collect()));
    let e = engine(m);
    let (evs, fin) = collect(&e, &prompt, &sampled(3));
    assert_eq!(fin, FinishReason::Stop);
    let text: String = evs.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(text, "hi!");
    assert_eq!(evs.last().unwrap().token, sp("<|assistant_end|>"));
    let c = e.generate_batch(&[prompt], &sampled(3), 1, 1).unwrap();
    assert_eq!(c[0].tokens, vec![104, 105, 33]);
    assert_eq!(c[0].usage.completion_tokens, 4);
    assert_eq!(c[0].usage.prompt_tokens, 2);
}

#[test]
fn stop_string_spanning_tokens() {
    let reply: Vec<u32> = b"one\nUser: two".iter().map(|&b| b.into()).collect();
    let e = engine(FakeModel::new(VOCAB, 64).with_script(say_after(1, reply)));
    let p = SamplingParams {
        stop: vec!["\nUser:".into()],
        ..SamplingParams::greedy(50)
    };
    let (evs, fin) = collect(&e, &[sp("<|bos|>")], &p);
    assert_eq!(fin, FinishReason::Stop);
    assert_eq!(
        evs.iter().map(|e| e.text.as_str()).collect::<String>(),
        "one"
    );
    assert_eq!(evs.len(), 9); // "one\nUser:" is 9 tokens; generation ends on the ':'
}

#[test]
fn max_tokens_and_context_give_length() {
    let e = engine(FakeModel::new(VOCAB, 16).with_script(|_| Some(b'a'.into())));
    let (evs, fin) = collect(&e, &[sp("<|bos|>")], &SamplingParams::greedy(5));
    assert_eq!((evs.len(), fin), (5, FinishReason::Length));
    // Context 16, prompt 3: at most 13 tokens fit.
    let (evs, fin) = collect(&e, &[sp("<|bos|>"), 1, 2], &SamplingParams::greedy(100));
    assert_eq!((evs.len(), fin), (13, FinishReason::Length));
}

#[test]
fn long_prompt_is_fitted_into_the_window() {
    let e = engine(FakeModel::new(VOCAB, 32).with_script(|_| Some(b'z'.into())));
    let prompt: Vec<u32> = std::iter::once(sp("<|bos|>"))
        .chain((0..100).map(|i| i % 200))
        .collect();
    let c = e
        .generate_batch(&[prompt], &SamplingParams::greedy(8), 1, 1)
        .unwrap();
    // Reserve 8 for generation: 24 prompt tokens kept (bos + 23 most recent).
    assert_eq!(c[0].usage.prompt_tokens, 24);
    assert_eq!(c[0].usage.dropped_prompt_tokens, 101 - 24);
    assert_eq!(c[0].text, "zzzzzzzz");
}

#[test]
fn calculator_output_is_forced_after_python_end() {
    let mut reply = vec![sp("<|python_start|>")];
    reply.extend(b"12*(3+4)".iter().map(|&b| u32::from(b)));
    reply.push(sp("<|python_end|>"));
    let n = reply.len();
    let prompt = vec![sp("<|bos|>"), sp("<|assistant_start|>")];
    let script = move |h: &[u32]| -> Option<u32> {
        let k = h.len().checked_sub(2)?;
        if k < n {
            return Some(reply[k]);
        }
        // After the tool output, the model says "ok" and ends.
        if h.last() == Some(&sp("<|output_end|>")) {
            return Some(b'o'.into());
        }
        if h.last() == Some(&u32::from(b'o')) {
            return Some(b'k'.into());
        }
        Some(sp("<|assistant_end|>"))
    };
    let e = engine(FakeModel::new(VOCAB, 64).with_script(script));
    let (evs, fin) = collect(&e, &prompt, &sampled(1));
    assert_eq!(fin, FinishReason::Stop);
    let forced: Vec<u32> = evs.iter().filter(|e| e.forced).map(|e| e.token).collect();
    assert_eq!(
        forced,
        vec![
            sp("<|output_start|>"),
            b'8'.into(),
            b'4'.into(),
            sp("<|output_end|>")
        ]
    );
    let text: String = evs.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(
        text,
        "<|python_start|>12*(3+4)<|python_end|><|output_start|>84<|output_end|>ok"
    );
}

#[test]
fn refused_tool_call_forces_nothing() {
    let mut reply = vec![sp("<|python_start|>")];
    reply.extend(b"open('x')".iter().map(|&b| u32::from(b)));
    reply.push(sp("<|python_end|>"));
    let e = engine(FakeModel::new(VOCAB, 64).with_script(say_after(1, reply)));
    let (evs, _) = collect(&e, &[sp("<|bos|>")], &SamplingParams::greedy(30));
    assert!(evs.iter().all(|e| !e.forced));
}

#[test]
fn utf8_split_across_tokens_streams_whole_chars() {
    let reply: Vec<u32> = "é☃🦀".bytes().map(u32::from).collect();
    let e = engine(FakeModel::new(VOCAB, 64).with_script(say_after(1, reply)));
    let (evs, _) = collect(&e, &[sp("<|bos|>")], &SamplingParams::greedy(30));
    let texts: Vec<&str> = evs.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, vec!["", "é", "", "", "☃", "", "", "", "🦀", ""]);
}

#[test]
fn cancellation_ends_stream_and_frees_row() {
    let e = engine(FakeModel::new(VOCAB, 256).with_script(|_| Some(b'x'.into())));
    let mut g = e
        .generate(&[sp("<|bos|>")], &SamplingParams::greedy(100))
        .unwrap();
    let cancel = g.cancel_token();
    let first: Vec<_> = g.by_ref().take(3).collect();
    assert_eq!(first.len(), 3);
    cancel.cancel();
    assert!(g.next().is_none());
    assert_eq!(g.finish_reason(), Some(FinishReason::Cancelled));

    let mut d = e.batch_decoder(2).unwrap();
    let a = d.add(vec![1], SamplingParams::greedy(100)).unwrap();
    let b = d.add(vec![2], SamplingParams::greedy(100)).unwrap();
    assert!(matches!(
        d.add(vec![3], SamplingParams::greedy(5)),
        Err(EngineError::BatchFull { .. })
    ));
    d.step().unwrap();
    assert!(d.cancel(a));
    assert!(!d.cancel(a));
    assert_eq!(d.free_rows(), 1);
    let outs = d.step().unwrap();
    assert!(outs
        .iter()
        .any(|o| o.id == a && o.finished == Some(FinishReason::Cancelled)));
    assert!(outs.iter().any(|o| o.id == b && o.event.is_some()));
    d.add(vec![3], SamplingParams::greedy(5)).unwrap();
}

#[test]
fn continuous_batching_join_midway_matches_alone() {
    let e = engine(FakeModel::new(VOCAB, 128));
    let pa = vec![sp("<|bos|>"), 5, 6, 7];
    let pb = vec![sp("<|bos|>"), 9];
    let params_a = sampled(11);
    let params_b = SamplingParams {
        max_tokens: 7,
        ..sampled(12)
    };
    let mut d = e.batch_decoder(4).unwrap();
    let a = d.add(pa.clone(), params_a.clone()).unwrap();
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let mut b = None;
    let mut steps = 0;
    while d.active() > 0 || b.is_none() {
        if steps == 4 {
            b = Some(d.add(pb.clone(), params_b.clone()).unwrap());
        }
        for o in d.step().unwrap() {
            let t = o.event.map(|e| e.token);
            if o.id == a {
                got_a.extend(t);
            } else if Some(o.id) == b {
                got_b.extend(t);
            }
        }
        steps += 1;
    }
    let alone = |p: &[u32], s: &SamplingParams| -> Vec<u32> {
        collect(&e, p, s).0.iter().map(|e| e.token).collect()
    };
    assert_eq!(got_a, alone(&pa, &params_a));
    assert_eq!(got_b, alone(&pb, &params_b));
}

#[test]
fn bad_requests_are_rejected_clearly() {
    let e = engine(FakeModel::new(VOCAB, 64));
    assert!(matches!(
        e.generate(&[], &SamplingParams::greedy(4)),
        Err(EngineError::EmptyPrompt)
    ));
    match e.generate(&[9999], &SamplingParams::greedy(4)) {
        Err(EngineError::InvalidToken {
            token: 9999,
            vocab_size,
        }) => assert_eq!(vocab_size, VOCAB),
        other => panic!("{:?}", other.err()),
    }
    let bad = SamplingParams {
        top_p: 1.5,
        ..Default::default()
    };
    assert!(matches!(
        e.generate(&[1], &bad),
        Err(EngineError::InvalidParams(_))
    ));
}

#[test]
fn completions_are_in_prompt_order() {
    let e = engine(FakeModel::new(VOCAB, 64).with_script(|h| Some(h[1] + 1)));
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| vec![sp("<|bos|>"), 60 + i]).collect();
    let out: Vec<Completion> = e
        .generate_batch(&prompts, &SamplingParams::greedy(2), 2, 4)
        .unwrap();
    assert_eq!(out.len(), 12);
    for (i, c) in out.iter().enumerate() {
        let ch = (61 + (i / 2) as u8) as char;
        assert_eq!(c.text, format!("{ch}{ch}"));
    }
    let _ = e.model().vocab_size();
}
