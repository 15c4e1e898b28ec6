"""The check's inputs from a file: an .npz archive (one array per input name) or the JSON that
Polygraphy writes with `polygraphy run --save-inputs` (and reads with `--load-inputs`).

Polygraphy's file is a JSON list with one feed dict per iteration, {input name: array}; each array
is an object {"array": base64 of the .npy bytes, "polygraphy_class": "ndarray"} (older versions
mark it with "polygraphy_serialized_json_type" instead, and may wrap the array in an .npz). Every
feed of the list is checked.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import zipfile

import numpy as np

from .errors import first_line

_TYPE_MARKER = "polygraphy_class"
_LEGACY_MARKER = "polygraphy_serialized_json_type"


def load_inputs(path: str) -> list[dict[str, np.ndarray]]:
    """The feeds in `path` (an .npz holds one). ValueError with one line on anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ValueError(f"cannot read inputs from {path}: {exc.strerror or exc}") from None
    if head.startswith(b"PK") or head.startswith(b"\x93NUMPY"):  # a zip (.npz) or an .npy
        from .check import load_inputs_npz

        return [load_inputs_npz(path)]
    return _load_polygraphy_json(path)


def _load_polygraphy_json(path: str) -> list[dict[str, np.ndarray]]:
    def fail(why: str) -> ValueError:
        return ValueError(f"cannot read inputs from {path}: {why}")

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise fail(f"not valid JSON ({first_line(exc)})") from None
    if isinstance(data, dict):  # a single feed dict
        data = [data]
    if not isinstance(data, list) or not data:
        raise fail("expected Polygraphy's input format: a non-empty list of {input name: array}")
    feeds = []
    for index, feed in enumerate(data):
        if not isinstance(feed, dict) or not feed:
            raise fail(f"feed {index} is not a non-empty object of named arrays")
        try:
            feeds.append({name: _decode_array(value) for name, value in feed.items()})
        except ValueError as exc:
            raise fail(f"feed {index}: {exc}") from None
    return feeds


def _decode_array(value) -> np.ndarray:
    if not isinstance(value, dict) or not isinstance(value.get("array"), str) or not (
            value.get(_TYPE_MARKER) == "ndarray" or _LEGACY_MARKER in value.values()):
        raise ValueError("an input is not a Polygraphy-encoded array")
    try:
        raw = base64.b64decode(value["array"].encode(), validate=True)
    except (binascii.Error, ValueError):
        try:
            raw = value["array"].encode("latin-1")  # Polygraphy's oldest encoding
        except UnicodeEncodeError:
            raise ValueError("an array is neither base64 nor latin-1 text") from None
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"an array does not decode ({first_line(exc)})") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:  # an .npz wrapped by old Polygraphy versions: its one array
        if not loaded.files:
            raise ValueError("an encoded archive holds no array")
        return loaded[loaded.files[0]]
