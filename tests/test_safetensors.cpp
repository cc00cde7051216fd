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
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_file.hpp"
#include "unshard/io/safetensors_writer.hpp"

#include "support/error_of.hpp"

namespace fs = std::filesystem;
using unshard::testing::contains;
using unshard::testing::error_of;
using unshard::checkpoint;
using unshard::dtype;
using unshard::safetensors_file;
using unshard::safetensors_writer;
using unshard::shape;

namespace {

// A fresh directory per test case, removed afterwards.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("unshard_test_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

// A hand-made file: u64 LE header length, the header text as given (no padding), data_bytes bytes.
std::string raw_file(const std::string& header, std::size_t data_bytes, std::uint64_t header_len_override = 0) {
  const std::uint64_t n = header_len_override ? header_len_override : header.size();
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  s += header;
  for (std::size_t i = 0; i < data_bytes; ++i) s.push_back(static_cast<char>(i * 7 + 1));
  return s;
}


// Writes `header` + data as a file, opens it, and checks the error names the file and every part.
void expect_bad(const temp_dir& dir, const std::string& case_name, const std::string& file_bytes,
                std::initializer_list<const char*> parts) {
  const std::string path = dir / (case_name + ".safetensors");
  write_bytes(path, file_bytes);
  const std::string msg = error_of([&] { safetensors_file f(path); });
  INFO("case ", case_name, ": ", msg);
  CHECK(contains(msg, path));
  for (const char* p : parts) CHECK_MESSAGE(contains(msg, p), "missing '", p, "'");
}

std::vector<std::byte> as_bytes_vec(const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  return {b, b + n};
}

std::vector<std::byte> file_range(const std::string& path, std::uint64_t offset, std::uint64_t n) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::vector<std::byte> out(n);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(n));
  return out;
}

std::vector<std::uint16_t> read_u16(const safetensors_file& f, const std::string& name) {
  const auto& t = f.at(name);
  std::vector<std::uint16_t> out(t.bytes / 2);
  f.read(t, 0, std::as_writable_bytes(std::span(out)));
  return out;
}

}  // namespace

TEST_CASE("round trip f32, bf16, f16 and raw bytes") {
  temp_dir dir;
  const std::string path = dir / "rt.safetensors";
  const std::vector<float> w = {1.5f, -2.25f, 3.0f, 0.1f, -0.0f, 1e-30f};
  const std::vector<float> b = {1.0f, 1.00390625f, 1.01171875f, 3.14159265f, -2.0f};
  const std::vector<float> h = {1.0f, 65504.0f, 0.1f};
  const std::array<float, 2> raw_vals = {7.0f, -8.5f};
  safetensors_writer wr;
  wr.add("h", shape{3}, h, dtype::f16);
  wr.add("w", shape{2, 3}, w);
  wr.add("b", shape{5}, b, dtype::bf16);
  wr.add("raw", dtype::f32, shape{2}, std::as_bytes(std::span(raw_vals)));
  wr.add("empty", shape{0, 4}, std::span<const float>{}, dtype::bf16);
  wr.set_metadata("format", "pt");
  wr.set_metadata("note", "unshard test");
  wr.write(path);

  safetensors_file f(path);
  CHECK(f.path() == path);
  REQUIRE(f.tensors().size() == 5);
  // Data-offset order, contiguous, each tensor aligned to its element size.
  for (std::size_t i = 1; i < f.tensors().size(); ++i)
    CHECK(f.tensors()[i].offset == f.tensors()[i - 1].offset + f.tensors()[i - 1].bytes);
  for (const auto& t : f.tensors()) {
    REQUIRE(t.type.has_value());
    CHECK(t.offset % unshard::size_of(*t.type) == 0);
  }
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "unshard test");

  const auto header_len = file_range(path, 0, 8);
  std::uint64_t n = 0;
  std::memcpy(&n, header_len.data(), 8);
  CHECK(n % 8 == 0);
  CHECK(fs::file_size(path) == 8 + n + 6 * 4 + 2 * 4 + 5 * 2 + 3 * 2);

  const auto& wi = f.at("w");
  CHECK(wi.dtype_name == "F32");
  CHECK(wi.type == dtype::f32);
  CHECK(wi.dims == shape{2, 3});
  CHECK(wi.bytes == 24);
  const auto wv = f.view("w").as<const float>();
  CHECK(std::equal(wv.begin(), wv.end(), w.begin(), w.end(), [](float x, float y) {
    return std::memcmp(&x, &y, 4) == 0;  // bit-exact, -0.0 included
  }));
  CHECK(file_range(path, f.at("raw").offset, 8) == as_bytes_vec(raw_vals.data(), 8));
  CHECK(f.at("raw").dims == shape{2});

  // bf16, round to nearest even: 1+2^-8 is a tie that goes down to 1.0, 1+3*2^-8 one that goes up.
  CHECK(f.at("b").dtype_name == "BF16");
  CHECK(read_u16(f, "b") == std::vector<std::uint16_t>{0x3F80, 0x3F80, 0x3F82, 0x4049, 0xC000});
  CHECK(f.at("h").dtype_name == "F16");
  CHECK(read_u16(f, "h") == std::vector<std::uint16_t>{0x3C00, 0x7BFF, 0x2E66});

  const auto& e = f.at("empty");
  CHECK(e.bytes == 0);
  CHECK(e.dims == shape{0, 4});
  CHECK(f.view("empty").numel() == 0);

  const checkpoint c = checkpoint::open(path);
  CHECK(c.names() == std::vector<std::string>{"b", "empty", "h", "raw", "w"});
  const auto bf = unshard::read_f32(c, "b");
  CHECK(bf == std::vector<float>{1.0f, 1.0f, 1.015625f, 3.140625f, -2.0f});
  CHECK(unshard::read_f32(c, "w").size() == 6);
  CHECK(unshard::read_f32(c, "h")[1] == 65504.0f);
}

TEST_CASE("an empty writer gives a valid file") {
  temp_dir dir;
  safetensors_writer wr;
  wr.write(dir / "empty.safetensors");
  safetensors_file f(dir / "empty.safetensors");
  CHECK(f.tensors().empty());
  CHECK(f.metadata().empty());
  CHECK(f.find("x") == nullptr);
}

TEST_CASE("partial reads return the right bytes and bytes_read counts exactly them") {
  temp_dir dir;
  const std::string path = dir / "p.safetensors";
  std::vector<float> vals(4 * 8);
  for (std::size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<float>(i) * 0.5f;
  safetensors_writer wr;
  wr.add("a", shape{4, 8}, vals);
  wr.add("b", shape{3}, std::vector<float>{1, 2, 3});
  wr.write(path);

  safetensors_file f(path);
  CHECK(f.bytes_read() == 0);
  const auto& a = f.at("a");
  std::array<float, 8> row{};
  f.read(a, 2 * 8 * 4, std::as_writable_bytes(std::span(row)));  // row 2
  for (std::size_t j = 0; j < 8; ++j) CHECK(row[j] == vals[2 * 8 + j]);
  CHECK(f.bytes_read() == 32);

  std::array<float, 3> tail{};
  f.read(a, (4 * 8 - 3) * 4, std::as_writable_bytes(std::span(tail)));  // last 3 elements, up to the end
  CHECK(tail[2] == vals.back());
  CHECK(f.bytes_read() == 44);
  f.read(a, 128, {});  // empty read at the very end is in bounds
  CHECK(f.bytes_read() == 44);

  std::array<std::byte, 8> buf{};
  std::string msg = error_of([&] { f.read(a, 124, buf); });
  CHECK(contains(msg, "'a'"));
  CHECK(contains(msg, path));
  CHECK(contains(msg, "byte offset 124"));
  msg = error_of([&] { f.read(a, ~std::uint64_t{0}, buf); });  // must not wrap around
  CHECK(contains(msg, "out of bounds"));
  CHECK(f.bytes_read() == 44);  // failed reads count nothing

  // A tensor_info that does not describe this file is refused, not trusted.
  unshard::tensor_info forged = a;
  forged.offset = fs::file_size(path) - 4;
  msg = error_of([&] { f.read(forged, 0, buf); });
  CHECK(contains(msg, "does not lie in the data"));

  SUBCASE("many threads") {
    std::vector<std::thread> threads;
    for (int r = 0; r < 4; ++r)
      threads.emplace_back([&f, &a, r] {
        std::array<std::byte, 16> b{};
        for (int i = 0; i < 100; ++i) f.read(a, static_cast<std::uint64_t>(r) * 16, b);
      });
    for (auto& t : threads) t.join();
    CHECK(f.bytes_read() == 44 + 4 * 100 * 16);
  }
  SUBCASE("moving keeps the mapping and the counter") {
    safetensors_file moved(std::move(f));
    CHECK(moved.bytes_read() == 44);
    CHECK(unshard::read_f32(moved, moved.at("b")) == std::vector<float>{1, 2, 3});
    CHECK(moved.bytes_read() == 56);
  }
  SUBCASE("checkpoint read counts too") {
    const checkpoint c = checkpoint::open(path);
    std::array<std::byte, 4> one{};
    c.read("b", 8, one);
    float v;
    std::memcpy(&v, one.data(), 4);
    CHECK(v == 3.0f);
    CHECK(c.bytes_read() == 4);
    msg = error_of([&] { c.read("b", 9, one); });
    CHECK(contains(msg, "'b'"));
    CHECK(c.bytes_read() == 4);
  }
}

TEST_CASE("zero-element tensors, other dtypes and misaligned data") {
  temp_dir dir;
  const std::string path = dir / "mixed.safetensors";
  // A 2-byte U8 tensor first puts the F32 tensor at a data offset of 2: readable, not viewable.
  // The header is padded to 8 bytes, as writers do, so the data section itself starts aligned.
  std::string header = R"({"u":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                       R"("f":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},)"
                       R"("z":{"dtype":"F32","shape":[3,0],"data_offsets":[6,6]},)"
                       R"("i":{"dtype":"I64","shape":[2],"data_offsets":[6,22]},)"
                       R"("e":{"dtype":"F8_E4M3","shape":[3],"data_offsets":[22,25]},)"
                       R"("q":{"dtype":"F4","shape":[2,3],"data_offsets":[25,28]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  write_bytes(path, raw_file(header, 28));
  safetensors_file f(path);
  CHECK(f.tensors().size() == 6);
  CHECK(f.at("i").dtype_name == "I64");
  CHECK_FALSE(f.at("i").type.has_value());
  CHECK(f.at("z").bytes == 0);
  CHECK(f.at("z").dims == shape{3, 0});
  CHECK(f.at("f").offset % 4 != 0);
  std::string msg = error_of([&] { (void)f.view("i"); });
  CHECK(contains(msg, "'i'"));
  CHECK(contains(msg, "I64"));
  msg = error_of([&] { (void)f.view("f"); });
  CHECK(contains(msg, "not aligned"));
  CHECK(unshard::read_f32(f, f.at("f")).size() == 1);
  msg = error_of([&] { (void)f.at("nope"); });
  CHECK(contains(msg, "'nope'"));
  CHECK(contains(msg, path));
}

TEST_CASE("reads the shipped Wan tiny vector") {
  const std::string path = UNSHARD_TEST_DATA_DIR "/wan_tiny_a.safetensors";
  const checkpoint c = checkpoint::open(path);
  const auto& q = c.at("blocks.0.self_attn.q.weight");
  CHECK(q.dims == shape{128, 128});
  CHECK(q.dtype_name == "F32");
  CHECK(q.type == dtype::f32);
  CHECK(q.bytes == 128 * 128 * 4);
  CHECK(c.names().size() == 97);
  const auto v = c.view("blocks.0.self_attn.q.weight").as<const float>();
  const auto r = unshard::read_f32(c, "blocks.0.self_attn.q.weight");
  REQUIRE(r.size() == v.size());
  CHECK(std::memcmp(r.data(), v.data(), r.size() * 4) == 0);
  CHECK(std::all_of(r.begin(), r.end(), [](float x) { return std::isfinite(x); }));
  CHECK(c.bytes_read() == 128 * 128 * 4);

  safetensors_file f(path);
  CHECK(f.metadata().at("model_type") == "t2v");
  CHECK(f.metadata().at("dim") == "128");
  CHECK(f.metadata().count("source_commit") == 1);

  safetensors_file la(UNSHARD_TEST_DATA_DIR "/liveavatar_tiny_a.safetensors");
  CHECK(la.at("blocks.0.self_attn.q.weight").dims == shape{64, 64});
}

TEST_CASE("index.json over two files") {
  temp_dir dir;
  safetensors_writer w1, w2;
  w1.add("x", shape{2}, std::vector<float>{1, 2});
  w1.add("y", shape{1, 2}, std::vector<float>{3, 4}, dtype::bf16);
  w1.add("unlisted", shape{1}, std::vector<float>{9});  // present in a file, not in the index
  w2.add("z", shape{3}, std::vector<float>{5, 6, 7}, dtype::f16);
  w1.write(dir / "model-00001-of-00002.safetensors");
  w2.write(dir / "model-00002-of-00002.safetensors");
  const std::string index = dir / "model.safetensors.index.json";
  write_bytes(index, R"({"metadata":{"total_size":18},"weight_map":{)"
                     R"("x":"model-00001-of-00002.safetensors","z":"model-00002-of-00002.safetensors",)"
                     R"("y":"model-00001-of-00002.safetensors"}})");

  const checkpoint c = checkpoint::open(index);
  CHECK(c.path() == index);
  CHECK(c.file_count() == 2);
  CHECK(c.names() == std::vector<std::string>{"x", "y", "z"});
  CHECK(c.find("unlisted") == nullptr);
  CHECK(unshard::read_f32(c, "x") == std::vector<float>{1, 2});
  CHECK(unshard::read_f32(c, "y") == std::vector<float>{3, 4});
  CHECK(unshard::read_f32(c, "z") == std::vector<float>{5, 6, 7});
  CHECK(c.bytes_read() == 8 + 4 + 6);
  CHECK(c.view("z").load(2) == 7.0f);
  CHECK(c.at("y").dims == shape{1, 2});
  const std::string msg = error_of([&] { (void)c.at("w"); });
  CHECK(contains(msg, "'w'"));
  CHECK(contains(msg, index));
}

TEST_CASE("bad index files") {
  temp_dir dir;
  safetensors_writer w;
  w.add("x", shape{1}, std::vector<float>{1});
  w.write(dir / "a.safetensors");
  const auto bad = [&](const std::string& name, const std::string& text, std::initializer_list<std::string> parts) {
    const std::string path = dir / name;
    write_bytes(path, text);
    const std::string msg = error_of([&] { (void)checkpoint::open(path); });
    INFO(name, ": ", msg);
    CHECK(contains(msg, path));
    for (const auto& p : parts) CHECK(contains(msg, p));
  };
  bad("invalid.json", R"({"weight_map": {"x": "a.safetensors",}})", {"invalid JSON"});
  bad("no_map.json", R"({"metadata": {}})", {"weight_map"});
  bad("map_not_object.json", R"({"weight_map": ["a.safetensors"]})", {"weight_map"});
  bad("not_string.json", R"({"weight_map": {"x": 3}})", {"'x'"});
  bad("missing_file.json", R"({"weight_map": {"x": "nope.safetensors"}})", {"nope.safetensors", "does not exist", "'x'"});
  bad("missing_tensor.json", R"({"weight_map": {"x": "a.safetensors", "ghost": "a.safetensors"}})",
      {"'ghost'", "a.safetensors", "does not contain"});
  bad("dup.json", R"({"weight_map": {"x": "a.safetensors", "x": "a.safetensors"}})", {"duplicate", "'x'"});
  const std::string msg = error_of([&] { (void)checkpoint::open(dir / "absent.safetensors"); });
  CHECK(contains(msg, "absent.safetensors"));
}

TEST_CASE("writer errors name the culprit") {
  safetensors_writer w;
  w.add("a", shape{2}, std::vector<float>{1, 2});
  std::string msg = error_of([&] { w.add("a", shape{1}, std::vector<float>{1}); });
  CHECK(contains(msg, "duplicate tensor name 'a'"));
  const std::array<std::byte, 6> six{};
  msg = error_of([&] { w.add("b", dtype::f32, shape{2}, six); });
  CHECK(contains(msg, "'b'"));
  CHECK(contains(msg, "needs 8"));
  msg = error_of([&] { w.add("c", shape{2, 2}, std::vector<float>{1, 2, 3}); });
  CHECK(contains(msg, "'c'"));
  msg = error_of([&] { w.add("__metadata__", shape{1}, std::vector<float>{1}); });
  CHECK(contains(msg, "reserved"));
  msg = error_of([&] { w.add("d", shape{-1}, std::vector<float>{}); });
  CHECK(contains(msg, "'d'"));
  const std::string bad_path = "/nonexistent-unshard-dir/x.safetensors";
  msg = error_of([&] { w.write(bad_path); });
  CHECK(contains(msg, bad_path));
  temp_dir dir;
  safetensors_writer bad_name;
  bad_name.add("\xff", shape{1}, std::vector<float>{1});  // not UTF-8: JSON cannot carry it
  msg = error_of([&] { bad_name.write(dir / "x.safetensors"); });
  CHECK(contains(msg, "x.safetensors"));
  CHECK_FALSE(fs::exists(dir / "x.safetensors"));
}

TEST_CASE("every malformed file is a clear error naming the culprit") {
  temp_dir dir;
  const std::string ok_entry = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const auto one = [&](const std::string& entry, std::size_t data = 8) {
    return raw_file(R"({"t":)" + entry + "}", data);
  };

  expect_bad(dir, "short", std::string("abcde"), {"5 bytes", "shorter than the 8-byte"});
  expect_bad(dir, "empty", std::string(), {"0 bytes"});
  expect_bad(dir, "len_beyond", raw_file("{}", 0, 1000), {"header length 1000", "beyond the file size"});
  {
    // Sparse, so the file is large without using disk: the header length fits but is absurd.
    const std::string path = dir / "absurd.safetensors";
    write_bytes(path, raw_file("{}", 0, 200'000'000));
    fs::resize_file(path, 200'000'100);
    const std::string msg = error_of([&] { safetensors_file f(path); });
    CHECK(contains(msg, path));
    CHECK(contains(msg, "absurd"));
  }
  expect_bad(dir, "bad_json", raw_file(R"({"t": {"dtype": F32}})", 0), {"invalid JSON", "byte offset 24"});
  expect_bad(dir, "trailing_json", raw_file(R"({} {})", 0), {"invalid JSON"});
  expect_bad(dir, "bad_utf8", raw_file("{\"\xff\":1}", 0), {"invalid JSON"});
  expect_bad(dir, "not_object", raw_file("[1,2]", 0), {"header is not a JSON object"});
  expect_bad(dir, "deep", raw_file(R"({"t":)" + std::string(100, '[') + std::string(100, ']') + "}", 0),
             {"nested deeper"});
  expect_bad(dir, "entry_not_object", raw_file(R"({"t":5})", 0), {"tensor 't'", "not a JSON object"});
  expect_bad(dir, "no_dtype", one(R"({"shape":[2],"data_offsets":[0,8]})"), {"tensor 't'", "no \"dtype\""});
  expect_bad(dir, "no_shape", one(R"({"dtype":"F32","data_offsets":[0,8]})"), {"tensor 't'", "no \"shape\""});
  expect_bad(dir, "no_offsets", one(R"({"dtype":"F32","shape":[2]})"), {"tensor 't'", "no \"data_offsets\""});
  expect_bad(dir, "dtype_not_string", one(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})"), {"tensor 't'", "dtype"});
  expect_bad(dir, "unknown_dtype", one(R"({"dtype":"F33","shape":[2],"data_offsets":[0,8]})"),
             {"tensor 't'", "unknown dtype 'F33'"});
  expect_bad(dir, "shape_not_array", one(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})"), {"tensor 't'", "shape"});
  expect_bad(dir, "negative_dim", one(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"),
             {"tensor 't'", "dimension 0", "non-negative"});
  expect_bad(dir, "float_dim", one(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"), {"tensor 't'", "dimension 0"});
  expect_bad(dir, "huge_dim", one(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]})"),
             {"tensor 't'", "dimension 0"});
  expect_bad(dir, "overflow", one(R"({"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})", 0),
             {"tensor 't'", "overflows"});
  expect_bad(dir, "overflow_bytes", one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})"),
             {"tensor 't'", "overflows"});
  expect_bad(dir, "rank7", one(R"({"dtype":"F32","shape":[1,1,1,1,1,1,2],"data_offsets":[0,8]})"),
             {"tensor 't'", "rank 7"});
  expect_bad(dir, "offsets_three", one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4,8]})"),
             {"tensor 't'", "data_offsets must be 2 non-negative integers"});
  expect_bad(dir, "offsets_negative", one(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})"),
             {"tensor 't'", "data_offsets must be 2 non-negative integers"});
  expect_bad(dir, "offsets_string", one(R"({"dtype":"F32","shape":[2],"data_offsets":"0-8"})"),
             {"tensor 't'", "data_offsets"});
  expect_bad(dir, "begin_after_end", one(R"({"dtype":"F32","shape":[0],"data_offsets":[8,0]})"),
             {"tensor 't'", "begin after end"});
  expect_bad(dir, "end_beyond", one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})"),
             {"tensor 't'", "beyond the data section of 8 bytes"});
  expect_bad(dir, "byte_count", one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"),
             {"tensor 't'", "hold 8 bytes", "needs 12"});
  expect_bad(dir, "byte_count_i64", one(R"({"dtype":"I64","shape":[2],"data_offsets":[0,8]})"),
             {"tensor 't'", "needs 16"});
  expect_bad(dir, "byte_count_bf16", one(R"({"dtype":"BF16","shape":[2],"data_offsets":[0,8]})"),
             {"tensor 't'", "needs 4"});
  expect_bad(dir, "byte_count_f8", one(R"({"dtype":"F8_E5M2","shape":[2],"data_offsets":[0,8]})"),
             {"tensor 't'", "needs 2"});
  expect_bad(dir, "byte_count_f4", one(R"({"dtype":"F4","shape":[3],"data_offsets":[0,8]})"),
             {"tensor 't'", "fraction"});
  expect_bad(dir, "overlap",
             raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                      12),
             {"tensor 'b'", "overlaps tensor 'a'", "byte offset"});
  expect_bad(dir, "hole",
             raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                      12),
             {"hole of 4 bytes", "'b'"});
  expect_bad(dir, "trailing", one(ok_entry, 12), {"4 trailing bytes"});
  expect_bad(dir, "duplicate_name",
             raw_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      8),
             {"duplicate tensor name 't'"});
  expect_bad(dir, "duplicate_field", one(R"({"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]})"),
             {"duplicate key 'dtype'", "'t'"});
  expect_bad(dir, "metadata_not_string", raw_file(R"({"__metadata__":{"k":"v","n":3}})", 0),
             {"__metadata__", "'n'", "not a string"});
  expect_bad(dir, "metadata_not_object", raw_file(R"({"__metadata__":"x"})", 0), {"__metadata__", "not a JSON object"});

  // A directory is not a safetensors file.
  const std::string msg = error_of([&] { safetensors_file f(dir.path.string()); });
  CHECK(contains(msg, dir.path.string()));
}
