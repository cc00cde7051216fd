#pragma once
// How a layer sees its parameters on a rank: as views fixed for the session (gathered units: the
// buffer a unit lands in never changes), or, under chunked unshard, through a weight_stream that
// hands each chunk over as it lands (a param_source, layer/param_source.hpp).
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/param_spec.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/runtime/shard_loading.hpp"

namespace unshard {

// Parameter views per unit and sub-unit, in declared order. Resident parameters point into the
// unit's resident buffer; sharded ones into its gathered buffer, except under chunked unshard,
// where they have no data (the weight_stream provides them chunk by chunk). Under fp8 the view of
// a quantized weight carries its scales (a resident parameter of the unit), also when it has no
// data: the weight_stream takes them from there for each chunk.
inline std::vector<std::vector<param_views>> build_unit_views(const std::vector<unit_layout>& units,
                                                              const unit_buffers& buffers, bool chunked) {
  std::vector<std::vector<param_views>> views;
  views.reserve(units.size());
  for (std::size_t u = 0; u < units.size(); ++u) {
    const unit_layout& ul = units[u];
    std::vector<tensor_view> sharded, resident;
    if (ul.gathered_bytes() && !chunked) ul.sharded.views_into(buffers.gathered(u), ul.sharded_params, sharded);
    if (ul.resident.used_bytes()) ul.resident.views_into(buffers.resident[u].data(), ul.resident_params, resident);
    const auto scaled = [&](const param_slot& s, tensor_view v) {
      const std::vector<std::size_t>& scales = s.resident ? ul.resident_scale : ul.sharded_scale;
      if (scales.empty() || scales[s.index] == unit_layout::no_scale) return v;
      const tensor_view& sc = resident[scales[s.index]];
      return v.with_scales(reinterpret_cast<const float*>(sc.data()), static_cast<std::size_t>(sc.numel()));
    };
    std::vector<param_views> per_sub;
    for (const auto& slots : ul.slots) {
      std::vector<tensor_view> v;
      for (const param_slot& s : slots)
        v.push_back(scaled(s, s.resident ? resident[s.index] : chunked ? tensor_view{} : sharded[s.index]));
      per_sub.emplace_back(std::move(v));
    }
    views.push_back(std::move(per_sub));
  }
  return views;
}

// A sub-unit's parameters under chunked unshard: resident ones at once, streamed ones chunk by
// chunk in declared order. Going back to a parameter already passed is an error naming it: the
// chunk sequence is fixed, so a mismatch would otherwise feed one weight's bytes to another.
//
// Feed is the rank's chunk schedule (rank_runtime):
//   feed.unit(u)                  the unit's layout
//   feed.resident_view(u, s, i)   view i of sub-unit s (resident parameters)
//   feed.chunk_at(g)              chunk g of the forward's chunk sequence
//   feed.chunk_end(u)             one past the last chunk of unit u
//   feed.acquire_chunk(g, turn)   waits until chunk g has landed; its buffer
//   feed.release_chunk(g)         this lane is done with chunk g
template <class Feed>
class weight_stream {
 public:
  // `next` is the lane's position in the chunk sequence (shared by the sub-units of a forward);
  // `turn` the lane's place in the tick (lane_turns.hpp).
  weight_stream(Feed& feed, std::size_t unit, std::size_t sub, std::size_t& next, std::size_t turn)
      : feed_(feed), unit_(feed.unit(unit)), sub_(sub), next_(next), end_(feed.chunk_end(unit)), turn_(turn) {}
  weight_stream(const weight_stream&) = delete;
  weight_stream& operator=(const weight_stream&) = delete;
  ~weight_stream() {
    if (held_) feed_.release_chunk(held_at_);
  }

  shape dims(std::size_t i) const { return spec(i).dims; }

  tensor_view whole(std::size_t i) {
    const param_slot& sl = slot(i);
    if (sl.resident) return feed_.resident_view(unit_.info.index, sub_, i);
    if (held_ && covers(feed_.chunk_at(held_at_), sl.index)) return with_scales_of(i, view_in_held(sl.index));
    release_held();
    const weight_chunk& c = expect(sl.index);
    if (c.split)
      throw_error("layer sub-unit ", unit_.name, "/", sub_, ": parameter '", spec(i).name,
                  "' streams in runs of rows; read it with rows(), not whole()");
    held_at_ = next_++;
    held_buffer_ = feed_.acquire_chunk(held_at_, turn_);
    held_ = true;
    return with_scales_of(i, view_in_held(sl.index));
  }

  template <class F>
  void rows(std::size_t i, F&& f) {
    const param_slot& sl = slot(i);
    const bool streamed_in_runs = !sl.resident && !(held_ && covers(feed_.chunk_at(held_at_), sl.index)) &&
                                  next_ < end_ && feed_.chunk_at(next_).split;
    if (!streamed_in_runs) {
      const tensor_view v = whole(i);
      f(v, std::int64_t{0}, v.dims()[0]);
      return;
    }
    release_held();
    expect(sl.index);
    const param_spec& p = spec(i);
    while (next_ < end_ && feed_.chunk_at(next_).split && feed_.chunk_at(next_).first_param == sl.index) {
      const weight_chunk& c = feed_.chunk_at(next_);
      std::byte* buf = feed_.acquire_chunk(next_, turn_);
      tensor_view chunk(buf, p.type, p.dims.with_rows(c.row_end - c.row_begin));
      if (const tensor_view& scales = feed_.resident_view(unit_.info.index, sub_, i); scales.has_scales()) {
        const auto [first, count] = scales.scales_of_rows(c.row_begin, c.row_end);  // fp8: this chunk's rows'
        chunk = chunk.with_scales(first, count);
      }
      f(chunk, c.row_begin, c.row_end);
      feed_.release_chunk(next_++);
    }
  }

  // End of the sub-unit: give back the held chunk and pass over the chunks of parameters it did
  // not read (a sub-unit with nothing to do in this call). They were gathered all the same: every
  // rank runs the same chunk sequence, so the collectives stay matched.
  void finish() {
    release_held();
    while (next_ < end_ && unit_.sharded_subunit[feed_.chunk_at(next_).first_param] == sub_) skip_chunk();
  }

 private:
  const param_slot& slot(std::size_t i) const {
    const auto& slots = unit_.slots[sub_];
    if (i >= slots.size())
      throw_error("layer sub-unit ", unit_.name, "/", sub_, ": parameter ", i, " out of range (", slots.size(),
                  " declared)");
    return slots[i];
  }
  const param_spec& spec(std::size_t i) const {
    const param_slot& sl = slot(i);
    return sl.resident ? unit_.resident_params[sl.index] : unit_.sharded_params[sl.index];
  }
  static bool covers(const weight_chunk& c, std::size_t k) { return !c.split && c.first_param <= k && k <= c.last_param; }

  // The next chunk must hold streamed parameter k (whole or its first rows); chunks of parameters
  // declared before k and never read are passed over.
  const weight_chunk& expect(std::size_t k) {
    while (next_ < end_ && feed_.chunk_at(next_).last_param < k &&
           unit_.sharded_subunit[feed_.chunk_at(next_).first_param] == sub_)
      skip_chunk();
    if (next_ >= end_ || feed_.chunk_at(next_).first_param > k || feed_.chunk_at(next_).last_param < k ||
        (feed_.chunk_at(next_).split && feed_.chunk_at(next_).row_begin != 0)) {
      const std::string next = next_ < end_ ? unit_.sharded_params[feed_.chunk_at(next_).first_param].name : "nothing";
      throw_error("layer sub-unit ", unit_.name, "/", sub_, " read parameter '", unit_.sharded_params[k].name,
                  "' out of order: under chunked unshard streamed parameters are read once, in declared order "
                  "(the next chunk holds '", next, "')");
    }
    return feed_.chunk_at(next_);
  }
  // fp8: a streamed weight's view gets the scales its (data-less) session view carries.
  tensor_view with_scales_of(std::size_t i, const tensor_view& v) const {
    const tensor_view& scales = feed_.resident_view(unit_.info.index, sub_, i);
    return scales.has_scales() ? v.with_scales(scales.scales(), scales.scale_count()) : v;
  }
  tensor_view view_in_held(std::size_t k) const {
    const param_spec& p = unit_.sharded_params[k];
    const std::size_t offset = unit_.sharded.entry(k).offset - feed_.chunk_at(held_at_).begin;
    return tensor_view(held_buffer_ + offset, p.type, p.dims);
  }
  void skip_chunk() {
    feed_.acquire_chunk(next_, turn_);
    feed_.release_chunk(next_++);
  }
  void release_held() {
    if (!held_) return;
    feed_.release_chunk(held_at_);
    held_ = false;
  }

  Feed& feed_;
  const unit_layout& unit_;
  std::size_t sub_;
  std::size_t& next_;
  std::size_t end_;
  std::size_t turn_;
  bool held_ = false;
  std::size_t held_at_ = 0;
  std::byte* held_buffer_ = nullptr;
};

}  // namespace unshard
