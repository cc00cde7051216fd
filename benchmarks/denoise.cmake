add_executable(bench_denoise denoise.cpp)
target_link_libraries(bench_denoise PRIVATE unshard::blas)
add_executable(bench_fp8_kv_schedules fp8_kv_schedules.cpp)
target_link_libraries(bench_fp8_kv_schedules PRIVATE unshard::blas)
