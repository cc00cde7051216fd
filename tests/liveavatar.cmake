# Live Avatar's streaming S2V DiT (issue 7): the model against the official references, sharded
# under every policy, the KV cache and the command-line tool.
unshard_add_test(test_liveavatar_reference test_liveavatar_reference.cpp)
unshard_add_test(test_liveavatar_sharded test_liveavatar_sharded.cpp)
unshard_add_test(test_liveavatar_denoise test_liveavatar_denoise.cpp)
if(UNSHARD_BUILD_EXAMPLES)
  add_test(NAME cli_unshard_avatar_errors COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/avatar_errors.sh
                                                  ${CMAKE_BINARY_DIR}/bin ${CMAKE_CURRENT_SOURCE_DIR}/data)
  add_test(NAME cli_unshard_avatar_demo COMMAND ${CMAKE_BINARY_DIR}/bin/unshard-avatar --demo --world-size 2)
endif()
if(UNSHARD_BUILD_EXAMPLES)
  # The denoising loop (issue 12): errors, both schedules' outputs, the demo.
  set(_avatar_cuda "")
  if(UNSHARD_ENABLE_CUDA)
    set(_avatar_cuda cuda)
  endif()
  add_test(NAME cli_unshard_avatar_denoise COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/avatar_denoise.sh
                                                   ${CMAKE_BINARY_DIR}/bin ${CMAKE_CURRENT_SOURCE_DIR}/data ${_avatar_cuda})
  add_test(NAME cli_unshard_avatar_demo_denoise COMMAND ${CMAKE_BINARY_DIR}/bin/unshard-avatar --demo --denoise --world-size 3
                                                        --policy chunked:64KiB+prefetch:1)
endif()
if(UNSHARD_BUILD_EXAMPLES AND UNSHARD_ENABLE_CUDA)
  # unshard-avatar --backend cuda against the references and the host (issue 13); skipped (77)
  # without a GPU.
  add_test(NAME gpu_s2v_avatar_cuda COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/s2v_avatar_cuda.sh
                                            ${CMAKE_BINARY_DIR}/bin ${CMAKE_CURRENT_SOURCE_DIR}/data)
  set_tests_properties(gpu_s2v_avatar_cuda PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 600)
endif()
