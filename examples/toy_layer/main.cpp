// The "write your own layer" walkthrough (README.md next to this file), as a program that checks
// itself: the toy model of toy_model.hpp is planned, then run sharded over 3 host ranks under two
// policies, and each run's output is compared with the unsharded forward and its measured peak
// with the planned one. Exit status 0 when everything agrees.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "toy_layer/toy_model.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"

using namespace unshard;

// Step 1: the concepts. A wrong signature fails here, with the concept's name, not deep inside the runtime.
static_assert(layer<toy::toy_block, toy::toy_state>);
static_assert(model<toy::toy_model>);

namespace {

// Step 4: one sharded run; true when it equals the unsharded forward bit for bit and stays within its plan.
bool run(const toy::toy_model& m, const toy::toy_weights& w, const std::vector<float>& x,
         const std::vector<float>& want, const std::string& policy, std::size_t world_size) {
  session_options opt;
  opt.world_size = world_size;
  opt.policy = parse_policy(policy).values;
  session<toy::toy_model> s(m, w, opt);
  std::vector<float> got;
  s.forward([&](std::size_t, toy::toy_state& st) { std::memcpy(st.x, x.data(), x.size() * sizeof(float)); },
            [&](std::size_t r, const toy::toy_state& st) {
              if (r == 0) got.assign(st.x, st.x + x.size());
            });
  bool ok = got.size() == want.size() && std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0;
  std::printf("policy %s: %s\n", policy.c_str(), s.plan().describe().c_str());
  for (std::size_t r = 0; r < world_size; ++r) {
    const std::size_t planned = s.plan().ranks[r].peak(), measured = s.measured(r).peak_bytes;
    std::printf("rank %zu planned_peak_bytes=%zu measured_peak_bytes=%zu\n", r, planned, measured);
    ok = ok && measured <= planned;
  }
  std::printf("  sharded output %s the unsharded forward\n", ok ? "equals" : "DIFFERS FROM");
  return ok;
}

}  // namespace

int main() {
  toy::toy_config c;  // Step 2: a model from its configuration; the weights are generated on read.
  c.layers = 6;
  c.dim = 160;  // D x D weights of 100 KiB: above the 64 KiB threshold under which parameters stay resident
  c.ffn = 320;
  const toy::toy_model m(c);
  const toy::toy_weights w(m);

  // Step 3: the ledger, before anything is allocated: every rank's peak, term by term.
  const memory_plan plan = plan_memory(m, 3, parse_policy("selective+prefetch:1").values);
  std::printf("planned before the run: %s\n", plan.describe().c_str());

  // The reference: every layer run unsharded, in order, on one rank.
  std::vector<float> x(c.tokens * c.dim);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 17) - 0.08f;
  reference_runner<toy::toy_model> ref(m, w);
  std::memcpy(ref.state().x, x.data(), x.size() * sizeof(float));
  ref.forward();
  const std::vector<float> want(ref.state().x, ref.state().x + x.size());

  const bool whole = run(m, w, x, want, "selective+prefetch:1", 3);  // whole units, one gathered ahead
  const bool chunks = run(m, w, x, want, "chunked:4KiB+prefetch:1", 3);  // the param_source forward
  return whole && chunks && plan.peak_bytes() > 0 ? 0 : 1;
}
