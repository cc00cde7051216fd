add_executable(bench_chunked chunked.cpp)
target_link_libraries(bench_chunked PRIVATE unshard::blas)
