# The CUDA backend's build: included by the top CMakeLists when UNSHARD_ENABLE_CUDA=ON, after
# check_language(CUDA) found nvcc. It defines unshard::cuda, an INTERFACE target for everything that
# uses the CUDA headers (include/unshard/backend/cuda, include/unshard/kernels/cuda): the header-only
# core plus the CUDA runtime, cuBLASLt and NCCL. Build-tree only for now: exporting it would make
# the installed package config require CUDAToolkit (see the note at the end).

# sm_89 (RTX 4090) and sm_90 (H100/H800) unless the user chose; this must precede
# enable_language(CUDA), which would otherwise cache the compiler's default architecture.
if(NOT CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "89;90" CACHE STRING "CUDA architectures to build for (89: RTX 4090, 90: H100)" FORCE)
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# NCCL ships with neither CMake config nor pkg-config files: look next to the toolkit, under
# NCCL_HOME (CMake variable or environment) and in the system directories.
set(_unshard_nccl_hints ${NCCL_HOME} $ENV{NCCL_HOME} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_TARGET_DIR})
find_path(UNSHARD_NCCL_INCLUDE_DIR nccl.h HINTS ${_unshard_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS}
          PATH_SUFFIXES include)
find_library(UNSHARD_NCCL_LIBRARY nccl HINTS ${_unshard_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
             PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
if(NOT UNSHARD_NCCL_INCLUDE_DIR OR NOT UNSHARD_NCCL_LIBRARY)
  message(FATAL_ERROR "UNSHARD_ENABLE_CUDA=ON needs NCCL: nccl.h (${UNSHARD_NCCL_INCLUDE_DIR}) or libnccl "
                      "(${UNSHARD_NCCL_LIBRARY}) not found; set NCCL_HOME to the NCCL installation")
endif()
if(NOT TARGET CUDA::cublasLt)
  message(FATAL_ERROR "UNSHARD_ENABLE_CUDA=ON needs cuBLASLt, which this CUDA toolkit (${CUDAToolkit_VERSION}) lacks")
endif()
message(STATUS "unshard: CUDA ${CUDAToolkit_VERSION} for sm ${CMAKE_CUDA_ARCHITECTURES}, NCCL ${UNSHARD_NCCL_LIBRARY}")

add_library(unshard_nccl INTERFACE)
target_include_directories(unshard_nccl INTERFACE ${UNSHARD_NCCL_INCLUDE_DIR})
target_link_libraries(unshard_nccl INTERFACE ${UNSHARD_NCCL_LIBRARY})

add_library(unshard_cuda INTERFACE)
add_library(unshard::cuda ALIAS unshard_cuda)
target_link_libraries(unshard_cuda INTERFACE unshard CUDA::cudart CUDA::cublasLt unshard_nccl)
target_compile_features(unshard_cuda INTERFACE cxx_std_20)
# C++20 in .cu files. CMake 3.25 does not know that nvcc >= 12 supports cuda_std_20 (its feature
# list for NVIDIA stops at 17), so the flag is passed directly there.
if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
  target_compile_features(unshard_cuda INTERFACE cuda_std_20)
else()
  target_compile_options(unshard_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
endif()
# Kernels call the constexpr helpers of the host path (align_up, the row math) from device code.
target_compile_options(unshard_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)

# unshard_cuda_target(target): makes a target that has .cu sources build with nvcc. The top
# CMakeLists adds -Wall -Wextra for every language, and nvcc rejects them ("Unknown option
# '-Wall'"): such warning flags are handed to nvcc's host compiler instead. Harmless once the top
# level restricts them to CXX with $<$<COMPILE_LANGUAGE:CXX>:...>.
function(unshard_cuda_target target)
  get_target_property(_opts ${target} COMPILE_OPTIONS)
  if(_opts)
    set(_fixed)
    foreach(_o IN LISTS _opts)
      if(_o MATCHES "^-W" AND NOT _o MATCHES "^\\$<")
        list(APPEND _fixed "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${_o}>" "$<$<NOT:$<COMPILE_LANGUAGE:CUDA>>:${_o}>")
      else()
        list(APPEND _fixed "${_o}")
      endif()
    endforeach()
    set_property(TARGET ${target} PROPERTY COMPILE_OPTIONS "${_fixed}")
  endif()
  target_link_libraries(${target} PRIVATE unshard::cuda)
endfunction()

# Installing unshard::cuda would need `find_dependency(CUDAToolkit)` and an NCCL lookup in
# unshard-config.cmake.in, and the NCCL path above is machine-specific; until a user asks for it,
# consumers of an installed unshard link CUDA::cudart CUDA::cublasLt and nccl themselves.
