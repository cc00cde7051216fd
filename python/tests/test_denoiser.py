"""unshard.LiveAvatarDenoiser against the official references of liveavatar_denoise_a, the schedules
against each other bit for bit, the input rules (in place, converted, refused) and the ledger."""

import json
import re
import struct
import threading

import numpy as np
import pytest

import unshard
from conftest import within_rule

# ---- helpers ---------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _mix(x):  # splitmix64's finaliser, as s2v_relative_dist_draws
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def seeded_draw(seed, clip, block, step):
    h = _mix(seed ^ 0x5851F42D4C957F2D)
    for v in (clip, block, step):
        h = _mix(h ^ _mix(v + 1))
    return 4 + h % 27


def make(case, **kw):
    return unshard.LiveAvatarDenoiser(case.config, case.weights, **kw)


def sunk(case, **kw):
    den = make(case, **kw)
    den.sink(**case.sink_inputs())
    return den


def check_block(case, result, clip, block, all_steps):
    name = "clip%d.block%d" % (clip, block)
    latent = result["latent"] if all_steps else result
    assert latent.dtype == np.float32 and latent.shape == case.ref(name + ".latent").shape
    ok, err, tol = within_rule(latent, case.ref(name + ".latent"))
    assert ok, "%s.latent: max|got - ref| = %g > %g" % (name, err, tol)
    if not all_steps:
        return
    assert (result["clip"], result["block"]) == (clip, block)
    for i, (noise_pred, step_latent) in enumerate(zip(result["noise_pred"], result["step_latent"])):
        for what, got in (("noise_pred", noise_pred), ("latent", step_latent)):
            ok, err, tol = within_rule(got, case.ref("%s.step%d.%s" % (name, i, what)))
            assert ok, "%s.step%d.%s: max|got - ref| = %g > %g" % (name, i, what, err, tol)


# ---- the references --------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["steps", "replicated"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_denoise_block_matches_the_official_references(denoise_case, world_size, schedule):
    den = sunk(denoise_case, world_size=world_size, schedule=schedule, policy="prefetch:1")
    for clip, block in denoise_case.blocks():
        assert den.next_block == (clip, block)
        r = den.denoise_block(**denoise_case.block_inputs(clip, block), all_steps=True)
        check_block(denoise_case, r, clip, block, all_steps=True)
    assert den.next_block == (1, 0)


@pytest.mark.parametrize("schedule", ["steps", "replicated"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_denoise_blocks_in_flight_matches_the_official_references(denoise_case, world_size, schedule):
    den = sunk(denoise_case, world_size=world_size, schedule=schedule, policy="chunked:4KiB+prefetch:1")
    blocks = [denoise_case.block_inputs(c, b) for c, b in denoise_case.blocks()]
    latents = list(den.denoise_blocks(blocks))
    assert len(latents) == len(blocks)
    for (clip, block), latent in zip(denoise_case.blocks(), latents):
        check_block(denoise_case, latent, clip, block, all_steps=False)
    if schedule == "steps" and world_size > 1:
        # Both blocks in one pipeline: 1 sink tick + (blocks + steps - 1) ticks.
        assert den.ticks_run == 1 + len(blocks) + den.steps - 1
    results = list(den.denoise_blocks(blocks, all_steps=True))  # the same blocks again, positions explicit below
    assert [(r["clip"], r["block"]) for r in results] == [(1, 0), (1, 1)]


def test_denoise_blocks_window_and_explicit_positions(denoise_case):
    den = sunk(denoise_case, world_size=2)
    blocks = [dict(denoise_case.block_inputs(c, b), clip=c, block=b) for c, b in denoise_case.blocks()]
    got = list(den.denoise_blocks(iter(blocks), window=1))
    for (clip, block), latent in zip(denoise_case.blocks(), got):
        check_block(denoise_case, latent, clip, block, all_steps=False)
    with pytest.raises(ValueError, match="window"):
        list(den.denoise_blocks(blocks, window=0))


# ---- schedules and GEMM paths ----------------------------------------------------------------


def run_seeded(case, blocks=4, **kw):
    """Two clips of the case's blocks with seeded draws (clip 1 wraps every step's noisy cache)."""
    den = sunk(case, gemm="portable", seed=11, **kw)
    inputs = [case.block_inputs(0, k % case.blocks_per_clip, with_draws=False) for k in range(blocks)]
    return list(den.denoise_blocks(inputs, all_steps=True))


def test_steps_schedule_equals_replicated_bit_for_bit_with_the_portable_gemm(denoise_case):
    sequential = run_seeded(denoise_case, world_size=1, schedule="replicated", policy="full")
    for world_size, schedule in [(1, "steps"), (3, "steps"), (4, "steps"), (2, "replicated")]:
        got = run_seeded(denoise_case, world_size=world_size, schedule=schedule, policy="chunked:4KiB+prefetch:2")
        for a, b in zip(sequential, got):
            assert (a["clip"], a["block"]) == (b["clip"], b["block"])
            assert np.array_equal(a["latent"], b["latent"]), (world_size, schedule)
            for x, y in zip(a["noise_pred"] + a["step_latent"], b["noise_pred"] + b["step_latent"]):
                assert np.array_equal(x, y)


def test_seeded_draws_are_s2v_relative_dist_draws(denoise_case):
    seeded = sunk(denoise_case, gemm="portable", seed=5)
    explicit = sunk(denoise_case, gemm="portable", seed=123)
    for clip, block in denoise_case.blocks():
        a = seeded.denoise_block(**denoise_case.block_inputs(clip, block, with_draws=False))
        draws = [seeded_draw(5, clip, block, s) for s in range(explicit.steps)]
        # ints, integral floats and a float32 array are the same draws
        for rd in (draws, [float(d) for d in draws], np.asarray(draws, dtype=np.float32)):
            b = explicit.denoise_block(**denoise_case.block_inputs(clip, block, with_draws=False), relative_dist=rd,
                                       clip=clip, block=block)
            assert np.array_equal(a, b)


def test_blas_and_portable_agree_within_the_rule(denoise_case):
    a = sunk(denoise_case, gemm="blas").denoise_block(**denoise_case.block_inputs(0, 0))
    b = sunk(denoise_case, gemm="portable").denoise_block(**denoise_case.block_inputs(0, 0))
    assert within_rule(a, b)[0]


# ---- inputs: in place, converted, refused ----------------------------------------------------


def test_f32_contiguous_arrays_are_read_in_place():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert unshard._debug_view_pointer(a) == a.ctypes.data
    v = a[1]  # a contiguous view at an offset
    assert unshard._debug_view_pointer(v) == v.ctypes.data
    ro = np.frombuffer(a.tobytes(), dtype=np.float32)  # read-only memory is fine
    assert unshard._debug_view_pointer(ro) == ro.ctypes.data
    for other in (a.astype(np.float64), a[:, ::2], a.transpose(1, 0, 2), np.asfortranarray(a), a[::-1]):
        assert unshard._debug_view_pointer(other) != other.ctypes.data


def test_inputs_converted_once_give_the_same_latent(denoise_case):
    inputs = denoise_case.block_inputs(0, 0)
    base = sunk(denoise_case).denoise_block(**{k: np.array(v) for k, v in inputs.items()})
    den = sunk(denoise_case)
    assert den._last_converted == []  # the sink's inputs were read in place too
    noise = np.ascontiguousarray(inputs["noise"], dtype=np.float64)  # exact: the values are float32
    audio = np.asfortranarray(inputs["audio"])
    cond = np.ascontiguousarray(np.swapaxes(np.swapaxes(inputs["cond_states"], -1, -2).copy(), -1, -2))  # contiguous again
    cond_strided = np.swapaxes(np.swapaxes(inputs["cond_states"], -1, -2).copy(), -1, -2)  # same values, strided
    got = den.denoise_block(noise=noise, audio=audio, cond_states=cond_strided, relative_dist=inputs["relative_dist"])
    assert sorted(den._last_converted) == ["audio", "cond_states", "noise"]
    assert np.array_equal(got, base)
    den2 = sunk(denoise_case)
    got = den2.denoise_block(noise=np.array(inputs["noise"]), audio=np.array(inputs["audio"]), cond_states=cond,
                             relative_dist=inputs["relative_dist"])
    assert den2._last_converted == []
    assert np.array_equal(got, base)
    # Negative strides (a reversed view of reversed data) read the same values.
    den4 = sunk(denoise_case)
    reversed_noise = np.ascontiguousarray(inputs["noise"][..., ::-1])[..., ::-1]
    got = den4.denoise_block(noise=reversed_noise, audio=inputs["audio"], cond_states=inputs["cond_states"],
                             relative_dist=inputs["relative_dist"])
    assert den4._last_converted == ["noise"] and np.array_equal(got, base)
    # float16 and integer inputs are converted (different values: only checked to run).
    got = den4.denoise_block(noise=inputs["noise"].astype(np.float16), audio=inputs["audio"].astype(np.int8),
                             cond_states=inputs["cond_states"], relative_dist=inputs["relative_dist"])
    assert sorted(den4._last_converted) == ["audio", "noise"] and np.isfinite(got).all()
    # Nested lists go through numpy.
    den3 = sunk(denoise_case)
    got = den3.denoise_block(noise=inputs["noise"].tolist(), audio=inputs["audio"], cond_states=inputs["cond_states"],
                             relative_dist=inputs["relative_dist"])
    assert den3._last_converted == ["noise"] and np.array_equal(got, base)


def test_bad_inputs_raise_naming_the_argument(denoise_case):
    den = make(denoise_case)
    block = denoise_case.block_inputs(0, 0)
    with pytest.raises(RuntimeError, match="before sink"):
        den.denoise_block(**block)
    with pytest.raises(RuntimeError, match="before sink"):
        list(den.denoise_blocks([block]))
    s = denoise_case.sink_inputs()
    with pytest.raises(ValueError, match="ref_latents has shape"):
        den.sink(**dict(s, ref_latents=np.zeros((16, 1, 8, 15), np.float32)))
    with pytest.raises(ValueError, match="context has shape"):
        den.sink(**dict(s, context=np.zeros((17, 48), np.float32)))  # longer than text_len = 16
    with pytest.raises(ValueError, match="audio has shape"):
        den.sink(**s, audio=np.zeros((25, 32, 11), np.float32))
    assert not den.sunk
    den.sink(**s)
    assert den.sunk
    with pytest.raises(ValueError, match=r"^noise has shape \(16, 3, 8, 15\), expected \(16, 3, 8, 16\)"):
        den.denoise_block(**dict(block, noise=np.zeros((16, 3, 8, 15), np.float32)))
    with pytest.raises(ValueError, match="cond_states has shape"):
        den.denoise_block(**dict(block, cond_states=np.zeros((16, 2, 8, 16), np.float32)))
    with pytest.raises(ValueError, match="audio has shape"):
        den.denoise_block(**dict(block, audio=np.zeros((25, 32, 13), np.float32)))
    with pytest.raises(ValueError, match=r"relative_dist has 3 values, expected one per denoising step \(4\)"):
        den.denoise_block(**dict(block, relative_dist=[5, 6, 7]))
    with pytest.raises(ValueError, match=r"relative_dist\[1\] is 6.5, not an integer"):
        den.denoise_block(**dict(block, relative_dist=[5, 6.5, 7, 8]))
    with pytest.raises(TypeError, match=r"relative_dist\[0\] is a str"):
        den.denoise_block(**dict(block, relative_dist=["5", 6, 7, 8]))
    with pytest.raises(TypeError, match="noise has dtype complex64"):
        den.denoise_block(**dict(block, noise=block["noise"].astype(np.complex64)))
    with pytest.raises(TypeError, match="noise is a str, not an array"):
        den.denoise_block(**dict(block, noise="not an array"))
    with pytest.raises(TypeError, match="audio is None"):
        den.denoise_block(**dict(block, audio=None))
    with pytest.raises(ValueError, match=r"block is 2, past the clip's 2 blocks"):
        den.denoise_block(**block, block=2)
    with pytest.raises(ValueError, match=r"blocks\[1\]\['noise'\] has shape"):
        list(den.denoise_blocks([block, dict(block, noise=np.zeros((3, 3), np.float32))]))
    with pytest.raises(ValueError, match=r"blocks\[0\] has an unknown key 'nosie'"):
        list(den.denoise_blocks([dict(block, nosie=1)]))
    with pytest.raises(ValueError, match=r"blocks\[0\] has no 'audio'"):
        list(den.denoise_blocks([{k: v for k, v in block.items() if k != "audio"}]))
    with pytest.raises(TypeError, match=r"blocks\[0\] is a list"):
        list(den.denoise_blocks([[1, 2]]))
    # Nothing above reached a rank: the stream is where it was and still runs.
    assert den.next_block == (0, 0)
    check_block(denoise_case, den.denoise_block(**block), 0, 0, all_steps=False)


def test_bad_constructor_arguments(denoise_case, tmp_path):
    # backend="cuda" without CUDA built in, or without a device: test_cuda_backend.py.
    with pytest.raises(ValueError, match="backend must be"):
        make(denoise_case, backend="tpu")
    with pytest.raises(ValueError, match="prefetch:0"):
        make(denoise_case, policy="prefetch:0")
    with pytest.raises(ValueError, match="schedule"):
        make(denoise_case, schedule="pipelined")
    with pytest.raises(ValueError, match="gemm"):
        make(denoise_case, gemm="cublas")
    with pytest.raises(ValueError, match="dtype"):
        make(denoise_case, dtype="f16")
    with pytest.raises(ValueError, match="world_size"):
        make(denoise_case, world_size=0)
    with pytest.raises(ValueError, match="devices"):
        make(denoise_case, devices=[0])
    with pytest.raises(FileNotFoundError):
        unshard.LiveAvatarDenoiser(denoise_case.config, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        make(denoise_case, budget="64KiB")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        unshard.LiveAvatarDenoiser(bad, denoise_case.weights)


def _rewrite_safetensors(src, dst, drop=(), add=None):
    """Copies src to dst without the tensors named in `drop`, with `add` ({name: float32 array}) added."""
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, base = json.loads(blob[8 : 8 + n]), 8 + n
    out_header, chunks, offset = {}, [], 0
    for name, t in header.items():
        if name == "__metadata__" or name in drop:
            continue
        begin, end = t["data_offsets"]
        chunks.append(blob[base + begin : base + end])
        out_header[name] = dict(t, data_offsets=[offset, offset + end - begin])
        offset += end - begin
    for name, a in (add or {}).items():
        data = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        out_header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    h = json.dumps(out_header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def test_weights_unknown_and_missing_tensors(denoise_case, tmp_path):
    extra = tmp_path / "extra.safetensors"
    _rewrite_safetensors(denoise_case.weights, extra, add={"extra.weight": np.zeros(2, np.float32)})
    with pytest.warns(UserWarning, match="unknown tensor 'extra.weight' ignored"):
        den = unshard.LiveAvatarDenoiser(denoise_case.config, extra)
    den.sink(**denoise_case.sink_inputs())
    check_block(denoise_case, den.denoise_block(**denoise_case.block_inputs(0, 0)), 0, 0, all_steps=False)
    with pytest.raises(ValueError, match=r"unknown tensor 'extra.weight' \(strict=True\)"):
        unshard.LiveAvatarDenoiser(denoise_case.config, extra, strict=True)
    missing = tmp_path / "missing.safetensors"
    _rewrite_safetensors(denoise_case.weights, missing, drop={"head.head.weight"})
    with pytest.raises(ValueError, match="missing tensor 'head.head.weight'"):
        unshard.LiveAvatarDenoiser(denoise_case.config, missing, world_size=2)
    bad = tmp_path / "misshapen.safetensors"
    _rewrite_safetensors(denoise_case.weights, bad, drop={"head.head.bias"},
                         add={"head.head.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"tensor 'head.head.bias' has shape \[3\], the model expects"):
        unshard.LiveAvatarDenoiser(denoise_case.config, bad)


def test_a_plain_s2v_config_takes_live_avatars_defaults_and_the_keywords(denoise_case, tmp_path):
    plain = tmp_path / "config.json"
    plain.write_text(json.dumps(json.loads(denoise_case.config.read_text())["model"]))
    den = unshard.LiveAvatarDenoiser(plain, denoise_case.weights)
    loop = den.loop
    assert loop["latent_hw"] == (48, 88) and loop["blocks_per_clip"] == 4 and loop["steps"] == 4 and loop["shift"] == 3.0
    assert loop["frames_per_block"] == 3 and loop["noisy_cache_tokens"] == 4 * 3 * 24 * 44  # one clip
    assert den.input_shapes["noise"] == (16, 3, 48, 88) and den.input_shapes["audio"] == (25, 32, 12)
    den = unshard.LiveAvatarDenoiser(plain, denoise_case.weights, size="128x128", blocks_per_clip=2, steps=2, shift=5.0,
                                     world_size=2, audio_frames=16)
    assert den.loop["latent_hw"] == (16, 16) and den.blocks_per_clip == 2 and den.steps == 2
    assert den.loop["noisy_cache_tokens"] == 2 * 3 * 8 * 8 and den.loop["audio_frames"] == 16
    assert len(den.timesteps) == 2 and den.sigmas[-1] == 0.0
    rng = np.random.default_rng(0)
    shapes = den.input_shapes
    den.sink(ref_latents=rng.standard_normal(shapes["ref_latents"], dtype=np.float32),
             motion_latents=rng.standard_normal(shapes["motion_latents"], dtype=np.float32),
             context=rng.standard_normal((5, 48), dtype=np.float32))
    for _ in range(3):  # into clip 1
        latent = den.denoise_block(**{k: rng.standard_normal(shapes[k], dtype=np.float32) for k in ("noise", "audio", "cond_states")})
        assert latent.shape == den.latent_shape == (16, 3, 16, 16) and np.isfinite(latent).all()
    assert den.next_block == (1, 1)
    assert unshard.LiveAvatarDenoiser(plain, denoise_case.weights, size=(256, 128)).loop["latent_hw"] == (16, 32)
    # The config's streaming section wins over the defaults, explicit keywords over both; its
    # kv_cache sizes stay, so another size must fit them.
    assert make(denoise_case).loop["latent_hw"] == (8, 16)
    assert make(denoise_case, steps=2).steps == 2
    with pytest.raises(ValueError, match="noisy cache of 192 tokens is not a positive multiple of the block's 384"):
        make(denoise_case, size=(256, 128))


# ---- the ledger ------------------------------------------------------------------------------


def test_plan_and_peaks(denoise_case):
    den = sunk(denoise_case, world_size=3, schedule="steps", policy="prefetch:1")
    plan = den.plan()
    assert plan["world_size"] == 3 and plan["schedule"] == "steps" and plan["policy"]
    assert len(plan["ranks"]) == 3
    assert plan["peak_bytes"] == max(r["peak_bytes"] for r in plan["ranks"])
    for r in plan["ranks"]:
        assert set(r["terms"]) == {"shards", "resident", "gathered", "activations", "workspace", "kv_cache"}
        assert sum(r["terms"].values()) == r["peak_bytes"]
    # rank 0 runs steps 0 and 3: two noisy caches, the others one each
    kv = [r["terms"]["kv_cache"] for r in plan["ranks"]]
    assert kv[0] > kv[1] == kv[2] > 0
    list(den.denoise_blocks([denoise_case.block_inputs(c, b) for c, b in denoise_case.blocks()]))
    peaks = den.peaks()
    assert [p["rank"] for p in peaks] == [0, 1, 2]
    for p, r in zip(peaks, plan["ranks"]):
        assert p["planned_peak_bytes"] == r["peak_bytes"]
        assert 0 < p["measured_peak_bytes"] <= p["planned_peak_bytes"]
        assert p["bytes_gathered"] > 0
    # the sink, then one forward per owned step and block
    assert [p["forwards"] for p in peaks] == [1 + 2 * 2, 1 + 2, 1 + 2]


# ---- instances and threads -------------------------------------------------------------------


def test_instances_are_independent_and_run_in_threads(denoise_case):
    a = sunk(denoise_case, world_size=2, gemm="portable")
    b = sunk(denoise_case, world_size=1, schedule="replicated", gemm="portable")
    blocks = denoise_case.blocks()
    got_a = [a.denoise_block(**denoise_case.block_inputs(*blocks[0]))]
    got_b = [b.denoise_block(**denoise_case.block_inputs(*blocks[0]))]
    got_a.append(a.denoise_block(**denoise_case.block_inputs(*blocks[1])))
    got_b.append(b.denoise_block(**denoise_case.block_inputs(*blocks[1])))
    for x, y in zip(got_a, got_b):
        assert np.array_equal(x, y)

    results, errors = {}, []

    def work(key, **kw):
        try:
            den = sunk(denoise_case, gemm="portable", **kw)
            results[key] = list(den.denoise_blocks([denoise_case.block_inputs(c, r) for c, r in blocks]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,), kwargs=dict(world_size=w)) for k, w in (("one", 1), ("three", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for x, y, z in zip(results["one"], results["three"], got_a):
        assert np.array_equal(x, y) and np.array_equal(x, z)


# ---- torch (skipped where it is not installed; CI never installs it) -------------------------


def test_torch_tensors_in(denoise_case):
    torch = pytest.importorskip("torch")
    base = sunk(denoise_case).denoise_block(**denoise_case.block_inputs(0, 0))
    den = make(denoise_case)
    den.sink(**{k: torch.from_numpy(np.array(v)) for k, v in denoise_case.sink_inputs().items()})
    assert den._last_converted == []
    inputs = {k: torch.from_numpy(np.array(v)) for k, v in denoise_case.block_inputs(0, 0).items() if k != "relative_dist"}
    assert unshard._debug_view_pointer(inputs["noise"]) == inputs["noise"].data_ptr()
    inputs["audio"] = inputs["audio"].double()
    got = den.denoise_block(**inputs, relative_dist=torch.tensor(denoise_case.draws[(0, 0)]))
    assert den._last_converted == ["audio"]
    assert np.array_equal(got, base)
    assert torch.equal(torch.from_numpy(got), torch.from_numpy(base))


# ---- argument checks: ranges, bools, files ---------------------------------------------------


def test_relative_dist_outside_the_official_range_is_refused_before_any_rank_runs(denoise_case):
    den = sunk(denoise_case)
    ticks = den.ticks_run
    block = denoise_case.block_inputs(0, 0, with_draws=False)
    for bad, at, value in (([-5, 4, 5, 6], 0, -5), ([4, 0, 5, 6], 1, 0), ([4, 5, 3, 6], 2, 3), ([4, 5, 6, 31], 3, 31),
                           ([10**9, 4, 5, 6], 0, 10**9), ([2**63 - 1] * 4, 0, 2**63 - 1), ([-2**63] * 4, 0, -2**63)):
        with pytest.raises(ValueError, match=r"^relative_dist\[%d\] = %d is outside \[4, 30\]" % (at, value)):
            den.denoise_block(**block, relative_dist=bad)
        with pytest.raises(ValueError, match=r"^blocks\[1\]\['relative_dist'\]\[%d\] = %d is outside \[4, 30\]" % (at, value)):
            list(den.denoise_blocks([dict(block, relative_dist=[4, 30, 4, 30]), dict(block, relative_dist=bad, block=1)]))
    # Nothing ran: the stream is where it was, and both ends of the range are accepted.
    assert den.next_block == (0, 0) and den.ticks_run == ticks
    den.denoise_block(**block, relative_dist=[4, 30, 4, 30])
    assert den.next_block == (0, 1)


@pytest.mark.parametrize("kw", ["world_size", "steps", "blocks_per_clip", "clips", "audio_frames", "seed"])
def test_negative_and_bool_integer_keywords_are_refused_naming_them(denoise_case, kw):
    with pytest.raises(ValueError, match=r"^%s must be (at least 1|a non-negative integer) \(got -1\)" % kw):
        make(denoise_case, **{kw: -1})
    with pytest.raises(TypeError, match=r"^%s must be an integer, not a bool" % kw):
        make(denoise_case, **{kw: True})
    with pytest.raises(TypeError, match=r"^%s must be an integer, got a float" % kw):
        make(denoise_case, **{kw: 2.0})


def test_world_size_over_the_maximum_is_refused_at_once(denoise_case):
    for n in (1025, 2**31, 2**40, 2**63, 2**64 + 1, 10**30):
        with pytest.raises(ValueError, match=r"^world_size is %d, beyond the supported 1024" % n):
            make(denoise_case, world_size=n)


def test_budget_must_be_a_non_negative_byte_count_not_a_bool(denoise_case):
    with pytest.raises(TypeError, match=r"^budget must be a byte count"):
        make(denoise_case, budget=True)
    with pytest.raises(TypeError, match=r"^budget must be a byte count"):
        make(denoise_case, budget=1.5)
    with pytest.raises(ValueError, match=r"^budget must be a non-negative integer \(got -1\)"):
        make(denoise_case, budget=-1)
    assert make(denoise_case, budget=0).plan()["budget_bytes"] == 0  # 0: no budget, as None


def test_seed_takes_any_64_bit_value(denoise_case):
    assert make(denoise_case, seed=2**64 - 1).loop["seed"] == 2**64 - 1
    with pytest.raises(ValueError, match=r"^seed is %d, beyond the largest 64-bit value" % 2**64):
        make(denoise_case, seed=2**64)


def test_negative_or_bool_clip_and_block_are_refused_naming_them(denoise_case):
    den = sunk(denoise_case)
    block = denoise_case.block_inputs(0, 0)
    for key in ("clip", "block"):
        with pytest.raises(ValueError, match=r"^%s must be a non-negative integer \(got -1\)" % key):
            den.denoise_block(**block, **{key: -1})
        with pytest.raises(TypeError, match=r"^%s must be an integer, not a bool" % key):
            den.denoise_block(**block, **{key: False})
        with pytest.raises(ValueError, match=r"^blocks\[0\]\['%s'\] must be a non-negative integer \(got -1\)" % key):
            list(den.denoise_blocks([dict(block, **{key: -1})]))
    assert den.next_block == (0, 0)


def test_a_directory_or_a_binary_file_as_config_is_refused_naming_it(denoise_case, tmp_path):
    with pytest.raises(IsADirectoryError, match="config") as e:
        unshard.LiveAvatarDenoiser(tmp_path, denoise_case.weights)
    assert e.value.filename == str(tmp_path)
    with pytest.raises(ValueError, match=r"^config: liveavatar config '%s': invalid JSON" % str(denoise_case.weights).replace("\\", "\\\\")):
        unshard.LiveAvatarDenoiser(denoise_case.weights, denoise_case.weights)  # a safetensors file: binary


def test_nan_and_inf_are_refused_naming_the_argument_and_index(denoise_case, tmp_path):
    def index(a, flat):  # the index the error names, as Python writes a tuple
        return re.escape(str(tuple(int(i) for i in np.unravel_index(flat, a.shape))))

    den = make(denoise_case)
    s = denoise_case.sink_inputs()
    ref = s["ref_latents"].copy()
    ref.flat[37] = np.nan
    with pytest.raises(ValueError, match=r"^ref_latents has NaN at index %s; inputs must be finite" % index(ref, 37)):
        den.sink(**dict(s, ref_latents=ref))
    den.sink(**s)
    block = denoise_case.block_inputs(0, 0)
    noise = block["noise"].astype(np.float64)  # converted: the index is still the caller's
    noise.flat[101] = -np.inf
    with pytest.raises(ValueError, match=r"^noise has -Inf at index %s \(after conversion to float32\)" % index(noise, 101)):
        den.denoise_block(**dict(block, noise=noise))
    big = block["audio"].astype(np.float64)
    big.flat[7] = 1e39  # finite in float64, beyond float32
    with pytest.raises(ValueError, match=r"^audio has \+Inf at index %s" % index(big, 7)):
        den.denoise_block(**dict(block, audio=big))
    cond = block["cond_states"].copy()
    cond.flat[0] = np.nan
    with pytest.raises(ValueError, match=r"^blocks\[1\]\['cond_states'\] has NaN"):
        list(den.denoise_blocks([block, dict(block, cond_states=cond)]))
    # Nothing reached a rank; a NaN weight is refused while loading, naming the tensor and element.
    assert den.next_block == (0, 0)
    check_block(denoise_case, den.denoise_block(**block), 0, 0, all_steps=False)
    blob = denoise_case.weights.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    shape = json.loads(blob[8 : 8 + n])["head.head.bias"]["shape"]
    bias = np.zeros(shape, np.float32)
    bias[2] = np.nan
    poisoned = tmp_path / "nan.safetensors"
    _rewrite_safetensors(denoise_case.weights, poisoned, drop={"head.head.bias"}, add={"head.head.bias": bias})
    # Found by the rank that reads it, while loading: a RuntimeError naming the rank, as any rank failure.
    with pytest.raises(RuntimeError, match=r"^rank \d failed while loading: .*nan.safetensors: tensor 'head.head.bias' has NaN "
                                           r"at element 2, byte offset 8 of the tensor's data"):
        unshard.LiveAvatarDenoiser(denoise_case.config, poisoned, world_size=2)
