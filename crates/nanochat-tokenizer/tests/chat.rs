mod common;

use nanochat_tokenizer::chat::DEFAULT_MAX_TOKENS;
use nanochat_tokenizer::{Content, Conversation, Message, Part, PartKind, Role};

#[derive(serde::Deserialize)]
struct Golden {
    conversation: Conversation,
    max_tokens: usize,
    ids: Vec<u32>,
    mask: Vec<u8>,
    completion: Option<Vec<u32>>,
}

#[test]
fn render_matches_nanochat_golden() {
    let tok = common::fixture_tokenizer();
    let golden: Vec<Golden> = serde_json::from_slice(&common::read_maybe_gz(&common::data(
        "render_golden.json.gz",
    )))
    .unwrap();
    assert_eq!(golden.len(), 10);
    for (i, g) in golden.iter().enumerate() {
        let (ids, mask) = tok
            .render_conversation(&g.conversation, g.max_tokens)
            .unwrap();
        assert_eq!(ids, g.ids, "case {i}");
        assert_eq!(mask, g.mask, "case {i}");
        if let Some(c) = &g.completion {
            assert_eq!(
                &tok.render_for_completion(&g.conversation).unwrap(),
                c,
                "case {i}"
            );
        }
    }
}

#[test]
fn json_round_trip_and_shapes() {
    let line = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"text","text":"a"},{"type":"python","text":"1+1"},{"type":"python_output","text":"2"}]}],"source":"x"}"#;
    let c = Conversation::from_json(line).unwrap();
    assert_eq!(c.messages.len(), 3);
    assert_eq!(c.messages[0].role, Role::System);
    assert_eq!(
        c.messages[2].content,
        Content::Parts(vec![
            Part::new(PartKind::Text, "a"),
            Part::new(PartKind::Python, "1+1"),
            Part::new(PartKind::PythonOutput, "2"),
        ])
    );
    let back: Conversation = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(Conversation::from_json(r#"{"messages":[{"role":"robot","content":"x"}]}"#).is_err());
    assert!(Conversation::from_json(
        r#"{"messages":[{"role":"assistant","content":[{"type":"image","text":"x"}]}]}"#
    )
    .is_err());
}

#[test]
fn mask_covers_exactly_the_assistant_output() {
    let tok = common::fixture_tokenizer();
    let id = |s| tok.special_id(s).unwrap();
    let c = Conversation {
        messages: vec![
            Message::text(Role::User, "q"),
            Message {
                role: Role::Assistant,
                content: Content::Parts(vec![
                    Part::new(PartKind::Python, "x"),
                    Part::new(PartKind::PythonOutput, "y"),
                ]),
            },
        ],
    };
    let (ids, mask) = tok.render_conversation(&c, DEFAULT_MAX_TOKENS).unwrap();
    let q = tok.encode("q");
    let x = tok.encode("x");
    let y = tok.encode("y");
    let mut want = vec![(tok.bos_id(), 0), (id("<|user_start|>"), 0)];
    want.extend(q.iter().map(|&t| (t, 0)));
    want.push((id("<|user_end|>"), 0));
    want.push((id("<|assistant_start|>"), 0));
    want.push((id("<|python_start|>"), 1));
    want.extend(x.iter().map(|&t| (t, 1)));
    want.push((id("<|python_end|>"), 1));
    want.push((id("<|output_start|>"), 0));
    want.extend(y.iter().map(|&t| (t, 0)));
    want.push((id("<|output_end|>"), 0));
    want.push((id("<|assistant_end|>"), 1));
    let got: Vec<(u32, u8)> = ids.into_iter().zip(mask).collect();
    assert_eq!(got, want);
}

#[test]
fn malformed_conversations_are_errors() {
    let tok = common::fixture_tokenizer();
    let u = |t: &str| Message::text(Role::User, t);
    let a = |t: &str| Message::text(Role::Assistant, t);
    let s = |t: &str| Message::text(Role::System, t);
    let bad = [
        vec![],
        vec![a("hi")],
        vec![u("a"), u("b")],
        vec![s("sys")],
        vec![s("sys"), a("x")],
        vec![u("a"), a("b"), s("c")],
        vec![u(""), a("b")],
        vec![
            u("a"),
            Message {
                role: Role::Assistant,
                content: Content::Parts(vec![]),
            },
        ],
        vec![Message {
            role: Role::User,
            content: Content::Parts(vec![Part::new(PartKind::Text, "x")]),
        }],
    ];
    for (i, messages) in bad.into_iter().enumerate() {
        let c = Conversation { messages };
        assert!(tok.render_conversation(&c, 100).is_err(), "case {i}");
    }
    // Completion needs a final assistant message to drop.
    let c = Conversation {
        messages: vec![u("a")],
    };
    assert!(tok.render_for_completion(&c).is_err());
    // A tokenizer without chat specials cannot render.
    let plain = nanochat_tokenizer::Tokenizer::with_appended_specials(
        "plain",
        (0..=255u8).map(|b| vec![b]).collect(),
        nanochat_tokenizer::NANOCHAT_PATTERN,
        &["<|bos|>"],
    )
    .unwrap();
    let c = Conversation {
        messages: vec![u("a"), a("b")],
    };
    assert!(matches!(
        plain.render_conversation(&c, 10),
        Err(nanochat_tokenizer::Error::UnknownSpecial(_))
    ));
}
