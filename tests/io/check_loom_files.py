#!/usr/bin/env python3
"""Checks safetensors files written by loom (tests/io/write_loom_files.cpp) with the official package.

    check_loom_files.py <dir>      # <dir> holds the files and expected.json

numpy.safetensors is read with safetensors.numpy.load_file; bf16.safetensors (numpy has no bfloat16)
with safetensors.deserialize, decoding BF16 by hand. Either way the official parser validates the
file; the header layout (8-byte aligned data start, '{', space padding) is checked directly.
"""
import json
import struct
import sys

import numpy as np
import safetensors
from safetensors.numpy import load_file

NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64}


def check_layout(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0, f"{path}: data starts at {8 + n}, not a multiple of 8"
    header = raw[8 : 8 + n]
    assert header[:1] == b"{", f"{path}: header does not start with '{{'"
    assert header.rstrip(b" ").endswith(b"}"), f"{path}: header not padded with spaces"
    return json.loads(header)


def decode(dtype, shape, data):
    if dtype == "BF16":
        bits = np.frombuffer(bytes(data), dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(bytes(data), dtype=NP[dtype]).reshape(shape)


def main():
    d = sys.argv[1]
    with open(f"{d}/expected.json") as f:
        expected = json.load(f)
    failures = 0
    for file, want in expected.items():
        path = f"{d}/{file}"
        header = check_layout(path)
        names = [k for k in header if k != "__metadata__"]
        assert names == [t["name"] for t in want["tensors"]], f"{path}: header order {names}"
        assert header.get("__metadata__", {}) == want["metadata"], f"{path}: metadata {header.get('__metadata__')}"
        if any(t["dtype"] == "BF16" for t in want["tensors"]):
            with open(path, "rb") as f:
                items = safetensors.deserialize(f.read())
            got = {name: decode(v["dtype"], v["shape"], v["data"]) for name, v in items}
            dtypes = {name: v["dtype"] for name, v in items}
        else:
            got = load_file(path)
            dtypes = {name: {np.dtype(t).name: k for k, t in NP.items()}[a.dtype.name] for name, a in got.items()}
        assert sorted(got) == sorted(t["name"] for t in want["tensors"]), f"{path}: names {sorted(got)}"
        for t in want["tensors"]:
            a = got[t["name"]]
            ok = (
                dtypes[t["name"]] == t["dtype"]
                and list(a.shape) == t["shape"]
                and np.array_equal(a.astype(np.float64).ravel(), np.array(t["values"], dtype=np.float64))
            )
            if not ok:
                failures += 1
                print(f"FAIL {path}: {t['name']}: got {dtypes[t['name']]} {list(a.shape)} {a.ravel()[:8]}, "
                      f"want {t['dtype']} {t['shape']} {t['values'][:8]}")
        print(f"ok {path}: {len(want['tensors'])} tensors")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
