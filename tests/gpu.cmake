# GPU tests (UNSHARD_ENABLE_CUDA=ON): every tests/gpu/test_*.cu is one doctest executable with the
# ctest label `gpu` (plus `multigpu` for test_multigpu_*.cu). They share gpu_main.cpp, which exits
# with 77 when no CUDA device is usable (or fewer than a multi-GPU test needs): ctest then reports
# the test as *skipped* (SKIP_RETURN_CODE), never as passed. gpu_main.cpp is plain C++ (g++), so
# nvcc compiles only the test files themselves.

add_library(unshard_gpu_test_main STATIC gpu/gpu_main.cpp)
target_link_libraries(unshard_gpu_test_main PUBLIC doctest::doctest unshard::cuda)
target_include_directories(unshard_gpu_test_main PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/gpu)
target_compile_definitions(unshard_gpu_test_main PUBLIC UNSHARD_TEST_DATA_DIR="${CMAKE_CURRENT_SOURCE_DIR}/data")

file(GLOB unshard_gpu_test_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/gpu/test_*.cu)
foreach(src ${unshard_gpu_test_sources})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  unshard_cuda_target(${name})
  target_link_libraries(${name} PRIVATE unshard_gpu_test_main)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  add_test(NAME ${name} COMMAND ${name})
  set(labels gpu)
  if(name MATCHES "^test_multigpu_")
    list(APPEND labels multigpu)
  endif()
  set_tests_properties(${name} PROPERTIES LABELS "${labels}" SKIP_RETURN_CODE 77)
endforeach()

# The backend's parts that need no device (error messages, launcher environment, unique-id file
# exchange) run everywhere, GPU or not: plain C++ against the CUDA headers, label `cuda_host`.
unshard_add_test(test_cuda_host gpu/test_cuda_host.cpp LABELS cuda_host)
target_link_libraries(test_cuda_host PRIVATE unshard::cuda)

# Every CUDA backend header compiles on its own in a plain C++ TU (g++ with the CUDA include path):
# the .cuh counterpart of tests/tests.cmake's header self-compile, which covers only .hpp files.
file(GLOB unshard_cuda_backend_headers RELATIVE ${PROJECT_SOURCE_DIR}/include
     ${PROJECT_SOURCE_DIR}/include/unshard/backend/cuda/*.cuh)
set(cuda_header_sources)
foreach(h ${unshard_cuda_backend_headers})
  string(MAKE_C_IDENTIFIER ${h} id)
  set(src ${CMAKE_CURRENT_BINARY_DIR}/cuda_header_tests/${id}.cpp)
  file(CONFIGURE OUTPUT ${src} CONTENT "#include <${h}>\n#include <${h}>\n")
  list(APPEND cuda_header_sources ${src})
endforeach()
add_library(unshard_cuda_header_tests OBJECT ${cuda_header_sources})
target_link_libraries(unshard_cuda_header_tests PRIVATE unshard::cuda)
