# unshard-launch: one process per rank with torchrun's variables (the process backend's launcher).
add_executable(unshard-launch unshard_launch.cpp)
target_include_directories(unshard-launch PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(unshard-launch PRIVATE unshard::unshard)
