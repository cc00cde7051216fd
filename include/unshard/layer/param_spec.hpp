#pragma once
// param_spec and param_views live in core/ (core/flat_layout.hpp lays parameters out and core/
// includes nothing above itself); this header keeps the layer-side include path.
#include "unshard/core/param_spec.hpp"
