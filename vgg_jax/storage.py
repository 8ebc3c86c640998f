"""Where runs and weights live: a local folder or Cloud Storage (`gs://bucket/path`), through
one layer, etils.epath (orbax's own path type; tensorstore moves the arrays).

Object storage has no appends and no renames of folders: `append_text` rewrites the object
(metrics and config history are small), `rename` copies then deletes. Local paths keep
POSIX behaviour (appends, atomic renames). epath reaches gs:// through TensorFlow's file
system when TensorFlow is installed, or through gcsfs with EPATH_USE_TF=false (what the
tests use against a GCS emulator on 127.0.0.1: STORAGE_EMULATOR_HOST, with tensorstore's
TENSORSTORE_GCS_HTTP_URL)."""
from __future__ import annotations

import os

from etils import epath

from vgg_jax.errors import UserError

SCHEMES = ("gs://",)


def is_remote(path) -> bool:
    return str(path).startswith(SCHEMES)


def absolute(path) -> str:
    """A path as the run records it: gs:// as given, a local one absolute."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(path, *parts) -> str:
    return "/".join([str(path).rstrip("/"), *parts]) if is_remote(path) else os.path.join(
        str(path), *parts)


def as_path(path) -> epath.Path:
    return epath.Path(absolute(path))


def exists(path) -> bool:
    return as_path(path).exists()


def isfile(path) -> bool:
    return as_path(path).is_file()


def isdir(path) -> bool:
    return as_path(path).is_dir()


def makedirs(path) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
    return as_path(path).read_text()


def write_text(path, text: str) -> None:
    """The whole file: written under a temporary name and renamed into place locally, one
    object write on Cloud Storage (atomic there)."""
    if is_remote(path):
        as_path(path).write_text(text)
        return
    tmp = f"{absolute(path)}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, absolute(path))


def append_text(path, text: str) -> None:
    """Append locally; on object storage, read and rewrite the object."""
    if not is_remote(path):
        with open(absolute(path), "a") as f:
            f.write(text)
        return
    old = read_text(path) if exists(path) else ""
    as_path(path).write_text(old + text)


def rename(src, dst) -> None:
    as_path(src).rename(as_path(dst))


def bucket(path) -> str:
    return str(path).split("://", 1)[1].split("/", 1)[0]


def check_reachable(path) -> None:
    """For gs:// paths: one line naming the bucket and what to set when it cannot be
    reached (no credentials, no emulator, no such bucket); local paths pass."""
    if not is_remote(path):
        return
    import logging
    import socket
    hint = ("set Google credentials (gcloud auth application-default login, or "
            "GOOGLE_APPLICATION_CREDENTIALS) or, for an emulator, STORAGE_EMULATOR_HOST and "
            "TENSORSTORE_GCS_HTTP_URL")
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        try:  # offline, the clients would retry for a minute before saying so
            socket.getaddrinfo("storage.googleapis.com", 443)
        except OSError as e:
            raise UserError(f"cannot reach bucket gs://{bucket(path)} (storage.googleapis.com: "
                            f"{e.strerror or e}): {hint}") from None
    root = epath.Path(f"gs://{bucket(path)}")
    quiet = logging.getLogger("gcsfs")  # it logs each failed try with its traceback
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        root.exists()
    except Exception as e:  # noqa: BLE001 (auth and transport errors share no type)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot reach bucket gs://{bucket(path)} ({type(e).__name__}: "
                        f"{first}): {hint}") from None
    finally:
        quiet.setLevel(level)
