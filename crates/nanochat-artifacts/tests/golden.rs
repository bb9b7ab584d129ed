//! Pins the worked examples in docs/artifacts.md: if these change, the format changed and the
//! documentation (and every stored object id) with it.

use std::fs;

use nanochat_artifacts::*;

const DOC_OBJECT_ID: &str = "8d99c3282ae2903b090f54e62c1e442782772ac27541b11c3fd0a69c217f5862";

#[test]
fn documented_manifest_bytes_and_object_id() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("hello.txt"), b"hello\n").unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("sub/empty.bin"), b"").unwrap();
    let m = Manifest::of_dir(d.path()).unwrap();
    assert_eq!(
        String::from_utf8(m.canonical_bytes()).unwrap(),
        r#"{"files":[{"path":"hello.txt","sha256":"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03","size":6},{"path":"sub/empty.bin","sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}],"version":1}"#
    );
    assert_eq!(m.id().as_str(), DOC_OBJECT_ID);
    // The store lays it out as documented.
    let store_dir = tempfile::tempdir().unwrap();
    let s = ArtifactStore::open(store_dir.path()).unwrap();
    let st = s.staging().unwrap();
    fs::write(st.dir().join("hello.txt"), b"hello\n").unwrap();
    fs::create_dir(st.dir().join("sub")).unwrap();
    fs::write(st.dir().join("sub/empty.bin"), b"").unwrap();
    let id = s.publish(st).unwrap();
    assert_eq!(id.as_str(), DOC_OBJECT_ID);
    let dir = s
        .root()
        .join("objects/8d/99c3282ae2903b090f54e62c1e442782772ac27541b11c3fd0a69c217f5862");
    assert_eq!(s.object_dir(&id), dir);
    assert_eq!(
        fs::read(dir.join("manifest.json")).unwrap(),
        m.canonical_bytes()
    );
    assert_eq!(fs::read(dir.join("data/hello.txt")).unwrap(), b"hello\n");
}

#[test]
fn documented_stage_key() {
    let fp = StageFingerprint {
        stage: "pretrain".into(),
        binary: "sha256:00".into(),
        config: serde_json::json!({"steps": 3}),
        inputs: [("tok".to_string(), ObjectId::new(DOC_OBJECT_ID).unwrap())].into(),
        env: Default::default(),
        schema: FINGERPRINT_SCHEMA,
        world_size: 1,
    };
    assert_eq!(
        String::from_utf8(canonical_json(&fp.to_value())).unwrap(),
        format!(
            r#"{{"binary":"sha256:00","config":{{"steps":3}},"env":{{}},"inputs":{{"tok":"{DOC_OBJECT_ID}"}},"schema":1,"stage":"pretrain"}}"#
        )
    );
    assert_eq!(
        fp.key().as_str(),
        "41d0a3c383d4d49e4b6a5eaa26230204bed2be95547b34d5793c8dc8b2211aaf"
    );
}
