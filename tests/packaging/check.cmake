# ctest -P script: builds and runs the consumer project against unshard.
#   MODE=find_package: installs unshard into a temporary prefix, then find_package(unshard); also checks
#                      that the license is installed and that COMPONENTS cuda fails, saying why, where
#                      the CUDA toolkit is not found.
#   MODE=fetchcontent: FetchContent_Declare(SOURCE_DIR <this checkout>).
set(work ${BINARY_DIR}/packaging-${MODE})
file(REMOVE_RECURSE ${work})
if(MODE STREQUAL "find_package")
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${work}/unshard-build -DUNSHARD_BUILD_TESTS=OFF
                          -DUNSHARD_BUILD_EXAMPLES=OFF -DUNSHARD_BUILD_BENCHMARKS=OFF -DUNSHARD_BUILD_PYTHON=OFF
                          -DUNSHARD_INSTALL=ON -DCMAKE_INSTALL_PREFIX=${work}/prefix RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "configuring unshard for install failed")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${work}/unshard-build RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "installing unshard failed")
  endif()
  if(NOT EXISTS ${work}/prefix/share/doc/unshard/LICENSE)
    message(FATAL_ERROR "the install has no share/doc/unshard/LICENSE")
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
foreach(program consumer consumer_blas consumer_cuda)
  if(program STREQUAL "consumer_cuda" AND NOT EXISTS ${work}/consumer/consumer_cuda)
    message(STATUS "no CUDA toolkit found: unshard::cuda not consumed")
    continue()
  endif()
  execute_process(COMMAND ${work}/consumer/${program} RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "the ${MODE} ${program} ran and failed")
  endif()
endforeach()

if(MODE STREQUAL "find_package")
  # COMPONENTS cuda where the CUDA toolkit cannot be found (hidden here if it is installed).
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/packaging/consumer -B ${work}/consumer-no-cuda
                          -DUNSHARD_CONSUMER_MODE=${MODE} -DUNSHARD_CONSUMER_REQUIRE_CUDA=ON
                          -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON ${extra}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc)
    message(FATAL_ERROR "find_package(unshard COMPONENTS cuda) succeeded without the CUDA toolkit")
  endif()
  string(REGEX REPLACE "[ \t\r\n]+" " " err_words "${err}")  # CMake wraps the message's lines
  if(NOT err_words MATCHES "unshard::cuda \\(COMPONENTS cuda\\) is not available: the CUDA toolkit was not found")
    message(FATAL_ERROR "find_package(unshard COMPONENTS cuda) without CUDA failed without saying why:\n${err}")
  endif()
endif()
