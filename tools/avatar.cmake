# unshard-avatar: Live Avatar's streaming S2V DiT, sharded (issue 7).
add_executable(unshard-avatar unshard_avatar.cpp)
target_include_directories(unshard-avatar PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(unshard-avatar PRIVATE unshard::blas)
