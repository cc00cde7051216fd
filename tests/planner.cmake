# The planner: time model, profiles, chunked plans and predicted timelines (test_plan_liveavatar,
# the ledger, is registered in tests.cmake).
unshard_add_test(test_plan_time test_plan_time.cpp)
if(UNSHARD_BUILD_EXAMPLES)
  add_test(NAME cli_unshard_plan_timeline COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/plan_timeline.sh
                                                 ${CMAKE_BINARY_DIR}/bin)
endif()
