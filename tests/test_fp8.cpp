// f8e4m3 (OCP FP8 E4M3 "FN") storage and the fp8 weight codec: issue 15's groundwork.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_file.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/typed_storage.hpp"
#include "unshard/quant/fp8.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"

#include "support/error_of.hpp"

using namespace unshard;
using quant::fp8_scaling;
using testing::contains;
using testing::error_of;
namespace fs = std::filesystem;

namespace {

// The OCP E4M3 value of a code, computed independently of the library: sign * 2^(e-7) * (1 + m/8)
// for e >= 1, sign * 2^-6 * m/8 for e = 0; NaN for S.1111.111.
double reference_value(unsigned code) {
  const unsigned s = code >> 7, e = (code >> 3) & 15u, m = code & 7u;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, static_cast<int>(e) - 7);
  return s ? -mag : mag;
}

shape mat(std::size_t rows, std::size_t cols) {
  return shape{static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)};
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// Reference encoder: the nearest finite code by exhaustive search over the 127 non-negative finite
// values (ties to the even code), nullopt-like 0xff for |x| > 464 (beyond 448 after rounding).
std::uint8_t reference_encode(float x, bool& overflow) {
  overflow = false;
  const double a = std::fabs(static_cast<double>(x));
  if (a > 464.0) {
    overflow = true;
    return 0x7f;
  }
  unsigned best = 0;
  double best_d = a;
  for (unsigned c = 1; c <= 0x7e; ++c) {
    const double d = std::fabs(reference_value(c) - a);
    if (d < best_d || (d == best_d && (c & 1u) == 0)) {
      best = c;
      best_d = d;
    }
  }
  return static_cast<std::uint8_t>(best | (std::signbit(x) ? 0x80u : 0u));
}


struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("unshard_test_fp8_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::vector<float> random_matrix(std::size_t rows, std::size_t cols, const std::vector<float>& row_range, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> w(rows * cols);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) w[r * cols + c] = u(gen) * row_range[r];
  return w;
}

float row_amax(const std::vector<float>& w, std::size_t cols, std::size_t r) {
  float m = 0;
  for (std::size_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(w[r * cols + c]));
  return m;
}

}  // namespace

TEST_CASE("f8e4m3 is a 1-byte dtype with its names") {
  CHECK(size_of(dtype::f8e4m3) == 1);
  CHECK(size_of(dtype::bf16) == 2);
  CHECK(size_of(dtype::f16) == 2);
  CHECK(size_of(dtype::f32) == 4);
  CHECK(sizeof(f8e4m3) == 1);
  CHECK(name_of(dtype::f8e4m3) == "f8e4m3");
  CHECK(safetensors_name(dtype::f8e4m3) == "F8_E4M3");
  CHECK(parse_dtype("f8e4m3") == dtype::f8e4m3);
  CHECK(parse_dtype("F8_E4M3") == dtype::f8e4m3);
  CHECK(parse_dtype("float8_e4m3fn") == dtype::f8e4m3);
  CHECK(contains(error_of([] { (void)parse_dtype("fp8"); }), "f8e4m3"));
  CHECK(dtype_of<f8e4m3>::value == dtype::f8e4m3);
  CHECK(detail::compute_dtype("F8_E4M3") == dtype::f8e4m3);
  CHECK_FALSE(detail::compute_dtype("F8_E5M2").has_value());
  CHECK(param_spec{"w", shape{3, 5}, dtype::f8e4m3}.bytes() == 15);
}

TEST_CASE("every one of the 256 codes decodes to its OCP E4M3 value") {
  int nans = 0;
  for (unsigned c = 0; c < 256; ++c) {
    INFO("code 0x" << std::hex << c);
    const float got = e4m3_bits_to_float(static_cast<std::uint8_t>(c));
    const double want = reference_value(c);
    CHECK(std::signbit(got) == ((c & 0x80u) != 0));
    CHECK(same_bits(quant::e4m3_values()[c], got));
    CHECK(same_bits(f8e4m3{static_cast<std::uint8_t>(c)}.to_float(), got));
    if (std::isnan(want)) {
      ++nans;
      CHECK(std::isnan(got));
    } else {
      CHECK(static_cast<double>(got) == want);
    }
  }
  CHECK(nans == 2);  // 0x7f and 0xff only
  CHECK(e4m3_bits_to_float(0x7e) == 448.0f);
  CHECK(e4m3_bits_to_float(0xfe) == -448.0f);
  CHECK(e4m3_bits_to_float(0x08) == std::ldexp(1.0f, -6));  // smallest normal
  CHECK(e4m3_bits_to_float(0x07) == std::ldexp(7.0f, -9));  // largest subnormal
  CHECK(e4m3_bits_to_float(0x01) == std::ldexp(1.0f, -9));  // smallest subnormal
  CHECK(e4m3_bits_to_float(0x38) == 1.0f);
  CHECK(same_bits(e4m3_bits_to_float(0x80), -0.0f));
}

TEST_CASE("every finite code round-trips through the encoder") {
  for (unsigned c = 0; c < 256; ++c) {
    if ((c & 0x7fu) == 0x7fu) continue;
    const float v = e4m3_bits_to_float(static_cast<std::uint8_t>(c));
    const e4m3_conversion r = float_to_e4m3(v);
    INFO("code 0x" << std::hex << c);
    CHECK(r.status == e4m3_status::ok);
    CHECK(r.bits == c);
    CHECK(float_to_e4m3_bits(v) == c);
  }
}

TEST_CASE("midpoints between adjacent codes round to the even code; off-midpoints to the nearer") {
  for (unsigned c = 0; c < 0x7e; ++c) {
    for (const unsigned sign : {0u, 0x80u}) {
      const float lo = e4m3_bits_to_float(static_cast<std::uint8_t>(c | sign));
      const float hi = e4m3_bits_to_float(static_cast<std::uint8_t>((c + 1) | sign));
      const float mid = (lo + hi) / 2;  // exact: e4m3 values have 4 significant bits
      REQUIRE(static_cast<double>(mid) == (static_cast<double>(lo) + static_cast<double>(hi)) / 2);
      const unsigned even = (c & 1u) ? c + 1 : c;
      INFO("codes 0x" << std::hex << c << "/0x" << c + 1 << " sign 0x" << sign);
      CHECK(float_to_e4m3(mid).bits == (even | sign));
      CHECK(float_to_e4m3(mid).status == e4m3_status::ok);
      CHECK(float_to_e4m3(std::nextafter(mid, lo)).bits == (c | sign));
      CHECK(float_to_e4m3(std::nextafter(mid, hi)).bits == ((c + 1) | sign));
    }
  }
}

TEST_CASE("the encoder matches an exhaustive-search reference over a sweep of f32 values") {
  // Every 97th f32 bit pattern from below half the smallest subnormal (2^-12) to beyond 464 (512),
  // both signs: about 3.6 million values across every binade, subnormal and overflow range.
  const std::uint32_t lo = 0x39800000u, hi = 0x44000000u;
  std::size_t checked = 0;
  for (std::uint32_t u = lo; u <= hi; u += 97) {
    for (const std::uint32_t sign : {0u, 0x80000000u}) {
      float x;
      const std::uint32_t b = u | sign;
      std::memcpy(&x, &b, 4);
      bool overflow = false;
      const std::uint8_t want = reference_encode(x, overflow);
      const e4m3_conversion got = float_to_e4m3(x);
      if (got.bits != (overflow ? (want | (sign ? 0x80u : 0u)) : want) ||
          (got.status == e4m3_status::overflow) != overflow) {
        FAIL_CHECK("x = " << x << ": got 0x" << std::hex << unsigned(got.bits) << ", want 0x" << unsigned(want)
                          << (overflow ? " (overflow)" : ""));
        return;
      }
      ++checked;
    }
  }
  CHECK(checked > 3'000'000);
}

TEST_CASE("448, the 464 boundary and beyond: overflow is reported, never clamped") {
  const auto conv = [](float x) { return float_to_e4m3(x); };
  CHECK(conv(448.0f).bits == 0x7e);
  CHECK(conv(448.0f).status == e4m3_status::ok);
  CHECK(conv(std::nextafter(448.0f, 0.0f)).bits == 0x7e);
  CHECK(conv(432.0f).bits == 0x7e);  // midpoint of 416 (0x7d, odd) and 448 (0x7e, even)
  CHECK(conv(std::nextafter(432.0f, 0.0f)).bits == 0x7d);
  CHECK(conv(460.0f).bits == 0x7e);
  // 464 = 448 + half an ulp is a tie between 448 (mantissa 110, even) and 480 (mantissa 111,
  // which is NaN in e4m3): RNE picks 448, as the OCP spec, CUDA's __NV_NOSAT conversion and torch do.
  CHECK(conv(464.0f).bits == 0x7e);
  CHECK(conv(464.0f).status == e4m3_status::ok);
  CHECK(conv(-464.0f).bits == 0xfe);
  // Anything above 464 would round to 480 or more: overflow, the NaN code, never 448.
  for (const float x : {std::nextafter(464.0f, 1000.0f), 470.0f, 480.0f, 500.0f, 1e6f, std::numeric_limits<float>::max()}) {
    INFO("x = " << x);
    CHECK(conv(x).status == e4m3_status::overflow);
    CHECK(conv(x).bits == 0x7f);
    CHECK(conv(-x).bits == 0xff);
    CHECK(float_to_e4m3_bits(x) == 0x7f);
    CHECK(f8e4m3::from_float(x).bits == 0x7f);
  }
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(conv(inf).status == e4m3_status::not_finite);
  CHECK(conv(inf).bits == 0x7f);
  CHECK(conv(-inf).bits == 0xff);
  CHECK(conv(std::nanf("")).status == e4m3_status::not_finite);
  CHECK((conv(std::nanf("")).bits & 0x7f) == 0x7f);
}

TEST_CASE("subnormal boundaries round to nearest even") {
  const auto code = [](float x) { return float_to_e4m3(x).bits; };
  const auto p2 = [](int e) { return std::ldexp(1.0f, e); };
  CHECK(code(p2(-9)) == 0x01);                               // smallest subnormal
  CHECK(code(p2(-10)) == 0x00);                              // half of it: tie between 0 and 0x01 -> 0
  CHECK(code(std::nextafter(p2(-10), 1.0f)) == 0x01);        // just above half: rounds up
  CHECK(code(-p2(-10)) == 0x80);                             // signed zero
  CHECK(code(p2(-11)) == 0x00);
  CHECK(code(std::numeric_limits<float>::denorm_min()) == 0x00);
  CHECK(code(-std::numeric_limits<float>::denorm_min()) == 0x80);
  CHECK(code(3 * p2(-10)) == 0x02);                          // 1.5 * 2^-9: tie between 0x01 and 0x02 -> 0x02
  CHECK(code(5 * p2(-10)) == 0x02);                          // 2.5 * 2^-9: tie -> 0x02
  CHECK(code(7 * p2(-10)) == 0x04);                          // 3.5 * 2^-9: tie -> 0x04
  CHECK(code(7 * p2(-9)) == 0x07);                           // largest subnormal
  CHECK(code(15 * p2(-10)) == 0x08);                         // 7.5 * 2^-9: tie between 0x07 and 2^-6 -> 0x08
  CHECK(code(std::nextafter(15 * p2(-10), 0.0f)) == 0x07);
  CHECK(code(p2(-6)) == 0x08);                               // smallest normal
  CHECK(code(std::nextafter(p2(-6), 0.0f)) == 0x08);         // rounds up into the normals
  CHECK(code(17 * p2(-10)) == 0x08);                         // 2^-6 * (1 + 1/16): tie -> even 0x08
  CHECK(code(19 * p2(-10)) == 0x0a);                         // 2^-6 * (1 + 3/16): tie -> even 0x0a
}

TEST_CASE("load/store and views of f8e4m3 storage") {
  std::array<std::uint8_t, 4> raw{0x38, 0xc0, 0x7e, 0x00};  // 1, -2, 448, 0
  CHECK(load_as_float(raw.data(), dtype::f8e4m3, 0) == 1.0f);
  CHECK(load_as_float(raw.data(), dtype::f8e4m3, 1) == -2.0f);
  CHECK(load_as_float(raw.data(), dtype::f8e4m3, 2) == 448.0f);
  store_from_float(raw.data(), dtype::f8e4m3, 3, 0.5f);
  CHECK(raw[3] == 0x30);
  store_from_float(raw.data(), dtype::f8e4m3, 3, 1000.0f);  // cannot throw (device code): the NaN code
  CHECK(raw[3] == 0x7f);
  const tensor_view v(raw.data(), dtype::f8e4m3, shape{2, 2});
  CHECK(v.bytes() == 4);
  CHECK(v.as<const f8e4m3>()[2].bits == 0x7e);
  v.store(3, -0.25f);
  CHECK(raw[3] == 0xa8);
  std::string msg = error_of([&] { v.store(1, 465.0f); });
  CHECK(contains(msg, "element 1"));
  CHECK(contains(msg, "448"));
  msg = error_of([&] { v.store(2, std::nanf("")); });
  CHECK(contains(msg, "element 2"));
  CHECK(raw[1] == 0xc0);  // untouched by the failed stores
  CHECK(raw[2] == 0x7e);
  CHECK(contains(error_of([&] { (void)v.as<const bf16>(); }), "f8e4m3"));
}

TEST_CASE("kernels that widen storage refuse f8e4m3, naming it") {
  std::array<std::uint8_t, 6> codes{0x38, 0x38, 0x38, 0x38, 0x38, 0x38};
  const tensor_view w(codes.data(), dtype::f8e4m3, shape{2, 3});
  std::string msg = error_of([&] { visit_storage(w, [](const auto*) {}); });
  CHECK(contains(msg, "f8e4m3 weights are not supported"));
  const std::array<float, 3> x{1, 2, 3};
  std::array<float, 2> y{};
  msg = error_of([&] { linear(x.data(), 1, 3, w, tensor_view{}, y.data()); });
  CHECK(contains(msg, "f8e4m3"));
  CHECK(contains(msg, "[2,3]"));
  std::array<float, 6> wf{1, 0, 0, 0, 1, 0};
  const tensor_view wv(wf.data(), dtype::f32, shape{2, 3}), bias(codes.data(), dtype::f8e4m3, shape{2});
  msg = error_of([&] { linear(x.data(), 1, 3, wv, bias, y.data()); });
  CHECK(contains(msg, "bias"));
  CHECK(contains(msg, "f8e4m3"));
}

TEST_CASE("quantize: errors name the tensor and the element, never clamp") {
  std::vector<float> w(12, 0.5f);  // [3, 4]
  w[6] = std::nanf("");            // row 1, column 2
  std::string msg = error_of([&] { (void)quant::quantize("blocks.0.ffn.0.weight", std::span<const float>(w), shape{3, 4}); });
  CHECK(contains(msg, "'blocks.0.ffn.0.weight'"));
  CHECK(contains(msg, "element 6"));
  CHECK(contains(msg, "row 1"));
  CHECK(contains(msg, "column 2"));
  w[6] = -std::numeric_limits<float>::infinity();
  msg = error_of([&] { (void)quant::quantize("w.inf", w.data(), shape{3, 4}, fp8_scaling::per_tensor); });
  CHECK(contains(msg, "'w.inf'"));
  CHECK(contains(msg, "element 6"));

  // bf16 input: the same checks (0x7f80 is +Inf).
  std::vector<bf16> wb(12, bf16::from_float(1.0f));
  wb[11] = bf16{0x7f80};
  msg = error_of([&] { (void)quant::quantize("w.bf16", wb.data(), shape{3, 4}); });
  CHECK(contains(msg, "'w.bf16'"));
  CHECK(contains(msg, "element 11"));
  CHECK(contains(msg, "row 2"));

  // Overflow after scaling: only possible with scales the caller gives (from a checkpoint, say).
  const std::vector<float> v{1.0f, 2.0f, 464.0f, 470.0f};
  std::vector<f8e4m3> codes(4);
  const std::vector<float> one{1.0f};
  msg = error_of([&] { quant::quantize_range("w.ovf", v.data(), 0, 4, 2, 2, fp8_scaling::per_tensor, one, codes.data()); });
  CHECK(contains(msg, "'w.ovf'"));
  CHECK(contains(msg, "element 3"));
  CHECK(contains(msg, "row 1"));
  CHECK(contains(msg, "448"));
  quant::quantize_range("w.ok", v.data(), 0, 3, 2, 2, fp8_scaling::per_tensor, one, codes.data());  // 464 -> 448
  CHECK(codes[2].bits == 0x7e);
  const std::vector<float> half_scales{1.0f, 0.5f};  // per channel: row 1 (464, 470) / 0.5 overflows
  msg = error_of([&] { quant::quantize_range("w.ch", v.data(), 0, 4, 2, 2, fp8_scaling::per_channel, half_scales, codes.data()); });
  CHECK(contains(msg, "element 2"));
  CHECK(contains(msg, "scale 0.5"));

  // Scales that are wrong in number or value.
  msg = error_of([&] { quant::quantize_range("w.n", v.data(), 0, 4, 2, 2, fp8_scaling::per_channel, one, codes.data()); });
  CHECK(contains(msg, "'w.n'"));
  CHECK(contains(msg, "needs 2"));
  const std::vector<float> zero{0.0f};
  msg = error_of([&] { quant::quantize_range("w.z", v.data(), 0, 4, 2, 2, fp8_scaling::per_tensor, zero, codes.data()); });
  CHECK(contains(msg, "'w.z'"));
  CHECK(contains(msg, "positive"));
  msg = error_of([&] { quant::quantize_range("w.r", v.data(), 3, 2, 2, 2, fp8_scaling::per_tensor, one, codes.data()); });
  CHECK(contains(msg, "outside"));

  // Rank: 1-D parameters stay bf16/f32 by policy; higher ranks are refused too.
  msg = error_of([&] { (void)quant::quantize("norm.weight", w.data(), shape{12}); });
  CHECK(contains(msg, "'norm.weight'"));
  CHECK(contains(msg, "rank 1"));
  CHECK(contains(msg, "1-D"));
  msg = error_of([&] { (void)quant::quantize("patch.weight", w.data(), shape{2, 3, 2}); });
  CHECK(contains(msg, "rank 3"));
  std::vector<std::uint8_t> already(4);
  msg = error_of([&] { (void)quant::quantize("q", tensor_view(already.data(), dtype::f8e4m3, shape{2, 2})); });
  CHECK(contains(msg, "f8e4m3 already"));
}

TEST_CASE("scales: amax / 448 per tensor or per row, 1 for zeros, never subnormal") {
  const std::vector<float> w{1, -2, 0, 0, 0, 0, 448, 0.5f};  // [4, 2]: row 1 and row 2 all zero
  const quant::fp8_weight t = quant::quantize("t", w.data(), shape{4, 2}, fp8_scaling::per_tensor);
  REQUIRE(t.scales.size() == 1);
  CHECK(t.scales[0] == 1.0f);
  CHECK(t.codes[6].bits == 0x7e);
  const quant::fp8_weight c = quant::quantize("c", w.data(), shape{4, 2});
  REQUIRE(c.scales.size() == 4);
  CHECK(c.scaling == fp8_scaling::per_channel);
  CHECK(c.scales[0] == 2.0f / 448.0f);
  CHECK(c.scales[1] == 1.0f);
  CHECK(c.scales[2] == 1.0f);
  CHECK(c.scales[3] == 1.0f);
  CHECK(c.codes[1].bits == 0xfe);  // -2 is the row's amax: -448
  CHECK(quant::scale_for_amax(0.0f) == 1.0f);
  CHECK(quant::scale_for_amax(1e-40f) == std::numeric_limits<float>::min());
  CHECK(quant::official_scale_for_amax(0.25f) == 1.0f / 448.0f);
  CHECK(quant::official_scale_for_amax(896.0f) == 2.0f);
  CHECK(quant::name_of(fp8_scaling::per_tensor) == "tensor");
  CHECK(quant::name_of(fp8_scaling::per_channel) == "channel");
  // A row of subnormal f32 values: its scale is FLT_MIN, and nothing overflows.
  const std::vector<float> tiny{1e-40f, -3e-41f};
  const quant::fp8_weight s = quant::quantize("tiny", tiny.data(), shape{1, 2});
  CHECK(s.scales[0] == std::numeric_limits<float>::min());
}

TEST_CASE("quantize/dequantize error is within half an e4m3 step, per tensor and per channel") {
  const std::size_t rows = 64, cols = 200;
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> range(0.01f, 3.0f);
  std::vector<float> ranges(rows);
  for (float& r : ranges) r = range(gen);
  const std::vector<float> w = random_matrix(rows, cols, ranges, 11);
  float tensor_amax = 0;
  for (std::size_t r = 0; r < rows; ++r) tensor_amax = std::max(tensor_amax, row_amax(w, cols, r));

  for (const fp8_scaling scaling : {fp8_scaling::per_tensor, fp8_scaling::per_channel}) {
    INFO("scaling " << quant::name_of(scaling));
    const quant::fp8_weight q = quant::quantize("w", std::span<const float>(w), mat(rows, cols), scaling);
    const std::vector<float> d = quant::dequantize(q);
    REQUIRE(d.size() == w.size());
    for (std::size_t r = 0; r < rows; ++r) {
      const float amax = scaling == fp8_scaling::per_tensor ? tensor_amax : row_amax(w, cols, r);
      const float s = q.row_scale(r);
      CHECK(s == amax / 448.0f);
      for (std::size_t c = 0; c < cols; ++c) {
        const float x = w[r * cols + c], err = std::fabs(d[r * cols + c] - x);
        // Half a step: 2^-4 of the value for normals, 2^-10 * scale for subnormals; a little f32
        // slack for x / scale and code * scale.
        const float bound = std::max(std::ldexp(std::fabs(x), -4), std::ldexp(s, -10)) * (1 + std::ldexp(1.0f, -18));
        if (err > bound || err > std::ldexp(amax, -4)) {
          FAIL_CHECK("row " << r << " col " << c << ": x = " << x << ", dequantized " << d[r * cols + c]);
          return;
        }
      }
    }
  }

  // bf16 input quantizes its exact values the same way as the same values in f32.
  std::vector<bf16> wb(w.size());
  std::vector<float> wbf(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    wb[i] = bf16::from_float(w[i]);
    wbf[i] = wb[i].to_float();
  }
  const quant::fp8_weight qb = quant::quantize("wb", tensor_view(wb.data(), dtype::bf16, mat(rows, cols)));
  const quant::fp8_weight qf = quant::quantize("wf", wbf.data(), mat(rows, cols));
  CHECK(qb.scales == qf.scales);
  CHECK(std::equal(qb.codes.begin(), qb.codes.end(), qf.codes.begin(), [](f8e4m3 a, f8e4m3 b) { return a.bits == b.bits; }));
}

TEST_CASE("per-channel scales beat a per-tensor scale on rows of very different ranges") {
  // Row ranges 1, 2^-16, 2^-20, 2^-26: under the tensor's scale the small rows fall into e4m3's
  // subnormal steps (or to zero); each with its own scale keeps ~3 significant bits.
  const std::size_t cols = 256;
  const std::vector<float> ranges{1.0f, std::ldexp(1.0f, -16), std::ldexp(1.0f, -20), std::ldexp(1.0f, -26)};
  const std::size_t rows = ranges.size();
  const std::vector<float> w = random_matrix(rows, cols, ranges, 3);
  const auto rel_rms = [&](const std::vector<float>& d, std::size_t r) {
    double se = 0;
    for (std::size_t c = 0; c < cols; ++c) se += std::pow(static_cast<double>(d[r * cols + c]) - w[r * cols + c], 2);
    return std::sqrt(se / cols) / row_amax(w, cols, r);
  };
  const std::vector<float> dt = quant::dequantize(quant::quantize("w", w.data(), mat(rows, cols), fp8_scaling::per_tensor));
  const std::vector<float> dc = quant::dequantize(quant::quantize("w", w.data(), mat(rows, cols), fp8_scaling::per_channel));
  double total_t = 0, total_c = 0;
  for (std::size_t r = 0; r < rows; ++r) {
    const double et = rel_rms(dt, r), ec = rel_rms(dc, r);
    INFO("row " << r << ": per-tensor " << et << ", per-channel " << ec);
    CHECK(ec <= et);
    CHECK(ec < 0.04);  // about 2^-5 of the row's range at most
    total_t += et;
    total_c += ec;
  }
  CHECK(rel_rms(dt, 0) == rel_rms(dc, 0));  // the row holding the tensor's amax has the same scale
  CHECK(rel_rms(dt, 1) > 3 * rel_rms(dc, 1));
  CHECK(rel_rms(dt, 3) == doctest::Approx(std::sqrt(1.0 / 3)).epsilon(0.2));  // all zeros: the rms of U(-1, 1)
  CHECK(total_c < total_t);
}

TEST_CASE("ranges and chunks: quantize_range over shard pieces and dequantize_rows over chunks") {
  const std::size_t rows = 9, cols = 7;
  std::vector<float> ranges(rows);
  for (std::size_t r = 0; r < rows; ++r) ranges[r] = std::ldexp(1.0f, -static_cast<int>(r));
  const std::vector<float> w = random_matrix(rows, cols, ranges, 5);
  for (const fp8_scaling scaling : {fp8_scaling::per_tensor, fp8_scaling::per_channel}) {
    INFO("scaling " << quant::name_of(scaling));
    const quant::fp8_weight whole = quant::quantize("w", w.data(), mat(rows, cols), scaling);
    // Pieces that start and end mid-row, as a rank's shard of a flat buffer does.
    std::vector<f8e4m3> pieces(rows * cols, f8e4m3{0x7f});
    for (std::size_t first = 0; first < rows * cols; first += 10) {
      const std::size_t n = std::min<std::size_t>(10, rows * cols - first);
      quant::quantize_range("w", w.data() + first, first, n, rows, cols, scaling, whole.scales, pieces.data() + first);
    }
    for (std::size_t i = 0; i < pieces.size(); ++i) CHECK(pieces[i].bits == whole.codes[i].bits);

    const std::vector<float> all = quant::dequantize(whole);
    for (const auto& [r0, r1] : {std::pair<std::size_t, std::size_t>{0, 3}, {3, 4}, {4, 9}, {5, 5}}) {
      std::vector<float> chunk((r1 - r0) * cols);
      quant::dequantize_rows(whole.codes.data() + r0 * cols, r0, r1, cols, scaling, whole.scales, chunk.data());
      for (std::size_t i = 0; i < chunk.size(); ++i) CHECK(same_bits(chunk[i], all[r0 * cols + i]));
      for (std::size_t r = r0; r < r1; ++r)
        for (std::size_t c = 0; c < cols; ++c)
          CHECK(chunk[(r - r0) * cols + c] == whole.codes[r * cols + c].to_float() * whole.row_scale(r));
    }
  }
  const quant::fp8_weight pc = quant::quantize("w", w.data(), mat(rows, cols));
  std::vector<float> out(cols);
  const std::string msg = error_of([&] {
    quant::dequantize_rows(pc.codes.data(), 8, 9, cols, fp8_scaling::per_channel, std::span(pc.scales).first(5), out.data());
  });
  CHECK(contains(msg, "need 9"));

  std::vector<f8e4m3> codes{{0x38}, {0x40}, {0xff}, {0x01}};
  const std::string bad = error_of([&] { quant::check_codes("ckpt.w", codes.data(), 4, 4, 3); });
  CHECK(contains(bad, "'ckpt.w'"));
  CHECK(contains(bad, "element 6"));
  CHECK(contains(bad, "row 2"));
  CHECK(contains(bad, "0xff"));
  quant::check_codes("ckpt.w", codes.data(), 0, 2, 3);
}

TEST_CASE("safetensors: F8_E4M3 tensors write and read back as f8e4m3") {
  temp_dir dir;
  const std::string path = dir / "fp8.safetensors";
  const std::size_t rows = 5, cols = 6;
  const std::vector<float> w = random_matrix(rows, cols, {1.0f, 0.5f, 2.0f, 0.01f, 3.0f}, 9);
  const quant::fp8_weight q = quant::quantize("blocks.0.w", w.data(), mat(rows, cols));
  safetensors_writer wr;
  wr.add("blocks.0.w", dtype::f8e4m3, mat(rows, cols), std::as_bytes(std::span(q.codes)));
  wr.add("blocks.0.w_scale", shape{rows}, q.scales);
  wr.add("bias", shape{3}, std::vector<float>{1.5f, -2.0f, 0.1f});
  wr.add("direct", shape{2, 2}, std::vector<float>{1.0f, -448.0f, 464.0f, 0.3f}, dtype::f8e4m3);
  wr.write(path);

  const safetensors_file f(path);
  const tensor_info& t = f.at("blocks.0.w");
  CHECK(t.dtype_name == "F8_E4M3");
  CHECK(t.type == dtype::f8e4m3);
  CHECK(t.bytes == rows * cols);
  CHECK(t.dims == mat(rows, cols));
  const tensor_view v = f.view("blocks.0.w");
  CHECK(v.type() == dtype::f8e4m3);
  const auto viewed = v.as<const f8e4m3>();
  REQUIRE(viewed.size() == q.codes.size());
  for (std::size_t i = 0; i < viewed.size(); ++i) CHECK(viewed[i].bits == q.codes[i].bits);
  std::vector<f8e4m3> read_back(rows * cols);
  f.read(t, 0, std::as_writable_bytes(std::span(read_back)));
  const std::vector<float> scales = read_f32(f, f.at("blocks.0.w_scale"));
  CHECK(scales == q.scales);
  std::vector<float> d(rows * cols);
  quant::dequantize_rows(read_back.data(), 0, rows, cols, fp8_scaling::per_channel, scales, d.data());
  const std::vector<float> want = quant::dequantize(q);
  for (std::size_t i = 0; i < d.size(); ++i) CHECK(same_bits(d[i], want[i]));

  const auto direct = f.view("direct").as<const f8e4m3>();
  CHECK(direct[0].bits == 0x38);
  CHECK(direct[1].bits == 0xfe);
  CHECK(direct[2].bits == 0x7e);  // 464 rounds to 448
  CHECK(direct[3].bits == float_to_e4m3_bits(0.3f));

  // Codes are not values: widening them to f32 without their scales is refused, naming the tensor.
  std::string msg = error_of([&] { (void)read_f32(f, t); });
  CHECK(contains(msg, "'blocks.0.w'"));
  CHECK(contains(msg, "F8_E4M3"));
  const checkpoint c = checkpoint::open(path);
  msg = error_of([&] { (void)read_f32(c, "blocks.0.w"); });
  CHECK(contains(msg, "'blocks.0.w'"));

  // The loader reads f8e4m3 as f8e4m3 (bytes as stored); into another dtype it dequantizes with the
  // stored scales (a range starting mid-row included), and codes without scales are refused.
  const checkpoint_weights cw(c);
  CHECK(cw.describe("blocks.0.w").type == dtype::f8e4m3);
  std::vector<std::byte> raw(rows * cols);
  detail::load_elements(cw, param_spec{"blocks.0.w", mat(rows, cols), dtype::f8e4m3}, 0, rows * cols, raw.data());
  CHECK(std::memcmp(raw.data(), q.codes.data(), raw.size()) == 0);
  const std::size_t first = 4, count = 17;
  std::vector<bf16> as_bf16(count);
  detail::load_elements(cw, param_spec{"blocks.0.w", mat(rows, cols), dtype::bf16}, first, count,
                        reinterpret_cast<std::byte*>(as_bf16.data()));
  for (std::size_t i = 0; i < count; ++i) CHECK(as_bf16[i].bits == bf16::from_float(want[first + i]).bits);
  std::vector<float> as_f32(rows * cols);
  detail::load_elements(cw, param_spec{"blocks.0.w", mat(rows, cols), dtype::f32}, 0, rows * cols,
                        reinterpret_cast<std::byte*>(as_f32.data()));
  for (std::size_t i = 0; i < as_f32.size(); ++i) CHECK(same_bits(as_f32[i], want[i]));
  msg = error_of([&] {
    detail::load_elements(cw, param_spec{"direct", mat(2, 2), dtype::f32}, 0, 4, reinterpret_cast<std::byte*>(as_f32.data()));
  });
  CHECK(contains(msg, "'direct' is f8e4m3 but has no scale tensor"));
  msg = error_of([&] {
    detail::load_elements(cw, param_spec{"bias", shape{3}, dtype::f8e4m3}, 0, 3, raw.data());
  });
  CHECK(contains(msg, "'bias'"));
  CHECK(contains(msg, "not supported by the loader yet"));

  // The writer's f32 -> F8_E4M3 path reports values e4m3 cannot hold.
  safetensors_writer bad;
  msg = error_of([&] { bad.add("over", shape{3}, std::vector<float>{1.0f, 2.0f, 465.0f}, dtype::f8e4m3); });
  CHECK(contains(msg, "'over'"));
  CHECK(contains(msg, "element 2"));
  msg = error_of([&] { bad.add("nan", shape{1}, std::vector<float>{std::nanf("")}, dtype::f8e4m3); });
  CHECK(contains(msg, "'nan'"));
}

TEST_CASE("a LoRA merges into f8e4m3 weights through their scales (none: an error), and is never read from f8e4m3") {
  temp_dir dir;
  const std::vector<std::uint8_t> codes{0x38, 0x40, 0x30, 0xb8};
  safetensors_writer base;
  base.add("blocks.0.weight", dtype::f8e4m3, shape{2, 2}, std::as_bytes(std::span(codes)));
  base.write(dir / "base.safetensors");
  safetensors_writer lora;
  lora.add("base_model.model.blocks.0.lora_A.weight", shape{1, 2}, std::vector<float>{1, 2});
  lora.add("base_model.model.blocks.0.lora_B.weight", shape{2, 1}, std::vector<float>{3, 4});
  lora.write(dir / "lora.safetensors");
  const checkpoint bc = checkpoint::open(dir / "base.safetensors"), lc = checkpoint::open(dir / "lora.safetensors");
  const checkpoint_weights bw(bc);
  // Codes without scales mean nothing: refused, naming the weight.
  std::string msg = error_of([&] { lora_weights<checkpoint_weights> merged(bw, lc, 1.0); });
  CHECK(contains(msg, "'blocks.0.weight' is f8e4m3 but has no scale tensor"));
  // With its scales (one per row): W = code x scale, then W + s B A (s = alpha / r = 1), in f32:
  // [[1, 2], [0.5, -1]] x [0.5, 0.25] per row + [[3, 6], [4, 8]].
  safetensors_writer scaled;
  scaled.add("blocks.0.weight", dtype::f8e4m3, shape{2, 2}, std::as_bytes(std::span(codes)));
  scaled.add("blocks.0.weight.scale", shape{2}, std::vector<float>{0.5f, 0.25f});
  scaled.write(dir / "scaled.safetensors");
  const checkpoint sc = checkpoint::open(dir / "scaled.safetensors");
  const checkpoint_weights sw(sc);
  const lora_weights<checkpoint_weights> merged(sw, lc, 1.0);
  CHECK(merged.describe("blocks.0.weight").type == dtype::f32);
  std::vector<float> w(4);
  merged.read("blocks.0.weight", 0, std::as_writable_bytes(std::span(w)));
  CHECK(w == std::vector<float>{3.5f, 7.0f, 4.125f, 7.75f});

  safetensors_writer lora8;
  lora8.add("base_model.model.blocks.0.lora_A.weight", dtype::f8e4m3, shape{1, 2}, std::as_bytes(std::span(codes).first(2)));
  lora8.add("base_model.model.blocks.0.lora_B.weight", shape{2, 1}, std::vector<float>{3, 4});
  lora8.write(dir / "lora8.safetensors");
  const checkpoint l8 = checkpoint::open(dir / "lora8.safetensors");
  msg = error_of([&] { lora_weights<checkpoint_weights> merged(bw, l8, 1.0); });
  CHECK(contains(msg, "lora_A.weight"));
  CHECK(contains(msg, "F8_E4M3"));
}
