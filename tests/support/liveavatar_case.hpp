#pragma once
// The Live Avatar reference cases of tests/data (liveavatar_<name>.safetensors with its
// config.json): the checkpoint, the config and the recorded stream of calls.
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "reference_checks.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/models/liveavatar/calls.hpp"
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"

namespace unshard::testing {

// A denoising-loop file (README §7): its checkpoint, the config and the loop it runs.
struct denoise_case {
  explicit denoise_case(const std::string& name)
      : file(checkpoint::open(data_dir + "/" + name + ".safetensors")),
        json(load_json_config(data_dir + "/" + name + ".config.json", "denoise config")),
        config(s2v::config::from_json(json, name)), loop(s2v::parse_loop(json, name, {})) {}
  checkpoint file;
  nlohmann::json json;
  s2v::config config;
  s2v::loop_spec loop;
};

struct stream_case {
  checkpoint file;
  nlohmann::json config_json;  // the whole vectors config: the model and the stream
  s2v::config config;
  s2v::stream_spec spec;
  s2v::workload work;
};

// The Live Avatar files of tests/data of each kind: recorded streams (call by call, README §4) and
// denoising loops (README §7: they name their calls by input.call_clip_block_step).
inline bool is_denoise_case(const std::string& name) {
  return checkpoint::open(data_dir + "/" + name + ".safetensors").find("input.call_clip_block_step") != nullptr;
}
inline std::vector<std::string> liveavatar_files(bool denoise_loops) {
  std::vector<std::string> out;
  for (const std::string& n : vector_files("liveavatar_"))
    if (is_denoise_case(n) == denoise_loops) out.push_back(n);
  return out;
}

inline stream_case load_case(const std::string& name) {
  stream_case c{checkpoint::open(data_dir + "/" + name + ".safetensors"), {}, {}, {}, {}};
  c.config_json = load_json_config(data_dir + "/" + name + ".config.json", "liveavatar config");
  c.config = s2v::config::from_json(c.config_json, name);
  c.spec = s2v::parse_stream(c.config_json, name, c.file);
  c.work = s2v::workload_of(c.spec, c.file);
  return c;
}

}  // namespace unshard::testing
