# ctest -P script: builds and runs the consumer project against unshard.
#   MODE=find_package: installs unshard into a temporary prefix, then find_package(unshard).
#   MODE=fetchcontent: FetchContent_Declare(SOURCE_DIR <this checkout>).
set(work ${BINARY_DIR}/packaging-${MODE})
file(REMOVE_RECURSE ${work})
if(MODE STREQUAL "find_package")
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${work}/unshard-build -DUNSHARD_BUILD_TESTS=OFF
                          -DUNSHARD_BUILD_EXAMPLES=OFF -DUNSHARD_BUILD_BENCHMARKS=OFF -DUNSHARD_INSTALL=ON
                          -DCMAKE_INSTALL_PREFIX=${work}/prefix RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "configuring unshard for install failed")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${work}/unshard-build RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "installing unshard failed")
  endif()
  set(extra -DCMAKE_PREFIX_PATH=${work}/prefix)
else()
  set(extra -DUNSHARD_SOURCE_DIR=${SOURCE_DIR})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/packaging/consumer -B ${work}/consumer
                        -DUNSHARD_CONSUMER_MODE=${MODE} ${extra} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the ${MODE} consumer failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${work}/consumer RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the ${MODE} consumer failed")
endif()
execute_process(COMMAND ${work}/consumer/consumer RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the ${MODE} consumer ran and failed")
endif()
