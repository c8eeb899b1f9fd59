//! TensorBoard event files, so that `tensorboard --logdir runs/` shows the trainer's curves next
//! to a Hugging Face TRL run's (TRL's `--report-to tensorboard` goes through PyTorch's
//! `torch.utils.tensorboard.SummaryWriter`).
//!
//! The format, as TensorFlow defines it and TensorBoard reads it:
//! - the file is `<dir>/events.out.tfevents.<unix seconds, 10 digits>.<host name>` (TensorFlow's
//!   `EventsWriter` naming; TensorBoard picks up any file whose name contains `tfevents`);
//! - it is a sequence of TFRecords: the data length as a little-endian u64, the masked CRC-32C
//!   of those 8 bytes, the data, the masked CRC-32C of the data;
//! - each record's data is an `Event` protobuf (tensorflow/core/util/event.proto); the first
//!   carries `file_version: "brain.Event:2"`, each later one a `Summary` with one scalar in
//!   `simple_value`, exactly as `SummaryWriter.add_scalar` writes it (one event per scalar).
//!
//! A run that continues from a checkpoint writes a new file that starts by marking the restart,
//! as `SummaryWriter(purge_step=...)` does: a file-version event and a `SessionLog` START event
//! at the first step the new file logs. TensorBoard then hides what earlier files in the
//! directory logged at that step or later (the steps a crashed run took after its checkpoint,
//! which the continued run takes again). [`read_scalars`] reads a directory the same way.
//!
//! Scalars are written a step at a time and flushed after each step, so a run that is killed
//! keeps everything it logged. `tests/fixtures/tensorboard/` holds files written by PyTorch, a
//! plain one and a restarted one, that this writer reproduces byte for byte
//! (`tests/tensorboard_format.rs`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;

/// The `file_version` of every event file TensorBoard 2.x reads as current.
const FILE_VERSION: &str = "brain.Event:2";

/// What the file-version event names as its writer (`SourceMetadata.writer`), as TensorFlow and
/// TensorBoard name theirs.
const WRITER_NAME: &str = "policy-trainer";

/// Added to the rotated CRC, as TFRecord's `MaskedCrc` does: a CRC computed over data that
/// itself holds CRCs is otherwise prone to degenerate values.
const CRC_MASK_DELTA: u32 = 0xa282_ead8;

/// The masked CRC-32C (Castagnoli) that TFRecord stores after the length and after the data.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(CRC_MASK_DELTA)
}

/// Writes scalar summaries to one TensorBoard event file.
///
/// `W` is the file in a run; tests pass a `Vec<u8>` through [`EventWriter::from_writer`].
pub struct EventWriter<W: Write = BufWriter<File>> {
    sink: W,
    /// Named in every error; for a sink that is no file, the label the caller gave.
    path: PathBuf,
    /// Reused across records.
    encoded: Vec<u8>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, and writes the file-version event.
    /// An existing file is never overwritten: a run restarted within the same second gets the
    /// name with `.1`, `.2`, ... appended.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the TensorBoard directory {}", dir.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = gethostname::gethostname();
        let base = format!("events.out.tfevents.{:010}.{}", now.as_secs(), host.to_string_lossy());
        let (file, path) = create_new_numbered(dir, &base)?;
        Self::from_writer(BufWriter::new(file), path, now.as_secs_f64())
    }

    /// [`EventWriter::create`], then [`EventWriter::mark_restart`] at `first_step`.
    pub fn create_starting_at(dir: &Path, first_step: i64) -> Result<Self> {
        let mut writer = Self::create(dir)?;
        writer.mark_restart(first_step)?;
        Ok(writer)
    }

    /// [`EventWriter::create`] when `enabled`, `None` otherwise: the trainer holds the result as
    /// `Option<EventWriter>` and logs through [`ScalarLog`] without checking at each call.
    pub fn create_if(enabled: bool, dir: &Path) -> Result<Option<Self>> {
        enabled.then(|| Self::create(dir)).transpose()
    }
}

impl<W: Write> EventWriter<W> {
    /// Starts an event file on `sink` with the file-version event stamped `wall_time` (seconds
    /// since the Unix epoch); `path` names the sink in errors.
    pub fn from_writer(sink: W, path: PathBuf, wall_time: f64) -> Result<Self> {
        let mut writer = Self { sink, path, encoded: Vec::new() };
        writer.write_event(&file_version_event(wall_time, WRITER_NAME))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The file (or the label given to [`EventWriter::from_writer`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks that logging (re)starts at `first_step`: TensorBoard then hides every event that
    /// the directory's earlier files hold at `first_step` or later. Stamped now, flushed.
    pub fn mark_restart(&mut self, first_step: i64) -> Result<()> {
        self.mark_restart_at(first_step, unix_now())
    }

    /// [`EventWriter::mark_restart`] with the given wall time: the two events
    /// `SummaryWriter(purge_step=first_step)` writes after its file-version event, a second
    /// file-version event and a `SessionLog` START, both at `first_step`.
    pub fn mark_restart_at(&mut self, first_step: i64, wall_time: f64) -> Result<()> {
        let file_version = proto::Event {
            wall_time,
            step: first_step,
            what: Some(proto::event::What::FileVersion(FILE_VERSION.to_string())),
            source_metadata: None,
        };
        let start = proto::Event {
            wall_time,
            step: first_step,
            what: Some(proto::event::What::SessionLog(proto::SessionLog {
                status: proto::session_log::SessionStatus::Start as i32,
            })),
            source_metadata: None,
        };
        self.write_event(&file_version)?;
        self.write_event(&start)?;
        self.flush()
    }

    /// One scalar, stamped now, flushed.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        self.add_scalars(step, &[(tag, value)])
    }

    /// A step's scalars, stamped now, then one flush.
    pub fn add_scalars(&mut self, step: i64, scalars: &[(&str, f64)]) -> Result<()> {
        self.add_scalars_at(step, scalars, unix_now())
    }

    /// A step's scalars with the given wall time (seconds since the Unix epoch), one event per
    /// scalar as `SummaryWriter.add_scalar` writes them, then one flush. TensorBoard stores
    /// scalars as f32 (`simple_value`), so each value is rounded to the nearest f32.
    pub fn add_scalars_at(
        &mut self,
        step: i64,
        scalars: &[(&str, f64)],
        wall_time: f64,
    ) -> Result<()> {
        for &(tag, value) in scalars {
            self.write_event(&scalar_event(tag, value as f32, step, wall_time))?;
        }
        self.flush()
    }

    /// Flushes and hands back the sink (the bytes written, for a `Vec<u8>`).
    pub fn into_inner(mut self) -> Result<W> {
        self.flush()?;
        Ok(self.sink)
    }

    fn flush(&mut self) -> Result<()> {
        self.sink
            .flush()
            .with_context(|| format!("writing TensorBoard events to {}", self.path.display()))
    }

    fn write_event(&mut self, event: &proto::Event) -> Result<()> {
        self.encoded.clear();
        event.encode(&mut self.encoded).expect("a Vec<u8> grows to hold any message");
        write_record(&mut self.sink, &self.encoded)
            .with_context(|| format!("writing TensorBoard events to {}", self.path.display()))
    }
}

/// Logging scalars to an event file that may not be there: implemented for [`EventWriter`] and
/// for `Option<EventWriter>`, where `None` (TensorBoard not asked for) logs nothing.
pub trait ScalarLog {
    /// A step's scalars, stamped now, then one flush.
    fn log_scalars(&mut self, step: i64, scalars: &[(&str, f64)]) -> Result<()>;
}

impl<W: Write> ScalarLog for EventWriter<W> {
    fn log_scalars(&mut self, step: i64, scalars: &[(&str, f64)]) -> Result<()> {
        self.add_scalars(step, scalars)
    }
}

impl<W: Write> ScalarLog for Option<EventWriter<W>> {
    fn log_scalars(&mut self, step: i64, scalars: &[(&str, f64)]) -> Result<()> {
        match self {
            Some(writer) => writer.add_scalars(step, scalars),
            None => Ok(()),
        }
    }
}

/// Splits TFRecord bytes (a whole event file) into the records' data, checking both CRCs of
/// each record; an error gives the byte offset of the bad record.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        ensure!(rest.len() >= 12, "truncated record header at byte {offset}");
        let (length_bytes, after) = rest.split_at(8);
        let length = u64::from_le_bytes(length_bytes.try_into().expect("8 bytes"));
        ensure!(
            read_u32(&after[..4]) == masked_crc32c(length_bytes),
            "length checksum mismatch in the record at byte {offset}"
        );
        let after = &after[4..];
        let Some(data_len) =
            usize::try_from(length).ok().filter(|&n| n <= after.len().saturating_sub(4))
        else {
            bail!("the record at byte {offset} claims {length} bytes, past the end of the data");
        };
        let (data, after) = after.split_at(data_len);
        ensure!(
            read_u32(&after[..4]) == masked_crc32c(data),
            "data checksum mismatch in the record at byte {offset}"
        );
        records.push(data);
        rest = &after[4..];
    }
    Ok(records)
}

/// One scalar as TensorBoard shows it (`simple_value` is an f32).
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    pub value: f32,
    pub wall_time: f64,
}

/// The scalars of every event file in `dir` (names containing `tfevents`, not its
/// subdirectories), as TensorBoard's loader shows the run: files in name order, events in file
/// order, and a `SessionLog` START at step `s` dropping the scalars read so far at steps `>= s`.
/// Each file's checksums are verified; an error names the file.
pub fn read_scalars(dir: &Path) -> Result<Vec<Scalar>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("listing the TensorBoard directory {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let is_event_file =
            path.file_name().is_some_and(|n| n.to_string_lossy().contains("tfevents"));
        if is_event_file && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut scalars = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let records =
            read_records(&bytes).with_context(|| format!("reading {}", path.display()))?;
        for (i, data) in records.into_iter().enumerate() {
            let event = proto::Event::decode(data)
                .with_context(|| format!("{}: record {i} is not an Event", path.display()))?;
            match event.what {
                Some(proto::event::What::Summary(summary)) => {
                    for value in summary.value {
                        if let Some(proto::summary::value::Value::SimpleValue(v)) = value.value {
                            scalars.push(Scalar {
                                tag: value.tag,
                                step: event.step,
                                value: v,
                                wall_time: event.wall_time,
                            });
                        }
                    }
                }
                Some(proto::event::What::SessionLog(log))
                    if log.status == proto::session_log::SessionStatus::Start as i32 =>
                {
                    scalars.retain(|s| s.step < event.step);
                }
                _ => {}
            }
        }
    }
    Ok(scalars)
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
}

/// One TFRecord: length, its masked CRC, data, the data's masked CRC.
fn write_record(sink: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let length = (data.len() as u64).to_le_bytes();
    sink.write_all(&length)?;
    sink.write_all(&masked_crc32c(&length).to_le_bytes())?;
    sink.write_all(data)?;
    sink.write_all(&masked_crc32c(data).to_le_bytes())
}

/// Opens `dir/base`, or `dir/base.1`, `dir/base.2`, ... for the first name not taken.
fn create_new_numbered(dir: &Path, base: &str) -> Result<(File, PathBuf)> {
    for n in 0u32.. {
        let name = if n == 0 { base.to_string() } else { format!("{base}.{n}") };
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("creating the TensorBoard event file {}", path.display())
                })
            }
        }
    }
    unreachable!("some numbered name is free")
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn file_version_event(wall_time: f64, writer_name: &str) -> proto::Event {
    proto::Event {
        wall_time,
        step: 0,
        what: Some(proto::event::What::FileVersion(FILE_VERSION.to_string())),
        source_metadata: Some(proto::SourceMetadata { writer: writer_name.to_string() }),
    }
}

fn scalar_event(tag: &str, value: f32, step: i64, wall_time: f64) -> proto::Event {
    let value = proto::summary::Value {
        tag: tag.to_string(),
        value: Some(proto::summary::value::Value::SimpleValue(value)),
    };
    proto::Event {
        wall_time,
        step,
        what: Some(proto::event::What::Summary(proto::Summary { value: vec![value] })),
        source_metadata: None,
    }
}

/// The parts of TensorFlow's `event.proto` and `summary.proto` (package `tensorboard` in the
/// tensorboard Python package's copies) that a scalar log uses; field numbers as there. prost
/// writes fields in field-number order, as the C++ and Python protobuf runtimes do, which is
/// what makes the bytes match PyTorch's.
mod proto {
    /// `Event`: `double wall_time = 1; int64 step = 2; oneof what { string file_version = 3;
    /// Summary summary = 5; SessionLog session_log = 7; ... } SourceMetadata source_metadata =
    /// 10;`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "event::What", tags = "3, 5, 7")]
        pub what: Option<event::What>,
        #[prost(message, optional, tag = "10")]
        pub source_metadata: Option<SourceMetadata>,
    }

    pub mod event {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum What {
            #[prost(string, tag = "3")]
            FileVersion(String),
            #[prost(message, tag = "5")]
            Summary(super::Summary),
            #[prost(message, tag = "7")]
            SessionLog(super::SessionLog),
        }
    }

    /// `SessionLog`: `SessionStatus status = 1; ...` (the checkpoint path and message are not
    /// written).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        #[prost(enumeration = "session_log::SessionStatus", tag = "1")]
        pub status: i32,
    }

    pub mod session_log {
        /// `SessionLog.SessionStatus`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
        #[repr(i32)]
        pub enum SessionStatus {
            StatusUnspecified = 0,
            Start = 1,
            Stop = 2,
            Checkpoint = 3,
        }
    }

    /// `SourceMetadata`: `string writer = 1;`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SourceMetadata {
        #[prost(string, tag = "1")]
        pub writer: String,
    }

    /// `Summary`: `repeated Value value = 1;`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<summary::Value>,
    }

    pub mod summary {
        /// `Summary.Value`: `string tag = 1; oneof value { float simple_value = 2; ... }`. In a
        /// oneof, so 0.0 is still written, as PyTorch writes it.
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Value {
            #[prost(string, tag = "1")]
            pub tag: String,
            #[prost(oneof = "value::Value", tags = "2")]
            pub value: Option<value::Value>,
        }

        pub mod value {
            #[derive(Clone, PartialEq, prost::Oneof)]
            pub enum Value {
                #[prost(float, tag = "2")]
                SimpleValue(f32),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TORCH_FIXTURE: &[u8] =
        include_bytes!("../tests/fixtures/tensorboard/torch_scalars.tfevents");

    /// The file-version event is the one record whose bytes differ from PyTorch's, by the
    /// writer name alone: with TensorBoard's name it is byte-identical.
    #[test]
    fn file_version_event_matches_tensorboards_with_its_writer_name() {
        let torch = read_records(TORCH_FIXTURE).unwrap();
        let wall_time = proto::Event::decode(torch[0]).unwrap().wall_time;
        let event = file_version_event(wall_time, "tensorboard.summary.writer.event_file_writer");
        let mut ours = Vec::new();
        write_record(&mut ours, &event.encode_to_vec()).unwrap();
        assert_eq!(read_records(&ours).unwrap(), vec![torch[0]]);
        assert_eq!(&TORCH_FIXTURE[..ours.len()], &ours[..]);
    }

    #[test]
    fn our_file_version_event_names_this_writer() {
        let bytes = EventWriter::from_writer(Vec::new(), "memory".into(), 12.5)
            .unwrap()
            .into_inner()
            .unwrap();
        let records = read_records(&bytes).unwrap();
        assert_eq!(records.len(), 1);
        let event = proto::Event::decode(records[0]).unwrap();
        assert_eq!(event, file_version_event(12.5, WRITER_NAME));
        assert_eq!(event.what, Some(proto::event::What::FileVersion("brain.Event:2".into())));
    }

    #[test]
    fn scalar_events_decode_to_what_was_logged() {
        let mut writer = EventWriter::from_writer(Vec::new(), "memory".into(), 1.0).unwrap();
        writer.add_scalars_at(7, &[("a", 0.5), ("b", -2.0)], 3.25).unwrap();
        let bytes = writer.into_inner().unwrap();
        let events: Vec<_> = read_records(&bytes)
            .unwrap()
            .iter()
            .map(|r| proto::Event::decode(*r).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1], scalar_event("a", 0.5, 7, 3.25));
        assert_eq!(events[2], scalar_event("b", -2.0, 7, 3.25));
    }
}
