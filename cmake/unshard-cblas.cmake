# The BLAS behind unshard::blas, shared by the build (the top CMakeLists) and the installed package
# (unshard-config.cmake): OpenBLAS's CBLAS for the host GEMMs of kernels/host/gemm.hpp.
#
# unshard_link_cblas(<target>): when OpenBLAS and its cblas.h are found, the INTERFACE target
# <target> links BLAS::BLAS, gets cblas.h's directory and defines UNSHARD_HAVE_CBLAS=1; otherwise it
# is left as it is (gemm.hpp then runs its portable GEMM). Sets UNSHARD_CBLAS_FOUND and
# UNSHARD_CBLAS_LIBRARIES in the caller.
function(unshard_link_cblas target)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS QUIET)
  find_path(UNSHARD_CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas)
  if(BLAS_FOUND AND UNSHARD_CBLAS_INCLUDE)
    target_link_libraries(${target} INTERFACE BLAS::BLAS)
    target_include_directories(${target} INTERFACE ${UNSHARD_CBLAS_INCLUDE})
    target_compile_definitions(${target} INTERFACE UNSHARD_HAVE_CBLAS=1)
    set(UNSHARD_CBLAS_FOUND TRUE PARENT_SCOPE)
    set(UNSHARD_CBLAS_LIBRARIES "${BLAS_LIBRARIES}" PARENT_SCOPE)
  else()
    set(UNSHARD_CBLAS_FOUND FALSE PARENT_SCOPE)
  endif()
endfunction()
