//! Store behaviour on real files: publish, verify, refs, cache, gc, locks, records.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nanochat_artifacts::*;

fn store() -> (tempfile::TempDir, ArtifactStore) {
    let d = tempfile::tempdir().unwrap();
    let s = ArtifactStore::open(d.path().join("artifacts")).unwrap();
    (d, s)
}

fn publish_sample(s: &ArtifactStore) -> ObjectId {
    let st = s.staging().unwrap();
    fs::create_dir_all(st.dir().join("ckpt")).unwrap();
    fs::write(st.dir().join("ckpt/model.bin"), vec![7u8; 1000]).unwrap();
    fs::write(st.dir().join("meta.json"), b"{\"step\":3}").unwrap();
    s.publish(st).unwrap()
}

fn writable(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn publish_is_content_addressed_and_read_only() {
    let (_d, s) = store();
    let id = publish_sample(&s);
    assert!(s.contains(&id));
    let m = s.manifest(&id).unwrap();
    assert_eq!(m.id(), id);
    assert_eq!(m.files.len(), 2);
    let data = s.object_data(&id);
    assert_eq!(fs::read(data.join("meta.json")).unwrap(), b"{\"step\":3}");
    let mode = fs::metadata(data.join("meta.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "published files are read-only");
    let hex = id.as_str();
    assert!(s
        .object_dir(&id)
        .ends_with(format!("objects/{}/{}", &hex[..2], &hex[2..])));
    // Same content again: same id, no duplicate, staging cleaned up.
    assert_eq!(publish_sample(&s), id);
    assert_eq!(s.list_objects().unwrap(), vec![id.clone()]);
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    s.verify(&id, VerifyMode::Full).unwrap();
    // publish_dir and publish_file produce ordinary objects.
    let copy = s.publish_dir(&data).unwrap();
    assert_eq!(copy, id, "copying an object's data reproduces its id");
    let f = s.publish_file("log.txt", b"hello").unwrap();
    assert_eq!(
        fs::read(s.object_data(&f).join("log.txt")).unwrap(),
        b"hello"
    );
}

#[test]
fn dropped_staging_is_removed() {
    let (_d, s) = store();
    let st = s.staging().unwrap();
    fs::write(st.dir().join("x"), b"x").unwrap();
    let root = st.dir().parent().unwrap().to_path_buf();
    drop(st);
    assert!(!root.exists());
}

#[test]
fn verify_names_flipped_truncated_missing_and_extra_files() {
    let (_d, s) = store();
    let id = publish_sample(&s);
    let data = s.object_data(&id);
    let model = data.join("ckpt/model.bin");
    writable(&model);

    // Flip one byte: same size, so only the full check sees it.
    let mut bytes = fs::read(&model).unwrap();
    bytes[500] ^= 1;
    fs::write(&model, &bytes).unwrap();
    s.verify(&id, VerifyMode::Fast).unwrap();
    let err = s.verify(&id, VerifyMode::Full).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ckpt/model.bin: altered"), "{msg}");
    let Error::Corrupt { problems, .. } = err else {
        panic!()
    };
    assert_eq!(problems.len(), 1);

    // Truncate: the fast check names it.
    fs::write(&model, &bytes[..10]).unwrap();
    let msg = s.verify(&id, VerifyMode::Fast).unwrap_err().to_string();
    assert!(
        msg.contains("ckpt/model.bin: truncated (expected 1000 bytes, found 10)"),
        "{msg}"
    );

    // Missing and extra files.
    fs::remove_file(&model).unwrap();
    fs::write(data.join("stray.txt"), b"?").unwrap();
    let problems = s.check(&id, VerifyMode::Fast).unwrap();
    assert_eq!(
        problems,
        vec![
            Problem::Missing {
                path: "ckpt/model.bin".into()
            },
            Problem::Extra {
                path: "stray.txt".into()
            }
        ]
    );

    // Republishing the same content repairs the object.
    assert_eq!(publish_sample(&s), id);
    s.verify(&id, VerifyMode::Full).unwrap();
}

#[test]
fn verify_detects_altered_manifest_and_unknown_objects() {
    let (_d, s) = store();
    let id = publish_sample(&s);
    let mpath = s.object_dir(&id).join(MANIFEST_FILE);
    let mut text = fs::read_to_string(&mpath).unwrap();
    text = text.replace("1000", "1001");
    fs::write(&mpath, text).unwrap();
    let msg = s.verify(&id, VerifyMode::Fast).unwrap_err().to_string();
    assert!(msg.contains("manifest.json: altered"), "{msg}");
    fs::remove_file(&mpath).unwrap();
    let msg = s.verify(&id, VerifyMode::Fast).unwrap_err().to_string();
    assert!(msg.contains("manifest.json: unreadable"), "{msg}");
    let other = ObjectId::of_bytes(b"nothing");
    assert!(matches!(
        s.verify(&other, VerifyMode::Fast),
        Err(Error::ObjectNotFound(_))
    ));
    assert!(matches!(s.manifest(&other), Err(Error::ObjectNotFound(_))));
}

#[test]
fn concurrent_publishers_of_the_same_object_all_succeed() {
    let (_d, s) = store();
    let ids: Vec<ObjectId> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| publish_sample(&s))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.list_objects().unwrap().len(), 1);
    s.verify(&ids[0], VerifyMode::Full).unwrap();
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn refs_are_validated_and_listed() {
    let (_d, s) = store();
    let id = publish_sample(&s);
    s.set_ref("latest/sft", &id).unwrap();
    s.set_ref("runs/tiny/sft", &id).unwrap();
    assert_eq!(s.get_ref("latest/sft").unwrap(), Some(id.clone()));
    assert_eq!(s.resolve_ref("runs/tiny/sft").unwrap(), id);
    assert_eq!(s.get_ref("latest/none").unwrap(), None);
    assert_eq!(
        s.get_ref("latest").unwrap(),
        None,
        "a ref directory is not a ref"
    );
    assert!(matches!(s.resolve_ref("x"), Err(Error::RefNotFound(_))));
    let names: Vec<String> = s.list_refs().unwrap().into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["latest/sft", "runs/tiny/sft"]);
    for bad in ["", "a//b", "../x", "a/.b", "a b"] {
        assert!(
            matches!(s.set_ref(bad, &id), Err(Error::InvalidRef { .. })),
            "{bad}"
        );
    }
    assert!(s.delete_ref("latest/sft").unwrap());
    assert!(!s.delete_ref("latest/sft").unwrap());
}

#[test]
fn cache_and_last_key_round_trip() {
    let (_d, s) = store();
    let id = publish_sample(&s);
    let fp = StageFingerprint {
        stage: "a".into(),
        binary: "sha256:1".into(),
        config: serde_json::json!({"n": 1}),
        inputs: Default::default(),
        env: Default::default(),
        schema: FINGERPRINT_SCHEMA,
        world_size: 1,
    };
    let key = fp.key();
    assert_eq!(s.cache_get(&key).unwrap(), None);
    let entry = ArtifactStore::new_cache_entry(key.clone(), "a", id.clone(), None, fp.to_value());
    s.cache_put(&entry).unwrap();
    assert_eq!(s.cache_get(&key).unwrap(), Some(entry.clone()));
    assert_eq!(s.cache_entries().unwrap(), vec![entry]);
    assert_eq!(s.last_key("tiny", "a").unwrap(), None);
    s.set_last_key("tiny", "a", &key).unwrap();
    assert_eq!(s.last_key("tiny", "a").unwrap(), Some(key.clone()));
    // A corrupt cache record is an error naming the file, not a silent miss.
    fs::write(s.root().join("cache").join(format!("{key}.json")), b"{").unwrap();
    let msg = s.cache_get(&key).unwrap_err().to_string();
    assert!(msg.contains(key.as_str()), "{msg}");
}

#[test]
fn gc_keeps_reachable_objects_and_deletes_only_when_asked() {
    let (_d, s) = store();
    let kept_by_ref = publish_sample(&s);
    s.set_ref("latest/x", &kept_by_ref).unwrap();
    let kept_by_cache = s.publish_file("out.txt", b"cached").unwrap();
    let log = s.publish_file("log.txt", b"log").unwrap();
    let fp = serde_json::json!({});
    let key = StageKey::of_bytes(b"k");
    s.cache_put(&ArtifactStore::new_cache_entry(
        key,
        "s",
        kept_by_cache.clone(),
        Some(log.clone()),
        fp,
    ))
    .unwrap();
    let garbage = s.publish_file("junk.txt", b"junk!").unwrap();
    fs::create_dir_all(s.root().join("tmp/stage-abandoned/data")).unwrap();

    // Default: dry run, and young objects are protected.
    let r = s.gc(&GcOptions::default()).unwrap();
    assert!(!r.deleted);
    assert_eq!((r.reachable, r.unreachable.len(), r.young), (3, 0, 1));

    let opts = GcOptions {
        delete: false,
        grace: Duration::ZERO,
    };
    let r = s.gc(&opts).unwrap();
    assert_eq!(r.unreachable, vec![(garbage.clone(), 5)]);
    assert_eq!(r.unreachable_bytes(), 5);
    assert_eq!(r.stale_tmp.len(), 1);
    assert!(s.contains(&garbage), "dry run deletes nothing");

    let r = s
        .gc(&GcOptions {
            delete: true,
            ..opts
        })
        .unwrap();
    assert!(r.deleted);
    assert!(!s.contains(&garbage));
    for id in [&kept_by_ref, &kept_by_cache, &log] {
        s.verify(id, VerifyMode::Full).unwrap();
    }
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn work_lock_is_exclusive_between_holders() {
    let (_d, s) = store();
    let key = StageKey::of_bytes(b"key");
    let lock = s.lock_work(&key).unwrap();
    assert!(lock.dir().is_dir());
    fs::write(lock.dir().join("ckpt"), b"1").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let second = s.lock_work(&key).unwrap();
            tx.send(()).unwrap();
            s.remove_work(second).unwrap();
        });
        // The second holder cannot get in while we hold the lock.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        assert_eq!(fs::read(s.work_dir(&key).join("ckpt")).unwrap(), b"1");
        drop(lock);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    });
    assert!(!s.work_dir(&key).exists());
}

#[test]
fn run_records_round_trip_in_order() {
    let (_d, s) = store();
    let mk = |started: &str| RunRecord {
        pipeline: "tiny".into(),
        started: started.into(),
        duration_s: 1.5,
        host: "h".into(),
        git_rev: None,
        argv: vec!["nanochat-run".into()],
        stages: vec![StageRecord {
            stage: "a".into(),
            key: Some(StageKey::of_bytes(b"a")),
            status: "ran".into(),
            exit_code: Some(0),
            duration_s: 1.0,
            object: None,
            log: None,
            reasons: vec!["missing output".into()],
        }],
    };
    let second = mk("2026-01-02T00:00:00Z");
    let first = mk("2026-01-01T00:00:00Z");
    s.write_run_record(&second).unwrap();
    let p = s.write_run_record(&first).unwrap();
    assert!(p.starts_with(s.root().join("records")));
    assert_eq!(s.run_records().unwrap(), vec![first, second]);
}

#[test]
fn publishing_a_symlink_fails_and_names_it() {
    let (_d, s) = store();
    let st = s.staging().unwrap();
    std::os::unix::fs::symlink("/etc/passwd", st.dir().join("evil")).unwrap();
    let msg = s.publish(st).unwrap_err().to_string();
    assert!(msg.contains("evil"), "{msg}");
}

#[test]
fn the_run_dir_sits_beside_the_object_outside_its_hash_and_the_first_publisher_keeps_it() {
    let (_d, s) = store();
    let publish_with_telemetry = |seconds: &str| {
        let st = s.staging().unwrap();
        fs::write(st.dir().join("result.txt"), b"42\n").unwrap();
        fs::write(st.run_dir().join("telemetry.json"), seconds).unwrap();
        s.publish(st).unwrap()
    };
    let first = publish_with_telemetry("{\"seconds\": 1.5}");
    // Different telemetry, same result: the same object, which keeps its first run dir.
    let second = publish_with_telemetry("{\"seconds\": 9.0}");
    assert_eq!(first, second);
    assert_eq!(
        s.manifest(&first).unwrap().files.len(),
        1,
        "run/ is not hashed"
    );
    s.verify(&first, VerifyMode::Full).unwrap();
    let run = s.object_run_dir(&first);
    assert_eq!(
        fs::read_to_string(run.join("telemetry.json")).unwrap(),
        "{\"seconds\": 1.5}"
    );
    assert_eq!(
        stage::run_dir_of(&s.object_data(&first)),
        Some(run.clone()),
        "a stage finds its input's run dir beside the input"
    );
    let mode = fs::metadata(run.join("telemetry.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "the run dir is as read-only as the data");

    // An object published without telemetry has no run dir at all.
    let plain = s.publish_file("log.txt", b"hello").unwrap();
    assert!(!s.object_run_dir(&plain).exists());
    assert_eq!(stage::run_dir_of(&s.object_data(&plain)), None);

    // The producer record round-trips through the run dir.
    let record = ProducerRecord {
        pipeline: "tiny".into(),
        stage: "pretrain".into(),
        key: StageKey::new("ab".repeat(32)).unwrap(),
        started: "2026-01-02T03:04:05Z".into(),
        duration_s: 12.5,
        resumed: true,
        inputs: [("corpus".to_string(), plain.clone())].into(),
        log: Some(plain.clone()),
        machine: MachineInfo::current(),
        git_rev: None,
    };
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(ProducerRecord::read(dir.path()).unwrap(), None);
    record.write(dir.path()).unwrap();
    assert_eq!(ProducerRecord::read(dir.path()).unwrap(), Some(record));
}
