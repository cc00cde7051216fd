"""examples/liveavatar/run_liveavatar.py without torch and without Live Avatar: the patch against a fake
package that has the names and the call protocol of Live Avatar's causal_s2v_pipeline (numpy arrays for
tensors), a recording fake denoiser, the real one on the liveavatar_denoise_a vectors, the LoRA renaming,
the errors when Live Avatar's code has changed, and --plan-only."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from conftest import DATA_DIR, DenoiseCase, within_rule

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "liveavatar" / "run_liveavatar.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("run_liveavatar_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rl = _load_script()

try:
    import unshard  # noqa: F401

    HAVE_UNSHARD = True
except ImportError:
    HAVE_UNSHARD = False

needs_unshard = pytest.mark.skipif(not HAVE_UNSHARD, reason="the compiled unshard module is not importable")

# ---- a fake Live Avatar ------------------------------------------------------------------------
#
# Written for this test from the call protocol of causal_s2v_pipeline.WanS2V (see the README): the sink is
# called once per step cache with sink_flag=True, then for every block every step is one call with that
# step's cache and the block's current_start/current_end, followed by the Euler scheduler's step().

FAKE_PIPELINE = textwrap.dedent('''
    import random
    import types

    import numpy as np

    TIMESTEPS = SIGMAS = None  # set by the fake entry from the vectors


    class CausalWanModel_S2V:
        @classmethod
        def from_pretrained(cls, checkpoint_dir, torch_dtype=None, device_map=None):
            raise AssertionError("the real DiT was built: the patch did not take effect")


    class FlowMatchEulerDiscreteScheduler:
        def __init__(self, num_train_timesteps=1000, shift=1.0):
            self.config = {"num_train_timesteps": num_train_timesteps, "shift": shift}
            self._step_index = 0

        def set_timesteps(self, n, device=None):
            self.timesteps = np.asarray(TIMESTEPS[:n], dtype=np.float32)
            self.sigmas = np.asarray(SIGMAS, dtype=np.float32)

        def step(self, model_output, timestep, sample, return_dict=True, generator=None):
            i = self._step_index
            prev = (sample + (self.sigmas[i + 1] - self.sigmas[i]) * model_output).astype(model_output.dtype)
            self._step_index += 1
            return (prev,) if not return_dict else types.SimpleNamespace(prev_sample=prev)


    class WanS2V:
        def __init__(self, config=None, checkpoint_dir=None, t5_cpu=False):
            self.noise_model = CausalWanModel_S2V.from_pretrained(checkpoint_dir, torch_dtype="float32", device_map="cpu")
            self.noise_model.freqs.to(device="cpu")
            self.noise_model = self.noise_model.eval().requires_grad_(False)
            self.noise_model.num_frame_per_block = 3
            self.motion_frames = 73
            self.num_frames_per_block = 3
            self.t5_cpu = t5_cpu

        def add_lora_to_model(self, model, lora_rank=4, lora_alpha=4, lora_target_modules="q,k,v,o,ffn.0,ffn.2",
                              init_lora_weights="kaiming", pretrained_lora_path=None, load_lora_weight_only=False):
            raise AssertionError("peft ran on the stand-in")

        def generate(self, vectors=None, audio_path="a.wav", infer_frames=80, sampling_steps=40, sample_solver="unipc",
                     python_seed=None, offload_model=True):
            v = vectors
            F = self.num_frames_per_block
            lat_motion = (self.motion_frames + 3) // 4
            num_blocks = ((infer_frames + 3 + self.motion_frames) // 4 - lat_motion) // F
            h, w = v["input.clip0.block0.noise"].shape[-2:]
            block_tokens = F * (h // 2) * (w // 2)
            # the pipeline sizes its caches by the DiT's layer count
            caches = {str(i + 1): [dict(k=None) for _ in range(self.noise_model.num_layers)] for i in range(4)}
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
            if offload_model:
                self.noise_model.to("cuda:0")
            common = dict(context=[v["input.context"]], seq_len=None, motion_latents=v["input.motion_latents"],
                          ref_latents=v["input.ref_latents"], motion_frames=[self.motion_frames, lat_motion],
                          drop_motion_frames=False, crossattn_cache=[])
            for gpu_id in range(4):
                self.noise_model([v["input.clip0.block0.noise"]], t=np.zeros((1, F), np.float32), **common,
                                 cond_states=v["input.clip0.block0.cond_states"], audio_input=v["input.clip0.block0.audio"],
                                 sink_flag=True, kv_cache=caches[str(gpu_id + 1)], current_start=0, current_end=block_tokens)
            if python_seed is not None:
                random.seed(python_seed)
            out = {}
            for b in range(num_blocks):
                sched.set_timesteps(sampling_steps)
                sched._step_index = 0
                p = "input.clip0.block%d." % b
                x = v[p + "noise"]
                for i, t in enumerate(sched.timesteps):
                    pred = self.noise_model([x], t=np.full((1, F), t, np.float32), **common, cond_states=v[p + "cond_states"],
                                            audio_input=v[p + "audio"], kv_cache=caches[str(i + 1)], mask=None,
                                            current_start=b * block_tokens, current_end=(b + 1) * block_tokens)
                    x = sched.step(pred[0][None], t, x[None], return_dict=False, generator=None)[0][0]
                out["clip0.block%d" % b] = x
            self.noise_model.cpu()
            return out
''')

FAKE_ENTRY = textwrap.dedent('''
    import argparse
    import sys

    import numpy as np

    from liveavatar.models.wan import causal_s2v_pipeline as pipeline


    def main():
        p = argparse.ArgumentParser()
        for flag in ("--ckpt_dir", "--vectors", "--out", "--lora_path_dmd", "--audio"):
            p.add_argument(flag)
        p.add_argument("--infer_frames", type=int, default=80)
        p.add_argument("--sample_steps", type=int, default=4)
        p.add_argument("--sample_solver", default="euler")
        p.add_argument("--size", default="720*400")
        p.add_argument("--t5_cpu", action="store_true")
        p.add_argument("--load_lora", action="store_true")
        args = p.parse_args()
        v = dict(np.load(args.vectors))
        pipeline.TIMESTEPS, pipeline.SIGMAS = v["input.scheduler.timesteps"], v["input.scheduler.sigmas"]
        s2v = pipeline.WanS2V(config=None, checkpoint_dir=args.ckpt_dir, t5_cpu=args.t5_cpu)
        if args.load_lora:
            s2v.noise_model = s2v.add_lora_to_model(s2v.noise_model, lora_rank=8, lora_alpha=5.0,
                                                    pretrained_lora_path=args.lora_path_dmd)
        out = s2v.generate(vectors=v, audio_path=args.audio or "a.wav", infer_frames=args.infer_frames,
                           sampling_steps=args.sample_steps, sample_solver=args.sample_solver, python_seed=2)
        np.savez(args.out, t5_cpu=np.array(args.t5_cpu), **out)


    if __name__ == "__main__":
        main()
''')


@pytest.fixture
def fake_liveavatar(tmp_path, monkeypatch):
    """A directory laid out like a LiveAvatar checkout with the fake pipeline and entry; the vectors as .npz."""
    root = tmp_path / "LiveAvatar"
    pkg = root / "liveavatar" / "models" / "wan"
    pkg.mkdir(parents=True)
    for d in (root / "liveavatar", root / "liveavatar" / "models", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "causal_s2v_pipeline.py").write_text(FAKE_PIPELINE)
    (root / "minimal_inference").mkdir()
    (root / "minimal_inference" / "s2v_streaming_interact.py").write_text(FAKE_ENTRY)
    case = DenoiseCase("liveavatar_denoise_a")
    np.savez(tmp_path / "vectors.npz", **{k: np.array(v) for k, v in case.tensors.items() if k.startswith("input.")})
    # What main() changes in the process, restored after the test.
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield types.SimpleNamespace(root=root, vectors=tmp_path / "vectors.npz", out=tmp_path / "out.npz", case=case, tmp=tmp_path)
    for name in [m for m in sys.modules if m == "liveavatar" or m.startswith("liveavatar.")]:
        del sys.modules[name]


class FakeDenoiser:
    """Records what the stand-in asks of unshard.LiveAvatarDenoiser; its results are marked by block and step."""

    made = []

    def __init__(self, config, weights, **kwargs):
        self.config, self.weights, self.kwargs = config, weights, kwargs
        self.steps = kwargs["steps"]
        self.blocks_per_clip = kwargs["blocks_per_clip"]
        w, h = kwargs["size"]
        self.shape = (16, 3, h // 8, w // 8)
        self.timesteps = [float(t) for t in DenoiseCase("liveavatar_denoise_a").tensors["input.scheduler.timesteps"]]
        self.loop = {"shift": kwargs["shift"]}
        self.input_shapes = {"noise": self.shape}
        self.sinks, self.blocks = [], []
        FakeDenoiser.made.append(self)

    def sink(self, **kw):
        self.sinks.append(kw)

    def denoise_block(self, noise, audio, cond_states, relative_dist=None, clip=None, block=None, all_steps=False):
        assert all_steps
        self.blocks.append(dict(noise=noise, audio=audio, cond_states=cond_states, relative_dist=list(relative_dist),
                                clip=clip, block=block))
        mark = 100.0 * (clip * self.blocks_per_clip + block)
        return {"clip": clip, "block": block,
                "noise_pred": [np.full(self.shape, mark + i + 0.5, np.float32) for i in range(self.steps)],
                "step_latent": [np.full(self.shape, mark + i, np.float32) for i in range(self.steps)],
                "latent": np.full(self.shape, mark + self.steps - 1, np.float32)}

    def plan(self):
        return {"world_size": 1, "policy": "p", "schedule": "steps", "budget_bytes": 0, "peak_bytes": 10,
                "ranks": [{"rank": 0, "peak_bytes": 10, "terms": {"shards": 10}, "host_bytes": 0}]}

    def peaks(self):
        return [{"rank": 0, "planned_peak_bytes": 10, "measured_peak_bytes": 5, "bytes_gathered": 0, "forwards": 9}]

    def __repr__(self):
        return "FakeDenoiser()"


def _run_main(fake, *extra, make=None):
    argv = ["--liveavatar", str(fake.root), "--unshard-backend", "host", "--config", "cfg.json", "--weights", "w.safetensors",
            "--ckpt_dir", "ckpt", "--vectors", str(fake.vectors), "--out", str(fake.out), "--infer_frames", "24",
            "--sample_steps", "4"] + list(extra)
    assert rl.main(argv, make_denoiser=make) == 0
    return dict(np.load(fake.out))


# ---- the patch routes the pipeline's calls ---------------------------------------------------------


def test_the_patch_routes_sink_and_blocks_to_one_denoiser(fake_liveavatar):
    FakeDenoiser.made.clear()
    out = _run_main(fake_liveavatar, "--fp8", make=FakeDenoiser)
    assert len(FakeDenoiser.made) == 1
    den = FakeDenoiser.made[0]
    # Built from what the pipeline showed: the latent size, the clip's blocks, the steps, the scheduler's shift.
    kw = den.kwargs
    assert (den.config, den.weights) == ("cfg.json", "w.safetensors")
    assert kw["size"] == (128, 64) and kw["blocks_per_clip"] == 2 and kw["steps"] == 4 and kw["shift"] == 3.0
    assert kw["audio_frames"] == 12 and kw["motion_frames"] == (73, 19)
    assert kw["backend"] == "host" and kw["world_size"] == 1 and kw["dtype"] == "f32" and kw["lora"] is None
    # Four sink calls (one per step cache) are one sink; the context is the list's tensor.
    assert len(den.sinks) == 1
    s = den.sinks[0]
    assert s["context"].shape == (7, 48) and s["ref_latents"].shape == (1, 16, 1, 8, 16)
    assert s["motion_latents"].shape == (1, 16, 19, 8, 16)
    # One denoise_block per block, at its position, with Live Avatar's draws: random.randint(4, 30) per step
    # in call order (the vectors' official draws, Python's random seeded with 2).
    assert [(b["clip"], b["block"]) for b in den.blocks] == [(0, 0), (0, 1)]
    draws = [d for b in den.blocks for d in b["relative_dist"]]
    assert draws == [int(d) for d in fake_liveavatar.case.tensors["input.relative_dist"]]
    np.testing.assert_array_equal(den.blocks[1]["noise"], fake_liveavatar.case.tensors["input.clip0.block1.noise"])
    # The scheduler's step returned unshard's latent: each block ends as its last step's latent.
    np.testing.assert_array_equal(out["clip0.block0"], np.full((16, 3, 8, 16), 3.0, np.float32))
    np.testing.assert_array_equal(out["clip0.block1"], np.full((16, 3, 8, 16), 103.0, np.float32))
    # --t5_cpu is added; --fp8 is not passed on (the fake entry would refuse an unknown flag).
    assert bool(out["t5_cpu"])


def test_install_by_hand_then_uninstall_restores_live_avatars_names(fake_liveavatar):
    FakeDenoiser.made.clear()
    sys.path.insert(0, str(fake_liveavatar.root))
    import liveavatar.models.wan.causal_s2v_pipeline as pipeline

    with rl.install(pipeline, rl.settings_from(rl._parser().parse_args(["--unshard-backend", "host"])), FakeDenoiser) as patch:
        s2v = pipeline.WanS2V(checkpoint_dir="ckpt")
        assert isinstance(s2v.noise_model, rl.UnshardDiT) and s2v.noise_model.num_layers == 0
        v = dict(np.load(fake_liveavatar.vectors))
        pipeline.TIMESTEPS, pipeline.SIGMAS = v["input.scheduler.timesteps"], v["input.scheduler.sigmas"]
        patch.settings.update(config="cfg.json", weights="w.safetensors")
        s2v.generate(vectors=v, infer_frames=24, sampling_steps=4, sample_solver="euler")
        den = FakeDenoiser.made[0]
        assert len(den.blocks) == 2
    # uninstall() restored Live Avatar's names
    assert pipeline.CausalWanModel_S2V.__name__ == "CausalWanModel_S2V" and not hasattr(pipeline.CausalWanModel_S2V, "_patch")
    assert pipeline.FlowMatchEulerDiscreteScheduler.__module__ == pipeline.__name__
    assert not hasattr(pipeline.WanS2V.generate, "__wrapped__") and not hasattr(pipeline.WanS2V.add_lora_to_model, "__wrapped__")


@needs_unshard
def test_the_patched_pipeline_gives_the_official_latents_with_the_real_denoiser(fake_liveavatar):
    """The fake pipeline fed the official inputs, its DiT replaced by unshard.LiveAvatarDenoiser over the
    vectors' weights at world size 3: every block's latent matches the official reference."""
    case = fake_liveavatar.case
    out = _run_main(fake_liveavatar, "--config", str(case.config), "--weights", str(case.weights),
                    "--unshard-world-size", "3", "--unshard-policy", "chunked:4KiB+prefetch:1")
    for b in range(2):
        name = "clip0.block%d" % b
        ok, err, tol = within_rule(out[name], case.ref(name + ".latent"))
        assert ok, "%s: max|got - ref| = %g > %g" % (name, err, tol)


def test_the_stand_in_refuses_what_it_does_not_serve(fake_liveavatar):
    sys.path.insert(0, str(fake_liveavatar.root))
    import liveavatar.models.wan.causal_s2v_pipeline as pipeline

    with rl.install(pipeline, rl.settings_from(rl._parser().parse_args(["--unshard-backend", "host"])), FakeDenoiser):
        dit = pipeline.WanS2V(checkpoint_dir="ckpt").noise_model
        with pytest.raises(rl.PatchError, match="noise_model.blocks"):
            dit.blocks
        assert not hasattr(dit, "some_new_attribute")  # probes still answer
        with pytest.raises(rl.PatchError, match="training forward"):
            dit([np.zeros((16, 3, 8, 16))], t=None)
        with pytest.raises(NotImplementedError, match="multi-speaker"):
            dit([np.zeros((16, 3, 8, 16))], t=None, kv_cache=[], mask=np.ones(1))
        with pytest.raises(rl.PatchError, match="outside WanS2V.generate"):
            dit([np.zeros((16, 3, 8, 16))], t=None, kv_cache=[], sink_flag=True, audio_input=np.zeros((1, 25, 32, 12)),
                motion_frames=[73, 19])
        with pytest.raises(rl.PatchError, match="CausalWanModel_S2V.config"):
            pipeline.CausalWanModel_S2V.config


def test_generate_refuses_multi_speaker_audio_and_other_solvers(fake_liveavatar):
    sys.path.insert(0, str(fake_liveavatar.root))
    import liveavatar.models.wan.causal_s2v_pipeline as pipeline

    with rl.install(pipeline, rl.settings_from(rl._parser().parse_args(["--unshard-backend", "host"])), FakeDenoiser):
        s2v = pipeline.WanS2V(checkpoint_dir="ckpt")
        with pytest.raises(NotImplementedError, match="multi-speaker"):
            s2v.generate(audio_path="a.wav+b.wav", sample_solver="euler")
        with pytest.raises(NotImplementedError, match="unipc"):
            s2v.generate(sample_solver="unipc")


# ---- when Live Avatar's code has changed --------------------------------------------------------------


def _module_from(source, name="fake_causal_s2v_pipeline"):
    mod = types.ModuleType(name)
    exec(compile(source, name, "exec"), mod.__dict__)
    return mod


@pytest.mark.parametrize("change, message", [
    (("class FlowMatchEulerDiscreteScheduler:", "class RenamedScheduler:"), "has no attribute 'FlowMatchEulerDiscreteScheduler'"),
    (("class WanS2V:", "class WanS2VRenamed:"), "has no attribute 'WanS2V'"),
    (("class CausalWanModel_S2V:", "class CausalWanModel:"), "has no attribute 'CausalWanModel_S2V'"),
    (("self.noise_model = CausalWanModel_S2V.from_pretrained(", "self.noise_model = build_dit("),
     r"WanS2V.__init__ no longer uses \['CausalWanModel_S2V', 'from_pretrained'\]"),
    (("sched = FlowMatchEulerDiscreteScheduler(", "sched = make_scheduler("), "WanS2V.generate no longer uses"),
    (("infer_frames=80, ", "clip_frames=80, "), "WanS2V.generate has no parameter 'infer_frames'"),
    (("pretrained_lora_path=None, ", "lora_path=None, "), "add_lora_to_model has no parameter 'pretrained_lora_path'"),
])
def test_a_changed_pipeline_is_a_clear_error(change, message):
    old, new = change
    assert old in FAKE_PIPELINE
    mod = _module_from(FAKE_PIPELINE.replace(old, new))
    saved = dict(mod.__dict__)
    with pytest.raises(rl.PatchError, match=message) as e:
        rl.install(mod, {"backend": "host"}, FakeDenoiser)
    assert "causal_s2v_pipeline.py" in str(e.value)
    assert {k: v for k, v in mod.__dict__.items()} == saved  # nothing patched


def test_main_refuses_several_processes_and_a_missing_checkout(fake_liveavatar, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(SystemExit, match="one process"):
        rl.main(["--liveavatar", str(fake_liveavatar.root)], make_denoiser=FakeDenoiser)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="not a LiveAvatar checkout"):
        rl.main(["--liveavatar", str(tmp_path / "nowhere")], make_denoiser=FakeDenoiser)


# ---- the LoRA file ------------------------------------------------------------------------------


def _write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _read(path):
    from conftest import read_safetensors

    return read_safetensors(path)


def test_a_lora_without_peft_names_is_renamed_bytes_unchanged(tmp_path):
    a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.arange(6, dtype=np.float32).reshape(3, 2)
    src = tmp_path / "liveavatar.safetensors"
    _write_safetensors(src, {"blocks.0.self_attn.q.lora_A.default.weight": a, "blocks.0.self_attn.q.lora_B.default.weight": b})
    out, ranks = rl.lora_for_unshard(str(src))
    assert out != str(src) and ranks == [2]
    got = _read(out)
    assert sorted(got) == ["base_model.model.blocks.0.self_attn.q.lora_A.weight", "base_model.model.blocks.0.self_attn.q.lora_B.weight"]
    np.testing.assert_array_equal(got["base_model.model.blocks.0.self_attn.q.lora_A.weight"], a)
    np.testing.assert_array_equal(got["base_model.model.blocks.0.self_attn.q.lora_B.weight"], b)
    assert rl.lora_for_unshard(str(src)) == (out, [2])  # reused while the source is unchanged
    peft = tmp_path / "peft.safetensors"
    _write_safetensors(peft, {"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b})
    assert rl.lora_for_unshard(str(peft)) == (str(peft), [2])  # already in unshard's names: used as it is


def test_a_lora_with_full_weights_is_refused_unless_told(tmp_path):
    src = tmp_path / "mixed.safetensors"
    _write_safetensors(src, {"x.lora_A.weight": np.ones((2, 4)), "x.lora_B.weight": np.ones((3, 2)), "audio.proj.weight": np.ones(3)})
    with pytest.raises(rl.PatchError, match="1 tensors that are not LoRA factors .*'audio.proj.weight'"):
        rl.lora_for_unshard(str(src))
    with pytest.warns(UserWarning, match="ignored"):
        out, _ = rl.lora_for_unshard(str(src), ignore_extra=True)
    assert sorted(_read(out)) == ["base_model.model.x.lora_A.weight", "base_model.model.x.lora_B.weight"]


def test_the_lora_add_lora_to_model_was_given_reaches_the_denoiser(fake_liveavatar):
    FakeDenoiser.made.clear()
    lora = fake_liveavatar.tmp / "lora"
    lora.mkdir()
    _write_safetensors(lora / "liveavatar.safetensors", {"m.lora_A.weight": np.ones((8, 4)), "m.lora_B.weight": np.ones((3, 8))})
    _run_main(fake_liveavatar, "--load_lora", "--lora_path_dmd", str(lora), make=FakeDenoiser)
    kw = FakeDenoiser.made[0].kwargs
    assert kw["lora_alpha"] == 5.0 and kw["lora"].endswith("liveavatar.unshard-peft.safetensors")
    assert sorted(_read(kw["lora"])) == ["base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight"]
    # A rank other than the training config's is refused before anything is built.
    FakeDenoiser.made.clear()
    _write_safetensors(lora / "liveavatar.safetensors", {"m.lora_A.weight": np.ones((4, 4)), "m.lora_B.weight": np.ones((3, 4))})
    with pytest.raises(rl.PatchError, match=r"rank\(s\) \[4\].*lora_rank 8"):
        _run_main(fake_liveavatar, "--load_lora", "--lora_path_dmd", str(lora), make=FakeDenoiser)
    assert not FakeDenoiser.made


# ---- --plan-only -----------------------------------------------------------------------------------


@needs_unshard
def test_plan_only_prints_the_plan_without_torch_or_liveavatar(tmp_path):
    # torch blocked (None in sys.modules makes `import torch` fail), no LiveAvatar checkout anywhere.
    boot = "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", boot, str(SCRIPT), "--plan-only", "--liveavatar", str(tmp_path / "none"),
           "--config", str(DATA_DIR / "liveavatar_denoise_a.config.json"),
           "--weights", str(DATA_DIR / "liveavatar_denoise_a.safetensors"),
           "--unshard-world-size", "3", "--unshard-policy", "chunked:4KiB+prefetch:1", "--unshard-budget", "64MiB"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "plan: world size 3, policy chunked:4096+prefetch:1, schedule steps" in r.stdout
    plan = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert plan["world_size"] == 3 and len(plan["ranks"]) == 3 and plan["budget_bytes"] == 64 << 20
    for rank in plan["ranks"]:
        assert sum(rank["terms"].values()) == rank["peak_bytes"]
    # A budget the plan exceeds is refused with the library's message, before anything runs.
    r = subprocess.run(cmd[:-1] + ["1MiB"], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode != 0 and "the plan does not fit" in r.stderr


def test_plan_only_passes_the_flags_through(capsys):
    FakeDenoiser.made.clear()

    class PlanFake(FakeDenoiser):
        def __init__(self, config, weights, **kwargs):
            kwargs.setdefault("steps", 4)
            kwargs.setdefault("blocks_per_clip", 4)
            kwargs["size"] = (704, 384)
            kwargs.setdefault("shift", 3.0)
            super().__init__(config, weights, **kwargs)
            self.loop = {"steps": 4}

    rl.main(["--plan-only", "--config", "c.json", "--weights", "w.json", "--unshard-backend", "host", "--unshard-world-size", "4",
             "--unshard-budget", "22GiB", "--size", "720*400", "--infer_frames", "48", "--sample_steps", "4"], make_denoiser=PlanFake)
    kw = FakeDenoiser.made[0].kwargs
    assert kw["world_size"] == 4 and kw["budget"] == "22GiB" and kw["steps"] == 4 and kw["blocks_per_clip"] == 4
    assert kw["dtype"] == "bf16" and kw["backend"] == "host"
    assert "plan: world size 1" in capsys.readouterr().out


def test_model_files_finds_the_index_in_the_checkpoint_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    cfg, w = rl.model_files(str(tmp_path))
    assert cfg == str(tmp_path / "config.json") and w.endswith("diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(rl.PatchError, match="--config FILE or --ckpt_dir"):
        rl.model_files(None)


def test_plan_only_errors_are_one_line_and_need_no_torch(tmp_path):
    boot = "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    base = [sys.executable, "-c", boot, str(SCRIPT), "--plan-only", "--liveavatar", str(tmp_path / "none")]
    # No --config: the script's one-line message, no traceback.
    r = subprocess.run(base, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "run_liveavatar.py: no model config: give --config FILE or --ckpt_dir DIR"
    if not HAVE_UNSHARD:
        return
    # --unshard-backend cuda without --unshard-world-size: the world size comes from unshard, not torch.
    r = subprocess.run(base + ["--config", str(DATA_DIR / "liveavatar_denoise_a.config.json"),
                               "--weights", str(DATA_DIR / "liveavatar_denoise_a.safetensors"), "--unshard-backend", "cuda"],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert "No module named 'torch'" not in r.stderr and "ModuleNotFoundError" not in r.stderr, r.stderr
