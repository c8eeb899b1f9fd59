"""TensorBoard event files: the fixture the Rust writer is checked against, and a check of a
training run's event files with TensorBoard's own reader.

Write mode (default; needs torch and tensorboard): PyTorch's `torch.utils.tensorboard.SummaryWriter`
logs the scalars listed in SCALARS with fixed wall times (the file-version event's wall time is
fixed too, by freezing `time.time` while the writer opens its file), and a second writer opened
with `purge_step=RESTART_STEP` (what a run continued from a checkpoint writes first) logs
RESTART_SCALARS, into policy-trainer/tests/fixtures/tensorboard/:
  - torch_scalars.tfevents, torch_restarted.tfevents: the event files PyTorch wrote (renamed:
    their names hold the host and pid);
  - scalars.json: what was logged (tag, value as Python's repr so nan/inf survive JSON, step,
    wall time), the file-version events' wall time and the restart step, for policy-trainer's
    tests/tensorboard_format.rs to log the same through its own writer and compare the bytes.

Check mode (needs tensorboard only): `--check DIR` reads every record of every event file in DIR
with TensorBoard's record reader (length and data CRCs verified, any error fatal), then the run
with `tensorboard.backend.event_processing.event_accumulator.EventAccumulator`, the loader behind
TensorBoard's scalar dashboard (which also hides what a crashed run logged past the step its
continuation restarted from), and prints the scalars. With `--metrics metrics.jsonl` it also
checks that they are exactly the trainer's records, tagged as Hugging Face's Trainer tags its logs
(see `expected_scalars`), each value rounded to float32; any difference is fatal.
The end-to-end test `tests/tests/train_e2e.rs` runs this check on a resumed run when
DPO_TENSORBOARD_PYTHON names a Python that has tensorboard (deploy/test.sh makes one).

Run: python tensorboard_events.py [--check DIR [--metrics METRICS_JSONL]]
"""
import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from unittest import mock

# Fixed instants (seconds since the epoch, with fractions that a float32 could not hold, so a
# writer that rounded wall_time through f32 would show up).
FILE_VERSION_WALL_TIME = 1767225600.123456
# (tag, value, step, wall time). Covers: step 0 (omitted on the wire), a step past 2^32 (a long
# varint), value 0.0 (still written: simple_value sits in a oneof), values that round when
# narrowed to float32 (0.1, 1/3), a subnormal float32, nan and both infinities, a negative step.
SCALARS = [
    ("train/loss", 0.6931471805599453, 0, 1767225601.5),
    ("train/loss", 0.1, 1, 1767225602.25),
    ("train/reward_accuracy", 0.0, 1, 1767225602.25),
    ("train/reward_accuracy", 1.0 / 3.0, 2, 1767225603.000001),
    ("train/grad_norm", 12345.678, 2, 1767225603.000001),
    ("train/lr", 1e-6, 3, 1767225604.75),
    ("eval/margin", -2.5, 10, 1767225610.0),
    ("eval/tiny", 1e-40, 11, 1767225611.0),
    ("eval/loss", float("nan"), 12, 1767225612.0),
    ("eval/loss", float("inf"), 13, 1767225613.0),
    ("eval/loss", float("-inf"), 14, 1767225614.0),
    ("big/step", 7.0, 2**40 + 3, 1767225615.0),
    ("negative/step", 8.0, -1, 1767225616.0),
]
# A continued run: restarted at step 5 (its checkpoint was step 4), then logging from there.
RESTART_STEP = 5
RESTART_WALL_TIME = 1767225700.654321
RESTART_SCALARS = [
    ("train/loss", 0.25, 5, 1767225701.5),
    ("eval/loss", 0.3, 6, 1767225702.5),
]

FIXTURE_DIR = (Path(__file__).resolve().parent.parent.parent
               / "policy-trainer" / "tests" / "fixtures" / "tensorboard")


def write_event_file(name, wall_time, scalars, purge_step=None):
    """Logs `scalars` through a SummaryWriter whose own events are stamped `wall_time`, and copies
    its one event file to FIXTURE_DIR/name."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as logdir:
        # The file-version event (and purge_step's events) take their wall time from
        # time.time() when the file is opened.
        with mock.patch("time.time", return_value=wall_time):
            writer = SummaryWriter(log_dir=logdir, purge_step=purge_step)
        for tag, value, step, scalar_wall_time in scalars:
            writer.add_scalar(tag, value, global_step=step, walltime=scalar_wall_time)
        writer.close()
        files = [f for f in os.listdir(logdir) if "tfevents" in f]
        if len(files) != 1:
            sys.exit(f"expected one event file in {logdir}, found {files}")
        FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(logdir, files[0]), FIXTURE_DIR / name)


def write_fixture():
    write_event_file("torch_scalars.tfevents", FILE_VERSION_WALL_TIME, SCALARS)
    write_event_file("torch_restarted.tfevents", RESTART_WALL_TIME, RESTART_SCALARS,
                     purge_step=RESTART_STEP)

    def listed(scalars):
        return [{"tag": tag, "value": repr(value), "step": step, "wall_time": wall_time}
                for tag, value, step, wall_time in scalars]

    spec = {
        "file_version_wall_time": FILE_VERSION_WALL_TIME,
        "scalars": listed(SCALARS),
        "restart": {
            "step": RESTART_STEP,
            "wall_time": RESTART_WALL_TIME,
            "scalars": listed(RESTART_SCALARS),
        },
    }
    (FIXTURE_DIR / "scalars.json").write_text(json.dumps(spec, indent=1) + "\n")
    print(f"wrote torch_scalars.tfevents, torch_restarted.tfevents and scalars.json in "
          f"{FIXTURE_DIR}")


def event_files(directory):
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and "tfevents" in p.name)
    if not files:
        sys.exit(f"no event files (names containing 'tfevents') in {directory}")
    return files


def check_records(path):
    """Every record through TensorBoard's own TFRecord reader; a CRC or truncation error is fatal
    (EventAccumulator would log it and stop reading quietly)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    reader = pywrap_tensorflow.PyRecordReader_New(str(path), 0, "", None)
    kinds = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        event = event_pb2.Event.FromString(reader.record())
        kinds.append(event.WhichOneof("what"))
        if event.HasField("file_version"):
            print(f"  file_version {event.file_version!r} at step {event.step}, wall_time "
                  f"{event.wall_time:.6f}, writer {event.source_metadata.writer!r}")
        if event.HasField("session_log"):
            status = event_pb2.SessionLog.SessionStatus.Name(event.session_log.status)
            print(f"  session_log {status} at step {event.step}")
    if not kinds or kinds[0] != "file_version":
        sys.exit(f"{path}: the first record is {kinds[:1]}, not the file-version event")
    print(f"  {len(kinds)} records, all CRCs valid")


def read_run(directory):
    """{tag: [(step, value)]} of the run in `directory`, as TensorBoard's loader shows it."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(directory), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hf_tag(key, is_eval):
    """The TensorBoard tag of a record key, as Hugging Face's Trainer makes it: `evaluate()`
    prefixes every metric that lacks it with `eval_`, then TensorBoardCallback's `rewrite_logs`
    turns `eval_X` into `eval/X`, `test_X` into `test/X` and anything else `X` into `train/X`."""
    if is_eval and not key.startswith("eval_"):
        key = "eval_" + key
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return prefix[:-1] + "/" + key[len(prefix):]
    return "train/" + key


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def expected_scalars(metrics_path):
    """{tag: [(step, value)]} that the trainer's records should show in TensorBoard: every number
    of each record except its `step` (the x axis), at that step; `kind` and nulls (non-finite
    values) are not numbers. Where an eval record has both `X` and `eval_X`, `eval_X` is the one
    shown."""
    expected = {}
    for line_no, line in enumerate(Path(metrics_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        is_eval = record.get("kind") == "eval"
        step = record["step"]
        chosen = {}
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = hf_tag(key, is_eval)
            if tag not in chosen or key.startswith("eval_"):
                chosen[tag] = value
        for tag, value in chosen.items():
            expected.setdefault(tag, []).append((step, f32(value)))
    return expected


def compare(shown, expected):
    problems = []
    for tag in sorted(set(shown) | set(expected)):
        got, want = shown.get(tag), expected.get(tag)
        if got is None:
            problems.append(f"{tag}: in metrics.jsonl, not in the event files")
        elif want is None:
            problems.append(f"{tag}: in the event files, not in metrics.jsonl")
        elif got != want:
            problems.append(f"{tag}: event files {got}\n    metrics.jsonl {want}")
    return problems


def check(directory, metrics_path):
    for path in event_files(directory):
        print(path)
        check_records(path)
    shown = read_run(directory)
    print(f"the run as TensorBoard shows it ({directory}):")
    for tag in sorted(shown):
        for step, value in shown[tag]:
            print(f"  {tag:<32} step {step:>14}  value {value!r}")
    if metrics_path:
        problems = compare(shown, expected_scalars(metrics_path))
        if problems:
            sys.exit("the event files differ from " + str(metrics_path) + ":\n  "
                     + "\n  ".join(problems))
        points = sum(len(v) for v in shown.values())
        print(f"{len(shown)} tags, {points} points: exactly the records of {metrics_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="DIR",
                        help="read the event files in DIR back with TensorBoard")
    parser.add_argument("--metrics", metavar="METRICS_JSONL",
                        help="with --check: the scalars must be exactly these records")
    args = parser.parse_args()
    if args.metrics and not args.check:
        parser.error("--metrics goes with --check")
    if args.check:
        check(args.check, args.metrics)
    else:
        write_fixture()


if __name__ == "__main__":
    main()
