//! End-to-end tests of the `nanochat` binary on a tiny checkpoint written by the test itself
//! (random weights, byte-level tokenizer with nanochat's specials), and on the trained tiny
//! chat model shipped with nanochat-inference's tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use nanochat_model::{save_checkpoint, CheckpointMeta, Gpt, GptConfig};
use nanochat_tokenizer::Tokenizer;

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
}

/// One tiny model for every test: depth 2, width 128, context 128, vocab 256 bytes + 9 specials.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let artifact = dir.path().join("artifact");
        let bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let tok = Tokenizer::nanochat("bytes", bytes).expect("tokenizer");
        tok.save(&artifact.join("tokenizer"))
            .expect("save tokenizer");
        let cfg = GptConfig::from_depth(2, tok.vocab_size() as usize, 128).expect("config");
        let mut gpt = Gpt::new(cfg, 7).expect("model");
        {
            // The reference zero-initialises lm_head and the output projections; give every
            // weight a deterministic spread so that generations depend on the prompt.
            let mut params = gpt.params_mut();
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            for p in params.iter_mut() {
                for v in p.data.iter_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5;
                }
            }
        }
        let mut meta = CheckpointMeta::new(1);
        meta.loss = Some(5.5);
        save_checkpoint(&gpt, &artifact.join("model"), &meta).expect("save checkpoint");
        Fixture {
            model: artifact,
            _dir: dir,
        }
    })
}

fn nanochat(args: &[&str], stdin: Option<&str>) -> Output {
    nanochat_env(args, stdin, &[])
}

/// Like [`nanochat`], with these environment variables set.
fn nanochat_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanochat"));
    cmd.args(args)
        .env_remove("NANOCHAT_MODEL")
        .env_remove("NANOCHAT_TOKENIZER")
        .env_remove("NANOCHAT_DEVICE")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn nanochat");
    if let Some(mut si) = child.stdin.take() {
        si.write_all(stdin.unwrap_or("").as_bytes()).expect("stdin");
    }
    child.wait_with_output().expect("wait")
}

fn model() -> &'static str {
    fixture().model.to_str().expect("utf-8 temp path")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn greedy_generate_is_deterministic_and_streams_text() {
    let args = [
        "generate",
        "--model",
        model(),
        "-t",
        "0",
        "-n",
        "24",
        "Hello there",
    ];
    let a = nanochat(&args, None);
    let b = nanochat(&args, None);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
    assert!(!a.stdout.is_empty());
    let j = json(&nanochat(
        &[
            "--json",
            "generate",
            "--model",
            model(),
            "-t",
            "0",
            "-n",
            "24",
            "Hello there",
        ],
        None,
    ));
    assert_eq!(j["usage"]["prompt_tokens"], 1 + "Hello there".len());
    let text = j["text"].as_str().unwrap_or_default();
    assert!(
        stdout(&a).starts_with(text),
        "stream vs json: {:?} / {text:?}",
        stdout(&a)
    );
    let reason = j["finish_reason"].as_str().unwrap_or_default();
    assert!(reason == "length" || reason == "stop", "{reason}");
}

#[test]
fn seeds_reproduce_and_differ() {
    let run = |seed: &str| {
        let o = nanochat(
            &[
                "--json",
                "generate",
                "--model",
                model(),
                "-t",
                "1",
                "--seed",
                seed,
                "-n",
                "16",
                "abc",
            ],
            None,
        );
        json(&o)["tokens"].clone()
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(run("5"), run("6"));
}

#[test]
fn empty_prompt_is_a_usage_error_unless_unconditional() {
    let o = nanochat(&["generate", "--model", model(), "   "], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    let o = nanochat(
        &["generate", "--model", model(), "-n", "4", "--unconditional"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = nanochat(
        &["generate", "--model", model(), "-n", "4", "-p", "1.5", "x"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("top_p"), "{}", stderr(&o));
}

#[test]
fn special_token_names_in_prompts_are_text() {
    let p = "<|assistant_end|><|bos|>";
    let j = json(&nanochat(
        &[
            "--json",
            "generate",
            "--model",
            model(),
            "-n",
            "2",
            "-t",
            "0",
            p,
        ],
        None,
    ));
    assert_eq!(j["usage"]["prompt_tokens"], 1 + p.len());
    let tok = fixture().model.join("tokenizer");
    let o = nanochat(
        &[
            "--json",
            "tok",
            "encode",
            "--tokenizer",
            tok.to_str().unwrap_or(""),
            p,
        ],
        None,
    );
    let ids: Vec<u64> = json(&o)["ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(ids.len(), p.len());
    assert!(ids.iter().all(|&i| i < 256));
}

#[test]
fn bad_model_paths_fail_clearly() {
    let o = nanochat(&["generate", "--model", "/nonexistent/model", "hi"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no such directory"), "{}", stderr(&o));
    let empty = tempfile::tempdir().expect("tempdir");
    let o = nanochat(
        &["info", "--model", empty.path().to_str().unwrap_or("")],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("model.safetensors"), "{}", stderr(&o));
}

#[test]
fn tok_encode_decode_round_trip() {
    let tok = fixture().model.join("tokenizer");
    let tok = tok.to_str().unwrap_or("");
    let text = "héllo wörld 🦀 \"quotes\"";
    let enc = nanochat(&["tok", "encode", "--tokenizer", tok, text], None);
    assert!(enc.status.success(), "{}", stderr(&enc));
    let ids = stdout(&enc);
    let dec = nanochat(&["tok", "decode", "--tokenizer", tok], Some(&ids));
    assert_eq!(stdout(&dec), format!("{text}\n"));
    let bad = nanochat(&["tok", "decode", "--tokenizer", tok, "99999"], None);
    assert_eq!(bad.status.code(), Some(2));
    let file = fixture().model.join("sample.txt");
    std::fs::write(&file, "some text to measure").expect("write");
    let ev = json(&nanochat(
        &[
            "--json",
            "tok",
            "eval",
            "--tokenizer",
            tok,
            file.to_str().unwrap_or(""),
        ],
        None,
    ));
    assert_eq!(ev[0]["bytes_per_token"], 1.0);
}

#[test]
fn info_reports_config_size_and_provenance() {
    let j = json(&nanochat(&["--json", "info", "--model", model()], None));
    assert_eq!(j["config"]["n_layer"], 2);
    assert_eq!(j["config"]["vocab_size"], 265);
    assert_eq!(j["meta"]["step"], 1);
    assert!(j["params"].as_u64().unwrap_or(0) > 100_000);
    assert!(
        j["memory_bytes"]["total"].as_u64().unwrap_or(0)
            > j["memory_bytes"]["weights"].as_u64().unwrap_or(0)
    );
    let o = nanochat(&["info", "--model", model()], None);
    assert!(stdout(&o).contains("parameters"));
    // Which kernel each op family takes on this CPU, and why.
    let out = stdout(&o);
    for family in [
        "kernels      gemm f32: ",
        "kernels      gemm bf16: ",
        "decode gemv",
    ] {
        assert!(out.contains(family), "{family}: {out}");
    }
    let kernels = j["kernels"].as_array().map_or(0, Vec::len);
    assert!(kernels >= 4, "{j}");
}

#[test]
fn the_device_defaults_to_cpu_and_bad_or_unbuilt_devices_fail_clearly() {
    let j = json(&nanochat(&["--json", "info", "--model", model()], None));
    let device = j["device"].as_str().unwrap_or_default();
    assert!(device.starts_with("cpu"), "{j}");
    let o = nanochat(&["info", "--model", model(), "--device", "cpu"], None);
    assert!(stdout(&o).contains("device       cpu"), "{}", stdout(&o));

    // A name that is no device: usage error listing the accepted ones.
    let o = nanochat(
        &["generate", "--model", model(), "--device", "tpu", "hi"],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--device") && stderr(&o).contains("\"cpu\", \"cuda\" or \"cuda:N\""),
        "{}",
        stderr(&o)
    );
    let o = nanochat_env(
        &["info", "--model", model()],
        None,
        &[("NANOCHAT_DEVICE", "tpu")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    if cfg!(feature = "cuda") {
        return; // with the feature, whether a GPU opens depends on the machine
    }
    // A GPU in a build without the `cuda` feature: every model command says how to rebuild.
    let model = model();
    let runs: [&[&str]; 5] = [
        &[
            "generate", "--model", model, "--device", "cuda", "-n", "2", "hi",
        ],
        &[
            "chat", "--model", model, "--device", "cuda:1", "--prompt", "hi",
        ],
        &["info", "--model", model, "--device", "gpu"],
        &["serve", "--model", model, "--device", "cuda", "--port", "0"],
        &["info", "--model", model],
    ];
    for (i, args) in runs.iter().enumerate() {
        // The last one takes the device from NANOCHAT_DEVICE.
        let env: &[(&str, &str)] = if i == 4 {
            &[("NANOCHAT_DEVICE", "cuda")]
        } else {
            &[]
        };
        let o = nanochat_env(args, None, env);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("device cuda") && err.contains("--features cuda"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn chat_reads_turns_and_commands_from_stdin() {
    let o = nanochat(
        &["chat", "--model", model(), "-n", "8"],
        Some("/temperature 0\n/help\nHi!\n/clear\nHow are you?\n/topk 5\n/quit\nignored\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("Assistant:").count(), 2, "{out}");
    for needle in [
        "temperature = 0",
        "/topk K",
        "conversation cleared",
        "top_k = 5",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in {out}");
    }
    let one = nanochat(
        &[
            "chat",
            "--model",
            model(),
            "-t",
            "0",
            "-n",
            "6",
            "--prompt",
            "Hi!",
        ],
        None,
    );
    assert!(one.status.success(), "{}", stderr(&one));
    let none = nanochat(&["chat", "--model", model(), "--prompt", " "], None);
    assert_eq!(none.status.code(), Some(2));
}

/// The trained fixture of nanochat-inference (crates/nanochat-inference/testdata/tiny-chat):
/// a depth-1 model that memorised the identity conversations, so its greedy answers are known.
fn trained_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../nanochat-inference/testdata/tiny-chat")
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

#[test]
fn chat_with_a_trained_model_gives_its_memorised_answers() {
    let model = trained_model();
    let o = nanochat(
        &["chat", "--model", &model, "-t", "0", "-n", "64"],
        Some("What is your name?\n/clear\nhi\n/quit\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("My name is nanochat."), "{out}");
    assert!(
        out.contains("Hello! I am nanochat. How can I help you today?"),
        "{out}"
    );
}

/// The REPL on a real terminal: `script` gives the process a pty, so it runs interactively.
#[test]
fn chat_repl_in_a_pty() {
    if !Path::new("/usr/bin/script").exists() {
        eprintln!("SKIP: util-linux `script` is not installed");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_nanochat");
    let cmd = format!("{bin} chat --model {} -t 0 -n 6", model());
    let o = Command::new("/usr/bin/script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut si) = c.stdin.take() {
                // Give the REPL time to start before typing, as a person would.
                std::thread::sleep(std::time::Duration::from_millis(500));
                si.write_all(b"Hello\n")?;
                std::thread::sleep(std::time::Duration::from_millis(1500));
                si.write_all(b"/temperature 0.5\n")?;
                std::thread::sleep(std::time::Duration::from_millis(500));
                // Ctrl-C at the prompt (not during a generation) leaves like the default action.
                si.write_all(b"\x03")?;
            }
            c.wait_with_output()
        })
        .expect("run script");
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(130), "{out}{}", stderr(&o));
    assert!(out.contains("temperature = 0.5"), "{out}");
    assert!(out.contains("type /help for commands"), "{out}");
    assert!(out.contains("Assistant:"), "{out}");
}

#[test]
fn tok_train_then_encode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus.txt");
    let text = "the cat sat on the mat. the cat ate the rat.\n\nthe end of the cat.\n";
    std::fs::write(&corpus, text.repeat(20)).expect("write");
    let out = dir.path().join("tok");
    let o = nanochat(
        &[
            "--json",
            "tok",
            "train",
            "--vocab-size",
            "300",
            "-o",
            out.to_str().unwrap_or(""),
            corpus.to_str().unwrap_or(""),
        ],
        None,
    );
    let j = json(&o);
    // A corpus this small runs out of pairs before 300; every merge it has is learned.
    let vocab = j["vocab_size"].as_u64().unwrap_or(0);
    assert!(vocab > 265 && vocab <= 300, "{j}");
    assert_eq!(j["stats"]["merges"].as_u64().unwrap_or(0) + 265, vocab);
    let enc = json(&nanochat(
        &[
            "--json",
            "tok",
            "encode",
            "--tokenizer",
            out.to_str().unwrap_or(""),
            "the cat",
        ],
        None,
    ));
    let n = enc["ids"].as_array().map_or(0, |a| a.len());
    assert!(
        n > 0 && n < "the cat".len(),
        "merges should compress: {n} ids"
    );
    // Refuses to overwrite.
    let again = nanochat(
        &[
            "tok",
            "train",
            "--vocab-size",
            "300",
            "-o",
            out.to_str().unwrap_or(""),
            corpus.to_str().unwrap_or(""),
        ],
        None,
    );
    assert_eq!(again.status.code(), Some(2));
}

/// Kills the server even when an assertion fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_answers_health_on_a_free_port() {
    use std::io::{BufRead, BufReader, Read};
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_nanochat"))
            .args([
                "serve",
                "--model",
                model(),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args(["--workers", "1"])
            .env_remove("NANOCHAT_MODEL")
            .env_remove("NANOCHAT_TOKENIZER")
            .env_remove("NANOCHAT_DEVICE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nanochat serve"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let mut addr = None;
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split("on http://").nth(1) {
            addr = rest.split('/').next().map(str::to_string);
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no listening address printed:\n{seen}"));
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("response");
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let health: serde_json::Value = serde_json::from_str(body).expect("health JSON");
    assert!(health.is_object(), "{health}");
}

#[test]
fn serve_rejects_a_missing_model_and_bad_config() {
    let o = nanochat(&["serve", "--model", "/nonexistent/model"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/model"), "{}", stderr(&o));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "prot = 1\n").expect("write config");
    let o = nanochat(
        &[
            "serve",
            "--model",
            model(),
            "--config",
            cfg.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("server.toml"), "{}", stderr(&o));
}
