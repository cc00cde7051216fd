# The planner's time model checked against the host backend (docs/planner.md, "Time model check").
# Run: <build>/benchmarks/bench_time_model_check --out benchmarks/results/time_model_check.csv
add_executable(bench_time_model_check time_model_check.cpp)
target_link_libraries(bench_time_model_check PRIVATE unshard::unshard)
target_include_directories(bench_time_model_check PRIVATE ${PROJECT_SOURCE_DIR}/examples)  # toy_layer/toy_model.hpp
target_compile_definitions(bench_time_model_check PRIVATE UNSHARD_TEST_DATA_DIR="${PROJECT_SOURCE_DIR}/tests/data")
