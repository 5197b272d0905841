"""A stand-in for sd-scripts' train_network.py, for testing the kohya backend without a GPU.

It reads the TOML given with --config_file the way sd-scripts does (sections flattened), "trains" for
max_train_epochs (sleeping FAKE_EPOCH_SECONDS per epoch), writes {output_name}-{epoch:06d}.safetensors
every save_every_n_epochs before the last epoch and {output_name}.safetensors at the end, and appends
its output_dir to $FAKE_TRAIN_LOG so tests can see which trials ran.

With save_state it writes sd-scripts' state folders ``{output_name}-{epoch:06d}-state`` (and
``{output_name}-state`` at the end), accelerate's RNG file last; ``--resume FOLDER`` continues after
that folder's epoch, as sd-scripts does with the train_state.json it saves. Every epoch trained is
appended as "output_dir epoch" to $FAKE_EPOCH_LOG, so tests can count epochs trained twice. With
$FAKE_TB set it logs to TensorBoard as sd-scripts does: ``logging_dir/<log_prefix><timestamp>/network_train``, kohya's tag names.
"""

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--config_file", required=True)
parser.add_argument("--resume", default=None)
args = parser.parse_args()
flat = {}
for key, value in tomllib.loads(Path(args.config_file).read_text()).items():
    flat.update(value if isinstance(value, dict) else {key: value})
out = Path(flat["output_dir"])
name = flat.get("output_name", "last")
epochs = flat["max_train_epochs"]
every = flat.get("save_every_n_epochs") or epochs + 1
if os.environ.get("FAKE_TRAIN_LOG"):
    with open(os.environ["FAKE_TRAIN_LOG"], "a") as fh:
        fh.write(f"{out}\n")
if os.environ.get("FAKE_TRAIN_FAIL") and os.environ["FAKE_TRAIN_FAIL"] in str(out):
    print(os.environ.get("FAKE_TRAIN_FAIL_MESSAGE", "CUDA error: simulated crash"), file=sys.stderr)
    sys.exit(3)


def save_state(folder: Path, epoch: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "train_state.json").write_text('{"current_epoch": %d}' % epoch)
    (folder / "random_states_0.pkl").write_bytes(b"rng")


def tensorboard_log():
    if not (os.environ.get("FAKE_TB") and flat.get("logging_dir")):
        return None
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder = Path(flat["logging_dir"]) / (flat.get("log_prefix", "") + time.strftime("%Y%m%d%H%M%S")) / "network_train"
    return EventFileWriter(str(folder))


def log_scalars(writer, values, step):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
    writer.add_event(Event(step=step, wall_time=time.time(), summary=summary))


writer, steps_per_epoch = tensorboard_log(), 3
first = int(Path(args.resume).name.rsplit("-", 2)[1]) + 1 if args.resume else 1
for epoch in range(first, epochs + 1):
    time.sleep(float(os.environ.get("FAKE_EPOCH_SECONDS", "0.01")))
    if os.environ.get("FAKE_EPOCH_LOG"):
        with open(os.environ["FAKE_EPOCH_LOG"], "a") as fh:
            fh.write(f"{out} {epoch}\n")
    if writer is not None:
        for step in range((epoch - 1) * steps_per_epoch + 1, epoch * steps_per_epoch + 1):
            log_scalars(writer, {"loss/current": 0.2 / step, "loss/average": 0.2 / step, "lr/unet": 1e-4,
                                 "lr/textencoder": 5e-5}, step)
        log_scalars(writer, {"loss/epoch_average": 0.2 / epoch}, epoch)
        writer.flush()
    if epoch % every == 0 and epoch < epochs:
        (out / f"{name}-{epoch:06d}.safetensors").write_bytes(b"epoch %d" % epoch)
        if flat.get("save_state"):
            save_state(out / f"{name}-{epoch:06d}-state", epoch)
    print(f"epoch {epoch}/{epochs} done", flush=True)
(out / f"{name}.safetensors").write_bytes(b"final")
if flat.get("save_state"):
    save_state(out / f"{name}-state", epochs)
