# The usage requirements of unshard::cuda, shared by the build (cmake/cuda.cmake, under
# UNSHARD_ENABLE_CUDA=ON) and the installed package (unshard-config.cmake, COMPONENTS cuda): the CUDA
# runtime, cuBLASLt and NCCL, C++20 in .cu files, and --expt-relaxed-constexpr (kernels call the
# constexpr helpers of the host path). The backend's .cuh headers hold no kernels: a plain C++
# target compiles them with these include directories (no nvcc needed); the kernels need nvcc.
#
# unshard_link_cuda(<target> <reason_var>): adds all of it to the INTERFACE target <target> (made
# an IMPORTED one if there is none of that name) and sets <reason_var> to an empty string; or, where
# something is missing, makes and changes no target and sets <reason_var> to a sentence saying what
# is missing and how to point CMake at it.
function(unshard_link_cuda target reason_var)
  find_package(CUDAToolkit QUIET)
  if(NOT CUDAToolkit_FOUND)
    set(${reason_var} "the CUDA toolkit was not found (put nvcc on the PATH or set CUDAToolkit_ROOT)" PARENT_SCOPE)
    return()
  endif()
  if(NOT TARGET CUDA::cublasLt)
    set(${reason_var} "this CUDA toolkit (${CUDAToolkit_VERSION}) has no cuBLASLt" PARENT_SCOPE)
    return()
  endif()
  # NCCL ships with neither CMake config nor pkg-config files: look next to the toolkit, under
  # NCCL_HOME (CMake variable or environment) and in the system directories.
  set(_hints ${NCCL_HOME} $ENV{NCCL_HOME} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_TARGET_DIR})
  find_path(UNSHARD_NCCL_INCLUDE_DIR nccl.h HINTS ${_hints} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(UNSHARD_NCCL_LIBRARY nccl HINTS ${_hints} ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
  if(NOT UNSHARD_NCCL_INCLUDE_DIR OR NOT UNSHARD_NCCL_LIBRARY)
    set(${reason_var} "NCCL was not found: nccl.h (${UNSHARD_NCCL_INCLUDE_DIR}) or libnccl (${UNSHARD_NCCL_LIBRARY}); set NCCL_HOME to the NCCL installation" PARENT_SCOPE)
    return()
  endif()

  if(NOT TARGET ${target})
    add_library(${target} INTERFACE IMPORTED)
  endif()
  target_include_directories(${target} INTERFACE ${UNSHARD_NCCL_INCLUDE_DIR})
  target_link_libraries(${target} INTERFACE CUDA::cudart CUDA::cublasLt ${UNSHARD_NCCL_LIBRARY})
  target_compile_features(${target} INTERFACE cxx_std_20)
  # C++20 in .cu files. CMake 3.25 does not know that nvcc >= 12 supports cuda_std_20 (its feature
  # list for NVIDIA stops at 17), so the flag is passed directly there.
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(${target} INTERFACE cuda_std_20)
  else()
    target_compile_options(${target} INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
  target_compile_options(${target} INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
  set(UNSHARD_CUDA_VERSION ${CUDAToolkit_VERSION} PARENT_SCOPE)
  set(${reason_var} "" PARENT_SCOPE)
endfunction()
