#!/usr/bin/env python3
"""Reads the file written by tests/io/write_h5_sample.cpp (loom's HDF5 writer) with h5py and
checks names, dtypes, shapes, values and attributes (CTest: io_h5py_interop).

    python3 tests/io/check_loom_h5.py FILE.h5

Exits 0 when everything matches, 1 with a list of the differences otherwise.
"""
import sys

import h5py
import numpy as np

Q = "unet/down_blocks/0/attn1/to_q"


def attrs_of(obj, errors):
    """The attributes of a group as Python values. loom writes strings as fixed-length UTF-8
    strings, which h5py returns as numpy.bytes_: they are decoded here (after checking the
    declared encoding); variable-length strings (str) are accepted too."""
    out = {}
    for k in obj.attrs:
        v = obj.attrs[k]
        if isinstance(v, bytes):
            info = h5py.check_string_dtype(obj.attrs.get_id(k).dtype)
            if info is None or info.encoding != "utf-8":
                errors.append(f"attribute {k}: string encoding {info}")
            v = v.decode("utf-8")
        out[k] = v
    return out


def main(path):
    errors = []

    def check(cond, msg):
        if not cond:
            errors.append(msg)

    with h5py.File(path, "r") as f:
        datasets, groups = {}, set()

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj
            else:
                groups.add(name)
        f.visititems(visit)

        expected = {
            Q + "/lora/down/weight": ("<f4", (2, 4), np.arange(8) * 0.5 - 1.0),
            Q + "/lora/up/weight": ("<f8", (3, 2), np.arange(6) * 0.375 + 0.0625),
            "scalar": ("<f4", (), np.array(2.5)),
            "empty": ("<f4", (0, 3), np.zeros((0, 3))),
            "steps": ("<i8", (3,), np.array([1, -2, 9007199254740993], dtype=np.int64)),
            "half": ("<f4", (2,), np.array([1.5, -0.15625])),  # bf16 widened to f32
        }
        check(set(datasets) == set(expected), f"datasets {sorted(datasets)} != {sorted(expected)}")
        for name, (dtype, shape, values) in expected.items():
            if name not in datasets:
                continue
            d = datasets[name]
            check(d.dtype == np.dtype(dtype), f"{name}: dtype {d.dtype.str} != {dtype}")
            check(d.shape == shape, f"{name}: shape {d.shape} != {shape}")
            # Non-empty tensors are chunked with a Fletcher-32 checksum; h5py reads them as usual.
            check(d.fletcher32 == (d.size > 0 and d.shape != ()), f"{name}: fletcher32 {d.fletcher32}")
            got = d[()]
            want = np.asarray(values).astype(np.dtype(dtype)).reshape(shape)
            check(np.array_equal(got, want), f"{name}: values {got!r} != {want!r}")
        # Creation order is tracked: h5py lists the root's members in the order loom wrote them.
        check(list(f.keys()) == ["unet", "scalar", "empty", "steps", "half", "extra"],
              f"root order {list(f.keys())}")

        root = attrs_of(f, errors)
        want_root = {"format": "loom", "format_version": 1, "kind": "lora", "base_fingerprint": "sha256:00ff",
                     "note": "\u00fcnic\u00f6de"}
        check(set(root) == set(want_root), f"root attributes {sorted(root)} != {sorted(want_root)}")
        for k, v in want_root.items():
            got = root.get(k)
            check(type(got) is type(v) or (isinstance(v, int) and isinstance(got, np.int64)),
                  f"root attribute {k}: type {type(got).__name__}")
            check(got == v, f"root attribute {k}: {got!r} != {v!r}")
        check(isinstance(root.get("format_version"), np.int64), "format_version is not int64")

        check(Q in groups, f"group {Q} missing")
        g = attrs_of(f[Q], errors) if Q in groups else {}
        check(g == {"rank": 2, "alpha": 4.0, "scaling": "alpha/r"}, f"group attributes {g}")
        check(isinstance(g.get("rank"), np.int64) and isinstance(g.get("alpha"), np.float64)
              and isinstance(g.get("scaling"), str), "group attribute types")
        check("extra/group" in groups, "group extra/group (attributes only) missing")
        if "extra/group" in groups:
            e = attrs_of(f["extra/group"], errors)
            check(e.get("empty_string") == "" and e.get("big") == -2**63, f"extra.group attributes {e}")

    if errors:
        print(f"{path}: {len(errors)} problem(s)")
        for e in errors:
            print("  " + e)
        return 1
    print(f"{path}: OK ({len(expected)} datasets, h5py {h5py.__version__})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: check_loom_h5.py FILE.h5", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
