#pragma once
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <vector>

#include "unshard/layer/model.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// The unsharded forward, with no runtime at all: every parameter read whole from the source into
// its own buffer, every layer run in order. The oracle the sharded runs are compared with, bit
// for bit. Plain heap memory: it is a test and tool utility, not a path that is planned.
template <model M>
class reference_runner {
 public:
  using state_type = typename M::state;

  template <weight_source S>
  reference_runner(const M& m, const S& weights) : model_(m) {
    buffer_set set;
    for (const buffer_spec& b : m.buffers()) {
      buffers_.push_back(make_buffer(b.bytes));
      set.add(b.name, {buffers_.back().get(), b.bytes});
    }
    state_ = std::make_unique<state_type>(m.make_state(set));
    for (std::size_t l = 0; l < m.layer_count(); ++l) {
      std::vector<param_views> subs;
      for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s) {
        std::vector<tensor_view> views;
        for (const param_spec& p : m.layer(l).parameters(s)) {
          buffers_.push_back(make_buffer(p.bytes()));
          detail::load_elements(weights, p, 0, static_cast<std::size_t>(p.dims.numel()), buffers_.back().get());
          views.emplace_back(buffers_.back().get(), p.type, p.dims);
        }
        subs.emplace_back(std::move(views));
      }
      params_.push_back(std::move(subs));
    }
  }

  state_type& state() noexcept { return *state_; }

  void forward() {
    for (std::size_t l = 0; l < model_.layer_count(); ++l)
      for (std::size_t s = 0; s < params_[l].size(); ++s) model_.layer(l).forward(s, params_[l][s], *state_);
  }

 private:
  struct free_deleter {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  using buffer = std::unique_ptr<std::byte, free_deleter>;
  static buffer make_buffer(std::size_t bytes) {
    auto* p = static_cast<std::byte*>(std::aligned_alloc(allocation_alignment, align_up(bytes == 0 ? 1 : bytes)));
    if (!p) throw_error("reference_runner: out of host memory allocating ", bytes, " bytes");
    return buffer(p);
  }

  const M& model_;
  std::vector<buffer> buffers_;
  std::unique_ptr<state_type> state_;
  std::vector<std::vector<param_views>> params_;
};

}  // namespace unshard
