"""What a training run records: metrics.jsonl (one JSON object per line, with `step`)
and TensorBoard event files, written by process 0 only and flushed at every write, so a
crash loses nothing that was logged.

The event files are what `tf.summary.scalar` writes (a file-version record, then one
`Event` holding a `Summary` of simple values per step, as TFRecords), built from
TensorFlow's own protos and written with `tf.io.TFRecordWriter` (local paths and every
filesystem tf.io.gfile knows). Not tf.summary: tensorflow-cpu no longer ships the
`tensorboard` package it needs. Not tensorboardX (until 2026-11-29): it imports PyTorch
when PyTorch is installed, 1.6-2.9 s of every start of train.py on the 2-core machine."""
from __future__ import annotations

import itertools
import json
import os
import socket
import tempfile
import time

import jax
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

from vgg_jax import storage

_FILES = itertools.count()  # this process's event files


class EventFile:
    """One TensorBoard event file in `logdir`, named as tf.summary names them (time, host,
    process id, a count within the process): a run started again, in another process or
    in this one, in the same second, starts a new file instead of overwriting one."""

    def __init__(self, logdir: str):
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_FILES)}.v2")
        self.path = storage.join(logdir, name)
        self._upload = storage.is_remote(logdir)  # written here, uploaded whole on flush
        if self._upload:
            self._local = tempfile.TemporaryDirectory(prefix="vgg_jax_events_")
            local = os.path.join(self._local.name, name)
        else:
            os.makedirs(logdir, exist_ok=True)
            local = self.path
        self._local_path = local
        self._writer = tf.io.TFRecordWriter(local)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._writer.write(event.SerializeToString())

    def scalars(self, step: int, values: dict[str, float]):
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                    summary=summary_pb2.Summary(value=values)))
        self._writer.flush()
        if self._upload:  # object storage has no appends: the file so far, as one object
            with open(self._local_path, "rb") as f:
                storage.as_path(self.path).write_bytes(f.read())

    def close(self):
        self._writer.close()
        if self._upload:
            self._local.cleanup()


class MetricWriter:
    """workdir/metrics.jsonl and workdir/tensorboard/ (process 0 only)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            self._path = storage.join(workdir, "metrics.jsonl")
            if storage.is_remote(workdir):  # rewritten whole at every write (no appends)
                self._jsonl = None
                self._text = storage.read_text(self._path) if storage.exists(self._path) else ""
            else:
                self._jsonl = open(self._path, "a")
            self._tb = EventFile(storage.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        line = json.dumps(dict(step=int(step), **clean)) + "\n"
        if self._jsonl is None:
            self._text += line
            storage.write_text(self._path, self._text)
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        self._tb.scalars(int(step), clean)

    def close(self):
        if self.active:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
