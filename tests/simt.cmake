# unshard's own CUDA kernels (include/unshard/kernels/cuda) on the SIMT emulator
# (kernels/cuda/simt_emulator.cuh): the GPU tests' own sources, compiled by the host compiler and
# run on the CPU with a host CUDA runtime and a host reading of cuBLASLt's matmul
# (support/simt_cuda_runtime.cpp, support/simt_cublaslt.cpp), label `simt`. Each runs
# twice, in both thread orders (UNSHARD_SIMT_ORDER), which turns a missing barrier into a wrong
# value. Needs the CUDA toolkit's headers only: no nvcc, no GPU, no CUDA library. cuDNN and NCCL
# are not emulated: their tests stay GPU-only (tests/gpu.cmake).
find_path(UNSHARD_CUDA_HEADERS cuda_runtime.h HINTS ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES include
          PATHS /usr/local/cuda/include)
if(NOT UNSHARD_CUDA_HEADERS)
  message(STATUS "unshard: no CUDA headers (cuda_runtime.h): the kernels' SIMT-emulator tests are not built")
  return()
endif()
message(STATUS "unshard: the CUDA kernels' tests also run on the SIMT emulator (headers: ${UNSHARD_CUDA_HEADERS})")

# The host side of the emulated device: the CUDA runtime calls and cuBLASLt's matmul (both in
# support/, both stricter than the libraries where the libraries would fault).
add_library(unshard_simt_runtime STATIC support/simt_cuda_runtime.cpp support/simt_cublaslt.cpp support/simt_nccl.cpp)
target_include_directories(unshard_simt_runtime PUBLIC ${UNSHARD_CUDA_HEADERS})
target_link_libraries(unshard_simt_runtime PRIVATE unshard)
if(UNSHARD_SANITIZE)
  target_compile_options(unshard_simt_runtime PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer)
endif()

# unshard_simt_target(target): compiles the target's kernels for the emulator.
function(unshard_simt_target target)
  target_link_libraries(${target} PRIVATE unshard_simt_runtime)
  target_compile_definitions(${target} PRIVATE UNSHARD_SIMT_EMULATION)
  # The kernels' 16-byte vector loads reinterpret bf16 arrays as uint4, as CUDA code does; nvcc
  # allows it, and the host compiler must not optimise on strict aliasing across them.
  # (#pragma unroll is nvcc's; g++ also cannot see that the vector kernels read a register array
  # only under the condition they filled it under, `vi < nvec` in both loops.)
  target_compile_options(${target} PRIVATE -fno-strict-aliasing -Wno-unknown-pragmas -Wno-maybe-uninitialized
                                           -Wno-uninitialized)
endfunction()

# The emulator's own semantics and the faults it names.
unshard_add_test(test_simt_emulator test_simt_emulator.cpp LABELS simt)
unshard_simt_target(test_simt_emulator)
target_include_directories(test_simt_emulator PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})

# The GPU tests that run here, whole: our kernels, the op set (its GEMMs on the host reading of
# cuBLASLt, support/simt_cublaslt.cpp) and the S2V model on the op set against the references.
# Not here: what needs cuDNN (test_sdpa), NCCL or several devices (the backend, Wan's sessions).
set(_simt_tests test_kernels test_row_kernels_bf16 test_s2v_ops test_gemm_linear test_gemm_bf16 test_s2v_cuda test_wan_cuda)

foreach(name ${_simt_tests})
  # A .cpp that includes the .cu: the same source file cannot be CUDA for the GPU test and C++ here.
  set(wrapper ${CMAKE_CURRENT_BINARY_DIR}/simt/${name}.cpp)
  file(CONFIGURE OUTPUT ${wrapper} CONTENT "#include \"${CMAKE_CURRENT_SOURCE_DIR}/gpu/${name}.cu\"\n")
  set(target simt_${name})
  unshard_add_test(${target} ${wrapper} LABELS simt)
  unshard_simt_target(${target})
  set_tests_properties(${target} PROPERTIES ENVIRONMENT UNSHARD_SIMT_ORDER=forward)
  add_test(NAME ${target}_reverse COMMAND ${target})
  set_tests_properties(${target}_reverse PROPERTIES ENVIRONMENT UNSHARD_SIMT_ORDER=reverse LABELS simt)
endforeach()

# unshard-avatar with its --backend cuda path built for the emulator (without the cuDNN frontend:
# the bf16 attention is our kernel), in its own directory so its name stays unshard-avatar, and
# tests/cli/s2v_avatar_cuda.sh (the GPU's check of it against the references and the host) run on
# it: the denoising loop on the CUDA backend at world size 1, every policy and precision the script
# checks, on the CPU.
if(UNSHARD_BUILD_EXAMPLES)
  set(_avatar_cuda_wrapper ${CMAKE_CURRENT_BINARY_DIR}/simt/avatar_cuda.cpp)
  file(CONFIGURE OUTPUT ${_avatar_cuda_wrapper} CONTENT "#include \"${PROJECT_SOURCE_DIR}/tools/avatar_cuda.cu\"\n")
  add_executable(simt_unshard_avatar ${PROJECT_SOURCE_DIR}/tools/unshard_avatar.cpp ${_avatar_cuda_wrapper})
  target_include_directories(simt_unshard_avatar PRIVATE ${PROJECT_SOURCE_DIR}/tools)
  target_link_libraries(simt_unshard_avatar PRIVATE unshard::blas)
  target_compile_definitions(simt_unshard_avatar PRIVATE UNSHARD_AVATAR_CUDA=1)
  unshard_simt_target(simt_unshard_avatar)
  set_target_properties(simt_unshard_avatar PROPERTIES OUTPUT_NAME unshard-avatar
                                                       RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/simt-bin)
  add_test(NAME simt_s2v_avatar_cuda COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/s2v_avatar_cuda.sh
                                             ${CMAKE_BINARY_DIR}/simt-bin ${CMAKE_CURRENT_SOURCE_DIR}/data)
  set_tests_properties(simt_s2v_avatar_cuda PROPERTIES LABELS simt ENVIRONMENT UNSHARD_SIMT=1 TIMEOUT 900)
endif()
