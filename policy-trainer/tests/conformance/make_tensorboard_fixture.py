"""The TensorBoard event-file fixture, and a check of any event file with TensorBoard's reader.

Write mode (default): PyTorch's `torch.utils.tensorboard.SummaryWriter` logs the scalars listed in
SCALARS, with fixed wall times (the file-version event's wall time is fixed too, by freezing
`time.time` while the writer opens its file), into ../fixtures/tensorboard/:
  - torch_scalars.tfevents: the event file PyTorch wrote (renamed: its name holds the host and pid);
  - scalars.json: what was logged (tag, value as Python's repr so nan/inf survive JSON, step,
    wall time) and the file-version event's wall time, for policy-trainer's
    tests/tensorboard_format.rs to log the same through its own writer and compare the bytes.

Check mode: `--check FILE_OR_DIR` reads every record with TensorBoard's record reader (length and
data CRCs verified, any error fatal) and then the scalars with
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator`, the loader behind
TensorBoard's scalar dashboard, and prints them, so a person can confirm that a file the trainer
wrote reads back as the values it logged. A file from the Rust writer with the fixture's scalars:
  TENSORBOARD_SAMPLE_DIR=/tmp/tb cargo test -p policy-trainer --test tensorboard_format \
      write_sample_for_the_python_check -- --ignored

Run: python make_tensorboard_fixture.py [--check FILE_OR_DIR]   (needs torch and tensorboard)
"""
import argparse
import json
import math
import os
import shutil
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

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "tensorboard"


def write_fixture():
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as logdir:
        # The file-version event takes its wall time from time.time() when the file is opened.
        with mock.patch("time.time", return_value=FILE_VERSION_WALL_TIME):
            writer = SummaryWriter(log_dir=logdir)
        for tag, value, step, wall_time in SCALARS:
            writer.add_scalar(tag, value, global_step=step, walltime=wall_time)
        writer.close()
        files = [f for f in os.listdir(logdir) if "tfevents" in f]
        if len(files) != 1:
            sys.exit(f"expected one event file in {logdir}, found {files}")
        FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(logdir, files[0]), FIXTURE_DIR / "torch_scalars.tfevents")

    spec = {
        "file_version_wall_time": FILE_VERSION_WALL_TIME,
        "scalars": [
            {"tag": tag, "value": repr(value), "step": step, "wall_time": wall_time}
            for tag, value, step, wall_time in SCALARS
        ],
    }
    (FIXTURE_DIR / "scalars.json").write_text(json.dumps(spec, indent=1) + "\n")
    print(f"wrote {FIXTURE_DIR / 'torch_scalars.tfevents'} and scalars.json")


def event_files(path):
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and "tfevents" in p.name)
    if not files:
        sys.exit(f"no event files (names containing 'tfevents') under {path}")
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
            print(f"  file_version {event.file_version!r}, wall_time {event.wall_time:.6f}, "
                  f"writer {event.source_metadata.writer!r}")
    if not kinds or kinds[0] != "file_version":
        sys.exit(f"{path}: the first record is {kinds[:1]}, not the file-version event")
    print(f"  {len(kinds)} records, all CRCs valid")


def check(path_arg):
    from tensorboard.backend.event_processing import event_accumulator

    for path in event_files(path_arg):
        print(path)
        check_records(path)
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.SCALARS: 0}
        )
        acc.Reload()
        for tag in sorted(acc.Tags()["scalars"]):
            for e in acc.Scalars(tag):
                print(f"  {tag:<28} step {e.step:>14}  value {e.value!r:<24} "
                      f"wall_time {e.wall_time:.6f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="FILE_OR_DIR",
                        help="read event files back with TensorBoard and print their scalars")
    args = parser.parse_args()
    if args.check:
        check(args.check)
    else:
        write_fixture()


if __name__ == "__main__":
    main()
