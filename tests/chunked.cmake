unshard_add_test(test_chunked test_chunked.cpp)
