"""Shared by the Python tests: the public vectors of tests/data, read with a tiny safetensors reader."""

import json
import os
import pathlib
import struct

import numpy as np
import pytest

DATA_DIR = pathlib.Path(os.environ.get("UNSHARD_TEST_DATA_DIR", pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"))

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def read_safetensors(path):
    """{name: numpy array} of a safetensors file (F32/F64/F16/int tensors; BF16 ones are skipped)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in _DTYPES:
            continue
        begin, end = t["data_offsets"]
        a = np.frombuffer(blob, dtype=_DTYPES[t["dtype"]], count=(end - begin) // np.dtype(_DTYPES[t["dtype"]]).itemsize,
                          offset=base + begin)
        out[name] = a.reshape(t["shape"])  # read-only views of the file's bytes
    return out


class DenoiseCase:
    """liveavatar_denoise_a: the config with its streaming/scheduler sections, the weights (with the
    inputs and refs in the same file), and the official draws per (clip, block)."""

    def __init__(self, name):
        self.config = DATA_DIR / (name + ".config.json")
        self.weights = DATA_DIR / (name + ".safetensors")
        self.tensors = read_safetensors(self.weights)
        loop = json.loads(self.config.read_text())["streaming"]
        self.clips, self.blocks_per_clip = loop["clips"], loop["blocks_per_clip"]
        t = self.tensors
        self.draws = {}
        for d, (clip, block, step) in zip(t["input.relative_dist"], t["input.call_clip_block_step"]):
            self.draws.setdefault((int(clip), int(block)), {})[int(step)] = d
        self.draws = {k: [v[s] for s in sorted(v)] for k, v in self.draws.items()}

    def sink_inputs(self):
        t = self.tensors
        return dict(ref_latents=t["input.ref_latents"], motion_latents=t["input.motion_latents"], context=t["input.context"])

    def block_inputs(self, clip, block, with_draws=True):
        t = self.tensors
        p = "input.clip%d.block%d." % (clip, block)
        d = dict(noise=t[p + "noise"], audio=t[p + "audio"], cond_states=t[p + "cond_states"])
        if with_draws:
            d["relative_dist"] = self.draws[(clip, block)]
        return d

    def blocks(self):
        return [(r, b) for r in range(self.clips) for b in range(self.blocks_per_clip)]

    def ref(self, name):
        return self.tensors["ref." + name]


@pytest.fixture(scope="session")
def denoise_case():
    return DenoiseCase("liveavatar_denoise_a")


def within_rule(got, ref):
    """docs/conventions.md: max|got - ref| <= 1e-5 * max(1, max|ref|), per tensor."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err, tol = float(np.max(np.abs(got - ref))), 1e-5 * max(1.0, float(np.max(np.abs(ref))))
    return err <= tol, err, tol
