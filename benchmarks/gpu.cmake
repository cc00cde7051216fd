# GPU benchmarks (UNSHARD_ENABLE_CUDA=ON): every benchmarks/gpu/*.cu becomes bench_gpu_<name>.
# Built in CI (no GPU there), run on a machine with one; each writes its results file under
# benchmarks/results/ by default.
file(GLOB unshard_gpu_bench_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/gpu/*.cu)
foreach(src ${unshard_gpu_bench_sources})
  get_filename_component(name ${src} NAME_WE)
  string(REGEX REPLACE "^bench_" "" name ${name})
  add_executable(bench_gpu_${name} ${src})
  unshard_cuda_target(bench_gpu_${name})
  target_compile_definitions(bench_gpu_${name} PRIVATE
    UNSHARD_BENCH_RESULTS_DIR="${CMAKE_CURRENT_SOURCE_DIR}/results")
endforeach()
