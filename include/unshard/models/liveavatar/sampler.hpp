#pragma once
// Live Avatar's sampler: diffusers' FlowMatchEulerDiscreteScheduler with num_train_timesteps N,
// shift s and S steps (the pipeline's euler solver, no CFG, no noise), to the float32 bit
// (vectors README.liveavatar.md §7.1):
//
//   training table   u_k = f32(k/N), shifted f32(f32(s u) / f32(1 + f32((s-1) u))), k = 1..N
//                    sigma_max = entry N (1), sigma_min = entry 1
//   grid (float64)   T_j = N sigma_max + j * ((N sigma_min - N sigma_max) / (S-1)), last = N sigma_min
//   shift (float64)  sigma_j = f32(s u / (1 + (s-1) u)), u = T_j / N;   sigma_S = 0
//   timesteps        t_j = f32(sigma_j * N)   (a float32 product)
//   Euler step i     x <- f32(x + f32(dt_i * v)),  dt_i = f32(sigma_{i+1} - sigma_i)
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/kernels/thread/residual.hpp"

namespace unshard::s2v {

struct flow_match_config {
  std::int64_t num_train_timesteps = 1000;
  double shift = 3.0;
  std::size_t steps = 4;
};

class flow_match_euler {
 public:
  explicit flow_match_euler(const flow_match_config& c) : config_(c) {
    if (c.steps == 0) throw_error("sampler: the number of denoising steps must be at least 1 (got 0)");
    if (c.num_train_timesteps < 1) throw_error("sampler: num_train_timesteps must be at least 1 (got ", c.num_train_timesteps, ")");
    if (!(c.shift > 0)) throw_error("sampler: shift must be positive (got ", c.shift, ")");
    build();
  }

  const flow_match_config& config() const noexcept { return config_; }
  std::size_t steps() const noexcept { return config_.steps; }
  std::span<const float> timesteps() const noexcept { return timesteps_; }  // [S]
  std::span<const float> sigmas() const noexcept { return sigmas_; }        // [S + 1], last 0
  float timestep(std::size_t i) const { return timesteps_.at(i); }
  float dt(std::size_t i) const { return add32(sigmas_.at(i + 1), -sigmas_.at(i)); }

  // x <- f32(x + f32(dt_i * v)) element by element (add_scaled: immune to FMA contraction). A
  // backend's ops run the same update on its memory (op scaled_add).
  void step(std::size_t i, std::span<float> x, std::span<const float> v) const {
    if (x.size() != v.size()) throw_error("sampler step ", i, ": latent has ", x.size(), " values, model output ", v.size());
    const float d = dt(i);
    for (std::size_t k = 0; k < x.size(); ++k) x[k] = add_scaled(x[k], v[k], d);
  }

 private:
  // Float32 arithmetic, one rounding per operation, immune to contraction: a double +, * or / of
  // two floats rounded to float is the correctly rounded float result.
  static float mul32(float a, float b) { return static_cast<float>(static_cast<double>(a) * b); }
  static float add32(float a, float b) { return static_cast<float>(static_cast<double>(a) + b); }
  static float div32(float a, float b) { return static_cast<float>(static_cast<double>(a) / b); }
  static float shifted_f32(float u, float s) { return div32(mul32(s, u), add32(1.0f, mul32(add32(s, -1.0f), u))); }

  void build() {
    const auto N = config_.num_train_timesteps;
    const std::size_t S = config_.steps;
    const float s32 = static_cast<float>(config_.shift);
    // Float32 end points of the training table (diffusers builds it in torch float32).
    const float sigma_max = shifted_f32(div32(static_cast<float>(N), static_cast<float>(N)), s32);
    const float sigma_min = shifted_f32(div32(1.0f, static_cast<float>(N)), s32);
    const double start = static_cast<double>(sigma_max) * static_cast<double>(N);
    const double stop = static_cast<double>(sigma_min) * static_cast<double>(N);
    const double step = S > 1 ? (stop - start) / static_cast<double>(S - 1) : 0.0;  // numpy.linspace
    sigmas_.clear();
    timesteps_.clear();
    for (std::size_t j = 0; j < S; ++j) {
      const double T = (S > 1 && j == S - 1) ? stop : static_cast<double>(j) * step + start;
      const double u = T / static_cast<double>(N);
      const float sigma = static_cast<float>(config_.shift * u / (1.0 + (config_.shift - 1.0) * u));
      sigmas_.push_back(sigma);
      timesteps_.push_back(mul32(sigma, static_cast<float>(N)));
    }
    sigmas_.push_back(0.0f);
  }

  flow_match_config config_;
  std::vector<float> timesteps_, sigmas_;
};

}  // namespace unshard::s2v
