# The CUDA backend's build: included by the top CMakeLists when UNSHARD_ENABLE_CUDA=ON, after
# check_language(CUDA) found nvcc. It defines unshard::cuda, an INTERFACE target for everything that
# uses the CUDA headers (include/unshard/backend/cuda, include/unshard/kernels/cuda): the header-only
# core plus the CUDA runtime, cuBLASLt and NCCL (cmake/unshard-cuda.cmake, which the installed
# package's `find_package(unshard COMPONENTS cuda)` uses too).

# sm_89 (RTX 4090) and sm_90 (H100/H800) unless the user chose; this must precede
# enable_language(CUDA), which would otherwise cache the compiler's default architecture.
if(NOT CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "89;90" CACHE STRING "CUDA architectures to build for (89: RTX 4090, 90: H100)" FORCE)
endif()
enable_language(CUDA)
include(${CMAKE_CURRENT_LIST_DIR}/unshard-cuda.cmake)

add_library(unshard_cuda INTERFACE)
add_library(unshard::cuda ALIAS unshard_cuda)
unshard_link_cuda(unshard_cuda _unshard_cuda_missing)
if(_unshard_cuda_missing)
  message(FATAL_ERROR "UNSHARD_ENABLE_CUDA=ON, but ${_unshard_cuda_missing}")
endif()
target_link_libraries(unshard_cuda INTERFACE unshard)
include(${CMAKE_CURRENT_LIST_DIR}/cudnn_frontend.cmake)  # cuDNN SDPA for bf16 attention, when found
message(STATUS "unshard: CUDA ${UNSHARD_CUDA_VERSION} for sm ${CMAKE_CUDA_ARCHITECTURES}, NCCL ${UNSHARD_NCCL_LIBRARY}")

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
