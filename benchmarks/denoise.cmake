add_executable(bench_denoise denoise.cpp)
target_link_libraries(bench_denoise PRIVATE unshard::blas)
