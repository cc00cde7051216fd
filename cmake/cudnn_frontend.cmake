# cuDNN's fused attention (kernels/cuda/sdpa.cuh) through the cudnn-frontend C++ headers: included
# by cmake/cuda.cmake. The headers come from -DUNSHARD_CUDNN_FRONTEND_INCLUDE=DIR, or from the
# `nvidia-cudnn-frontend` PyPI package of the python3 on PATH (its `include/` next to the `cudnn`
# module); libcudnn (cuDNN 9) from the CUDA toolkit, CUDNN_HOME or the system. With both, the
# unshard::cuda target gets UNSHARD_HAVE_CUDNN_FRONTEND=1 and links cuDNN; without, bf16
# attention runs unshard's own kernel (attention.cuh) and this says so at configure time.

set(UNSHARD_CUDNN_FRONTEND_INCLUDE "" CACHE PATH "Directory holding cudnn_frontend.h (default: from python3's nvidia-cudnn-frontend)")
option(UNSHARD_USE_CUDNN_FRONTEND "Use cuDNN's SDPA for bf16 attention when the frontend headers and cuDNN are found" ON)

find_package(CUDAToolkit QUIET)  # its variables (unshard_link_cuda found it in a function scope)
set(_unshard_cudnn_fe_dir "")
if(UNSHARD_USE_CUDNN_FRONTEND)
  if(UNSHARD_CUDNN_FRONTEND_INCLUDE)
    set(_unshard_cudnn_fe_dir "${UNSHARD_CUDNN_FRONTEND_INCLUDE}")
  else()
    find_program(UNSHARD_PYTHON3 python3)
    if(UNSHARD_PYTHON3)
      execute_process(
        COMMAND "${UNSHARD_PYTHON3}" -c
                "import cudnn, os; print(os.path.join(os.path.dirname(os.path.dirname(cudnn.__file__)), 'include'))"
        OUTPUT_VARIABLE _unshard_cudnn_fe_py OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _unshard_py_rc)
      if(_unshard_py_rc EQUAL 0 AND EXISTS "${_unshard_cudnn_fe_py}/cudnn_frontend.h")
        set(_unshard_cudnn_fe_dir "${_unshard_cudnn_fe_py}")
      endif()
    endif()
  endif()
endif()

set(_unshard_cudnn_hints ${CUDNN_HOME} $ENV{CUDNN_HOME} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_TARGET_DIR})
if(_unshard_cudnn_fe_dir AND EXISTS "${_unshard_cudnn_fe_dir}/cudnn_frontend.h")
  find_path(UNSHARD_CUDNN_INCLUDE_DIR cudnn.h HINTS ${_unshard_cudnn_hints} ${CUDAToolkit_INCLUDE_DIRS}
            PATH_SUFFIXES include)
  find_library(UNSHARD_CUDNN_LIBRARY cudnn HINTS ${_unshard_cudnn_hints} ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
endif()

if(_unshard_cudnn_fe_dir AND EXISTS "${_unshard_cudnn_fe_dir}/cudnn_frontend.h" AND UNSHARD_CUDNN_INCLUDE_DIR
   AND UNSHARD_CUDNN_LIBRARY)
  set(UNSHARD_HAVE_CUDNN_FRONTEND ON)
  # SYSTEM: the frontend's own warnings are not ours (-Wall -Wextra).
  target_include_directories(unshard_cuda SYSTEM INTERFACE "${_unshard_cudnn_fe_dir}" "${UNSHARD_CUDNN_INCLUDE_DIR}")
  # The frontend's header-only engines compile some kernels at run time: NVRTC.
  target_link_libraries(unshard_cuda INTERFACE "${UNSHARD_CUDNN_LIBRARY}" $<$<TARGET_EXISTS:CUDA::nvrtc>:CUDA::nvrtc>)
  target_compile_definitions(unshard_cuda INTERFACE UNSHARD_HAVE_CUDNN_FRONTEND=1)
  message(STATUS "unshard: bf16 attention uses cuDNN SDPA (frontend ${_unshard_cudnn_fe_dir}, ${UNSHARD_CUDNN_LIBRARY})")
else()
  set(UNSHARD_HAVE_CUDNN_FRONTEND OFF)
  if(NOT _unshard_cudnn_fe_dir OR NOT EXISTS "${_unshard_cudnn_fe_dir}/cudnn_frontend.h")
    message(STATUS "unshard: cuDNN frontend headers not found: attention uses unshard's own kernel "
                   "(pip install nvidia-cudnn-frontend, or -DUNSHARD_CUDNN_FRONTEND_INCLUDE=DIR)")
  else()
    message(STATUS "unshard: cuDNN frontend headers found but cuDNN (cudnn.h/libcudnn) not: attention uses unshard's "
                   "own kernel (set CUDNN_HOME)")
  endif()
endif()
