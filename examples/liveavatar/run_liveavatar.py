#!/usr/bin/env python3
"""Run Live Avatar's single-process pipeline with unshard's sharded DiT in place of its own.

    python run_liveavatar.py --liveavatar ~/LiveAvatar [--unshard-* options] [Live Avatar's own flags]

It imports the user's checkout of Alibaba-Quark/LiveAvatar (`--liveavatar DIR`), patches its
single-process pipeline `causal_s2v_pipeline.WanS2V` at run time, and then runs Live Avatar's own
entry script (`minimal_inference/s2v_streaming_interact.py`) with the remaining flags. None of
Live Avatar's code is copied here; the patch replaces three things and wraps two methods:

- the DiT (`WanS2V.noise_model`, built by `CausalWanModel_S2V.from_pretrained` in `WanS2V.__init__`):
  a stand-in is built instead, so no 30 GiB bf16 replica lands on cuda:0. Its `num_layers` is 0,
  so the pipeline's own KV caches (four noisy caches of one clip each plus the cond cache, ~41 GiB
  in bf16 at 704x384) are empty lists; unshard holds the caches, one per step, on the rank that
  runs the step.
- the denoising of a block: at a block's first step the stand-in runs the whole block (every step)
  in one `unshard.LiveAvatarDenoiser.denoise_block` call; the pipeline's remaining step calls get
  that block's per-step outputs. The sink (cond prefill, called once per step cache) becomes one
  `den.sink`.
- the Euler scheduler (`FlowMatchEulerDiscreteScheduler` as `causal_s2v_pipeline` sees it): a
  subclass whose `step` returns unshard's latent for that step, so the block the pipeline keeps is
  exactly the one unshard computed (float32 between steps, cast to the pipeline's dtype).
- `WanS2V.add_lora_to_model` records the LoRA for the stand-in (unshard merges it per shard while
  each rank loads) instead of wrapping a model with peft.
- `WanS2V.generate` records the clip length and step count (the denoiser's loop is fixed at
  construction) and prints the ledger and the measured peaks when it returns.

umT5 (on the CPU with `--t5_cpu`, added unless `--keep-t5-on-gpu`), wav2vec2 and the VAE stay in
PyTorch on cuda:0. Every patched attribute is checked before anything is patched: if Live Avatar's
code no longer has it, the run stops with a PatchError naming the file and the attribute.

`--plan-only` (`--dry-run`) builds none of that: it needs only numpy and unshard, constructs the
denoiser from `--config`/`--weights` (or `--ckpt_dir`) and prints `den.plan()`. See README.md.
"""

from __future__ import annotations

import argparse
import functools
import glob
import inspect
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import warnings

PIPELINE_MODULE = "liveavatar.models.wan.causal_s2v_pipeline"
PIPELINE_FILE = "liveavatar/models/wan/causal_s2v_pipeline.py"
ENTRY_FILE = "minimal_inference/s2v_streaming_interact.py"
LORA_FILE_IN_REPO = "liveavatar.safetensors"  # what Live Avatar's loader fetches for a hub id
LORA_CACHE_DIR = "ckpt/LiveAvatar"  # and where it caches it (liveavatar/utils/load_weight_utils.py)
VAE_STRIDE = 8  # Wan's VAE: one latent pixel per 8x8 pixels (config.vae_stride[1:])

GiB = float(1 << 30)


class PatchError(RuntimeError):
    """Live Avatar's code is not what the patch expects (an attribute moved, a call changed)."""


class MissingAttribute(PatchError, AttributeError):
    """An attribute of the stand-ins that Live Avatar's code asks for; an AttributeError too, so that hasattr()
    and getattr(x, name, default) probes still answer False/default instead of raising."""


# ---- small helpers -------------------------------------------------------------------------


def _is_torch(x):
    return type(x).__module__.split(".")[0] == "torch"


def _first(x):
    """The pipeline passes the latent and the context as one-element lists."""
    return x[0] if isinstance(x, (list, tuple)) else x


def _scalar(t):
    """The first value of a timestep tensor/array as a float."""
    if _is_torch(t):
        return float(t.detach().reshape(-1)[0].item())
    import numpy as np

    return float(np.asarray(t, dtype=np.float64).reshape(-1)[0])


def _to_host(t):
    """What the host backend reads in place: float32, C-contiguous, in host memory."""
    if _is_torch(t):
        import torch

        return t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return t  # numpy (or anything the module converts itself)


def _to_device(t):
    """For a backend that reads device memory: float32 where the tensor already is."""
    if _is_torch(t):
        import torch

        return t.detach().to(dtype=torch.float32).contiguous()
    return t


def _like(a, ref):
    """unshard's result `a` (a numpy array today, any DLPack tensor tomorrow) as `ref`'s kind of tensor."""
    if _is_torch(ref):
        import torch

        try:
            t = torch.from_dlpack(a)
        except (TypeError, BufferError, RuntimeError):  # an exporter without __dlpack__, a read-only array
            t = torch.as_tensor(a)
        return t.to(device=ref.device, dtype=ref.dtype)
    import numpy as np

    return np.asarray(a).astype(getattr(ref, "dtype", np.float32), copy=False)


def _gib(n):
    """A byte count for people: GiB for the 14B model, smaller units for the tiny test vectors."""
    for unit, size in (("GiB", GiB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if n >= size:
            return "%.2f %s" % (n / size, unit)
    return "%d B" % n


def format_plan(plan):
    """den.plan() as lines: each rank's peak and its terms."""
    lines = [
        "plan: world size %d, policy %s, schedule %s, peak %s%s"
        % (plan["world_size"], plan["policy"], plan["schedule"], _gib(plan["peak_bytes"]),
           (", budget " + _gib(plan["budget_bytes"])) if plan.get("budget_bytes") else "")
    ]
    for r in plan["ranks"]:
        terms = ", ".join("%s %s" % (k, _gib(v)) for k, v in r["terms"].items() if v)
        lines.append("  rank %d: peak %s (%s)%s" % (r["rank"], _gib(r["peak_bytes"]), terms,
                                                   ("; host " + _gib(r["host_bytes"])) if r.get("host_bytes") else ""))
    return "\n".join(lines)


def format_peaks(peaks):
    return "\n".join(
        "  rank %d: planned %s, measured %s, gathered %s, %d forwards"
        % (p["rank"], _gib(p["planned_peak_bytes"]), _gib(p["measured_peak_bytes"]), _gib(p["bytes_gathered"]), p["forwards"])
        for p in peaks)


# ---- the LoRA file ---------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."


def _read_safetensors_header(path):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise PatchError("%s: not a safetensors file (shorter than its header length)" % path)
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    return n, header


def _peft_name(key):
    """The name unshard's LoRA reader takes (docs/lora.md: base_model.model.<module>.lora_{A,B}.weight) for a
    LoRA factor `key`, or None when `key` is not a LoRA factor. peft state dicts come with or without the
    prefix, and with the adapter's name (`.default`) when saved from the wrapped model."""
    for ab in ("lora_A", "lora_B"):
        for tail in (".%s.weight" % ab, ".%s.default.weight" % ab):
            if key.endswith(tail):
                module = key[: -len(tail)]
                if module.startswith(_PEFT_PREFIX):
                    module = module[len(_PEFT_PREFIX):]
                return _PEFT_PREFIX + module + ".%s.weight" % ab
    return None


def lora_for_unshard(path, out_dir=None, ignore_extra=False):
    """A safetensors LoRA in the names unshard reads: `path` itself when its names already are, else a copy
    with the names rewritten (the tensor bytes copied unchanged) in `out_dir` (default: beside `path`, or
    the temp directory when that is not writable). Tensors that are not LoRA factors (full weights Live
    Avatar's loader would load over the base model, strict=False) are an error unless ignore_extra."""
    n, header = _read_safetensors_header(path)
    renames, extra, ranks = {}, [], set()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        new = _peft_name(key)
        if new is None:
            extra.append(key)
            continue
        if new in renames.values():
            raise PatchError("%s: two tensors map to the LoRA factor '%s' (one with and one without the peft prefix or "
                             "adapter name?)" % (path, new))
        renames[key] = new
        if new.endswith(".lora_A.weight") and len(info.get("shape", [])) == 2:
            ranks.add(info["shape"][0])
    if not renames:
        raise PatchError("%s holds no LoRA factors (no '*.lora_A.weight' / '*.lora_B.weight' tensors)" % path)
    if extra:
        msg = ("%s holds %d tensors that are not LoRA factors (e.g. %s). Live Avatar's add_lora_to_model loads them "
               "over the base weights (load_state_dict(strict=False)); unshard merges LoRA factors only (docs/lora.md)"
               % (path, len(extra), ", ".join("'%s'" % k for k in extra[:3])))
        if not ignore_extra:
            raise PatchError(msg + ". Pass --unshard-lora-ignore-extra to run without them.")
        warnings.warn(msg + "; ignored (--unshard-lora-ignore-extra).")
    if not extra and all(k == v for k, v in renames.items()):
        return path, sorted(ranks)
    # Rewrite the header only: data offsets are relative to the data section, which is copied as it is.
    kept = {renames[k]: v for k, v in header.items() if k in renames}
    if "__metadata__" in header:
        kept["__metadata__"] = header["__metadata__"]
    # Dropped tensors (ignore_extra) keep their bytes in the data section, unreferenced.
    blob = json.dumps(kept, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8 bytes
    stem = os.path.splitext(os.path.basename(path))[0]
    for d in ([out_dir] if out_dir else [os.path.dirname(os.path.abspath(path)), tempfile.gettempdir()]):
        if d and os.access(d, os.W_OK):
            out_dir = d
            break
    out = os.path.join(out_dir, stem + ".unshard-peft.safetensors")
    st = os.stat(path)
    stamp = out + ".source"
    source_id = "%s %d %d" % (os.path.abspath(path), st.st_size, int(st.st_mtime))
    if os.path.exists(out) and os.path.exists(stamp) and open(stamp).read() == source_id:
        return out, sorted(ranks)
    with open(path, "rb") as src, open(out + ".tmp", "wb") as dst:
        src.seek(8 + n)
        dst.write(struct.pack("<Q", len(blob)))
        dst.write(blob)
        shutil.copyfileobj(src, dst, 64 << 20)
    os.replace(out + ".tmp", out)
    with open(stamp, "w") as f:
        f.write(source_id)
    print("[unshard] LoRA %s: %d tensors renamed to peft names in %s" % (path, len(kept) - ("__metadata__" in kept), out))
    return out, sorted(ranks)


def resolve_lora(spec):
    """The local safetensors file for Live Avatar's --lora_path_dmd: a file, a directory holding one, or a
    Hugging Face repo id (fetched as Live Avatar's loader does: liveavatar.safetensors into ckpt/LiveAvatar)."""
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(spec, "*.safetensors")))
        named = [f for f in files if os.path.basename(f) == LORA_FILE_IN_REPO]
        if named or len(files) == 1:
            return (named or files)[0]
        raise PatchError("LoRA directory %s: expected %s or a single *.safetensors file, found %s; pass --unshard-lora FILE"
                         % (spec, LORA_FILE_IN_REPO, files or "none"))
    if os.path.isfile(spec):
        if not spec.endswith(".safetensors"):
            raise PatchError("LoRA %s: unshard reads safetensors files only (Live Avatar also loads .pt/.bin); save it as "
                             "safetensors and pass --unshard-lora FILE" % spec)
        return spec
    if "/" in spec and not spec.startswith(("/", ".")):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise PatchError("LoRA '%s' looks like a Hugging Face repo id but huggingface_hub is not importable (%s); "
                             "download %s yourself and pass --unshard-lora FILE" % (spec, e, LORA_FILE_IN_REPO)) from e
        return hf_hub_download(repo_id=spec, filename=LORA_FILE_IN_REPO, cache_dir=LORA_CACHE_DIR)
    raise FileNotFoundError("LoRA '%s': no such file or directory" % spec)


def model_files(ckpt_dir, config=None, weights=None):
    """The DiT's config.json and safetensors index (or single file) in a Wan2.2-S2V checkpoint directory."""
    if config is None:
        if ckpt_dir is None:
            raise PatchError("no model config: give --config FILE or --ckpt_dir DIR")
        config = os.path.join(ckpt_dir, "config.json")
    if weights is None:
        if ckpt_dir is None:
            raise PatchError("no model weights: give --weights FILE or --ckpt_dir DIR")
        found = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors.index.json")))
        if not found:
            found = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
        if len(found) != 1:
            raise PatchError("%s: expected one *.safetensors.index.json (or one *.safetensors) for the DiT, found %s; "
                             "pass --weights FILE" % (ckpt_dir, found or "none"))
        weights = found[0]
    return config, weights


# ---- the stand-in for the DiT ----------------------------------------------------------------


class _Freqs:
    """`noise_model.freqs`: the pipeline moves the RoPE table to its device; unshard keeps its own."""

    def to(self, *args, **kwargs):
        return self


class UnshardDiT:
    """Stands where Live Avatar's CausalWanModel_S2V was (WanS2V.noise_model). The pipeline calls it once per
    sink and once per block and step; it runs a whole block in one LiveAvatarDenoiser call and hands the
    pipeline that block's per-step outputs."""

    num_layers = 0  # the pipeline sizes its own KV caches by this: none of them is allocated

    def __init__(self, patch, checkpoint_dir, torch_dtype=None):
        self._patch = patch
        self.checkpoint_dir = checkpoint_dir
        self.torch_dtype = torch_dtype
        self.freqs = _Freqs()
        self.lora = None  # (path, alpha, rank) from add_lora_to_model
        self.run = None  # what generate() fixes: steps, blocks per clip, ...
        self.den = None
        self._built_for = None
        self._in_sink = False
        self._block = None  # (clip, block) being served
        self._result = None  # that block's denoise_block(all_steps=True) result
        self._step = -1
        self.pending = None  # (step, latent) for the scheduler's next step()
        self._device_inputs = patch.settings.get("backend") == "cuda"
        self.calls = {"sink": 0, "step": 0, "blocks": 0}

    # What the pipeline does to a torch module; nothing to do for the stand-in.
    def to(self, *args, **kwargs):
        return self

    def cpu(self):
        return self

    def eval(self):
        return self

    def requires_grad_(self, *args, **kwargs):
        return self

    def __getattr__(self, name):  # only for attributes not set above: Live Avatar uses the DiT in a new way
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingAttribute("%s uses WanS2V.noise_model.%s, which the unshard stand-in for CausalWanModel_S2V does not have: "
                         "Live Avatar's pipeline changed in a way run_liveavatar.py does not patch" % (PIPELINE_FILE, name))

    # ---- generate() tells what the loop is --------------------------------------------------

    def begin_run(self, **run):
        if self.den is not None and self.run is not None:
            changed = {k: (self.run[k], v) for k, v in run.items() if self.run.get(k) != v}
            if changed:
                raise PatchError("a second generate() with a different loop %s: the denoiser's loop is fixed at "
                                 "construction; run the script again" % changed)
        self.run = dict(run)
        self._block, self._result, self._step, self.pending, self._in_sink = None, None, -1, None, False

    def end_run(self):
        if self.den is None:
            warnings.warn("generate() returned without calling the DiT: %s's loop no longer goes through "
                          "WanS2V.noise_model, so unshard did nothing" % PIPELINE_FILE)
            return
        print("[unshard] %d sink call(s), %d step calls, %d blocks denoised; peaks:\n%s"
              % (self.calls["sink"], self.calls["step"], self.calls["blocks"], format_peaks(self.den.peaks())))

    # ---- the calls ------------------------------------------------------------------------

    def __call__(self, x, t=None, **kw):
        if kw.get("kv_cache") is None:
            raise PatchError("%s called the DiT without kv_cache (the training forward); the unshard stand-in serves "
                             "the streaming inference calls only" % PIPELINE_FILE)
        if kw.get("mask") is not None:
            raise NotImplementedError("multi-speaker routing (audio 'a.wav+b.wav', a routing mask) is not supported by "
                                      "unshard's LiveAvatarDenoiser")
        if kw.get("drop_motion_frames"):
            raise NotImplementedError("drop_motion_frames=True is not supported by unshard's LiveAvatarDenoiser")
        latent = _first(x)
        if kw.get("sink_flag"):
            return self._sink(latent, kw)
        return self._denoise_step(latent, t, kw)

    def _inputs(self, **tensors):
        conv = _to_device if self._device_inputs else _to_host
        return {k: (conv(v) if v is not None else None) for k, v in tensors.items()}

    def _call(self, fn, **tensors):
        try:
            return fn(**self._inputs(**tensors))
        except TypeError as e:
            # A backend that reads host memory only refuses device tensors: copy to the host from now on.
            if not self._device_inputs or "host" not in str(e):
                raise
            self._device_inputs = False
            warnings.warn("unshard refused device tensors (%s); passing host copies from now on" % e)
            return fn(**self._inputs(**tensors))

    def _sink(self, latent, kw):
        # The pipeline runs the sink once per step cache, with the same inputs; unshard's sink fills every
        # step's cond cache at once, so the first call of a run of sink calls does it.
        self.calls["sink"] += 1
        if self._in_sink:
            return None
        self._in_sink = True
        self._build(latent, kw)
        context = _first(kw["context"])
        self._call(self.den.sink, ref_latents=kw["ref_latents"], motion_latents=kw["motion_latents"], context=context,
                   audio=kw.get("audio_input"), cond_states=kw.get("cond_states"))
        return None

    def _position(self, latent, kw):
        """(clip, block) from the call's current_start/current_end, as the pipeline computes them."""
        f, h, w = latent.shape[-3], latent.shape[-2], latent.shape[-1]
        block_tokens = f * (h // 2) * (w // 2)  # the patch embedding is 1x2x2
        start, end = int(kw["current_start"]), int(kw["current_end"])
        if end - start != block_tokens or start % block_tokens:
            raise PatchError("%s: a step call spans tokens [%d, %d), not one block of %d tokens: the stream positions "
                             "changed" % (PIPELINE_FILE, start, end, block_tokens))
        k = start // block_tokens
        bpc = self.den.blocks_per_clip
        return k // bpc, k % bpc

    def _denoise_step(self, latent, t, kw):
        self._in_sink = False
        self.calls["step"] += 1
        if self.den is None:
            raise PatchError("%s called the DiT for a step before any sink call: the prefill moved" % PIPELINE_FILE)
        pos = self._position(latent, kw)
        steps = self.den.steps
        if pos != self._block:
            if self._block is not None and self._step != steps - 1:
                raise PatchError("%s moved to clip %d block %d after %d of %d steps of clip %d block %d"
                                 % ((PIPELINE_FILE,) + pos + (self._step + 1, steps) + self._block))
            # Live Avatar draws relative_dist = random.randint(4, 30) in each step's forward, in call order;
            # drawing the block's S values here consumes Python's random stream in that same order.
            draws = [random.randint(4, 30) for _ in range(steps)]
            self._result = self._call(
                functools.partial(self.den.denoise_block, relative_dist=draws, clip=pos[0], block=pos[1], all_steps=True),
                noise=latent, audio=kw["audio_input"], cond_states=kw["cond_states"])
            self._block, self._step = pos, 0
            self.calls["blocks"] += 1
        else:
            self._step += 1
            if self._step >= steps:
                raise PatchError("%s ran step %d of clip %d block %d; the denoiser has %d steps"
                                 % ((PIPELINE_FILE, self._step) + pos + (steps,)))
        i = self._step
        if t is not None:
            want, got = self.den.timesteps[i], _scalar(t)
            if abs(want - got) > 1e-3 * max(1.0, abs(want)):
                raise PatchError("step %d: the pipeline's timestep is %r, unshard's sampler has %r (steps %d, shift %r): "
                                 "the schedulers disagree" % (i, got, want, steps, self.den.loop["shift"]))
        self.pending = (i, self._result["step_latent"][i])
        return [_like(self._result["noise_pred"][i], latent)]

    # ---- building the denoiser on the first sink -------------------------------------------

    def _build(self, latent, kw):
        f, h, w = (int(v) for v in latent.shape[-3:])
        audio_frames = int(kw["audio_input"].shape[-1])
        motion = tuple(int(v) for v in kw.get("motion_frames") or ())
        key = (f, h, w, audio_frames, motion)
        if self.den is not None:
            if key != self._built_for:
                raise PatchError("the stream changed shape %s -> %s; run the script again for a new size"
                                 % (self._built_for, key))
            return
        if self.run is None:
            raise PatchError("the DiT was called outside WanS2V.generate (the patched wrapper did not see the loop)")
        run = self.run
        lat_motion = (run["motion_frames"] + 3) // 4
        if motion and motion != (run["motion_frames"], lat_motion):
            raise PatchError("motion_frames %s in the DiT call, %s from the pipeline's config" % (motion, (run["motion_frames"], lat_motion)))
        if f != run["frames_per_block"]:
            raise PatchError("blocks of %d latent frames, the pipeline's num_frames_per_block is %d" % (f, run["frames_per_block"]))
        # The clip's latent frames and blocks as WanS2V.generate computes them from infer_frames.
        clip_frames = (run["infer_frames"] + 3 + run["motion_frames"]) // 4 - lat_motion
        blocks_per_clip = clip_frames // f
        settings = self._patch.settings
        config, weights = model_files(self.checkpoint_dir, settings.get("config"), settings.get("weights"))
        # --unshard-lora/--unshard-lora-alpha win over what Live Avatar's add_lora_to_model was given.
        lora, alpha = settings.get("lora"), settings.get("lora_alpha")
        if lora is None and self.lora is not None:
            lora = resolve_lora(self.lora[0])
        if alpha is None and self.lora is not None:
            alpha = self.lora[1]
        if lora is not None:
            lora, ranks = lora_for_unshard(lora, settings.get("lora_cache"), settings.get("lora_ignore_extra", False))
            if self.lora is not None and self.lora[2] is not None and ranks and ranks != [self.lora[2]]:
                raise PatchError("the LoRA file %s has rank(s) %s, Live Avatar's training config says lora_rank %s"
                                 % (lora, ranks, self.lora[2]))
        kwargs = dict(
            lora=lora, lora_alpha=alpha, world_size=settings["world_size"], policy=settings["policy"],
            schedule=settings["schedule"], backend=settings["backend"], devices=settings.get("devices"),
            gemm=settings["gemm"], dtype=settings["dtype"] or _dtype_name(self.torch_dtype),
            size=(w * VAE_STRIDE, h * VAE_STRIDE), blocks_per_clip=blocks_per_clip, steps=run["sampling_steps"],
            shift=self._patch.scheduler_shift, budget=settings.get("budget"), audio_frames=audio_frames,
            motion_frames=motion or None)
        print("[unshard] building LiveAvatarDenoiser(%s, %s, %s)"
              % (config, weights, ", ".join("%s=%r" % kv for kv in kwargs.items() if kv[1] is not None)))
        self.den = self._patch.make_denoiser(config, weights, **kwargs)
        self._built_for = key
        want = tuple(int(v) for v in self.den.input_shapes["noise"])
        got = tuple(int(v) for v in latent.shape[-4:])
        if got != want:
            raise PatchError("the pipeline's block latent is %s, the denoiser expects %s" % (got, want))
        print("[unshard] %r\n%s" % (self.den, format_plan(self.den.plan())))


def _dtype_name(torch_dtype):
    return "f32" if str(torch_dtype) in ("torch.float32", "float32") else "bf16"


# ---- the patch -------------------------------------------------------------------------------


def _code_names(fn):
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    return set(code.co_names) if code is not None else set()


def check_pipeline(module):
    """Everything the patch relies on in causal_s2v_pipeline, checked before anything is patched."""
    where = PIPELINE_FILE

    def need(obj, attr, what):
        if not hasattr(obj, attr):
            raise PatchError("%s: %s has no attribute '%s' (%s); Live Avatar's code changed and run_liveavatar.py needs "
                             "updating" % (where, getattr(obj, "__name__", obj), attr, what))
        return getattr(obj, attr)

    pipe = need(module, "WanS2V", "the single-process pipeline class")
    need(module, "CausalWanModel_S2V", "the DiT class WanS2V.__init__ builds with from_pretrained")
    sched = need(module, "FlowMatchEulerDiscreteScheduler", "the Euler scheduler WanS2V.generate builds")
    if not isinstance(sched, type):
        raise PatchError("%s: FlowMatchEulerDiscreteScheduler is not a class" % where)
    init = need(pipe, "__init__", "the constructor")
    generate = need(pipe, "generate", "the generation loop")
    add_lora = need(pipe, "add_lora_to_model", "the LoRA loader the entry script calls")
    for fn, name, names in ((init, "WanS2V.__init__", {"CausalWanModel_S2V", "from_pretrained", "noise_model"}),
                            (generate, "WanS2V.generate", {"FlowMatchEulerDiscreteScheduler", "noise_model", "step"})):
        missing = names - _code_names(fn)
        if missing:
            raise PatchError("%s: %s no longer uses %s; the patch would not take effect" % (where, name, sorted(missing)))
    params = inspect.signature(generate).parameters
    for p in ("infer_frames", "sampling_steps", "audio_path", "sample_solver"):
        if p not in params:
            raise PatchError("%s: WanS2V.generate has no parameter '%s'" % (where, p))
    lp = inspect.signature(add_lora).parameters
    for p in ("model", "pretrained_lora_path", "lora_alpha", "lora_rank"):
        if p not in lp:
            raise PatchError("%s: WanS2V.add_lora_to_model has no parameter '%s'" % (where, p))
    return pipe


class Patch:
    """The installed patch: what it replaced (to restore) and the stand-in it made."""

    def __init__(self, module, settings, make_denoiser):
        self.module = module
        self.settings = settings
        self.make_denoiser = make_denoiser
        self.dit = None
        self.scheduler_shift = None
        self._saved = []

    def _set(self, obj, name, value):
        self._saved.append((obj, name, obj.__dict__[name] if name in obj.__dict__ else getattr(obj, name)))
        setattr(obj, name, value)

    def uninstall(self):
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.uninstall()


def install(module, settings, make_denoiser):
    """Patches causal_s2v_pipeline (`module`) so that WanS2V runs its DiT and denoising loop through one
    LiveAvatarDenoiser made by make_denoiser(config, weights, **kwargs). Returns the Patch (uninstall() undoes it)."""
    pipe = check_pipeline(module)
    patch = Patch(module, settings, make_denoiser)

    class DiTFactory:
        """causal_s2v_pipeline's CausalWanModel_S2V: from_pretrained makes the stand-in, loads nothing."""

        @staticmethod
        def from_pretrained(checkpoint_dir, *args, torch_dtype=None, **kwargs):
            patch.dit = UnshardDiT(patch, checkpoint_dir, torch_dtype)
            return patch.dit

        def __getattr__(self, name):
            raise MissingAttribute("%s uses CausalWanModel_S2V.%s; run_liveavatar.py replaces that class with "
                             "from_pretrained only" % (PIPELINE_FILE, name))

    base = module.FlowMatchEulerDiscreteScheduler

    class UnshardEuler(base):
        """Live Avatar's Euler scheduler whose step() returns unshard's latent for the step the DiT stand-in
        just served (the pipeline keeps its latent in its own dtype, as the scheduler's output would be)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cfg = getattr(self, "config", None)
            shift = getattr(cfg, "shift", None) if cfg is not None else None
            if shift is None and isinstance(cfg, dict):
                shift = cfg.get("shift")
            patch.scheduler_shift = float(shift if shift is not None else kwargs.get("shift", 3.0))

        def step(self, model_output, timestep, sample, *args, **kwargs):
            out = super().step(model_output, timestep, sample, *args, **kwargs)
            dit = patch.dit
            if dit is None or dit.pending is None:
                return out
            _, latent = dit.pending
            dit.pending = None
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            ours = _like(latent, prev).reshape(prev.shape)
            if isinstance(out, tuple):
                return (ours,) + tuple(out[1:])
            out.prev_sample = ours
            return out

    # diffusers records the class name in the scheduler's config (_class_name): keep Live Avatar's.
    UnshardEuler.__name__ = UnshardEuler.__qualname__ = base.__name__

    orig_generate = pipe.generate
    orig_add_lora = pipe.add_lora_to_model
    generate_sig = inspect.signature(orig_generate)
    lora_sig = inspect.signature(orig_add_lora)

    @functools.wraps(orig_generate)
    def generate(self, *args, **kwargs):
        a = generate_sig.bind(self, *args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        audio = a.get("audio_path")
        if isinstance(audio, str) and "+" in audio:
            raise NotImplementedError("multi-speaker audio ('a.wav+b.wav') is not supported by unshard's LiveAvatarDenoiser")
        if a.get("sample_solver") != "euler":
            raise NotImplementedError("sample_solver=%r: Live Avatar's streaming loop and unshard run the Euler solver only"
                                      % (a.get("sample_solver"),))
        for attr in ("motion_frames", "num_frames_per_block"):
            if not hasattr(self, attr):
                raise PatchError("%s: WanS2V has no attribute '%s'" % (PIPELINE_FILE, attr))
        if not isinstance(self.noise_model, UnshardDiT):
            raise PatchError("WanS2V.noise_model is a %s, not the unshard stand-in: the DiT was built some other way"
                             % type(self.noise_model).__name__)
        self.noise_model.begin_run(infer_frames=int(a["infer_frames"]), sampling_steps=int(a["sampling_steps"]),
                                   motion_frames=int(self.motion_frames), frames_per_block=int(self.num_frames_per_block))
        result = orig_generate(self, *args, **kwargs)
        self.noise_model.end_run()
        return result

    @functools.wraps(orig_add_lora)
    def add_lora_to_model(self, model, *args, **kwargs):
        if not isinstance(model, UnshardDiT):
            return orig_add_lora(self, model, *args, **kwargs)
        a = lora_sig.bind(self, model, *args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        if a.get("pretrained_lora_path") is None:
            raise NotImplementedError("add_lora_to_model without pretrained_lora_path (a fresh LoRA to train) has no "
                                      "meaning for unshard's inference-only denoiser")
        model.lora = (a["pretrained_lora_path"], float(a["lora_alpha"]), int(a["lora_rank"]) if a.get("lora_rank") else None)
        print("[unshard] LoRA %s (rank %s, alpha %s): merged per shard by unshard when the denoiser is built"
              % model.lora)
        return model

    patch._set(module, "CausalWanModel_S2V", DiTFactory())
    patch._set(module, "FlowMatchEulerDiscreteScheduler", UnshardEuler)
    patch._set(pipe, "generate", generate)
    patch._set(pipe, "add_lora_to_model", add_lora_to_model)
    return patch


# ---- the command line --------------------------------------------------------------------------


def _parser():
    p = argparse.ArgumentParser(
        description="Live Avatar's single-process pipeline with unshard.LiveAvatarDenoiser as its DiT. Options not "
                    "listed here are Live Avatar's own (minimal_inference/s2v_streaming_interact.py) and passed on.",
        allow_abbrev=False)
    p.add_argument("--liveavatar", default=".", metavar="DIR", help="the Alibaba-Quark/LiveAvatar checkout (default: .)")
    p.add_argument("--entry", default=None, metavar="FILE", help="Live Avatar's entry script (default: DIR/" + ENTRY_FILE + ")")
    p.add_argument("--plan-only", "--dry-run", dest="plan_only", action="store_true",
                   help="build only the denoiser (numpy + unshard; no torch, no LiveAvatar) and print its plan")
    p.add_argument("--config", default=None, help="the DiT's config.json (default: --ckpt_dir/config.json)")
    p.add_argument("--weights", default=None, help="its safetensors file or index (default: the index in --ckpt_dir)")
    g = p.add_argument_group("unshard")
    g.add_argument("--unshard-backend", choices=["host", "cuda"], default=None,
                   help="default: cuda when torch.cuda is available, else host")
    g.add_argument("--unshard-devices", default=None, metavar="0,1,2,3", help="GPUs of the ranks (cuda backend)")
    g.add_argument("--unshard-world-size", type=int, default=None,
                   help="ranks (default: one per device with cuda, or the number of GPUs; 1 with host)")
    g.add_argument("--unshard-policy", default="prefetch:1", help="docs/conventions.md policy string (default prefetch:1)")
    g.add_argument("--unshard-schedule", choices=["steps", "replicated"], default="steps")
    g.add_argument("--unshard-budget", default=None, metavar="SIZE", help="per-rank budget, e.g. 22GiB: a plan over it is refused")
    g.add_argument("--unshard-dtype", choices=["bf16", "f32"], default=None, help="weight storage (default: the pipeline's, bf16)")
    g.add_argument("--unshard-gemm", choices=["blas", "portable"], default="blas")
    g.add_argument("--unshard-lora", default=None, metavar="FILE", help="LoRA safetensors (default: from --lora_path_dmd)")
    g.add_argument("--unshard-lora-alpha", type=float, default=None, help="default: the training config's lora_alpha")
    g.add_argument("--unshard-lora-cache", default=None, metavar="DIR", help="where a renamed copy of the LoRA goes")
    g.add_argument("--unshard-lora-ignore-extra", action="store_true", help="merge the LoRA factors, drop its other tensors")
    g.add_argument("--keep-t5-on-gpu", action="store_true", help="do not add --t5_cpu")
    return p


def _official(argv):
    """The Live Avatar flags this script reads (they stay in what is passed on)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--ckpt_dir", default=None)
    p.add_argument("--size", default=None)
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--infer_frames", type=int, default=None)
    p.add_argument("--ulysses_size", type=int, default=1)
    p.add_argument("--dit_fsdp", action="store_true")
    return p.parse_known_args(argv)[0]


def default_backend():
    try:
        import torch
    except ImportError:
        return "host"
    return "cuda" if torch.cuda.is_available() else "host"


def _torch_device_count():
    import torch

    return torch.cuda.device_count()


def _unshard_device_count():
    """The GPUs this process sees, asked of unshard instead of torch (--plan-only needs no torch); 0 when
    unshard cannot tell (then the constructor says what is missing: a CUDA build, or a device)."""
    try:
        import unshard

        return unshard.cuda_device_count()
    except Exception:
        return 0


def settings_from(opts, device_count=_torch_device_count):
    """The unshard settings from the options; device_count() gives the cuda backend's default world size
    (one rank per visible GPU) when neither --unshard-world-size nor --unshard-devices does."""
    backend = opts.unshard_backend or default_backend()
    devices = [int(d) for d in opts.unshard_devices.split(",")] if opts.unshard_devices else None
    world = opts.unshard_world_size
    if world is None:
        if devices:
            world = len(devices)
        elif backend == "cuda":
            world = max(1, device_count())
        else:
            world = 1
    return dict(backend=backend, devices=devices, world_size=world, policy=opts.unshard_policy, schedule=opts.unshard_schedule,
                budget=opts.unshard_budget, dtype=opts.unshard_dtype, gemm=opts.unshard_gemm, config=opts.config,
                weights=opts.weights, lora=opts.unshard_lora, lora_alpha=opts.unshard_lora_alpha,
                lora_cache=opts.unshard_lora_cache, lora_ignore_extra=opts.unshard_lora_ignore_extra)


def _import_unshard():
    try:
        import unshard
    except ImportError as e:
        raise SystemExit("run_liveavatar.py: cannot import unshard (%s); `pip install .` from the unshard checkout" % e)
    return unshard


def _make(unshard_module):
    def make(config, weights, **kwargs):
        try:
            return unshard_module.LiveAvatarDenoiser(config, weights, **{k: v for k, v in kwargs.items() if v is not None})
        except NotImplementedError as e:
            if kwargs.get("backend") == "cuda":
                raise SystemExit("run_liveavatar.py: %s\n(pass --unshard-backend host to run the DiT on the CPU ranks)" % e)
            raise
    return make


def _probe_backend(settings):
    """Fails now, not after Live Avatar has loaded umT5, wav2vec2 and the VAE, when this unshard has no CUDA
    backend: the constructor refuses an unbuilt backend before it looks at its files, so a probe with no
    files answers NotImplementedError (no backend) or FileNotFoundError (a backend, and nothing loaded)."""
    unshard = _import_unshard()
    missing = os.path.join(tempfile.gettempdir(), "run_liveavatar-no-such-file.json")
    try:
        unshard.LiveAvatarDenoiser(missing, missing, backend="cuda")
    except NotImplementedError as e:
        raise SystemExit("run_liveavatar.py: %s\n(pass --unshard-backend host to run the DiT on the CPU ranks)" % e)
    except Exception:  # the files are missing: the backend exists
        pass


def plan_only(opts, official, make_denoiser=None):
    settings = settings_from(opts, device_count=_unshard_device_count)  # no torch here
    make = make_denoiser or _make(_import_unshard())
    try:
        config, weights = model_files(official.ckpt_dir, opts.config, opts.weights)
    except PatchError as e:  # no --config / --weights / --ckpt_dir
        raise SystemExit("run_liveavatar.py: %s" % e)
    kwargs = dict(world_size=settings["world_size"], policy=settings["policy"], schedule=settings["schedule"],
                  backend=settings["backend"], devices=settings["devices"], gemm=settings["gemm"],
                  dtype=settings["dtype"] or "bf16", budget=settings["budget"])
    if official.size:
        kwargs["size"] = official.size.replace("*", "x")
    if official.sample_steps:
        kwargs["steps"] = official.sample_steps
    if official.infer_frames:  # Live Avatar's 73 motion frames (19 latent) and 3 latent frames per block
        kwargs["blocks_per_clip"] = ((official.infer_frames + 3 + 73) // 4 - 19) // 3
    try:
        den = make(config, weights, **kwargs)
    except (ValueError, FileNotFoundError) as e:  # a plan over the budget, a bad config or policy, a missing file
        raise SystemExit("run_liveavatar.py: %s" % e)
    plan = den.plan()
    print(repr(den))
    print("loop: %s" % json.dumps(den.loop))
    print("input shapes: %s" % json.dumps(den.input_shapes))
    print(format_plan(plan))
    print(json.dumps(plan, indent=1))
    return plan


def main(argv=None, make_denoiser=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = _parser().parse_known_args(argv)
    official = _official(rest)
    if opts.plan_only:
        plan_only(opts, official, make_denoiser)
        return 0

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise SystemExit("run_liveavatar.py runs one process (torchrun --nproc_per_node=1, or plain python): unshard drives "
                         "the local GPUs from it; WORLD_SIZE=%s would select Live Avatar's TPP pipeline" % os.environ["WORLD_SIZE"])
    if official.ulysses_size > 1 or official.dit_fsdp:
        raise SystemExit("run_liveavatar.py: --ulysses_size/--dit_fsdp shard Live Avatar's own DiT; unshard replaces it")
    # Live Avatar's entry initialises torch.distributed from the environment (env://): a plain `python` run
    # gets the single-process values torchrun would set.
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(k, v)

    root = os.path.abspath(opts.liveavatar)
    if not os.path.isfile(os.path.join(root, PIPELINE_FILE)):
        raise SystemExit("run_liveavatar.py: %s is not a LiveAvatar checkout (no %s); pass --liveavatar DIR" % (root, PIPELINE_FILE))
    entry = os.path.abspath(opts.entry or os.path.join(root, ENTRY_FILE))
    if not os.path.isfile(entry):
        raise SystemExit("run_liveavatar.py: no entry script %s" % entry)
    if root not in sys.path:
        sys.path.insert(0, root)

    if "--fp8" in rest:  # it converts Live Avatar's DiT's linear layers; the stand-in has none
        rest.remove("--fp8")
        print("[unshard] --fp8 dropped: unshard stores the DiT's weights as %s (--unshard-dtype)" % (opts.unshard_dtype or "bf16"))
    if not opts.keep_t5_on_gpu and "--t5_cpu" not in rest:
        rest.append("--t5_cpu")  # umT5 (~11 GiB) stays off cuda:0

    settings = settings_from(opts)
    make = make_denoiser or _make(_import_unshard())
    if make_denoiser is None and settings["backend"] == "cuda":
        _probe_backend(settings)
    import importlib

    module = importlib.import_module(PIPELINE_MODULE)
    patch = install(module, settings, make)
    print("[unshard] patched %s: DiT -> LiveAvatarDenoiser (backend %s, world size %d, devices %s, policy %s, schedule %s)"
          % (PIPELINE_FILE, settings["backend"], settings["world_size"], settings["devices"], settings["policy"], settings["schedule"]))
    import runpy

    sys.argv = [entry] + rest
    try:
        runpy.run_path(entry, run_name="__main__")
    finally:
        patch.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
