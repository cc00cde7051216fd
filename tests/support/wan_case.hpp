#pragma once
// The Wan reference cases of tests/data (wan_<name>.safetensors with wan_<name>.config.json) as the
// Wan tests load them.
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "reference_checks.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/models/wan/config.hpp"
#include "unshard/models/wan/geometry.hpp"
#include "unshard/models/wan/model.hpp"

namespace unshard::testing {

// A Wan forward's output and every block's output, as f32 vectors (needs record_block_outputs).
struct wan_outputs {
  std::vector<float> output;
  std::vector<std::vector<float>> blocks;
};

inline wan_outputs collect_outputs(const wan::model& m, const wan::state& st) {
  wan_outputs o;
  const auto out = m.output(st).as<float>();
  o.output.assign(out.begin(), out.end());
  for (std::size_t i = 0; i < m.geometry().num_layers; ++i) {
    const auto b = m.block_output(st, i).as<float>();
    o.blocks.emplace_back(b.begin(), b.end());
  }
  return o;
}

inline std::vector<std::string> wan_vector_files() { return vector_files("wan_"); }

inline wan::config config_for(const std::string& name) {
  return wan::config::load(data_dir + "/" + name + ".config.json");
}

struct wan_case {
  checkpoint file;
  wan::config config;
  wan::workload work;
};

// The workload comes from the file's inputs: x [C, F, H, W] and context [text tokens, text_dim].
inline wan_case load_wan_case(const std::string& name) {
  wan_case c{checkpoint::open(data_dir + "/" + name + ".safetensors"), config_for(name), {}};
  const auto x = c.file.at("input.x").dims, ctx = c.file.at("input.context").dims;
  c.work = {{x[0], x[1], x[2], x[3]}, ctx[0]};
  return c;
}

// Puts the case's inputs (input.x, input.t, input.context) into a state of the Wan model m.
template <class Model, class State>
void set_case_inputs(const Model& m, State& st, const checkpoint& file) {
  m.set_inputs(st, file.view("input.x"), file.view("input.t"), file.view("input.context"));
}

// One forward of the session s (over m) on the case's inputs; finish(rank, state) sees every
// rank's state afterwards.
template <class Session, class Model, class Finish>
void forward_case(Session& s, const Model& m, const checkpoint& file, Finish&& finish) {
  s.forward([&](std::size_t, auto& st) { set_case_inputs(m, st, file); }, std::forward<Finish>(finish));
}

}  // namespace unshard::testing
