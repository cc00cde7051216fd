"""unshard: Live Avatar's S2V denoiser over sharded weights, under a peak memory known before the run.

    import unshard
    den = unshard.LiveAvatarDenoiser("config.json", "model.safetensors", world_size=4, policy="prefetch:1")
    den.sink(ref_latents=ref, motion_latents=motion, context=context)
    latent = den.denoise_block(noise=noise, audio=audio, cond_states=cond)      # [16, F, H, W]
    for latent in den.denoise_blocks(blocks):                                  # several in flight
        ...
    den.plan(); den.peaks()

    # backend="cuda" (a module built with CUDA: unshard.backends == ("host", "cuda")): rank r on GPU
    # devices[r]; CUDA tensors in (read in place), DLPack tensors out (torch.from_dlpack(latent)).
    den = unshard.LiveAvatarDenoiser(..., backend="cuda", world_size=2, devices=[0, 1], compute="bf16")

See python/README.md for the whole API.
"""

import itertools as _itertools

try:
    from . import _unshard
except ImportError as _e:  # the package directory of a checkout, without the compiled module
    raise ImportError(
        "unshard: the compiled module unshard._unshard is missing or does not load (" + str(_e) + "); "
        "install the package with `pip install .` from the repository root (or build it with CMake where "
        "nanobind is installed and put <build>/python on PYTHONPATH). Running from the repository's python/ "
        "directory imports the sources instead of the installed package."
    ) from _e

__version__ = _unshard.__version__
blas_available = _unshard.blas_available
backends = _unshard.backends  # ("host",), or ("host", "cuda") when built with UNSHARD_ENABLE_CUDA=ON
cuda_available = _unshard.cuda_available  # built with CUDA and a CUDA device visible
cuda_device_count = _unshard.cuda_device_count
_debug_view_pointer = _unshard._debug_view_pointer
_to_numpy = _unshard._to_numpy  # a CUDA result (or any float32 DLPack tensor) as a numpy array


class LiveAvatarDenoiser(_unshard.LiveAvatarDenoiser):
    """Live Avatar's denoising loop (the cond prefill, then every block through its Euler steps) over
    the S2V model, its weights sharded over `world_size` ranks under `policy`, the steps spread over
    the ranks under `schedule="steps"` (bit-identical to the sequential loop): host ranks (threads)
    with backend="host", GPUs (rank r on devices[r], one process) with backend="cuda".

    LiveAvatarDenoiser(config, weights, lora=None, lora_alpha=None, world_size=1, policy="prefetch:1",
                       schedule="steps", backend="host", devices=None, gemm=None, dtype="f32",
                       size=None, clips=None, blocks_per_clip=None, steps=None, shift=None, seed=0,
                       budget=None, strict=False, audio_frames=None, motion_frames=None, compute="f32")
    """

    def denoise_blocks(self, blocks, all_steps=False, window=None, stream=None):
        """Denoises the blocks of `blocks` (an iterable of dicts with noise, audio, cond_states and
        optionally relative_dist, clip, block), several in flight under the `steps` schedule, and
        yields their latents (dicts with every step's outputs when all_steps=True) in order.

        window=None collects the whole iterable and runs it as one pipeline; window=N runs it N blocks
        at a time (for an endless stream; each window fills and drains the pipeline). This is a
        generator: nothing runs, and no input is checked, until it is iterated.

        stream (backend="cuda"): the caller's CUDA stream, as for denoise_block.
        """
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError("window must be a positive integer or None, got %r" % (window,))
        it = iter(blocks)
        while True:
            chunk = list(it) if window is None else list(_itertools.islice(it, window))
            if not chunk:
                return
            yield from self._denoise_many(chunk, all_steps, stream)
            if window is None:
                return


__all__ = ["LiveAvatarDenoiser", "backends", "blas_available", "cuda_available", "cuda_device_count", "__version__"]
