"""unshard.LiveAvatarDenoiser(backend="cuda") against the official references of liveavatar_denoise_a and
the host backend, device tensors in (read in place) and out (DLPack, owned by the caller), and the
ordering against the caller's stream.

Everything that runs the CUDA backend needs a module built with CUDA (UNSHARD_ENABLE_CUDA=ON) and a
visible GPU, and SKIPS otherwise, saying which is missing: these tests never pass without a GPU. The
device-tensor tests also need torch with CUDA. What runs everywhere: backend="cuda" on a build without
CUDA raises NotImplementedError saying how to build it, and on a CUDA build without a GPU a
RuntimeError saying there is no device.
"""

import numpy as np
import pytest

import unshard
from conftest import within_rule

CUDA_BUILT = "cuda" in unshard.backends

# bf16 compute rounds q, k, v and every GEMM input to bf16 (2^-9 relative each): about a dozen
# roundings per block on the path of the 2-block model, 4 Euler steps with |dt| < 1. The bound of
# tests/cli/s2v_avatar_cuda.sh: catches a wrong layout or a lost term (errors of order 1), not a
# precision claim.
BF16_RULE = 5e-2


def within(got, ref, rule):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err, tol = float(np.max(np.abs(got - ref))), rule * max(1.0, float(np.max(np.abs(ref))))
    return err <= tol, err, tol


def require_gpu():
    if not CUDA_BUILT:
        pytest.skip("module built without CUDA (pip install . --config-settings=cmake.define.UNSHARD_ENABLE_CUDA=ON)")
    if unshard.cuda_device_count() < 1:
        pytest.skip("no CUDA device visible")


def require_torch_cuda():
    require_gpu()
    torch = pytest.importorskip("torch", reason="device tensors in and out need torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def make(case, **kw):
    return unshard.LiveAvatarDenoiser(case.config, case.weights, **kw)


def host(x):
    """A result (a CUDA DLPack tensor on this backend) as numpy."""
    return unshard._to_numpy(x)


def check_block(case, result, clip, block, rule, host_result=None):
    name = "clip%d.block%d" % (clip, block)
    assert (result["clip"], result["block"]) == (clip, block)
    outputs = [("latent", result["latent"], case.ref(name + ".latent"))]
    for i, (noise_pred, step_latent) in enumerate(zip(result["noise_pred"], result["step_latent"])):
        outputs.append(("step%d.noise_pred" % i, noise_pred, case.ref("%s.step%d.noise_pred" % (name, i))))
        outputs.append(("step%d.latent" % i, step_latent, case.ref("%s.step%d.latent" % (name, i))))
    assert len(outputs) == 1 + 2 * len(case.draws[(clip, block)])
    for what, got, ref in outputs:
        got = host(got)
        assert got.dtype == np.float32 and got.shape == ref.shape
        ok, err, tol = within(got, ref, rule)
        assert ok, "%s.%s: max|got - ref| = %g > %g" % (name, what, err, tol)
    if host_result is not None:
        ok, err, tol = within(host(result["latent"]), host_result, rule)
        assert ok, "%s.latent vs the host backend: %g > %g" % (name, err, tol)


# ---- everywhere ------------------------------------------------------------------------------


def test_cuda_backend_in_a_build_without_cuda_says_how_to_build_it(denoise_case):
    if CUDA_BUILT:
        pytest.skip("module built with CUDA (this checks the host-only build)")
    assert unshard.backends == ("host",)
    assert not unshard.cuda_available() and unshard.cuda_device_count() == 0
    with pytest.raises(NotImplementedError, match=r"built without CUDA.*UNSHARD_ENABLE_CUDA=ON"):
        make(denoise_case, backend="cuda")
    with pytest.raises(NotImplementedError, match="UNSHARD_ENABLE_CUDA=ON"):
        make(denoise_case, backend="cuda", devices=[0], compute="bf16")


def test_cuda_only_arguments_on_the_host_backend(denoise_case):
    with pytest.raises(ValueError, match="devices applies to backend='cuda' only"):
        make(denoise_case, devices=[0])
    with pytest.raises(ValueError, match="compute='bf16' needs backend='cuda'"):
        make(denoise_case, compute="bf16")
    with pytest.raises(ValueError, match="compute must be"):
        make(denoise_case, compute="f16")
    with pytest.raises(ValueError, match="fp8_activations='tensor' needs backend='cuda'"):
        make(denoise_case, policy="prefetch:1+fp8", fp8_activations="tensor")
    with pytest.raises(ValueError, match="fp8_activations must be 'none' or 'tensor', got 'channel'"):
        make(denoise_case, policy="prefetch:1+fp8", fp8_activations="channel")
    den = make(denoise_case)
    assert den.backend == "host" and den.devices is None and den.compute == "f32"
    assert den.fp8_activations == "none"
    with pytest.raises(ValueError, match="stream applies to backend='cuda' only"):
        den.sink(**denoise_case.sink_inputs(), stream=0)
    assert not den.sunk


def test_cuda_backend_without_a_gpu_is_a_runtime_error(denoise_case):
    if not CUDA_BUILT:
        pytest.skip("module built without CUDA")
    if unshard.cuda_device_count() > 0:
        pytest.skip("a CUDA device is visible")
    assert not unshard.cuda_available()
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        make(denoise_case, backend="cuda")


# ---- on a GPU: the references ------------------------------------------------------------------


def gpu_runs():
    runs = [(1, "steps", "prefetch:1"), (1, "replicated", "full"), (1, "steps", "chunked:64KiB+prefetch:1")]
    if CUDA_BUILT and unshard.cuda_device_count() >= 2:
        runs += [(2, "steps", "prefetch:1"), (2, "replicated", "chunked:64KiB+offload+prefetch:1")]
    return runs


@pytest.mark.parametrize("world_size,schedule,policy", gpu_runs())
def test_f32_matches_the_references_and_the_host_backend(denoise_case, world_size, schedule, policy):
    require_gpu()
    host_den = make(denoise_case, gemm="portable")
    host_den.sink(**denoise_case.sink_inputs())
    den = make(denoise_case, backend="cuda", world_size=world_size, schedule=schedule, policy=policy)
    assert den.backend == "cuda" and den.compute == "f32" and den.devices == tuple(range(world_size))
    den.sink(**denoise_case.sink_inputs())
    for clip, block in denoise_case.blocks():
        want = host_den.denoise_block(**denoise_case.block_inputs(clip, block))
        r = den.denoise_block(**denoise_case.block_inputs(clip, block), all_steps=True)
        check_block(denoise_case, r, clip, block, 1e-5, host_result=want)
    assert den.next_block == (1, 0)
    # The ledger, as on the host backend: the terms add up, measured <= planned, one forward per
    # owned step and block plus the sink.
    plan = den.plan()
    assert plan["world_size"] == world_size and plan["schedule"] == schedule
    for rank in plan["ranks"]:
        assert sum(rank["terms"].values()) == rank["peak_bytes"] and rank["device"] == rank["rank"]
    for p in den.peaks():
        assert 0 < p["measured_peak_bytes"] <= p["planned_peak_bytes"] and p["device"] == p["rank"]
    blocks = len(denoise_case.blocks())
    forwards = [p["forwards"] for p in den.peaks()]
    if schedule == "steps":
        owned = [len(range(r, den.steps, world_size)) for r in range(world_size)]
        assert forwards == [(1 if o else 0) + o * blocks for o in owned]
    else:
        assert forwards == [1 + den.steps * blocks] * world_size


def test_f32_blocks_in_flight(denoise_case):
    require_gpu()
    world_size = 2 if unshard.cuda_device_count() >= 2 else 1
    den = make(denoise_case, backend="cuda", world_size=world_size, policy="chunked:64KiB+prefetch:1")
    den.sink(**denoise_case.sink_inputs())
    blocks = [denoise_case.block_inputs(c, b) for c, b in denoise_case.blocks()]
    results = list(den.denoise_blocks(blocks, all_steps=True))
    assert len(results) == len(blocks)
    for (clip, block), r in zip(denoise_case.blocks(), results):
        check_block(denoise_case, r, clip, block, 1e-5)
    if world_size > 1:
        assert den.ticks_run == 1 + len(blocks) + den.steps - 1


def test_bf16_compute_within_its_coarse_bound(denoise_case):
    require_gpu()
    den = make(denoise_case, backend="cuda", compute="bf16")
    assert den.compute == "bf16"
    den.sink(**denoise_case.sink_inputs())
    for clip, block in denoise_case.blocks():
        r = den.denoise_block(**denoise_case.block_inputs(clip, block), all_steps=True)
        check_block(denoise_case, r, clip, block, BF16_RULE)


# fp8 activations quantize every GEMM input to e4m3 (2^-4 relative): the rule of
# tests/cli/s2v_avatar_cuda.sh, a check that catches a lost or doubled scale or a wrong layout (errors of
# order 1), not a precision claim.
FP8_ACTIVATIONS_RULE = 2e-1


@pytest.mark.parametrize("policy", ["prefetch:1+fp8", "chunked:64KiB+prefetch:1+fp8:tensor"])
def test_fp8_weights_against_the_host_fp8_run(denoise_case, policy):
    """fp8 weights on the GPU answer to the host backend's run of the same policy (the same codes and
    scales): weight-only fp8 in f32 dequantizes to the host's f32 weights exactly (the 1e-5 rule),
    fp8_activations='tensor' within FP8_ACTIVATIONS_RULE."""
    require_gpu()
    on_host = make(denoise_case, policy=policy)
    on_host.sink(**denoise_case.sink_inputs())
    expected = [np.array(on_host.denoise_block(**denoise_case.block_inputs(c, b))) for c, b in denoise_case.blocks()]
    with pytest.raises(ValueError, match="needs an fp8 policy"):
        make(denoise_case, backend="cuda", policy="prefetch:1", fp8_activations="tensor")
    for act, rule in (("none", 1e-5), ("tensor", FP8_ACTIVATIONS_RULE)):
        den = make(denoise_case, backend="cuda", policy=policy, fp8_activations=act)
        assert den.fp8_activations == act
        den.sink(**denoise_case.sink_inputs())
        for (clip, block), ref in zip(denoise_case.blocks(), expected):
            ok, err, tol = within(host(den.denoise_block(**denoise_case.block_inputs(clip, block))), ref, rule)
            assert ok, "%s fp8_activations=%s clip%d.block%d: max|gpu - host| = %g > %g" % (policy, act, clip, block,
                                                                                          err, tol)


def test_bad_devices(denoise_case):
    require_gpu()
    n = unshard.cuda_device_count()
    with pytest.raises(ValueError, match=r"devices\[0\] is %d, but this process sees %d" % (n, n)):
        make(denoise_case, backend="cuda", devices=[n])
    with pytest.raises(ValueError, match="devices has 2 entries but world_size is 1"):
        make(denoise_case, backend="cuda", devices=[0, 0])
    with pytest.raises(ValueError, match="world_size=%d puts rank r on GPU r" % (n + 1)):
        make(denoise_case, backend="cuda", world_size=n + 1)
    if n >= 2:
        with pytest.raises(ValueError, match=r"devices\[0\] and devices\[1\] are both GPU 1"):
            make(denoise_case, backend="cuda", world_size=2, devices=[1, 1])
        den = make(denoise_case, backend="cuda", world_size=2, devices=[1, 0])
        assert den.devices == (1, 0) and [p["device"] for p in den.peaks()] == [1, 0]


# ---- on a GPU: device tensors and streams (torch) ---------------------------------------------


def device_inputs(torch, case, clip, block, device="cuda:0"):
    d = case.block_inputs(clip, block)
    return {k: (torch.from_numpy(np.array(v)).to(device) if k != "relative_dist" else v) for k, v in d.items()}


def test_device_tensors_in_place_and_out_owned(denoise_case):
    torch = require_torch_cuda()
    den = make(denoise_case, backend="cuda")
    sink = {k: torch.from_numpy(np.array(v)).cuda() for k, v in denoise_case.sink_inputs().items()}
    den.sink(**sink)
    assert den._last_converted == []
    assert den._last_input_pointers == {k: v.data_ptr() for k, v in sink.items()}  # read in place: no copy
    for clip, block in denoise_case.blocks():
        inputs = device_inputs(torch, denoise_case, clip, block)
        latent = den.denoise_block(**inputs)
        assert den._last_converted == []
        for k in ("noise", "audio", "cond_states"):
            assert den._last_input_pointers[k] == inputs[k].data_ptr(), k
        t = torch.from_dlpack(latent)
        assert t.is_cuda and t.device.index == 0 and t.dtype == torch.float32 and t.is_contiguous()
        assert tuple(t.shape) == den.latent_shape
        del latent, inputs  # the tensor owns the memory now: it outlives the DLPack object
        torch.cuda.synchronize()
        ok, err, tol = within_rule(t.cpu().numpy(), denoise_case.ref("clip%d.block%d.latent" % (clip, block)))
        assert ok, (clip, block, err, tol)


def test_device_tensor_refusals_name_the_argument(denoise_case):
    torch = require_torch_cuda()
    den = make(denoise_case, backend="cuda")
    den.sink(**denoise_case.sink_inputs())
    good = device_inputs(torch, denoise_case, 0, 0)
    with pytest.raises(TypeError, match=r"noise is a CUDA tensor on device 0 of dtype float64"):
        den.denoise_block(**dict(good, noise=good["noise"].double()))
    with pytest.raises(TypeError, match=r"cond_states is a CUDA tensor on device 0 that is not C-contiguous"):
        den.denoise_block(**dict(good, cond_states=good["cond_states"].transpose(2, 3).contiguous().transpose(2, 3)))
    with pytest.raises(ValueError, match=r"audio has shape"):
        den.denoise_block(**dict(good, audio=good["audio"][:-1]))
    with pytest.raises(TypeError, match=r"stream is a str"):
        den.denoise_block(**good, stream="default")
    if torch.cuda.device_count() >= 2:
        with pytest.raises(TypeError, match=r"noise is a CUDA tensor on device 1.*devices\[0\]"):
            den.denoise_block(**dict(good, noise=good["noise"].to("cuda:1")))
    assert den.next_block == (0, 0)  # nothing reached a rank
    ok, _, _ = within_rule(host(den.denoise_block(**good)), denoise_case.ref("clip0.block0.latent"))
    assert ok


class _StreamProtocol:
    """A stream through the CUDA stream protocol (__cuda_stream__ -> (version, handle))."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@pytest.mark.parametrize("form", ["torch", "int", "protocol"])
def test_work_is_ordered_after_the_callers_stream(denoise_case, form):
    torch = require_torch_cuda()
    den = make(denoise_case, backend="cuda")
    s = torch.cuda.Stream()
    stream = {"torch": s, "int": s.cuda_stream, "protocol": _StreamProtocol(s.cuda_stream)}[form]
    den.sink(**denoise_case.sink_inputs(), stream=stream)
    want = {k: torch.from_numpy(np.array(v)).pin_memory() for k, v in denoise_case.block_inputs(0, 0).items()
            if k != "relative_dist"}
    inputs = {k: torch.zeros(v.shape, device="cuda:0") for k, v in want.items()}
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # the inputs' values arrive on `s` well after the call is made
        for k in inputs:
            inputs[k].copy_(want[k], non_blocking=True)
        latent = den.denoise_block(**inputs, relative_dist=denoise_case.draws[(0, 0)], stream=stream)
        got = torch.from_dlpack(latent).clone()  # on `s`: after the results were written
    s.synchronize()
    ok, err, tol = within_rule(got.cpu().numpy(), denoise_case.ref("clip0.block0.latent"))
    assert ok, "read the inputs before the caller's stream wrote them? %g > %g" % (err, tol)
