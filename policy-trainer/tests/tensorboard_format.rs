//! The TensorBoard event files the trainer writes, checked against the format without Python:
//! CRC-32C known vectors, and the files that PyTorch's `SummaryWriter` wrote
//! (`fixtures/tensorboard/`, made by the workspace's `tests/conformance/tensorboard_events.py`)
//! reproduced byte for byte from the same scalars and wall times, a plain one and one that a
//! continued run starts with.

use std::path::Path;

use policy_trainer::tensorboard::{
    masked_crc32c, read_records, read_scalars, EventWriter, Scalar, ScalarLog,
};

const TORCH_FIXTURE: &[u8] = include_bytes!("fixtures/tensorboard/torch_scalars.tfevents");
const TORCH_RESTARTED: &[u8] = include_bytes!("fixtures/tensorboard/torch_restarted.tfevents");
const FIXTURE_SCALARS: &str = include_str!("fixtures/tensorboard/scalars.json");

#[test]
fn masked_crc32c_known_vectors() {
    // Unmasked CRC-32C: "" 0, "123456789" 0xe3069283 (the catalogue check value), 32 zero bytes
    // 0x8a9136aa and bytes 0..32 0x46dd794e (RFC 3720 B.4). Masked values from TensorBoard's
    // own `masked_crc32c`.
    let ascending: Vec<u8> = (0..32).collect();
    let cases: [(&[u8], u32); 6] = [
        (b"", 0xa282_ead8),
        (b"123456789", 0xc78a_b0e5),
        (&[0; 32], 0x0fd7_fffa),
        (&ascending, 0x951f_7892),
        (&30u64.to_le_bytes(), 0x3212_dcd9),
        (b"brain.Event:2", 0x7c06_01ee),
    ];
    for (data, masked) in cases {
        assert_eq!(masked_crc32c(data), masked, "masked CRC-32C of {data:?}");
    }
}

struct LoggedScalar {
    tag: String,
    value: f64,
    step: i64,
    wall_time: f64,
}

fn fixture_spec() -> serde_json::Value {
    serde_json::from_str(FIXTURE_SCALARS).unwrap()
}

fn listed_scalars(list: &serde_json::Value) -> Vec<LoggedScalar> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| LoggedScalar {
            tag: s["tag"].as_str().unwrap().to_string(),
            // Python's repr: round-trips exactly, and spells nan/inf/-inf as Rust parses them.
            value: s["value"].as_str().unwrap().parse().unwrap(),
            step: s["step"].as_i64().unwrap(),
            wall_time: s["wall_time"].as_f64().unwrap(),
        })
        .collect()
}

fn fixture_scalars() -> (f64, Vec<LoggedScalar>) {
    let spec = fixture_spec();
    (spec["file_version_wall_time"].as_f64().unwrap(), listed_scalars(&spec["scalars"]))
}

fn write_scalars<W: std::io::Write>(writer: &mut EventWriter<W>, scalars: &[LoggedScalar]) {
    for s in scalars {
        writer.add_scalars_at(s.step, &[(s.tag.as_str(), s.value)], s.wall_time).unwrap();
    }
}

/// The bytes after the file-version event (the one record that names its writer).
fn after_file_version_event(file: &[u8]) -> &[u8] {
    let first = read_records(file).unwrap()[0].len();
    &file[8 + 4 + first + 4..]
}

/// Every record after the file-version event is byte-identical to PyTorch's; the file-version
/// event differs only in the writer it names (the library's unit test checks it byte for byte
/// with TensorBoard's name), so its length and wall time are compared here.
#[test]
fn reproduces_pytorchs_summary_writer_byte_for_byte() {
    let (file_version_wall_time, scalars) = fixture_scalars();
    let mut writer =
        EventWriter::from_writer(Vec::new(), "memory".into(), file_version_wall_time).unwrap();
    write_scalars(&mut writer, &scalars);
    let ours = writer.into_inner().unwrap();

    let torch_records = read_records(TORCH_FIXTURE).unwrap();
    let our_records = read_records(&ours).unwrap();
    assert_eq!(our_records.len(), scalars.len() + 1);
    assert_eq!(our_records.len(), torch_records.len());
    for (i, (o, t)) in our_records.iter().zip(&torch_records).enumerate().skip(1) {
        assert_eq!(o, t, "record {i} ({})", scalars[i - 1].tag);
    }
    // The file-version event: wall_time (tag byte, 8 bytes) and file_version (tag byte, length
    // byte, "brain.Event:2") are the same bytes.
    let prefix = |r: &[u8]| r[..1 + 8 + 2 + 13].to_vec();
    assert_eq!(prefix(our_records[0]), prefix(torch_records[0]));
    assert!(String::from_utf8_lossy(our_records[0]).contains("policy-trainer"));

    assert_eq!(
        after_file_version_event(&ours),
        after_file_version_event(TORCH_FIXTURE),
        "the scalar records as a whole"
    );
}

/// A continued run's file: after the file-version event, the restart marks that
/// `SummaryWriter(purge_step=5)` writes, then scalars, all byte for byte as PyTorch wrote them.
#[test]
fn marks_a_restart_as_summary_writers_purge_step_does() {
    let restart = &fixture_spec()["restart"];
    let (step, wall_time) =
        (restart["step"].as_i64().unwrap(), restart["wall_time"].as_f64().unwrap());
    let mut writer = EventWriter::from_writer(Vec::new(), "memory".into(), wall_time).unwrap();
    writer.mark_restart_at(step, wall_time).unwrap();
    write_scalars(&mut writer, &listed_scalars(&restart["scalars"]));
    let ours = writer.into_inner().unwrap();
    assert_eq!(read_records(&ours).unwrap().len(), read_records(TORCH_RESTARTED).unwrap().len());
    assert_eq!(after_file_version_event(&ours), after_file_version_event(TORCH_RESTARTED));
}

/// [`read_scalars`] shows a directory as TensorBoard does: files in name order, and a restart
/// at step `s` hiding what earlier files logged at `s` and later.
#[test]
fn read_scalars_hides_what_a_restart_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let mut crashed = EventWriter::create(dir.path()).unwrap();
    for step in 1..=5 {
        crashed.add_scalars(step, &[("train/loss", step as f64)]).unwrap();
    }
    crashed.add_scalar("eval/loss", 0.5, 4).unwrap();
    drop(crashed);
    let mut continued = EventWriter::create_starting_at(dir.path(), 4).unwrap();
    for step in 4..=6 {
        continued.add_scalars(step, &[("train/loss", 10.0 * step as f64)]).unwrap();
    }
    let shown: Vec<(String, i64, f32)> = read_scalars(dir.path())
        .unwrap()
        .into_iter()
        .map(|Scalar { tag, step, value, .. }| (tag, step, value))
        .collect();
    let loss = |step: i64, value: f32| ("train/loss".to_string(), step, value);
    assert_eq!(
        shown,
        vec![loss(1, 1.0), loss(2, 2.0), loss(3, 3.0), loss(4, 40.0), loss(5, 50.0), loss(6, 60.0)]
    );
    // Anything else in the directory is not read.
    std::fs::write(dir.path().join("metrics.jsonl"), "{}\n").unwrap();
    assert_eq!(read_scalars(dir.path()).unwrap().len(), 6);
}

#[test]
fn event_file_is_named_as_tensorflow_names_it_and_flushed_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let logdir = dir.path().join("runs").join("tensorboard");
    let mut writer = EventWriter::create(&logdir).unwrap();
    let path = writer.path().to_path_buf();
    assert_eq!(path.parent(), Some(logdir.as_path()));
    let name = path.file_name().unwrap().to_str().unwrap();
    let rest = name.strip_prefix("events.out.tfevents.").unwrap();
    let (seconds, host) = rest.split_once('.').unwrap();
    assert_eq!(seconds.len(), 10);
    assert!(seconds.bytes().all(|b| b.is_ascii_digit()), "{name}");
    assert!(!host.is_empty(), "{name}");

    // Read while the writer is still open: what a killed run would leave.
    assert_eq!(records_in(&path), 1);
    writer.add_scalars(1, &[("train/loss", 0.69), ("train/lr", 1e-6)]).unwrap();
    assert_eq!(records_in(&path), 3);
    writer.add_scalar("eval/loss", 0.6, 2).unwrap();
    assert_eq!(records_in(&path), 4);

    // A second file in the same directory does not overwrite the first.
    let second = EventWriter::create(&logdir).unwrap();
    assert_ne!(second.path(), path);
    assert_eq!(records_in(&path), 4);
}

#[test]
fn an_absent_writer_logs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut absent = EventWriter::create_if(false, dir.path()).unwrap();
    assert!(absent.is_none());
    absent.log_scalars(1, &[("train/loss", 1.0)]).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let mut present = EventWriter::create_if(true, dir.path()).unwrap();
    present.log_scalars(1, &[("train/loss", 1.0)]).unwrap();
    let path = present.as_ref().unwrap().path().to_path_buf();
    assert_eq!(records_in(&path), 2);
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let err = EventWriter::create(&not_a_dir.join("tb")).err().unwrap();
    assert!(format!("{err:#}").contains(&not_a_dir.display().to_string()), "{err:#}");

    // A failing write (a full disk) names the file too.
    #[cfg(target_os = "linux")]
    {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let sink = std::io::BufWriter::new(full);
        let err = EventWriter::from_writer(sink, "/dev/full".into(), 0.0).err().unwrap();
        assert!(format!("{err:#}").contains("/dev/full"), "{err:#}");
    }

    // A corrupted byte is reported, with the record's offset.
    let mut bytes = TORCH_FIXTURE.to_vec();
    let last = bytes.len() - 5;
    bytes[last] ^= 1;
    let err = read_records(&bytes).unwrap_err();
    assert!(format!("{err}").contains("data checksum mismatch"), "{err}");
    assert!(read_records(&TORCH_FIXTURE[..TORCH_FIXTURE.len() - 1]).is_err());
}

/// Not a check: writes the fixture's scalars through [`EventWriter::create`] into
/// `$TENSORBOARD_SAMPLE_DIR`, for the workspace's `tests/conformance/tensorboard_events.py --check
/// DIR` to read back with TensorBoard itself. Run with `-- --ignored`.
#[test]
#[ignore]
fn write_sample_for_the_python_check() {
    let dir = std::env::var_os("TENSORBOARD_SAMPLE_DIR").expect("set TENSORBOARD_SAMPLE_DIR");
    let (_, scalars) = fixture_scalars();
    let mut writer = EventWriter::create(Path::new(&dir)).unwrap();
    write_scalars(&mut writer, &scalars);
    println!("wrote {}", writer.path().display());
}

fn records_in(path: &Path) -> usize {
    read_records(&std::fs::read(path).unwrap()).unwrap().len()
}
