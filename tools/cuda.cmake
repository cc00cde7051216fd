# unshard-dit --backend cuda: one CUDA translation unit (dit_cuda.cu) linked into the same tool.
target_sources(unshard-dit PRIVATE dit_cuda.cu)
target_compile_definitions(unshard-dit PRIVATE UNSHARD_DIT_CUDA=1)
unshard_cuda_target(unshard-dit)

# unshard-avatar --backend cuda: likewise, one CUDA translation unit (avatar_cuda.cu).
target_sources(unshard-avatar PRIVATE avatar_cuda.cu)
target_compile_definitions(unshard-avatar PRIVATE UNSHARD_AVATAR_CUDA=1)
unshard_cuda_target(unshard-avatar)
