# The process backend: ranks as processes on loopback, bootstrapped as under torchrun.
unshard_add_test(test_process_backend test_process_backend.cpp LABELS process)
set_tests_properties(test_process_backend PROPERTIES TIMEOUT 600)
if(TARGET unshard-launch)
  # The launcher tests run this test binary's worker cases under unshard-launch.
  target_compile_definitions(test_process_backend PRIVATE UNSHARD_LAUNCH_PATH="$<TARGET_FILE:unshard-launch>")
  add_dependencies(test_process_backend unshard-launch)
endif()
if(UNSHARD_BUILD_EXAMPLES)
  add_test(NAME cli_unshard_dit_process COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/dit_process.sh
                                                ${CMAKE_BINARY_DIR}/bin ${CMAKE_CURRENT_SOURCE_DIR}/data)
  set_tests_properties(cli_unshard_dit_process PROPERTIES LABELS process TIMEOUT 300)
endif()
if(UNSHARD_BUILD_EXAMPLES)
  # The denoising loop's steps schedule with one process per rank (issue 12).
  add_test(NAME cli_unshard_avatar_denoise_process COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/avatar_denoise_process.sh
                                                           ${CMAKE_BINARY_DIR}/bin ${CMAKE_CURRENT_SOURCE_DIR}/data)
  set_tests_properties(cli_unshard_avatar_denoise_process PROPERTIES LABELS process TIMEOUT 300)
endif()
if(UNSHARD_BUILD_EXAMPLES)
  # unshard-avatar's forward mode (the recorded calls) with one process per rank.
  add_test(NAME cli_unshard_avatar_process COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/avatar_process.sh
                                                   ${CMAKE_BINARY_DIR}/bin ${CMAKE_CURRENT_SOURCE_DIR}/data)
  set_tests_properties(cli_unshard_avatar_process PROPERTIES LABELS process TIMEOUT 300)
endif()
